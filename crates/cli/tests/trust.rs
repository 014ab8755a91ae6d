//! Results a user can trust: failed solves are failures, every trainable tensor
//! is a parameter or the user is told, numbers are checked at the door, reads
//! stay inside the model's folder, writes never follow planted symlinks, sizes
//! are checked before allocating, and multi-output commands write all their
//! outputs or none.

mod common;

use common::*;
use hvp_onnx::proto::Dimension;
use hvp_onnx::proto::{
    data_type, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto,
    TypeProtoTensor, ValueInfoProto,
};
use prost::Message;
use std::path::Path;
use std::process::Output;

const ARCH: &str = "mlp:64,16,10";

fn mlp_fixture(name: &str) -> String {
    fixture("mlp").join(name).to_string_lossy().into_owned()
}

/// `hvp COMMAND` on the MLP fixture (32 examples) with the options in `opts`
/// (space-separated) and `paths` (flags with file or computed arguments).
fn on_mlp(command: &str, opts: &str, paths: &[&str]) -> Output {
    let (w, x) = (mlp_fixture("weights.safetensors"), mlp_fixture("inputs.npy"));
    on_mlp_with(command, &w, &x, opts, paths)
}

/// As [`on_mlp`], with other weights and inputs files.
fn on_mlp_with(command: &str, weights: &str, inputs: &str, opts: &str, paths: &[&str]) -> Output {
    let y = mlp_fixture("labels.npy");
    let mut args = vec![
        command,
        "--arch",
        ARCH,
        "--weights",
        weights,
        "--inputs",
        inputs,
        "--labels",
        &y,
    ];
    args.extend(opts.split_whitespace());
    args.extend(paths);
    hvp(&args)
}

/// `hvp solve` on the MLP fixture, right-hand side its vector.
fn solve(opts: &str, paths: &[&str]) -> Output {
    let v = mlp_fixture("vector.safetensors");
    let mut all = vec!["--rhs", &v];
    all.extend(paths);
    on_mlp("solve", opts, &all)
}

