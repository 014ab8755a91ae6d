//! ONNX import through the command line: models exported by both PyTorch
//! exporters (tests/fixtures/onnx, written by scripts/make_fixtures.py) give the
//! gradient, HVP and GGN product of PyTorch's float64 references (1e-9 in f64,
//! 1e-4 in f32); the seed ResNet's ONNX export agrees with the built-in
//! `resnet-cifar:2,2,2`; `--params` restricts the Hessian; bad files fail cleanly.

mod common;

use common::*;
use hvp_onnx::proto::{
    data_type, AttributeProto, Dimension, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, TypeProtoTensor, ValueInfoProto,
};
use hvp_tensor::{DType, Tensor};
use prost::Message;
use std::path::{Path, PathBuf};

/// `tests/fixtures/onnx/NAME`, or `tests/fixtures/zoo/MODEL` for `zoo/MODEL`.
fn case_dir(name: &str) -> PathBuf {
    match name.strip_prefix("zoo/") {
        Some(model) => fixture("zoo").join(model),
        None => fixture("onnx").join(name),
    }
}

fn meta(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(case_dir(name).join("meta.json")).unwrap()).unwrap()
}

/// The direction of a case: stored, or generated as the fixture script does.
fn vector_of(name: &str, tmp: &TempDir) -> String {
    match meta(name)["vector"].as_str().unwrap() {
        "file" => case_dir(name).join("vector.safetensors").to_string_lossy().into_owned(),
        generated => {
            let seed: u64 = generated.strip_prefix("generated:").unwrap().parse().unwrap();
            write_generated(
                "resnet-cifar:2,2,2",
                3,
                seed,
                &tmp.path("unused.safetensors"),
                &tmp.path("v.safetensors"),
            );
            tmp.s("v.safetensors")
        }
    }
}

/// Runs grad / product on `model` and returns the output path.
fn run(kind: &str, model: &Path, data: &Path, vector: &str, dtype: &str, out: &Path, extra: &[&str]) {
    let (inputs, labels) = (data.join("inputs.npy"), data.join("labels.npy"));
    let mut args = vec![
        if kind == "grad" { "grad" } else { "product" },
        "--model",
        model.to_str().unwrap(),
        "--inputs",
        inputs.to_str().unwrap(),
        "--labels",
        labels.to_str().unwrap(),
        "--dtype",
        dtype,
        "--batch-size",
        "2",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ];
    match kind {
        "hvp" => args.extend(["--vector", vector, "--curvature", "hessian"]),
        "ggn" => args.extend(["--vector", vector, "--curvature", "ggn"]),
        _ => {}
    }
    args.extend(extra);
    ok(&args);
}

fn check_case(name: &str) {
    let tmp = TempDir::new(&format!("onnx-{name}"));
    let dir = case_dir(name);
    let cap = meta(name)["subset_cap"].as_u64().map(|c| c as usize);
    let vector = vector_of(name, &tmp);
    let loss = meta(name)["loss"].as_str().unwrap().to_string();
    let exports: Vec<String> = match meta(name)["exports"].as_array() {
        Some(list) => list.iter().map(|e| e.as_str().unwrap().to_string()).collect(),
        None => vec!["dynamo".into(), "legacy".into()],
    };
    for exporter in &exports {
        let model = dir.join(format!("{exporter}.onnx"));
        for (dtype, tol) in [("f64", 1e-9), ("f32", 1e-4)] {
            for kind in ["grad", "hvp", "ggn"] {
                let out = tmp.path(&format!("{exporter}-{kind}-{dtype}.safetensors"));
                run(kind, &model, &dir, &vector, dtype, &out, &["--loss", &loss]);
                let e = relative_error(&dir.join("expected.safetensors"), kind, &out, cap);
                assert!(
                    e < tol,
                    "{name} ({exporter} export): {kind} in {dtype} differs from PyTorch by {e:e}"
                );
                eprintln!("{name} ({exporter}): {kind} {dtype} relative error {e:.2e}");
            }
        }
    }
}

#[test]
fn mlp_exports_match_pytorch() {
    check_case("mlp");
}

#[test]
fn small_cnn_with_maxpool_sigmoid_softmax_matches_pytorch() {
    check_case("small_cnn");
}

#[test]
fn regression_mlp_with_mse_loss_matches_pytorch() {
    check_case("regression");
}

// The model zoo (tests/fixtures/zoo, written by scripts/make_zoo.py): small
// versions of today's architectures, float32 weights, float64 references.

