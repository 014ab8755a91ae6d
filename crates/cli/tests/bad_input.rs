//! Bad input gets one clear line on stderr, a non-zero exit, no panic and no
//! output file.

mod common;

use common::*;
use hvp_model::io::write_safetensors;
use hvp_tensor::{DType, Tensor};
use std::path::Path;

fn f64_bytes(v: &[f64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

struct Setup {
    tmp: TempDir,
    weights: String,
    vector: String,
    inputs: String,
    labels: String,
}

fn setup(tag: &str) -> Setup {
    let dir = fixture("mlp");
    let s = |p: &str| dir.join(p).to_string_lossy().into_owned();
    Setup {
        tmp: TempDir::new(tag),
        weights: s("weights.safetensors"),
        vector: s("vector.safetensors"),
        inputs: s("inputs.npy"),
        labels: s("labels.npy"),
    }
}

/// Runs `hvp product` on the MLP fixture with some arguments replaced, and
/// checks the failure is clean and mentions `expect`.
fn fails(st: &Setup, replace: &[(&str, &str)], expect: &str) {
    let out = st.tmp.s("out.safetensors");
    let mut args: Vec<(String, String)> = [
        ("--arch", "mlp:64,16,10"),
        ("--weights", st.weights.as_str()),
        ("--vector", st.vector.as_str()),
        ("--inputs", st.inputs.as_str()),
        ("--labels", st.labels.as_str()),
        ("--out", out.as_str()),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    for (k, v) in replace {
        match args.iter_mut().find(|(a, _)| a == k) {
            Some(slot) => slot.1 = v.to_string(),
            None => args.push((k.to_string(), v.to_string())),
        }
    }
    let mut flat = vec!["product".to_string()];
    for (a, b) in args {
        flat.push(a);
        flat.push(b);
    }
    let refs: Vec<&str> = flat.iter().map(String::as_str).collect();
    let o = hvp(&refs);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure for {replace:?}, got success");
    assert!(!stderr.contains("panicked"), "panic for {replace:?}: {stderr}");
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "one line expected for {replace:?}: {stderr}"
    );
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(
        stderr.contains(expect),
        "for {replace:?} expected '{expect}' in: {stderr}"
    );
    assert!(!Path::new(&out).exists(), "an output file was written for {replace:?}");
    let leftovers = std::fs::read_dir(&st.tmp.0).unwrap().count();
    assert_eq!(leftovers, 0, "temporary files left behind for {replace:?}");
}

#[test]
fn missing_files() {
    let st = setup("missing");
    fails(
        &st,
        &[("--weights", "/nonexistent/w.safetensors")],
        "cannot read /nonexistent/w.safetensors",
    );
    fails(
        &st,
        &[("--vector", "/nonexistent/v.safetensors")],
        "cannot read /nonexistent/v.safetensors",
    );
    fails(
        &st,
        &[("--inputs", "/nonexistent/x.npy")],
        "cannot read /nonexistent/x.npy",
    );
}

#[test]
fn truncated_or_corrupt_files() {
    let st = setup("corrupt");
    let bytes = std::fs::read(&st.weights).unwrap();
    let cut = st
        .tmp
        .0
        .parent()
        .unwrap()
        .join(format!("cut-{}.safetensors", std::process::id()));
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    fails(
        &st,
        &[("--weights", cut.to_str().unwrap())],
        "not a valid safetensors file",
    );
    std::fs::write(&cut, b"garbage that is not a header").unwrap();
    fails(
        &st,
        &[("--weights", cut.to_str().unwrap())],
        "not a valid safetensors file",
    );

    let x = std::fs::read(&st.inputs).unwrap();
    let cut_npy = st
        .tmp
        .0
        .parent()
        .unwrap()
        .join(format!("cut-{}.npy", std::process::id()));
    std::fs::write(&cut_npy, &x[..x.len() - 100]).unwrap();
    fails(&st, &[("--inputs", cut_npy.to_str().unwrap())], "truncated");
    std::fs::write(&cut_npy, b"PK\x03\x04 not numpy").unwrap();
    fails(&st, &[("--inputs", cut_npy.to_str().unwrap())], "not an NPY file");
    let _ = std::fs::remove_file(cut);
    let _ = std::fs::remove_file(cut_npy);
}

#[test]
fn truncated_idx_dataset() {
    let st = setup("idx");
    let dir = st.tmp.0.parent().unwrap().join(format!("idx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = repo_root().join("data/fashion-mnist-subset");
    let images = std::fs::read(src.join("t10k-images-idx3-ubyte.gz")).unwrap();
    std::fs::write(dir.join("t10k-images-idx3-ubyte.gz"), &images[..images.len() / 2]).unwrap();
    std::fs::copy(
        src.join("t10k-labels-idx1-ubyte.gz"),
        dir.join("t10k-labels-idx1-ubyte.gz"),
    )
    .unwrap();
    let spec = format!("mnist:{}:test", dir.display());
    let w = dir.join("w.safetensors").to_string_lossy().into_owned();
    assert!(hvp(&["init", "--arch", "mlp:784,10", "--out", &w]).status.success());
    let out = st.tmp.s("g.safetensors");
    let o = hvp(&[
        "grad",
        "--arch",
        "mlp:784,10",
        "--weights",
        &w,
        "--dataset",
        &spec,
        "--out",
        &out,
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && !stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("truncated") || stderr.contains("damaged"), "{stderr}");
    assert!(!Path::new(&out).exists());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn wrong_tensor_names_and_shapes() {
    let st = setup("names");
    let other = st
        .tmp
        .0
        .parent()
        .unwrap()
        .join(format!("w-{}.safetensors", std::process::id()));
    let t = |shape: &[usize]| Tensor::<f64>::zeros(shape);
    let base = vec![
        ("0.weight".to_string(), t(&[16, 64])),
        ("0.bias".to_string(), t(&[16])),
        ("2.weight".to_string(), t(&[10, 16])),
        ("2.bias".to_string(), t(&[10])),
    ];
    let mut renamed = base.clone();
    renamed[3].0 = "2.biass".into();
    write_safetensors(&other, &renamed, DType::F32).unwrap();
    fails(
        &st,
        &[("--weights", other.to_str().unwrap())],
        "tensor '2.bias' is missing",
    );
    let mut extra = base.clone();
    extra.push(("3.weight".into(), t(&[1])));
    write_safetensors(&other, &extra, DType::F32).unwrap();
    fails(
        &st,
        &[("--weights", other.to_str().unwrap())],
        "unexpected tensor '3.weight'",
    );
    let mut shaped = base.clone();
    shaped[0].1 = t(&[16, 63]);
    write_safetensors(&other, &shaped, DType::F32).unwrap();
    fails(
        &st,
        &[("--weights", other.to_str().unwrap())],
        "tensor '0.weight' has shape [16, 63]",
    );
    // The same weights under another architecture: a shape error naming the tensor.
    fails(
        &st,
        &[("--arch", "mlp:64,32,10")],
        "tensor '0.weight' has shape [16, 64]",
    );
    let _ = std::fs::remove_file(other);
}

#[test]
fn labels_out_of_range_and_nan_inputs() {
    let st = setup("labels");
    let bad_labels = st.tmp.0.parent().unwrap().join(format!("y-{}.npy", std::process::id()));
    let mut y: Vec<u8> = vec![1; 32];
    y[5] = 12;
    write_npy(&bad_labels, "|u1", &[32], &y);
    fails(
        &st,
        &[("--labels", bad_labels.to_str().unwrap())],
        "label 12 of example 5 is out of range",
    );

    let nan_inputs = st.tmp.0.parent().unwrap().join(format!("x-{}.npy", std::process::id()));
    let mut x = vec![0.5f64; 32 * 64];
    x[7 * 64 + 3] = f64::NAN;
    write_npy(&nan_inputs, "<f8", &[32, 64], &f64_bytes(&x));
    fails(
        &st,
        &[("--inputs", nan_inputs.to_str().unwrap())],
        "input example 7 contains NaN",
    );

    // Inputs whose shape does not fit the architecture.
    write_npy(&nan_inputs, "<f8", &[32, 63], &f64_bytes(&vec![0.5; 32 * 63]));
    fails(
        &st,
        &[("--inputs", nan_inputs.to_str().unwrap())],
        "63 features but mlp:64,16,10 expects 64",
    );
    let _ = std::fs::remove_file(bad_labels);
    let _ = std::fs::remove_file(nan_inputs);
}

#[test]
fn nan_in_vector_and_unknown_arch() {
    let st = setup("vector");
    let v = st
        .tmp
        .0
        .parent()
        .unwrap()
        .join(format!("v-{}.safetensors", std::process::id()));
    let mut w0 = Tensor::<f64>::zeros(&[16, 64]);
    w0.data_mut()[10] = f64::NAN;
    let named = vec![
        ("0.weight".to_string(), w0),
        ("0.bias".to_string(), Tensor::zeros(&[16])),
        ("2.weight".to_string(), Tensor::zeros(&[10, 16])),
        ("2.bias".to_string(), Tensor::zeros(&[10])),
    ];
    write_safetensors(&v, &named, DType::F64).unwrap();
    fails(
        &st,
        &[("--vector", v.to_str().unwrap())],
        "tensor '0.weight' contains NaN",
    );
    fails(
        &st,
        &[("--arch", "transformer:12")],
        "unknown architecture 'transformer:12'",
    );
    fails(&st, &[("--arch", "resnet-cifar:2,2")], "give three block counts");
    let _ = std::fs::remove_file(v);
}