/// `hvp influence` of a fresh `mlp:784,8,10` on the first `limit` MNIST subset
/// images for test points 0 and 1, CG on the GGN, with extra arguments.
fn influence(tmp: &TempDir, limit: &str, extra: &[&str]) -> Output {
    let w = tmp.s("w.safetensors");
    if !Path::new(&w).exists() {
        ok(&["init", "--arch", "mlp:784,8,10", "--seed", "0", "--out", &w]);
    }
    let d = format!("mnist:{}", repo_root().join("data/mnist-subset").display());
    let test = format!("{d}:test");
    let mut args = vec![
        "influence",
        "--arch",
        "mlp:784,8,10",
        "--weights",
        &w,
        "--train",
        &d,
        "--test",
        &test,
        "--limit-train",
        limit,
        "--test-indices",
        "0,1",
        "--solver",
        "cg",
        "--curvature",
        "ggn",
    ];
    args.extend(extra);
    hvp(&args)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Exactly one `error:` line, and it is the last line.
fn one_error_line(o: &Output) -> String {
    let err = stderr(o);
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    errors[0].to_string()
}

#[test]
fn failed_solve_exits_3_with_its_report_and_no_solution() {
    let tmp = TempDir::new("trust-failed");
    let (x, r) = (tmp.s("x.safetensors"), tmp.s("r.json"));
    // The MLP's Hessian is indefinite: CG meets negative curvature.
    let o = solve("--solver cg --damping 0.01", &["--out", &x, "--report", &r]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let line = one_error_line(&o);
    assert!(
        line.contains("negative curvature") && line.contains("--keep-unconverged"),
        "{line}"
    );
    assert!(!Path::new(&x).exists(), "a failed solve wrote its solution");
    let report = json(Path::new(&r));
    assert_eq!(report["status"], "failed");
    assert_eq!(report["converged"], false);
    assert!(report["failure"].as_str().unwrap().contains("--curvature ggn"));
    // Too few iterations on a positive definite system: failed, not converged.
    let o = solve(
        "--solver cg --curvature ggn --damping 0.01 --max-iter 2",
        &["--out", &x, "--report", &r],
    );
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let line = one_error_line(&o);
    assert!(
        line.contains("did not reach the tolerance") && line.contains("--max-iter"),
        "{line}"
    );
    assert_eq!(json(Path::new(&r))["status"], "failed");
    assert!(!Path::new(&x).exists());
    // Asked explicitly: the solution is written, the report says so, the exit is still 3.
    let o = solve(
        "--solver cg --curvature ggn --damping 0.01 --max-iter 2 --keep-unconverged",
        &["--out", &x, "--report", &r],
    );
    assert_eq!(o.status.code(), Some(3));
    assert!(Path::new(&x).exists());
    assert_eq!(json(Path::new(&r))["kept_unconverged"], true);
    // Run to its tolerance, the same solve converges: exit 0, status converged.
    let o = solve(
        "--solver cg --curvature ggn --damping 0.01 --dtype f64",
        &["--out", &x, "--report", &r],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let report = json(Path::new(&r));
    assert_eq!(report["status"], "converged");
    assert!(report["relative_residual"].as_f64().unwrap() <= 1e-6);
}

#[test]
fn structured_approximations_are_never_called_converged() {
    let tmp = TempDir::new("trust-approx");
    let (x, r) = (tmp.s("x.safetensors"), tmp.s("r.json"));
    for solver in ["kfac", "ekfac", "arnoldi", "lissa"] {
        let o = solve(
            "--curvature ggn --damping 0.1 --rank 5 --depth 50",
            &["--solver", solver, "--out", &x, "--report", &r],
        );
        assert!(o.status.success(), "{solver}: {}", stderr(&o));
        let report = json(Path::new(&r));
        assert_eq!(report["status"], "approximate", "{solver}: {report}");
        assert_eq!(report["converged"], false, "{solver}");
    }
    // EK-FAC on the indefinite Hessian: residual 2.8e3 measured, far worse than x = 0.
    let o = solve("--solver ekfac --damping 1e-6", &["--out", &x, "--report", &r]);
    assert!(o.status.success());
    let report = json(Path::new(&r));
    assert!(report["relative_residual"].as_f64().unwrap() >= 1.0);
    assert!(stderr(&o).contains("APPROXIMATION WORSE THAN ZERO"), "{}", stderr(&o));
    let warned = report["warnings"].as_array().unwrap();
    assert!(
        warned.iter().any(|w| w.as_str().unwrap().contains("WORSE THAN ZERO")),
        "{report}"
    );
    // K-FAC's inverse is undefined without damping: refused, not NaN.
    let x0 = tmp.s("x0.safetensors");
    let o = solve("--solver kfac --damping 0", &["--out", &x0]);
    assert!(one_error_line(&o).contains("--damping"));
    assert!(!Path::new(&x0).exists());
}

#[test]
fn influence_refuses_to_score_from_a_failed_solve() {
    let tmp = TempDir::new("trust-influence");
    let out = tmp.s("scores.csv");
    let json_out = tmp.s("scores.json");
    let args = [
        "--damping",
        "0.01",
        "--max-iter",
        "1",
        "--out",
        &out,
        "--json",
        &json_out,
    ];
    let o = influence(&tmp, "200", &args);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(one_error_line(&o).contains("was not scored"));
    assert!(!Path::new(&out).exists() && !Path::new(&json_out).exists());
    let mut keep = args.to_vec();
    keep.push("--keep-unconverged");
    let o = influence(&tmp, "200", &keep);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.starts_with("train_index,test_index,score,label,solve_status,relative_residual\n"));
    assert!(text.lines().skip(1).all(|l| l.split(',').nth(4) == Some("failed")));
    let meta = json(Path::new(&json_out));
    assert_eq!(meta["queries"][0]["solve_status"], "failed");
    assert!(meta["queries"][0]["relative_residual"].as_f64().unwrap() > 1e-6);
}

#[test]
fn bad_numbers_are_refused_at_the_door() {
    let tmp = TempDir::new("trust-numbers");
    let out = tmp.s("out.safetensors");
    let (w, x, v) = (
        mlp_fixture("weights.safetensors"),
        mlp_fixture("inputs.npy"),
        mlp_fixture("vector.safetensors"),
    );
    let product = |flag: &str, value: &str| {
        let arg = format!("{flag}={value}");
        on_mlp("product", "", &["--vector", &v, "--out", &out, &arg])
    };
    for (flag, value) in [
        ("--weight-decay", "nan"),
        ("--weight-decay", "inf"),
        ("--weight-decay", "-1"),
        ("--batch-size", "0"),
        ("--batch-size", "99999999999"),
        ("--threads", "100000"),
        ("--pad", "18446744073709551615"),
        ("--limit", "0"),
    ] {
        let o = product(flag, value);
        assert_eq!(o.status.code(), Some(2), "{flag} {value}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(e.starts_with("error:") && e.contains(flag), "{flag} {value}: {e}");
        assert!(!Path::new(&out).exists());
    }
    for (flag, value) in [
        ("--damping", "nan"),
        ("--damping", "-0.5"),
        ("--tol", "0"),
        ("--scale", "inf"),
    ] {
        let arg = format!("{flag}={value}");
        let o = solve("--solver cg", &[&arg, "--out", &out]);
        assert_eq!(o.status.code(), Some(2), "{flag} {value}: {}", stderr(&o));
        assert!(stderr(&o).contains(flag));
    }
    let o = on_mlp("self-influence", "--damping 0", &["--out", &out]);
    assert!(one_error_line(&o).contains("--damping 0"));
    assert!(!Path::new(&out).exists());
    let o = on_mlp("grad", "--params fc.*", &["--out", &out]);
    assert!(
        one_error_line(&o).contains("--params"),
        "--params must not be ignored with --arch"
    );
    // f64 weights beyond the f32 range: refused in f32 with the tensor's name, fine in f64.
    let big = tmp.s("big.safetensors");
    let mut tensors = read_flat(Path::new(&w));
    tensors.get_mut("2.bias").unwrap()[3] = 1e39;
    let model = hvp_model::Model::new(&ARCH.parse().unwrap(), 1).unwrap();
    let named: Vec<(String, hvp_tensor::Tensor<f64>)> = model
        .params
        .iter()
        .map(|p| {
            (
                p.name.clone(),
                hvp_tensor::Tensor::new(p.shape.clone(), tensors[&p.name].clone()).unwrap(),
            )
        })
        .collect();
    hvp_model::io::write_safetensors(Path::new(&big), &named, hvp_tensor::DType::F64).unwrap();
    let o = on_mlp_with("grad", &big, &x, "", &["--out", &out]);
    let line = one_error_line(&o);
    assert!(line.contains("'2.bias'") && line.contains("--dtype f64"), "{line}");
    assert!(!Path::new(&out).exists());
    // Sizes: a gigantic --arch, --top beyond the parameter count.
    let o = hvp(&["init", "--arch", "mlp:784,1000000000000,10", "--out", &out]);
    assert!(one_error_line(&o).contains("parameters"));
    let o = on_mlp("spectrum", "--top 100000", &[]);
    assert!(one_error_line(&o).contains("--top"));
}

#[test]
fn npy_header_sizes_are_checked_before_allocating() {
    let tmp = TempDir::new("trust-npy");
    let out = tmp.s("out.safetensors");
    let x = tmp.path("x.npy");
    // Declares 10^11 x 10^6 floats in a file of a few hundred bytes.
    write_npy(&x, "<f4", &[100_000_000_000, 1_000_000], &[0u8; 64]);
    let w = mlp_fixture("weights.safetensors");
    let o = on_mlp_with("grad", &w, x.to_str().unwrap(), "", &["--out", &out]);
    let line = one_error_line(&o);
    assert!(line.contains("x.npy"), "{line}");
    // Reading a device or a FIFO never starts.
    let o = on_mlp_with("grad", "/dev/zero", &mlp_fixture("inputs.npy"), "", &["--out", &out]);
    assert!(one_error_line(&o).contains("not a regular file"));
}

#[test]
fn outputs_are_written_together_or_not_at_all_and_never_through_symlinks() {
    let tmp = TempDir::new("trust-outputs");
    let x = tmp.s("x.safetensors");
    // The report's folder does not exist: refused before solving, and x not written.
    let o = solve(
        "--solver cg --curvature ggn --damping 0.1",
        &["--out", &x, "--report", &tmp.s("missing/r.json")],
    );
    assert!(one_error_line(&o).contains("does not exist"));
    assert!(!Path::new(&x).exists());
    // A symlink planted at the output is replaced, its target untouched.
    let victim = tmp.path("victim.txt");
    std::fs::write(&victim, "precious").unwrap();
    std::os::unix::fs::symlink(&victim, &x).unwrap();
    let o = solve("--solver cg --curvature ggn --damping 0.1 --dtype f64", &["--out", &x]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert!(!std::fs::symlink_metadata(&x).unwrap().file_type().is_symlink());
    let leftovers: Vec<_> = std::fs::read_dir(&tmp.0)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporaries left behind: {leftovers:?}");
}

#[test]
fn influence_runs_lock_their_output_and_resume_only_the_same_configuration() {
    let tmp = TempDir::new("trust-resume");
    let out = tmp.s("scores.csv");
    let run = |damping: &str, extra: &[&str]| {
        let mut args = vec!["--damping", damping, "--dtype", "f64", "--out", &out, "--quiet"];
        args.extend(extra);
        influence(&tmp, "100", &args)
    };
    // Another run holds the lock (this test process is alive): refused at once.
    let lock = tmp.path("scores.csv.lock");
    std::fs::write(&lock, format!("{}\n", std::process::id())).unwrap();
    let o = run("0.1", &[]);
    assert!(one_error_line(&o).contains("another hvp run is writing"));
    std::fs::remove_file(&lock).unwrap();
    // A partial file from a run with another damping: --resume refuses to mix.
    let o = run("0.1", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let full = std::fs::read_to_string(&out).unwrap();
    let partial_meta = tmp.path("scores.csv.partial.json");
    let partial_csv = tmp.path("scores.csv.partial");
    // Recreate an interrupted run's partial files by hand from a finished one.
    let header_and_rows: Vec<&str> = full.lines().take(1 + 100).collect();
    std::fs::write(&partial_csv, header_and_rows.join("\n") + "\n").unwrap();
    let config = serde_json::json!({"fingerprint": {"damping": 0.5}});
    std::fs::write(&partial_meta, format!("{config}\n")).unwrap();
    let o = run("0.1", &["--resume"]);
    let line = one_error_line(&o);
    assert!(
        line.contains("another configuration") && line.contains("damping"),
        "{line}"
    );
    // A symlink planted at the partial file is removed, never written through.
    let victim = tmp.path("victim.txt");
    std::fs::write(&victim, "precious").unwrap();
    std::fs::remove_file(&partial_csv).unwrap();
    std::os::unix::fs::symlink(&victim, &partial_csv).unwrap();
    let _ = std::fs::remove_file(&partial_meta);
    let o = run("0.1", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), full);
    assert!(!partial_csv.exists() && !lock.exists());
}

fn value_info(name: &str, dims: &[i64]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type: data_type::FLOAT,
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| Dimension {
                            dim_value: (d > 0).then_some(d),
                            dim_param: (d <= 0).then(|| "N".to_string()),
                        })
                        .collect(),
                }),
            }),
        }),
    }
}