#[test]
fn zoo_resnet18_matches_pytorch() {
    check_case("zoo/resnet18");
}

/// Depthwise and grouped, dilated convolutions, ReLU6 (Clip), HardSwish.
#[test]
fn zoo_mobilenet_v2_matches_pytorch() {
    check_case("zoo/mobilenet_v2");
}

/// Transposed convolutions (grouped, output padding), dilated convolution,
/// skip concatenation, GroupNorm, AveragePool, ELU, LeakyReLU.
#[test]
fn zoo_unet_matches_pytorch() {
    check_case("zoo/unet");
}

/// Patch embedding, class token, LayerNorm, nn.MultiheadAttention, GELU MLP.
#[test]
fn zoo_vit_matches_pytorch() {
    check_case("zoo/vit");
}

/// int64 token ids through an embedding; nn.MultiheadAttention and
/// scaled_dot_product_attention blocks; mean over the sequence.
#[test]
fn zoo_text_transformer_matches_pytorch() {
    check_case("zoo/text_transformer");
}

/// Causal attention: a stored mask through `masked_fill(-inf)` (Where with an
/// infinite constant) and `scaled_dot_product_attention(is_causal=True)` (Trilu),
/// position embeddings from `arange`, the last token's logits.
#[test]
fn zoo_gpt_matches_pytorch() {
    check_case("zoo/gpt");
}

/// Token- and channel-mixing MLPs, GroupNorm, SiLU.
#[test]
fn zoo_mixer_matches_pytorch() {
    check_case("zoo/mixer");
}

