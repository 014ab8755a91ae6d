//! The solver commands through the command line on the bundled Fashion-MNIST
//! subset: solve (every solver) with its JSON report, factors, spectrum and
//! subsample-error, whose predicted error must be within a factor of 2 of the
//! measured one for m ≥ 100.

mod common;

use common::*;

fn data() -> String {
    format!("mnist:{}", repo_root().join("data/fashion-mnist-subset").display())
}

#[test]
fn every_solver_from_the_cli_with_reports() {
    let tmp = TempDir::new("solve");
    let (w, g) = (tmp.s("w.safetensors"), tmp.s("g.safetensors"));
    let d = data();
    let arch = "mlp:784,16,10";
    ok(&["init", "--arch", arch, "--seed", "3", "--out", &w]);
    ok(&[
        "grad",
        "--arch",
        arch,
        "--weights",
        &w,
        "--dataset",
        &format!("{d}:test"),
        "--limit",
        "1",
        "--dtype",
        "f64",
        "--out",
        &g,
    ]);
    let f = tmp.s("f.safetensors");
    let common = [
        "--arch",
        arch,
        "--weights",
        &w,
        "--dataset",
        &d,
        "--limit",
        "500",
        "--dtype",
        "f64",
        "--quiet",
    ];
    let mut fa = common.to_vec();
    fa.extend(["--kind", "ekfac", "--out", &f]);
    let mut args = vec!["factors"];
    args.extend(fa);
    ok(&args);
    for solver in ["cg", "pcg", "arnoldi", "lissa", "kfac", "ekfac"] {
        let (x, r) = (
            tmp.s(&format!("x-{solver}.safetensors")),
            tmp.s(&format!("r-{solver}.json")),
        );
        let mut args = vec!["solve"];
        args.extend(common);
        args.extend([
            "--rhs",
            &g,
            "--solver",
            solver,
            "--curvature",
            "ggn",
            "--damping",
            "0.05",
            "--factors",
            &f,
            "--depth",
            "300",
            "--out",
            &x,
            "--report",
            &r,
        ]);
        ok(&args);
        let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&r).unwrap()).unwrap();
        let residual = report["relative_residual"].as_f64().unwrap();
        assert!(
            residual.is_finite() && report["products"].as_u64().unwrap() >= 1,
            "{solver}: {report}"
        );
        assert_eq!(report["damping"].as_f64(), Some(0.05));
        assert_eq!(report["examples"].as_u64(), Some(500));
        if solver == "cg" || solver == "pcg" {
            assert!(residual < 1e-6 && report["converged"] == true, "{solver}: {report}");
        }
    }
    // The direct solver refuses a model above its stated limit, with the reason.
    let x = tmp.s("x.safetensors");
    let mut args = vec!["solve"];
    args.extend(common);
    args.extend(["--rhs", &g, "--solver", "direct", "--out", &x]);
    let o = hvp(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("refuses more than 10000 parameters"),
        "{err}"
    );
}

#[test]
fn spectrum_and_subsample_error_predictions_on_real_mnist() {
    let tmp = TempDir::new("subsample");
    let (w, v) = (tmp.s("w.safetensors"), tmp.s("v.safetensors"));
    let d = format!("mnist:{}", repo_root().join("data/mnist-subset").display());
    let arch = "mlp:784,16,10";
    ok(&["init", "--arch", arch, "--seed", "4", "--out", &w]);
    ok(&["init", "--arch", arch, "--seed", "5", "--random-vector", "--out", &v]);
    let out = ok(&[
        "spectrum",
        "--arch",
        arch,
        "--weights",
        &w,
        "--dataset",
        &d,
        "--limit",
        "300",
        "--dtype",
        "f64",
        "--top",
        "3",
        "--curvature",
        "ggn",
    ]);
    assert!(out.contains("trace estimate") && out.contains("| 1 |"), "{out}");

    let r = tmp.s("sub.json");
    ok(&[
        "subsample-error",
        "--arch",
        arch,
        "--weights",
        &w,
        "--dataset",
        &d,
        "--vector",
        &v,
        "--dtype",
        "f64",
        "--sizes",
        "100,250,500",
        "--repeats",
        "6",
        "--predict-batches",
        "12",
        "--seed",
        "1",
        "--report",
        &r,
        "--quiet",
    ]);
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&r).unwrap()).unwrap();
    for row in report["rows"].as_array().unwrap() {
        let (measured, predicted) = (
            row["measured_mean"].as_f64().unwrap(),
            row["predicted"].as_f64().unwrap(),
        );
        let ratio = predicted / measured;
        assert!(
            (0.5..=2.0).contains(&ratio),
            "m = {}: predicted {predicted} vs measured {measured}",
            row["m"]
        );
    }
}

#[test]
fn factors_checkpoint_is_removed_when_done_and_a_foreign_one_is_refused() {
    let tmp = TempDir::new("factors-resume");
    let w = tmp.s("w.safetensors");
    let arch = "mlp:784,16,10";
    ok(&["init", "--arch", arch, "--seed", "3", "--out", &w]);
    let d = format!("{}:train", data());
    let f = tmp.s("f.safetensors");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "factors",
            "--arch",
            arch,
            "--weights",
            &w,
            "--dataset",
            &d,
            "--limit",
            "200",
            "--kind",
            "ekfac",
            "--out",
            &f,
            "--quiet",
        ];
        args.extend(extra);
        hvp(&args)
    };
    let done = run(&["--checkpoint-every", "0", "--resume"]);
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    let partial = tmp.path("f.safetensors.partial");
    assert!(
        !partial.exists(),
        "the checkpoint is removed once the factors are written"
    );
    let first = std::fs::read(&f).unwrap();
    // A file that is no checkpoint of this run is named, not trusted.
    std::fs::copy(&f, &partial).unwrap();
    let refused = run(&["--resume"]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        err.contains("f.safetensors.partial") && err.contains("delete it"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&f).unwrap(),
        first,
        "the factors already written are untouched"
    );
    // Without --resume the run starts over and replaces it.
    let fresh = run(&[]);
    assert!(fresh.status.success(), "{}", String::from_utf8_lossy(&fresh.stderr));
    assert_eq!(std::fs::read(&f).unwrap(), first);
    assert!(!partial.exists());
    let bad = run(&["--checkpoint-every=-1"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--checkpoint-every"));
}