fn float_init(name: &str, dims: Vec<i64>, values: Vec<f32>) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims,
        data_type: data_type::FLOAT,
        float_data: values,
        ..Default::default()
    }
}

fn node(op: &str, input: &[&str], output: &str) -> NodeProto {
    NodeProto {
        name: format!("{op}_{output}"),
        op_type: op.into(),
        input: input.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        ..Default::default()
    }
}

fn write_model(path: &Path, nodes: Vec<NodeProto>, initializer: Vec<TensorProto>) {
    let bytes = ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(GraphProto {
            name: "g".into(),
            node: nodes,
            initializer,
            input: vec![value_info("x", &[-1, 4])],
            output: vec![value_info("y", &[-1, 3])],
        }),
        ..Default::default()
    }
    .encode_to_vec();
    std::fs::write(path, bytes).unwrap();
}

/// Parameter `p` (called `what`) of a model with 4 inputs and 3 classes: its
/// gradient on five fixed examples equals central differences of the loss,
/// entry by entry (f64); returns that gradient.
fn gradient_matches_differences(imported: &hvp_onnx::Imported, p: usize, what: &str) -> Vec<f64> {
    let x: Vec<f64> = (0..20).map(|i| ((i * 3 % 11) as f64) * 0.1 - 0.5).collect();
    let data = hvp_data::InMemory::new(vec![4], x, vec![0, 2, 1, 1, 0]).unwrap();
    let loss = |weights: &hvp_model::Weights| {
        hvp_curvature::Problem::new(&imported.model, weights, &data, 5)
            .unwrap()
            .gradient_as::<f64>(&|_| {})
            .unwrap()
    };
    let grad = loss(&imported.weights).value.tensors[p].data().to_vec();
    let h = 1e-6;
    for (k, &g) in grad.iter().enumerate() {
        let mut plus = imported.weights.clone();
        plus.params[p].data_mut()[k] += h;
        let mut minus = imported.weights.clone();
        minus.params[p].data_mut()[k] -= h;
        let fd = (loss(&plus).loss - loss(&minus).loss) / (2.0 * h);
        assert!((g - fd).abs() < 1e-7 * (1.0 + g.abs()), "{what}[{k}]: {g} vs {fd}");
    }
    grad
}

