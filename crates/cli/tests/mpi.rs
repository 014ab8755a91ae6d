//! Multi-process runs (`--features mpi`, under `mpirun`): with 1, 2 and 4
//! processes the gradient, HVP, GGN product, CG solution, K-FAC factors,
//! influence and self-influence scores equal the single-process results up to
//! summation order (1e-12 relative; the CG solution 1e-9); an error on one rank
//! ends the whole job quickly with a non-zero status.
#![cfg(feature = "mpi")]

mod common;

use common::*;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// `mpirun -n k hvp args…` on loopback (root allowed, as in CI containers).
fn mpirun(k: usize, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("mpirun");
    cmd.args(["-n", &k.to_string(), "--oversubscribe", "--mca", "btl", "self,vader"])
        .args(["--mca", "oob_tcp_if_include", "lo", env!("CARGO_BIN_EXE_hvp")])
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .env("HVP_CACHE_DIR", test_cache_dir());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("mpirun runs (install openmpi-bin)")
}

fn ok_mpi(k: usize, args: &[&str]) -> String {
    let o = mpirun(k, args, &[]);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "mpirun -n {k} hvp {args:?} failed: {stderr}");
    String::from_utf8_lossy(&o.stdout).into_owned() + &stderr
}

fn max_relative_difference(a: &std::path::Path, b: &std::path::Path) -> f64 {
    let (a, b) = (read_flat(a), read_flat(b));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let mut worst: f64 = 0.0;
    for (k, x) in &a {
        let scale = x.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-300);
        for (p, q) in x.iter().zip(&b[k]) {
            worst = worst.max((p - q).abs() / scale);
        }
    }
    worst
}

fn mlp_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "--arch",
        "mlp:64,16,10",
        "--inputs",
        "X",
        "--labels",
        "Y",
        "--dtype",
        "f64",
        "--batch-size",
        "3",
        "--quiet",
    ];
    v.extend(extra);
    v
}