/// `--loss` must fit the labels: float targets need mse, class labels ce.
#[test]
fn loss_must_fit_the_labels() {
    let tmp = TempDir::new("onnx-loss");
    let reg = case_dir("regression");
    let cls = case_dir("mlp");
    for (dir, loss, needle) in [
        (&reg, "ce", "pass --loss mse"),
        (&cls, "mse", "--loss mse needs float regression targets"),
    ] {
        let out = tmp.path("g.safetensors");
        let o = hvp(&[
            "grad",
            "--model",
            dir.join("legacy.onnx").to_str().unwrap(),
            "--inputs",
            dir.join("inputs.npy").to_str().unwrap(),
            "--labels",
            dir.join("labels.npy").to_str().unwrap(),
            "--loss",
            loss,
            "--out",
            out.to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && stderr.contains(needle), "{loss}: {stderr}");
        assert!(!out.exists());
    }
}

#[test]
fn seed_resnet_exports_match_pytorch() {
    check_case("seed_resnet");
}

/// The seed ResNet imported from ONNX computes what the built-in architecture
/// computes on the same (float32-rounded) weights.
#[test]
fn seed_resnet_export_equals_builtin_architecture() {
    let tmp = TempDir::new("onnx-vs-builtin");
    let dir = case_dir("seed_resnet");
    write_generated_as(
        "resnet-cifar:2,2,2",
        3,
        42,
        &tmp.path("w.safetensors"),
        &tmp.path("v.safetensors"),
        DType::F32,
    );
    let (inputs, labels) = (dir.join("inputs.npy"), dir.join("labels.npy"));
    let common_args = |out: &str| {
        vec![
            "product".to_string(),
            "--inputs".into(),
            inputs.to_string_lossy().into_owned(),
            "--labels".into(),
            labels.to_string_lossy().into_owned(),
            "--vector".into(),
            tmp.s("v.safetensors"),
            "--dtype".into(),
            "f64".into(),
            "--quiet".into(),
            "--out".into(),
            tmp.s(out),
        ]
    };
    let mut builtin = common_args("builtin.safetensors");
    builtin.extend([
        "--arch".into(),
        "resnet-cifar:2,2,2".into(),
        "--weights".into(),
        tmp.s("w.safetensors"),
    ]);
    let mut imported = common_args("onnx.safetensors");
    imported.extend(["--model".into(), dir.join("dynamo.onnx").to_string_lossy().into_owned()]);
    for args in [&builtin, &imported] {
        ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    }
    let (a, b) = (
        read_flat(&tmp.path("builtin.safetensors")),
        read_flat(&tmp.path("onnx.safetensors")),
    );
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let (mut diff, mut norm) = (0.0, 0.0);
    for (k, x) in &a {
        for (p, q) in x.iter().zip(&b[k]) {
            diff += (p - q) * (p - q);
            norm += p * p;
        }
    }
    let e = (diff / norm).sqrt();
    assert!(e < 1e-12, "ONNX and built-in HVPs differ by {e:e}");
}

/// `--params 'fc.*'` takes the Hessian in the fc parameters alone: H_ff v_f,
/// which is the fc block of the full product with the other directions zero.
#[test]
fn params_glob_restricts_the_hessian_to_the_matching_block() {
    let tmp = TempDir::new("onnx-params");
    let dir = case_dir("small_cnn");
    let model = dir.join("legacy.onnx");
    let full = read_safetensors_map(&dir.join("vector.safetensors"));
    let zeroed: Vec<(String, Tensor<f64>)> = full
        .iter()
        .map(|(k, t)| {
            let keep = k.starts_with("fc.");
            let data = t.data().iter().map(|&x| if keep { x } else { 0.0 }).collect();
            (k.clone(), Tensor::new(t.shape().to_vec(), data).unwrap())
        })
        .collect();
    let only_fc: Vec<(String, Tensor<f64>)> = zeroed.iter().filter(|(k, _)| k.starts_with("fc.")).cloned().collect();
    hvp_model::io::write_safetensors(&tmp.path("v0.safetensors"), &zeroed, DType::F64).unwrap();
    hvp_model::io::write_safetensors(&tmp.path("vfc.safetensors"), &only_fc, DType::F64).unwrap();
    run(
        "hvp",
        &model,
        &dir,
        &tmp.s("v0.safetensors"),
        "f64",
        &tmp.path("full.safetensors"),
        &[],
    );
    run(
        "hvp",
        &model,
        &dir,
        &tmp.s("vfc.safetensors"),
        "f64",
        &tmp.path("fc.safetensors"),
        &["--params", "fc.*"],
    );
    let (full, fc) = (
        read_flat(&tmp.path("full.safetensors")),
        read_flat(&tmp.path("fc.safetensors")),
    );
    assert_eq!(fc.keys().collect::<Vec<_>>(), vec!["fc.bias", "fc.weight"]);
    for (k, v) in &fc {
        for (a, b) in v.iter().zip(&full[k]) {
            assert!((a - b).abs() <= 1e-12 * (1.0 + b.abs()), "{k}: {a} vs {b}");
        }
    }
    // The frozen parameters really are constants: their block of the full
    // product is non-zero, so the restricted one differs from the full one.
    assert!(full["proj"].iter().any(|v| v.abs() > 1e-8));

    let listing = ok(&["params", "--model", model.to_str().unwrap(), "--params", "fc.*"]);
    assert!(listing.contains("| fc.weight | [10, 18] | 180 | yes |"), "{listing}");
    assert!(
        listing.contains("| conv1.weight | [4, 1, 3, 3] | 36 | no |"),
        "{listing}"
    );
    assert!(
        listing.contains("2 of 7 parameter tensors trainable: 190 of 1100 scalars"),
        "{listing}"
    );
    let none = hvp(&["params", "--model", model.to_str().unwrap(), "--params", "nothing.*"]);
    assert!(!none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("matches none of the model's trainable parameters"));
}

fn read_safetensors_map(path: &Path) -> Vec<(String, Tensor<f64>)> {
    hvp_model::io::read_safetensors(path)
        .unwrap()
        .into_iter()
        .map(|(k, v)| {
            let t = v.unwrap();
            (k, Tensor::new(t.shape, t.data).unwrap())
        })
        .collect()
}

// ---- bad files ----

fn value_info(name: &str, dims: &[Dimension]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type: data_type::FLOAT,
                shape: Some(TensorShapeProto { dim: dims.to_vec() }),
            }),
        }),
    }
}

fn dim(v: i64) -> Dimension {
    Dimension {
        dim_value: Some(v),
        dim_param: None,
    }
}

fn named_dim(p: &str) -> Dimension {
    Dimension {
        dim_value: None,
        dim_param: Some(p.into()),
    }
}