/// A LayerScale-style `gamma` used through Mul is a parameter, and its gradient
/// equals central differences of the loss (f64).
#[test]
fn trainable_tensors_through_any_differentiable_op_are_parameters() {
    let tmp = TempDir::new("trust-layerscale");
    let m = tmp.path("m.onnx");
    let w: Vec<f32> = (0..12).map(|i| ((i * 5 % 7) as f32 - 3.0) * 0.2).collect();
    let gamma = vec![0.5f32, -1.5, 2.0];
    write_model(
        &m,
        vec![node("MatMul", &["x", "w"], "h"), node("Mul", &["h", "gamma"], "y")],
        vec![
            float_init("w", vec![4, 3], w),
            float_init("gamma", vec![3], gamma.clone()),
        ],
    );
    let listing = ok(&["params", "--model", m.to_str().unwrap()]);
    assert!(listing.contains("| gamma | [3] | 3 | yes | parameter |"), "{listing}");
    let imported = hvp_onnx::load(&m, &hvp_onnx::ImportOptions::default()).unwrap();
    assert_eq!(imported.model.param_names(), vec!["w", "gamma"]);
    gradient_matches_differences(&imported, 1, "gamma");
    // --params can still freeze it, and hvp params says so.
    let listing = ok(&["params", "--model", m.to_str().unwrap(), "--params", "w"]);
    assert!(listing.contains("| gamma | [3] | 3 | no | frozen |"), "{listing}");
}

