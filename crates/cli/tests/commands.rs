//! The commands end to end on bundled data: init, grad and product on the
//! Fashion-MNIST subset and the CIFAR-10 sample, output names and dtypes.

mod common;

use common::*;
use hvp_model::io::read_safetensors;

#[test]
fn init_then_products_on_bundled_datasets() {
    let tmp = TempDir::new("commands");
    let (w, v) = (tmp.s("w.safetensors"), tmp.s("v.safetensors"));
    let o = hvp(&[
        "init",
        "--arch",
        "resnet-cifar:1,1,1",
        "--in-channels",
        "3",
        "--seed",
        "1",
        "--out",
        &w,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = hvp(&[
        "init",
        "--arch",
        "resnet-cifar:1,1,1",
        "--in-channels",
        "3",
        "--random-vector",
        "--out",
        &v,
    ]);
    assert!(o.status.success());
    let weights = read_safetensors(std::path::Path::new(&w)).unwrap();
    // A full state_dict: parameters, running statistics and the int64 step counters.
    assert!(weights.contains_key("layer2.0.downsample.1.running_var"));
    assert!(matches!(weights.get("bn.num_batches_tracked"), Some(Err(d)) if d == "I64"));
    let vector = read_safetensors(std::path::Path::new(&v)).unwrap();
    assert!(
        !vector.contains_key("bn.running_mean"),
        "vectors hold trainable parameters only"
    );
    let norm2: f64 = vector
        .values()
        .map(|t| t.as_ref().unwrap().data.iter().map(|x| x * x).sum::<f64>())
        .sum();
    let count: usize = vector.values().map(|t| t.as_ref().unwrap().data.len()).sum();
    assert!(
        (norm2 / count as f64 - 1.0).abs() < 0.05,
        "unit normal entries: mean square {}",
        norm2 / count as f64
    );

    let cifar = format!("cifar10:{}:test", fixture("cifar10").display());
    let out = tmp.s("hv.safetensors");
    let o = hvp(&[
        "product",
        "--arch",
        "resnet-cifar:1,1,1",
        "--weights",
        &w,
        "--dataset",
        &cifar,
        "--vector",
        &v,
        "--dtype",
        "f64",
        "--out",
        &out,
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    // Results and summaries on stdout, progress and warnings on stderr.
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("N=20") && stdout.contains("images/s") && stdout.contains("peak memory"),
        "{stdout}"
    );
    let hv = read_safetensors(std::path::Path::new(&out)).unwrap();
    assert_eq!(hv.len(), vector.len());
    assert!(hv
        .values()
        .all(|t| t.as_ref().unwrap().data.iter().all(|x| x.is_finite())));

    // MLP on Fashion-MNIST with --limit: f32 output by default.
    let mw = tmp.s("mlp.safetensors");
    assert!(hvp(&["init", "--arch", "mlp:784,32,10", "--out", &mw]).status.success());
    let fm = format!("mnist:{}", repo_root().join("data/fashion-mnist-subset").display());
    let g = tmp.s("g.safetensors");
    let o = hvp(&[
        "grad",
        "--arch",
        "mlp:784,32,10",
        "--weights",
        &mw,
        "--dataset",
        &fm,
        "--limit",
        "300",
        "--out",
        &g,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("N=300"));
    let bytes = std::fs::read(&g).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("0.weight").unwrap().dtype(), safetensors::Dtype::F32);
}

#[test]
fn weight_decay_adds_w_times_v_to_the_product() {
    let tmp = TempDir::new("wd");
    let dir = fixture("mlp");
    let s = |p: &str| dir.join(p).to_string_lossy().into_owned();
    let (w, v, x, y) = (
        s("weights.safetensors"),
        s("vector.safetensors"),
        s("inputs.npy"),
        s("labels.npy"),
    );
    let (plain, decayed) = (tmp.s("p.safetensors"), tmp.s("d.safetensors"));
    let base = [
        "product",
        "--arch",
        "mlp:64,16,10",
        "--weights",
        &w,
        "--vector",
        &v,
        "--inputs",
        &x,
        "--labels",
        &y,
        "--dtype",
        "f64",
    ];
    let mut a = base.to_vec();
    a.extend(["--out", &plain]);
    assert!(hvp(&a).status.success());
    let mut a = base.to_vec();
    a.extend(["--weight-decay", "0.25", "--out", &decayed]);
    let o = hvp(&a);
    assert!(o.status.success() && String::from_utf8_lossy(&o.stderr).contains("curvature includes 0.25·I"));
    let (p, d, vv) = (
        read_flat(std::path::Path::new(&plain)),
        read_flat(std::path::Path::new(&decayed)),
        read_flat(std::path::Path::new(&v)),
    );
    for (name, pv) in &p {
        for ((a, b), c) in pv.iter().zip(&d[name]).zip(&vv[name]) {
            assert!((a + 0.25 * c - b).abs() < 1e-12 * b.abs().max(1.0), "{name}");
        }
    }
}

/// `hvp bench` times every method at every size and rates each row against the
/// highest GEMM peak it read during the run, the same for every row.
#[test]
fn bench_rates_every_row_against_the_best_gemm_peak_of_the_run() {
    let tmp = TempDir::new("bench");
    let json = tmp.s("rows.jsonl");
    let o = hvp(&[
        "bench",
        "--arch",
        "mlp:64,32,10",
        "--sizes",
        "40,80",
        "--batch-size",
        "16",
        "--repeats",
        "1",
        "--threads",
        "1",
        "--json",
        &json,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    // One reading before the first timing and one after each size.
    assert_eq!(stderr.matches("GEMM peak, ").count(), 3, "{stderr}");
    let text = std::fs::read_to_string(&json).unwrap();
    let rows: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let keys: Vec<(String, u64)> = rows
        .iter()
        .map(|r| (r["method"].as_str().unwrap().to_string(), r["n"].as_u64().unwrap()))
        .collect();
    let expected: Vec<(String, u64)> = [40, 80]
        .iter()
        .flat_map(|&n| ["grad", "hvp", "ggn"].map(|m| (m.to_string(), n)))
        .collect();
    assert_eq!(keys, expected);
    let peak = rows[0]["gemm_peak_gflop_per_s"].as_f64().unwrap();
    assert!(peak > 0.1, "GEMM peak {peak} GFLOP/s");
    assert!(
        stdout.contains(&format!("GEMM peak here: {peak:.1} GFLOP/s")),
        "{stdout}"
    );
    for r in &rows {
        assert_eq!(r["gemm_peak_gflop_per_s"].as_f64().unwrap(), peak);
        let (rate, share) = (r["gflop_per_s"].as_f64().unwrap(), r["of_gemm_peak"].as_f64().unwrap());
        assert!(rate > 0.0 && r["seconds"].as_f64().unwrap() > 0.0, "{r}");
        assert!((share - rate / peak).abs() <= 1e-12 * share, "{r}");
    }
    for r in rows.iter().filter(|r| r["method"] == "grad") {
        assert_eq!(r["ratio_to_grad"].as_f64().unwrap(), 1.0);
    }
}