/// `x [batch, 4] → Gemm(W [3, 4], transB) → op → y`, with `op` applied last.
fn tiny_model(op: &str, input_dims: Vec<Dimension>, with_weight: bool) -> Vec<u8> {
    let weight = TensorProto {
        name: "fc.weight".into(),
        dims: vec![3, 4],
        data_type: data_type::FLOAT,
        float_data: (0..12).map(|i| i as f32 * 0.1).collect(),
        ..Default::default()
    };
    let gemm = NodeProto {
        name: "fc".into(),
        op_type: "Gemm".into(),
        input: vec!["x".into(), "fc.weight".into()],
        output: vec!["h".into()],
        attribute: vec![AttributeProto {
            name: "transB".into(),
            r#type: 2,
            i: 1,
            ..Default::default()
        }],
        ..Default::default()
    };
    let last = NodeProto {
        name: "last".into(),
        op_type: op.into(),
        input: vec!["h".into()],
        output: vec!["y".into()],
        ..Default::default()
    };
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(GraphProto {
            name: "tiny".into(),
            node: vec![gemm, last],
            initializer: if with_weight { vec![weight] } else { vec![] },
            input: vec![value_info("x", &input_dims)],
            output: vec![value_info("y", &[named_dim("batch"), dim(3)])],
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

/// Runs `product` on the model file and returns stderr, asserting failure and no output.
fn fails_with(tmp: &TempDir, bytes: &[u8], needles: &[&str]) {
    std::fs::write(tmp.path("m.onnx"), bytes).unwrap();
    let x: Vec<f32> = (0..8).map(|i| i as f32).collect();
    write_npy_f32(&tmp.path("x.npy"), &[2, 4], &x);
    write_npy_i64(&tmp.path("y.npy"), &[0, 1]);
    let out = tmp.path("out.safetensors");
    let o = hvp(&[
        "grad",
        "--model",
        &tmp.s("m.onnx"),
        "--inputs",
        &tmp.s("x.npy"),
        "--labels",
        &tmp.s("y.npy"),
        "--out",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure, got success");
    for n in needles {
        assert!(stderr.contains(n), "stderr lacks '{n}': {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!out.exists(), "an output file was written");
}

#[test]
fn the_tiny_model_itself_imports_and_runs() {
    let tmp = TempDir::new("onnx-tiny");
    std::fs::write(
        tmp.path("m.onnx"),
        tiny_model("Relu", vec![named_dim("N"), dim(4)], true),
    )
    .unwrap();
    let x: Vec<f32> = (0..8).map(|i| i as f32).collect();
    write_npy_f32(&tmp.path("x.npy"), &[2, 4], &x);
    write_npy_i64(&tmp.path("y.npy"), &[0, 1]);
    ok(&[
        "grad",
        "--model",
        &tmp.s("m.onnx"),
        "--inputs",
        &tmp.s("x.npy"),
        "--labels",
        &tmp.s("y.npy"),
        "--out",
        &tmp.s("g.safetensors"),
    ]);
    assert!(read_flat(&tmp.path("g.safetensors")).contains_key("fc.weight"));
}

#[test]
fn truncated_file_is_a_decode_error() {
    let tmp = TempDir::new("onnx-truncated");
    let bytes = std::fs::read(case_dir("mlp").join("legacy.onnx")).unwrap();
    fails_with(&tmp, &bytes[..bytes.len() / 2], &["is not a valid ONNX model"]);
}

#[test]
fn unknown_operator_is_named_with_the_supported_list() {
    let tmp = TempDir::new("onnx-unknown-op");
    let bytes = tiny_model("Cos", vec![named_dim("N"), dim(4)], true);
    fails_with(
        &tmp,
        &bytes,
        &[
            "Cos ×1 ('last')",
            "1 operator type(s) hvp does not support",
            "Supported: Add, AveragePool",
        ],
    );
}

#[test]
fn unresolvable_dynamic_shape_is_explained() {
    let tmp = TempDir::new("onnx-dynamic");
    let bytes = tiny_model("Relu", vec![named_dim("N"), named_dim("features")], true);
    fails_with(&tmp, &bytes, &["dynamic shape hvp cannot resolve", "'features'"]);
}

#[test]
fn missing_initializer_is_named() {
    let tmp = TempDir::new("onnx-missing");
    let bytes = tiny_model("Relu", vec![named_dim("N"), dim(4)], false);
    fails_with(
        &tmp,
        &bytes,
        &["node 'fc' (Gemm) reads 'fc.weight'", "missing initializer"],
    );
}

#[test]
fn wrong_example_shape_is_an_error() {
    let tmp = TempDir::new("onnx-shape");
    std::fs::write(
        tmp.path("m.onnx"),
        tiny_model("Relu", vec![named_dim("N"), dim(5)], true),
    )
    .unwrap();
    // Gemm's weight is [3, 4] but the input declares 5 features.
    fails_with(
        &tmp,
        &tiny_model("Relu", vec![named_dim("N"), dim(5)], true),
        &["node 'fc' (Gemm)", "cannot multiply"],
    );
}

/// `train --model` trains the imported graph (BatchNorm in train mode) and its
/// output overrides the initializers by name: the loss goes down.
#[test]
fn train_an_onnx_model_and_use_the_result() {
    let tmp = TempDir::new("onnx-train");
    let dir = case_dir("small_cnn");
    let model = dir.join("dynamo.onnx");
    let (inputs, labels) = (dir.join("inputs.npy"), dir.join("labels.npy"));
    let grad = |extra: &[&str]| -> f64 {
        let mut args = vec![
            "grad",
            "--model",
            model.to_str().unwrap(),
            "--inputs",
            inputs.to_str().unwrap(),
            "--labels",
            labels.to_str().unwrap(),
            "--dtype",
            "f64",
            "--out",
        ];
        let out = tmp.s("g.safetensors");
        args.push(&out);
        args.extend(extra);
        let text = ok(&args);
        let loss = text.split("mean loss ").nth(1).unwrap().split(',').next().unwrap();
        loss.trim().parse().unwrap()
    };
    let before = grad(&[]);
    ok(&[
        "train",
        "--model",
        model.to_str().unwrap(),
        "--inputs",
        inputs.to_str().unwrap(),
        "--labels",
        labels.to_str().unwrap(),
        "--epochs",
        "20",
        "--lr",
        "0.5",
        "--batch-size",
        "4",
        "--dtype",
        "f64",
        "--quiet",
        "--out",
        &tmp.s("trained.safetensors"),
    ]);
    let after = grad(&["--weights", &tmp.s("trained.safetensors")]);
    assert!((before - 2.279969).abs() < 1e-5, "initial loss {before}");
    assert!(
        after < 0.8 * before,
        "training did not reduce the loss: {before} → {after}"
    );
}

/// A convolution graph without BatchNormalization whose weights carry the
/// legacy exporter's folded names gets the folding warning (and still runs).
#[test]
fn folded_batchnorm_is_warned_about() {
    let tmp = TempDir::new("onnx-folded");
    let tensor = |name: &str, dims: Vec<i64>| TensorProto {
        name: name.into(),
        dims: dims.clone(),
        data_type: data_type::FLOAT,
        float_data: (0..dims.iter().product::<i64>())
            .map(|i| (i as f32 * 0.37).sin() * 0.3)
            .collect(),
        ..Default::default()
    };
    let node = |name: &str, op: &str, input: &[&str], output: &str| NodeProto {
        name: name.into(),
        op_type: op.into(),
        input: input.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        ..Default::default()
    };
    let bytes = ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(GraphProto {
            name: "folded".into(),
            node: vec![
                node("conv", "Conv", &["x", "onnx::Conv_5", "onnx::Conv_6"], "c"),
                node("pool", "GlobalAveragePool", &["c"], "p"),
                node("flat", "Flatten", &["p"], "y"),
            ],
            initializer: vec![
                tensor("onnx::Conv_5", vec![3, 1, 3, 3]),
                tensor("onnx::Conv_6", vec![3]),
            ],
            input: vec![value_info("x", &[named_dim("N"), dim(1), dim(5), dim(5)])],
            output: vec![value_info("y", &[named_dim("N"), dim(3)])],
        }),
        ..Default::default()
    }
    .encode_to_vec();
    std::fs::write(tmp.path("m.onnx"), bytes).unwrap();
    let o = hvp(&["params", "--model", &tmp.s("m.onnx")]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("BatchNorm was folded"), "{stderr}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("| onnx::Conv_6 | [3] | 3 | yes |"));
}

/// Shape plumbing with a dynamic batch (Shape → Gather → Unsqueeze → Concat →
/// Reshape), Squeeze, Dropout, Erf and AveragePool: the imported graph's HVP
/// equals central differences of its gradient (f64).
#[test]
fn dynamic_shape_plumbing_and_remaining_operators_differentiate_exactly() {
    let tmp = TempDir::new("onnx-plumbing");
    let float = |name: &str, dims: Vec<i64>, values: Vec<f32>| TensorProto {
        name: name.into(),
        dims,
        data_type: data_type::FLOAT,
        float_data: values,
        ..Default::default()
    };
    let int64 = |name: &str, dims: Vec<i64>, values: Vec<i64>| TensorProto {
        name: name.into(),
        dims,
        data_type: data_type::INT64,
        int64_data: values,
        ..Default::default()
    };
    let ints = |name: &str, v: Vec<i64>| AttributeProto {
        name: name.into(),
        r#type: 7,
        ints: v,
        ..Default::default()
    };
    let node = |op: &str, input: &[&str], output: &str, attribute: Vec<AttributeProto>| NodeProto {
        name: format!("{op}_{output}"),
        op_type: op.into(),
        input: input.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute,
        ..Default::default()
    };
    let conv_w: Vec<f32> = vec![0.8, -0.6, 1.1];
    let fc_w: Vec<f32> = (0..60).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.05).collect();
    let graph = GraphProto {
        name: "plumbing".into(),
        node: vec![
            node(
                "AveragePool",
                &["x"],
                "a",
                vec![ints("kernel_shape", vec![2, 2]), ints("strides", vec![2, 2])],
            ),
            node("Conv", &["a", "conv.weight"], "b", vec![]),
            node("Erf", &["b"], "c", vec![]),
            node("Dropout", &["c"], "d", vec![]),
            node("Shape", &["d"], "s", vec![]),
            node("Gather", &["s", "zero"], "n", vec![]),
            node("Unsqueeze", &["n", "axis0"], "n1", vec![]),
            node(
                "Concat",
                &["n1", "minus_one"],
                "target",
                vec![AttributeProto {
                    name: "axis".into(),
                    r#type: 2,
                    i: 0,
                    ..Default::default()
                }],
            ),
            node("Reshape", &["d", "target"], "e", vec![]),
            node("Unsqueeze", &["e", "axis2"], "f", vec![]),
            node("Squeeze", &["f", "axis2"], "h", vec![]),
            NodeProto {
                attribute: vec![AttributeProto {
                    name: "transB".into(),
                    r#type: 2,
                    i: 1,
                    ..Default::default()
                }],
                ..node("Gemm", &["h", "fc.weight"], "y", vec![])
            },
        ],
        initializer: vec![
            float("conv.weight", vec![3, 1, 1, 1], conv_w.clone()),
            float("fc.weight", vec![5, 12], fc_w.clone()),
            int64("zero", vec![], vec![0]),
            int64("axis0", vec![1], vec![0]),
            int64("axis2", vec![1], vec![2]),
            int64("minus_one", vec![1], vec![-1]),
        ],
        input: vec![value_info("x", &[named_dim("N"), dim(1), dim(4), dim(4)])],
        output: vec![value_info("y", &[named_dim("N"), dim(5)])],
    };
    let bytes = ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec();
    std::fs::write(tmp.path("m.onnx"), bytes).unwrap();
    let x: Vec<f32> = (0..48).map(|i| ((i * 5 % 11) as f32) * 0.1 - 0.4).collect();
    write_npy_f32(&tmp.path("x.npy"), &[3, 1, 4, 4], &x);
    write_npy_i64(&tmp.path("y.npy"), &[0, 3, 4]);
    let v_conv = [0.3, -0.2, 0.5];
    let v_fc: Vec<f64> = (0..60).map(|i| ((i % 5) as f64 - 2.0) * 0.1).collect();
    let weights = |h: f64, path: &str| {
        let conv: Vec<f64> = conv_w.iter().zip(&v_conv).map(|(&w, d)| w as f64 + h * d).collect();
        let fc: Vec<f64> = fc_w.iter().zip(&v_fc).map(|(&w, d)| w as f64 + h * d).collect();
        hvp_model::io::write_safetensors(
            &tmp.path(path),
            &[
                ("conv.weight".into(), Tensor::new(vec![3, 1, 1, 1], conv).unwrap()),
                ("fc.weight".into(), Tensor::new(vec![5, 12], fc).unwrap()),
            ],
            DType::F64,
        )
        .unwrap();
    };
    weights(0.0, "w0.safetensors");
    let vector = [
        (
            "conv.weight".to_string(),
            Tensor::new(vec![3, 1, 1, 1], v_conv.to_vec()).unwrap(),
        ),
        ("fc.weight".to_string(), Tensor::new(vec![5, 12], v_fc.clone()).unwrap()),
    ];
    hvp_model::io::write_safetensors(&tmp.path("v.safetensors"), &vector, DType::F64).unwrap();
    let base = |cmd: &str, w: &str, out: &str| -> Vec<String> {
        [
            cmd,
            "--model",
            &tmp.s("m.onnx"),
            "--weights",
            &tmp.s(w),
            "--inputs",
            &tmp.s("x.npy"),
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(
            [
                "--labels",
                &tmp.s("y.npy"),
                "--dtype",
                "f64",
                "--batch-size",
                "2",
                "--quiet",
            ]
            .map(String::from),
        )
        .chain(["--out".to_string(), tmp.s(out)])
        .collect()
    };
    let run = |args: Vec<String>| ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let h = 1e-4;
    weights(h, "wp.safetensors");
    weights(-h, "wm.safetensors");
    run(base("grad", "wp.safetensors", "gp.safetensors"));
    run(base("grad", "wm.safetensors", "gm.safetensors"));
    let mut product = base("product", "w0.safetensors", "hv.safetensors");
    product.extend(["--vector".to_string(), tmp.s("v.safetensors")]);
    run(product);
    let (gp, gm, hv) = (
        read_flat(&tmp.path("gp.safetensors")),
        read_flat(&tmp.path("gm.safetensors")),
        read_flat(&tmp.path("hv.safetensors")),
    );
    let (mut diff, mut norm) = (0.0, 0.0);
    for (k, exact) in &hv {
        for ((a, b), e) in gp[k].iter().zip(&gm[k]).zip(exact) {
            let fd = (a - b) / (2.0 * h);
            diff += (fd - e) * (fd - e);
            norm += e * e;
        }
    }
    let e = (diff / norm).sqrt();
    assert!(norm > 1e-6, "the product is not trivially zero");
    assert!(
        e < 1e-6,
        "HVP differs from central differences of the gradient by {e:e}"
    );
}

/// `init --model` writes the ONNX model's trainable initializers as a state_dict
/// (that `--weights` reads back unchanged) or a random direction over them.
#[test]
fn init_writes_the_initializers_and_directions_of_an_onnx_model() {
    let tmp = TempDir::new("onnx-init");
    let model = fixture("onnx/small_cnn/dynamo.onnx");
    let m = model.to_str().unwrap();
    let (w, v, vfc) = (tmp.s("w.safetensors"), tmp.s("v.safetensors"), tmp.s("vfc.safetensors"));
    ok(&["init", "--model", m, "--dtype", "f64", "--out", &w]);
    ok(&["init", "--model", m, "--random-vector", "--out", &v]);
    ok(&[
        "init",
        "--model",
        m,
        "--params",
        "fc.*",
        "--random-vector",
        "--out",
        &vfc,
    ]);
    let imported = hvp_onnx::load(&model, &hvp_onnx::ImportOptions::default()).unwrap();
    let written = read_flat(Path::new(&w));
    assert_eq!(written.len(), imported.model.params.len());
    for (spec, t) in imported.model.params.iter().zip(&imported.weights.params) {
        assert_eq!(written[&spec.name], t.data(), "{}", spec.name);
    }
    assert_eq!(read_flat(Path::new(&v)).len(), 7);
    let fc: Vec<String> = read_flat(Path::new(&vfc)).into_keys().collect();
    assert_eq!(fc, vec!["fc.bias".to_string(), "fc.weight".to_string()]);
}

/// `validate --model`: leave-one-out validation of an ONNX model (measured
/// Pearson 0.993 over 3 removals with full-batch gradient-descent retraining).
#[test]
fn validate_runs_on_an_onnx_model() {
    let tmp = TempDir::new("onnx-validate");
    let dir = fixture("onnx/mlp");
    let data = format!(
        "npy:{},{}",
        dir.join("inputs.npy").display(),
        dir.join("labels.npy").display()
    );
    let report = tmp.s("val.json");
    let model = dir.join("legacy.onnx");
    ok(&[
        "validate",
        "--model",
        model.to_str().unwrap(),
        "--train",
        &data,
        "--test",
        &data,
        "--test-index",
        "1",
        "--k",
        "3",
        "--retrain",
        "gd",
        "--retrain-epochs",
        "20",
        "--lr",
        "0.05",
        "--solver",
        "cg",
        "--curvature",
        "ggn",
        "--damping",
        "0.1",
        "--dtype",
        "f64",
        "--report",
        &report,
        "--quiet",
    ]);
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(v["model"], "onnx:legacy.onnx");
    assert_eq!(v["removed"].as_array().unwrap().len(), 3);
    assert!(v["pearson"].as_f64().unwrap() > 0.9, "{v}");
}

/// Linear layers inside attention blocks (MatMul with a transposed weight and a
/// fused bias `Add`, `nn.MultiheadAttention`'s q/k/v projection on `[S, batch, D]`,
/// its out-projection as a Gemm on `[S·batch, D]` token rows) are K-FAC layers whose
/// per-example gradients sum over the example's tokens, and depthwise convolutions
/// one K-FAC layer per group: the one-pass scores they give equal one forward-mode
/// (JVP) pass per vector, to 1e-10 in f64.
#[test]
fn attention_linear_layers_have_exact_per_example_gradients() {
    use hvp_curvature::Problem;
    for (model_name, glob) in [
        ("vit", "blocks.*.mlp.*"),
        ("vit", "blocks.*.attn.*"),
        ("text_transformer", "block1.attn.*"),
        ("text_transformer", "block2.[qof]*"),
        ("mobilenet_v2", "blocks.*"),
        ("mobilenet_v2", "stem.*"),
    ] {
        for exporter in ["legacy", "dynamo"] {
            let dir = case_dir(&format!("zoo/{model_name}"));
            let options = hvp_onnx::ImportOptions {
                params_glob: Some(glob.to_string()),
            };
            let imported = hvp_onnx::load(&dir.join(format!("{exporter}.onnx")), &options).unwrap();
            let data = hvp_data::NpyDataset::open(&dir.join("inputs.npy"), &dir.join("labels.npy")).unwrap();
            let problem = Problem::new(&imported.model, &imported.weights, &data, 2)
                .unwrap()
                .with_dtype(DType::F64);
            let vectors: Vec<_> = (0..2)
                .map(|s| hvp_model::ParamVector::random_normal(&imported.model, s))
                .collect();
            let layered = hvp_solvers::kfac::example_gradient_dots(&problem, &vectors, &|_| {}).unwrap();
            assert!(
                layered.is_some(),
                "{model_name} {exporter} '{glob}': every selected parameter is in a K-FAC layer"
            );
            let many = hvp_influence::scores::scores_many(&problem, &vectors, &|_| {}).unwrap();
            for (q, v) in vectors.iter().enumerate() {
                let one = hvp_influence::scores::scores(&problem, v, &|_| {}).unwrap();
                let scale = one.iter().fold(0.0f64, |m, s| m.max(s.abs()));
                for (i, (a, b)) in many[q].iter().zip(&one).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-10 * scale,
                        "{model_name} {exporter} '{glob}' vector {q} example {i}: {a} vs {b}"
                    );
                }
            }
        }
    }
}

/// EK-FAC factors of a ViT (attention and MLP layers factored, LayerNorm and
/// class token not) and of a MobileNetV2 (depthwise convolutions factored group
/// by group, the dilated grouped convolution not) are written, read back by
/// `solve`, and the parameters without a curvature estimate are named.
#[test]
fn transformer_factors_save_load_and_name_what_they_leave_out() {
    for (zoo, layers, uncovered, named) in [
        ("vit", "factors for 10 layers", "12 parameter tensor(s)", "cls_token"),
        (
            "mobilenet_v2",
            "factors for 96 layers",
            "2 parameter tensor(s)",
            "grouped.weight",
        ),
    ] {
        let tmp = TempDir::new(&format!("zoo-factors-{zoo}"));
        let dir = case_dir(&format!("zoo/{zoo}"));
        let model = dir.join("legacy.onnx");
        let (inputs, labels) = (dir.join("inputs.npy"), dir.join("labels.npy"));
        let common = [
            "--model",
            model.to_str().unwrap(),
            "--inputs",
            inputs.to_str().unwrap(),
            "--labels",
            labels.to_str().unwrap(),
        ];
        let factors = tmp.path("f.safetensors");
        let mut args = vec!["factors", "--kind", "ekfac", "--out", factors.to_str().unwrap()];
        args.extend(common);
        let o = hvp(&args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{stderr}");
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(stdout.contains(layers), "{zoo}: {stdout}");
        assert!(stderr.contains(uncovered) && stderr.contains(named), "{zoo}: {stderr}");
        let g = tmp.path("g.safetensors");
        let mut args = vec!["grad", "--quiet", "--out", g.to_str().unwrap()];
        args.extend(common);
        ok(&args);
        let x = tmp.path("x.safetensors");
        let mut args = vec![
            "solve",
            "--solver",
            "ekfac",
            "--curvature",
            "ggn",
            "--damping",
            "1",
            "--factors",
            factors.to_str().unwrap(),
            "--rhs",
            g.to_str().unwrap(),
            "--out",
            x.to_str().unwrap(),
        ];
        args.extend(common);
        let o = hvp(&args);
        assert!(o.status.success(), "{zoo}: {}", String::from_utf8_lossy(&o.stderr));
        assert!(x.exists());
    }
}