/// A trainable tensor that also reaches an input hvp reads only at load time
/// (here a `Where` condition) is refused by name, with the way out.
#[test]
fn trainable_tensor_into_a_non_differentiable_input_is_refused_by_name() {
    let tmp = TempDir::new("trust-where");
    let m = tmp.path("m.onnx");
    write_model(
        &m,
        vec![
            node("Add", &["x", "gate"], "h"),
            node("Where", &["gate", "h", "x"], "g"),
            node("MatMul", &["g", "w"], "y"),
        ],
        vec![
            float_init("gate", vec![4], vec![1.0, 0.0, 1.0, 0.0]),
            float_init("w", vec![4, 3], vec![0.1; 12]),
        ],
    );
    let o = hvp(&["params", "--model", m.to_str().unwrap()]);
    let line = one_error_line(&o);
    assert!(
        line.contains("'gate'") && line.contains("Where") && line.contains("--params"),
        "{line}"
    );
    // Excluding it makes the model usable.
    let listing = ok(&["params", "--model", m.to_str().unwrap(), "--params", "w"]);
    assert!(listing.contains("| gate | [4] | 4 | no | frozen |"), "{listing}");
}

/// A row gathered from a trainable table with fixed indices is differentiated
/// (the table is a parameter; only the picked row gets a gradient).
#[test]
fn gathered_rows_of_a_trainable_table_are_differentiated() {
    let tmp = TempDir::new("trust-gather");
    let m = tmp.path("m.onnx");
    let idx = TensorProto {
        name: "idx".into(),
        dims: vec![1],
        data_type: data_type::INT64,
        int64_data: vec![1],
        ..Default::default()
    };
    write_model(
        &m,
        vec![
            node("Gather", &["table", "idx"], "row"),
            node("Add", &["x", "row"], "h"),
            node("MatMul", &["h", "w"], "y"),
        ],
        vec![
            float_init("table", vec![5, 4], (0..20).map(|i| i as f32 * 0.1).collect()),
            idx,
            float_init("w", vec![4, 3], vec![0.1; 12]),
        ],
    );
    let imported = hvp_onnx::load(&m, &hvp_onnx::ImportOptions::default()).unwrap();
    assert_eq!(imported.model.param_names(), vec!["table", "w"]);
    let g = gradient_matches_differences(&imported, 0, "table");
    for (k, &v) in g.iter().enumerate().filter(|(k, _)| !(4..8).contains(k)) {
        assert_eq!(v, 0.0, "table[{k}] is not gathered");
    }
}

