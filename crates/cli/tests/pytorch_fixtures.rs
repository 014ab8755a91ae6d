//! `hvp grad` and `hvp product` through the command line against PyTorch's float64
//! gradient, double-backward HVP and GGN product (tests/fixtures, written by
//! scripts/make_fixtures.py): f64 within 1e-9 relative, f32 within 1e-4.

mod common;

use common::*;

struct Case {
    name: &'static str,
    arch: String,
    in_channels: usize,
    cap: Option<usize>,
    generated: Option<u64>,
}

fn case(name: &'static str) -> Case {
    let meta = std::fs::read_to_string(fixture(name).join("meta.json")).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&meta).unwrap();
    let weights = meta["weights"].as_str().unwrap();
    Case {
        name,
        arch: meta["arch"].as_str().unwrap().to_string(),
        in_channels: meta["in_channels"].as_u64().unwrap() as usize,
        cap: meta["subset_cap"].as_u64().map(|c| c as usize),
        generated: weights.strip_prefix("generated:").map(|s| s.parse().unwrap()),
    }
}

/// Relative error over all compared entries of `kind/NAME` tensors.
fn compare(c: &Case, kind: &str, out: &std::path::Path) -> f64 {
    relative_error(&fixture(c.name).join("expected.safetensors"), kind, out, c.cap)
}

fn check_case(name: &'static str) {
    let c = case(name);
    let tmp = TempDir::new(name);
    let dir = fixture(name);
    let (weights, vector) = match c.generated {
        Some(seed) => {
            write_generated(
                &c.arch,
                c.in_channels,
                seed,
                &tmp.path("w.safetensors"),
                &tmp.path("v.safetensors"),
            );
            (tmp.s("w.safetensors"), tmp.s("v.safetensors"))
        }
        None => (
            dir.join("weights.safetensors").to_string_lossy().into_owned(),
            dir.join("vector.safetensors").to_string_lossy().into_owned(),
        ),
    };
    let inputs = dir.join("inputs.npy").to_string_lossy().into_owned();
    let labels = dir.join("labels.npy").to_string_lossy().into_owned();
    // f32 runs twice: on the pure-Rust GEMM and on oneDNN where it is installed
    // (asked for explicitly: it is the default on Intel CPUs only).
    let other = if hvp_tensor::onednn::is_installed() {
        "onednn"
    } else {
        "default"
    };
    for (dtype, tol, gemm) in [("f64", 1e-9, "default"), ("f32", 1e-4, "rust"), ("f32", 1e-4, other)] {
        for (kind, extra) in [
            ("grad", vec![]),
            ("hvp", vec!["--curvature", "hessian"]),
            ("ggn", vec!["--curvature", "ggn"]),
        ] {
            let out = tmp.s(&format!("{kind}-{dtype}-{gemm}.safetensors"));
            let mut args = vec![
                if kind == "grad" { "grad" } else { "product" },
                "--arch",
                &c.arch,
                "--weights",
                &weights,
                "--inputs",
                &inputs,
                "--labels",
                &labels,
                "--dtype",
                dtype,
                "--batch-size",
                "3",
                "--quiet",
                "--out",
                &out,
            ];
            if kind != "grad" {
                args.extend(["--vector", vector.as_str()]);
                args.extend(extra);
            }
            let env: &[(&str, &str)] = match gemm {
                "rust" => &[("HVP_GEMM", "rust")],
                "onednn" => &[("HVP_GEMM", "onednn")],
                _ => &[],
            };
            let o = hvp_env(&args, env);
            assert!(
                o.status.success(),
                "{name} {kind} {dtype} ({gemm} GEMM): {}",
                String::from_utf8_lossy(&o.stderr)
            );
            let e = compare(&c, kind, std::path::Path::new(&out));
            assert!(
                e < tol,
                "{name}: {kind} in {dtype} ({gemm} GEMM) differs from PyTorch by {e:e} (tolerance {tol:e})"
            );
            eprintln!("{name}: {kind} {dtype} ({gemm} GEMM) relative error {e:.2e}");
        }
    }
}

#[test]
fn mlp_matches_pytorch() {
    check_case("mlp");
}

#[test]
fn resnet_111_one_channel_matches_pytorch() {
    check_case("resnet111");
}

#[test]
fn seed_resnet_matches_pytorch() {
    check_case("seed_resnet");
}