/// Runs `args` (with X, Y, W, V placeholders for the MLP fixture) in one plain
/// process and under mpirun with 1, 2 and 4 processes; returns the worst
/// relative difference of the `--out` files.
fn compare_counts(tmp: &TempDir, command: &[&str], out_name: &str) -> f64 {
    let dir = fixture("mlp");
    let subst = |s: &str| -> String {
        match s {
            "X" => dir.join("inputs.npy").to_string_lossy().into_owned(),
            "Y" => dir.join("labels.npy").to_string_lossy().into_owned(),
            "W" => dir.join("weights.safetensors").to_string_lossy().into_owned(),
            "V" => dir.join("vector.safetensors").to_string_lossy().into_owned(),
            other => other.to_string(),
        }
    };
    let run = |k: Option<usize>| -> std::path::PathBuf {
        let out = tmp.path(&format!("{}-{out_name}", k.map_or("plain".into(), |k| k.to_string())));
        let mut args: Vec<String> = command.iter().map(|s| subst(s)).collect();
        args.extend(["--out".to_string(), out.to_string_lossy().into_owned()]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        match k {
            None => {
                ok(&refs);
            }
            Some(k) => {
                ok_mpi(k, &refs);
            }
        }
        out
    };
    let plain = run(None);
    let mut worst: f64 = 0.0;
    for k in [1, 2, 4] {
        let d = max_relative_difference(&plain, &run(Some(k)));
        eprintln!("{out_name}: {k} processes, max relative difference {d:.2e}");
        worst = worst.max(d);
    }
    worst
}

#[test]
fn gradient_hvp_and_ggn_equal_one_process() {
    let tmp = TempDir::new("mpi-products");
    let mut grad = vec!["grad"];
    grad.extend(mlp_args(&["--weights", "W"]));
    assert!(compare_counts(&tmp, &grad, "grad.safetensors") < 1e-12);
    for curvature in ["hessian", "ggn"] {
        let mut product = vec!["product"];
        product.extend(mlp_args(&["--weights", "W", "--vector", "V", "--curvature", curvature]));
        assert!(compare_counts(&tmp, &product, &format!("{curvature}.safetensors")) < 1e-12);
    }
}

#[test]
fn cg_solution_and_kfac_factors_equal_one_process() {
    let tmp = TempDir::new("mpi-solve");
    let mut solve = vec!["solve"];
    solve.extend(mlp_args(&[
        "--weights",
        "W",
        "--rhs",
        "V",
        "--solver",
        "cg",
        "--curvature",
        "ggn",
        "--damping",
        "0.1",
    ]));
    assert!(compare_counts(&tmp, &solve, "x.safetensors") < 1e-9);
    // Factors hold eigenbases, whose signs rounding may flip: compare what they
    // are for, the EK-FAC inverse product, computed in one process from each.
    let dir = fixture("mlp");
    let (x, y, w, v) = (
        dir.join("inputs.npy"),
        dir.join("labels.npy"),
        dir.join("weights.safetensors"),
        dir.join("vector.safetensors"),
    );
    let data: Vec<&str> = vec![
        "--arch",
        "mlp:64,16,10",
        "--weights",
        w.to_str().unwrap(),
        "--inputs",
        x.to_str().unwrap(),
        "--labels",
        y.to_str().unwrap(),
        "--dtype",
        "f64",
        "--batch-size",
        "3",
        "--quiet",
    ];
    let inverse = |k: Option<usize>| -> std::path::PathBuf {
        let f = tmp.path(&format!("f-{k:?}.safetensors"));
        let mut args = vec!["factors", "--kind", "ekfac", "--out", f.to_str().unwrap()];
        args.extend(&data);
        match k {
            None => {
                ok(&args);
            }
            Some(k) => {
                ok_mpi(k, &args);
            }
        }
        let out = tmp.path(&format!("kx-{k:?}.safetensors"));
        let mut solve = vec![
            "solve",
            "--solver",
            "ekfac",
            "--damping",
            "0.1",
            "--factors",
            f.to_str().unwrap(),
        ];
        solve.extend(["--rhs", v.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        solve.extend(&data);
        ok(&solve);
        out
    };
    let plain = inverse(None);
    for k in [1, 2, 4] {
        let d = max_relative_difference(&plain, &inverse(Some(k)));
        eprintln!("EK-FAC inverse product: {k} processes, max relative difference {d:.2e}");
        assert!(d < 1e-9, "EK-FAC factors from {k} processes differ: {d:e}");
    }
}

#[test]
fn influence_and_self_influence_scores_equal_one_process() {
    let tmp = TempDir::new("mpi-influence");
    let dir = fixture("mlp");
    let data = format!(
        "npy:{},{}",
        dir.join("inputs.npy").display(),
        dir.join("labels.npy").display()
    );
    let weights = dir.join("weights.safetensors").to_string_lossy().into_owned();
    let scores = |k: Option<usize>| -> Vec<f64> {
        let out = tmp.path(&format!("inf-{k:?}.csv"));
        let args = [
            "influence",
            "--arch",
            "mlp:64,16,10",
            "--weights",
            &weights,
            "--train",
            &data,
            "--test",
            &data,
            "--test-indices",
            "0,5",
            "--solver",
            "cg",
            // The MLP's Hessian is indefinite (CG would fail); the GGN is not.
            "--curvature",
            "ggn",
            "--damping",
            "0.1",
            "--dtype",
            "f64",
            "--batch-size",
            "5",
            "--quiet",
            "--out",
            out.to_str().unwrap(),
        ];
        match k {
            None => {
                ok(&args);
            }
            Some(k) => {
                ok_mpi(k, &args);
            }
        }
        std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| l.split(',').nth(2).unwrap().parse().unwrap())
            .collect()
    };
    let plain = scores(None);
    assert_eq!(plain.len(), 64);
    let scale = plain.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    for k in [2, 4] {
        let other = scores(Some(k));
        let worst = plain.iter().zip(&other).fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst < 1e-9 * scale, "{k} processes: influence differs by {worst:e}");
    }

    let mut self_inf = vec!["self-influence"];
    self_inf.extend(mlp_args(&["--weights", "W"]));
    let plain = tmp.path("self-plain.csv");
    let mut args: Vec<String> = self_inf
        .iter()
        .map(|s| match *s {
            "X" => dir.join("inputs.npy").to_string_lossy().into_owned(),
            "Y" => dir.join("labels.npy").to_string_lossy().into_owned(),
            "W" => weights.clone(),
            o => o.to_string(),
        })
        .collect();
    args.extend(["--out".into(), plain.to_string_lossy().into_owned()]);
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let last = args.len() - 1;
    args[last] = tmp.s("self-2.csv");
    ok_mpi(2, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap();
    let (a, b) = (read(&plain), read(&tmp.path("self-2.csv")));
    assert_eq!(a.lines().count(), b.lines().count());
    for (x, y) in a.lines().zip(b.lines()).skip(1) {
        let value = |l: &str| l.split(',').nth(2).unwrap().parse::<f64>().unwrap();
        assert!(
            (value(x) - value(y)).abs() <= 1e-12 * value(x).abs().max(1e-300),
            "{x} vs {y}"
        );
    }
}

#[test]
fn an_error_on_one_rank_ends_the_job_quickly() {
    let tmp = TempDir::new("mpi-fail");
    let dir = fixture("mlp");
    let out = tmp.path("g.safetensors");
    let (x, y, w) = (
        dir.join("inputs.npy"),
        dir.join("labels.npy"),
        dir.join("weights.safetensors"),
    );
    let start = Instant::now();
    let o = mpirun(
        2,
        &[
            "grad",
            "--arch",
            "mlp:64,16,10",
            "--weights",
            w.to_str().unwrap(),
            "--inputs",
            x.to_str().unwrap(),
            "--labels",
            y.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &[("HVP_TEST_FAIL_RANK", "1")],
    );
    let elapsed = start.elapsed();
    let all = String::from_utf8_lossy(&o.stderr).into_owned() + &String::from_utf8_lossy(&o.stdout);
    assert!(!o.status.success(), "the job succeeded: {all}");
    assert!(all.contains("rank 1: error: failure injected on rank 1"), "{all}");
    assert!(elapsed < Duration::from_secs(20), "the job took {elapsed:?} to end");
    assert!(!out.exists(), "an output was written");
}