/// The binary on mutated inputs of every kind: each run ends with a result
/// (exit 0) or exactly one `error:` line (exit 1 or 2), never a panic or a
/// signal, and a failed run leaves no output file.
#[test]
fn the_binary_answers_every_mutant_with_a_result_or_one_error_line() {
    use hvp_io::fuzz::Mutator;
    let tmp = TempDir::new("trust-fuzz");
    let out = tmp.s("out.safetensors");
    let check = |o: &Output, what: &str| {
        let err = stderr(o);
        match o.status.code() {
            Some(0) => {}
            Some(1) | Some(2) => {
                assert_eq!(
                    err.lines().filter(|l| l.starts_with("error:")).count(),
                    1,
                    "{what}: {err}"
                );
                assert!(!Path::new(&out).exists(), "{what}: output left by a failed run");
            }
            other => panic!("{what}: exit {other:?}: {err}"),
        }
        let _ = std::fs::remove_file(&out);
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("weights", std::fs::read(mlp_fixture("weights.safetensors")).unwrap()),
        ("inputs", std::fs::read(mlp_fixture("inputs.npy")).unwrap()),
        ("labels", std::fs::read(mlp_fixture("labels.npy")).unwrap()),
        ("onnx", std::fs::read(fixture("onnx/mlp/legacy.onnx")).unwrap()),
    ];
    for (kind, valid) in &cases {
        for seed in 0..25 {
            let mutant = tmp.path(&format!("mutant-{kind}"));
            std::fs::write(&mutant, Mutator::new(seed).mutate(valid)).unwrap();
            let m = mutant.to_str().unwrap();
            let o = match *kind {
                "weights" => on_mlp_with("grad", m, &mlp_fixture("inputs.npy"), "", &["--out", &out]),
                "inputs" => on_mlp_with("grad", &mlp_fixture("weights.safetensors"), m, "", &["--out", &out]),
                "labels" => {
                    let x = mlp_fixture("inputs.npy");
                    let w = mlp_fixture("weights.safetensors");
                    hvp(&[
                        "grad",
                        "--arch",
                        ARCH,
                        "--weights",
                        &w,
                        "--inputs",
                        &x,
                        "--labels",
                        m,
                        "--out",
                        &out,
                    ])
                }
                _ => {
                    let (x, y) = (fixture("onnx/mlp/inputs.npy"), fixture("onnx/mlp/labels.npy"));
                    hvp(&[
                        "grad",
                        "--model",
                        m,
                        "--inputs",
                        x.to_str().unwrap(),
                        "--labels",
                        y.to_str().unwrap(),
                        "--out",
                        &out,
                    ])
                }
            };
            check(&o, &format!("{kind} mutant {seed}"));
        }
    }
    // Random --arch specs and numeric flags.
    for seed in 0..40u64 {
        let mut m = Mutator::new(seed);
        // (argv cannot hold NUL bytes)
        let spec = String::from_utf8_lossy(&m.mutate(b"mlp:64,16,10")).replace('\0', "");
        check(
            &hvp(&["init", "--arch", &spec, "--out", &out]),
            &format!("--arch {spec:?}"),
        );
        let value = String::from_utf8_lossy(&m.mutate(b"256")).replace('\0', "");
        let arg = format!("--batch-size={value}");
        check(&on_mlp("grad", "", &["--out", &out, &arg]), &arg);
    }
}
