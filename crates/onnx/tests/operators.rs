//! Operators through the importer: unsupported ones are all named in one
//! error; elementwise ones (activations, the decomposed forms of
//! normalisations) have exact first and second derivatives — each checked in
//! f64 by putting it in place of the MLP fixture's ReLU and comparing hvp's
//! Hessian-vector product with central differences of its gradient.

use hvp_curvature::{Curvature, Problem};
use hvp_data::NpyDataset;
use hvp_model::{ParamVector, Weights};
use hvp_onnx::proto::{AttributeProto, ModelProto, NodeProto, TensorProto};
use hvp_onnx::{load, ImportOptions, OnnxError};
use prost::Message;
use std::path::{Path, PathBuf};

fn case(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/onnx")
        .join(name)
}

fn mlp() -> ModelProto {
    ModelProto::decode(std::fs::read(case("mlp").join("legacy.onnx")).unwrap().as_slice()).unwrap()
}

/// The model written to `m.onnx` in a fresh scratch folder, removed when the
/// returned guard drops.
fn save(model: &ModelProto, tag: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix(&format!("hvp-onnx-ops-{tag}-"))
        .tempdir()
        .unwrap();
    let path = dir.path().join("m.onnx");
    std::fs::write(&path, model.encode_to_vec()).unwrap();
    (dir, path)
}

fn node(op: &str, name: &str, domain: &str) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name: name.into(),
        domain: domain.into(),
        input: vec!["x".into()],
        output: vec![format!("{name}_out")],
        ..Default::default()
    }
}

#[test]
fn every_unsupported_operator_is_named_in_one_error() {
    let mut model = mlp();
    let g = model.graph.as_mut().unwrap();
    g.node.push(node("Foo", "foo1", ""));
    g.node.push(node("Bar", "bar", ""));
    g.node.push(node("Foo", "foo2", ""));
    g.node.push(node("Baz", "baz", "com.example"));
    let (_scratch, path) = save(&model, "unsupported");
    eprintln!("model with unsupported operators: {}", path.display());
    let err = load(&path, &ImportOptions::default()).err().expect("refused");
    assert!(matches!(err, OnnxError::UnsupportedOps { count: 3, .. }), "{err}");
    // The initializers' roles are known before the operators are read (`hvp params` shows them).
    if let OnnxError::UnsupportedOps { initializers, .. } = &err {
        let params: Vec<&str> = initializers
            .iter()
            .filter(|i| i.role == hvp_onnx::Role::Parameter)
            .map(|i| i.name.as_str())
            .collect();
        assert_eq!(params.len(), 4, "{params:?}");
    }
    let text = err.to_string();
    for part in [
        "3 operator type(s)",
        "Foo ×2 ('foo1', 'foo2')",
        "Bar ×1 ('bar')",
        "com.example::Baz ×1 ('baz')",
    ] {
        assert!(text.contains(part), "missing {part:?} in: {text}");
    }
}

/// A float scalar initializer.
fn scalar(name: &str, v: f32) -> TensorProto {
    TensorProto {
        name: name.into(),
        data_type: 1,
        dims: vec![],
        float_data: vec![v],
        ..Default::default()
    }
}

fn float_attr(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: 1,
        f: v,
        ..Default::default()
    }
}

#[test]
fn elementwise_operators_have_exact_second_derivatives() {
    let dir = case("mlp");
    let data = NpyDataset::open(&dir.join("inputs.npy"), &dir.join("labels.npy")).unwrap();
    // (operator, extra inputs as initializers, attributes); in place of the ReLU.
    // ELU is not among them: its second derivative jumps at 0, where this
    // fixture has pre-activations, so central differences of the gradient
    // straddle the jump (its rule is checked away from 0 in hvp-autodiff's
    // unit tests).
    let cases: Vec<(&str, Vec<TensorProto>, Vec<AttributeProto>)> = vec![
        ("HardSwish", vec![], vec![]),
        ("Softplus", vec![], vec![]),
        (
            "HardSigmoid",
            vec![],
            vec![float_attr("alpha", 0.3), float_attr("beta", 0.4)],
        ),
        ("Clip", vec![scalar("lo", -0.4), scalar("hi", 0.9)], vec![]),
        ("Pow", vec![scalar("p", 3.0)], vec![]),
        ("Exp", vec![], vec![]),
        ("Neg", vec![], vec![]),
        ("Tanh", vec![], vec![]),
    ];
    for (op, extra, attributes) in cases {
        let mut model = mlp();
        let g = model.graph.as_mut().unwrap();
        let relu = g
            .node
            .iter_mut()
            .find(|n| n.op_type == "Relu")
            .expect("the MLP has a ReLU");
        relu.op_type = op.into();
        relu.attribute = attributes;
        for t in &extra {
            relu.input.push(t.name.clone());
        }
        g.initializer.extend(extra);
        let (_scratch, path) = save(&model, op);
        let imported = load(&path, &ImportOptions::default()).unwrap_or_else(|e| panic!("{op}: {e}"));
        let (m, w) = (&imported.model, &imported.weights);
        let problem = Problem::new(m, w, &data, 4).unwrap();
        let v = ParamVector::random_normal(m, 7);
        let hv = problem
            .product_as::<f64>(Curvature::Hessian, &v, &|_| {})
            .unwrap()
            .value;
        // Central differences of the gradient along v.
        let h = 1e-5;
        let at = |s: f64| {
            let mut shifted: Weights = w.clone();
            for (p, d) in shifted.params.iter_mut().zip(&v.tensors) {
                p.data_mut().iter_mut().zip(d.data()).for_each(|(x, dx)| *x += s * dx);
            }
            Problem::new(m, &shifted, &data, 4)
                .unwrap()
                .gradient_as::<f64>(&|_| {})
                .unwrap()
                .value
        };
        let mut fd = at(h);
        fd.axpy(-1.0, &at(-h));
        fd.scale(0.5 / h);
        let err = hv.relative_error(&fd);
        assert!(
            err < 1e-6,
            "{op}: Hessian-vector product vs central differences: {err:e} (norms {} and {})",
            hv.norm(),
            fd.norm()
        );
        assert!(hv.norm() > 0.0, "{op}: a non-trivial product");
    }
}

/// LayerNormalization (scale and bias trainable) between the MLP fixture's
/// first layer and its ReLU: the loss equals a direct computation of
/// `W₂ relu(LN(W₀ x + b₀)) + b₂`, and the Hessian-vector product equals
/// central differences of the gradient.
#[test]
fn layer_normalization_computes_and_differentiates_exactly() {
    let dir = case("mlp");
    let data = NpyDataset::open(&dir.join("inputs.npy"), &dir.join("labels.npy")).unwrap();
    let mut model = mlp();
    let g = model.graph.as_mut().unwrap();
    let k = g.node.iter().position(|n| n.op_type == "Relu").unwrap();
    let hidden = g.node[k].input[0].clone();
    g.node[k].input[0] = "normalised".into();
    let width = 16usize;
    let vector = |name: &str, f: &dyn Fn(usize) -> f32| TensorProto {
        name: name.into(),
        data_type: 1,
        dims: vec![width as i64],
        float_data: (0..width).map(f).collect(),
        ..Default::default()
    };
    g.initializer.push(vector("ln.weight", &|i| 0.5 + 0.1 * i as f32));
    g.initializer.push(vector("ln.bias", &|i| 0.05 * i as f32 - 0.3));
    g.node.insert(
        k,
        NodeProto {
            op_type: "LayerNormalization".into(),
            name: "ln".into(),
            input: vec![hidden, "ln.weight".into(), "ln.bias".into()],
            output: vec!["normalised".into()],
            attribute: vec![
                float_attr("epsilon", 1e-3),
                AttributeProto {
                    name: "axis".into(),
                    r#type: 2,
                    i: -1,
                    ..Default::default()
                },
            ],
            ..Default::default()
        },
    );
    let (_scratch, path) = save(&model, "layernorm");
    let imported = load(&path, &ImportOptions::default()).unwrap();
    let (m, w) = (&imported.model, &imported.weights);
    // Parameters in the file's initializer order (PyTorch writes its state_dict's).
    assert_eq!(
        m.param_names(),
        vec!["0.weight", "0.bias", "2.weight", "2.bias", "ln.weight", "ln.bias"]
    );
    let problem = Problem::new(m, w, &data, 4).unwrap();
    // The loss, computed directly in f64.
    let p = |name: &str| {
        w.params[m.param_names().iter().position(|n| *n == name).unwrap()]
            .data()
            .to_vec()
    };
    let (w0, b0, gamma, beta, w2, b2) = (
        p("0.weight"),
        p("0.bias"),
        p("ln.weight"),
        p("ln.bias"),
        p("2.weight"),
        p("2.bias"),
    );
    let mut batch = hvp_data::Batch::default();
    let n = hvp_data::Dataset::len(&data);
    hvp_data::Dataset::read(&data, &(0..n).collect::<Vec<_>>(), &mut batch).unwrap();
    let d_in = batch.x.len() / n;
    // The float32 attribute is read as the decimal it was written with.
    let eps = 1e-3;
    let mut total = 0.0;
    for (x, &y) in batch.x.chunks(d_in).zip(&batch.labels) {
        let h: Vec<f64> = (0..width)
            .map(|j| b0[j] + (0..d_in).map(|i| w0[j * d_in + i] * x[i]).sum::<f64>())
            .collect();
        let mean = h.iter().sum::<f64>() / width as f64;
        let var = h.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / width as f64;
        let a: Vec<f64> = (0..width)
            .map(|j| ((h[j] - mean) / (var + eps).sqrt() * gamma[j] + beta[j]).max(0.0))
            .collect();
        let logits: Vec<f64> = (0..b2.len())
            .map(|c| b2[c] + (0..width).map(|j| w2[c * width + j] * a[j]).sum::<f64>())
            .collect();
        let top = logits.iter().cloned().fold(f64::MIN, f64::max);
        let lse = top + logits.iter().map(|l| (l - top).exp()).sum::<f64>().ln();
        total += lse - logits[y];
    }
    let direct = total / n as f64;
    let loss = problem.gradient_as::<f64>(&|_| {}).unwrap().loss;
    assert!(
        (loss - direct).abs() <= 1e-12 * direct.abs(),
        "loss {loss} vs direct {direct}"
    );
    // Second derivatives: H v against central differences of the gradient.
    let v = ParamVector::random_normal(m, 5);
    let hv = problem
        .product_as::<f64>(Curvature::Hessian, &v, &|_| {})
        .unwrap()
        .value;
    let h = 1e-5;
    let at = |s: f64| {
        let mut shifted: Weights = w.clone();
        for (t, d) in shifted.params.iter_mut().zip(&v.tensors) {
            t.data_mut().iter_mut().zip(d.data()).for_each(|(x, dx)| *x += s * dx);
        }
        Problem::new(m, &shifted, &data, 4)
            .unwrap()
            .gradient_as::<f64>(&|_| {})
            .unwrap()
            .value
    };
    let mut fd = at(h);
    fd.axpy(-1.0, &at(-h));
    fd.scale(0.5 / h);
    let err = hv.relative_error(&fd);
    assert!(err < 1e-6, "LayerNormalization: H v vs central differences {err:e}");
}

/// ReduceSum over the hidden features (axes as an opset-13 input), feeding a
/// product with the features themselves: the loss equals that of the same
/// graph with `16 × ReduceMean`, and H v equals differences of the gradient.
#[test]
fn reduce_sum_computes_and_differentiates_exactly() {
    let dir = case("mlp");
    let data = NpyDataset::open(&dir.join("inputs.npy"), &dir.join("labels.npy")).unwrap();
    let build = |sum: bool| {
        let mut model = mlp();
        let g = model.graph.as_mut().unwrap();
        let k = g.node.iter().position(|n| n.op_type == "Relu").unwrap();
        let hidden = g.node[k].input[0].clone();
        g.node[k].input[0] = "scaled".into();
        g.initializer.push(TensorProto {
            name: "axes".into(),
            data_type: 7,
            dims: vec![1],
            int64_data: vec![1],
            ..Default::default()
        });
        g.initializer.push(scalar("sixteen", 16.0));
        let reduce = NodeProto {
            op_type: if sum { "ReduceSum" } else { "ReduceMean" }.into(),
            name: "reduce".into(),
            input: if sum {
                vec![hidden.clone(), "axes".into()]
            } else {
                vec![hidden.clone()]
            },
            output: vec!["reduced".into()],
            attribute: if sum {
                vec![]
            } else {
                vec![AttributeProto {
                    name: "axes".into(),
                    r#type: 7,
                    ints: vec![1],
                    ..Default::default()
                }]
            },
            ..Default::default()
        };
        let times = |a: &str, b: &str, out: &str| NodeProto {
            op_type: "Mul".into(),
            name: out.into(),
            input: vec![a.into(), b.into()],
            output: vec![out.into()],
            ..Default::default()
        };
        let mut added = vec![reduce];
        if !sum {
            added.push(times("reduced", "sixteen", "reduced16"));
        }
        let total = if sum { "reduced" } else { "reduced16" };
        added.push(times(&hidden, total, "scaled"));
        for (i, n) in added.into_iter().enumerate() {
            g.node.insert(k + i, n);
        }
        let (_scratch, path) = save(&model, if sum { "reduce-sum" } else { "reduce-mean" });
        load(&path, &ImportOptions::default()).unwrap()
    };
    let (with_sum, with_mean) = (build(true), build(false));
    let (m, w) = (&with_sum.model, &with_sum.weights);
    let loss = |i: &hvp_onnx::Imported| {
        Problem::new(&i.model, &i.weights, &data, 4)
            .unwrap()
            .gradient_as::<f64>(&|_| {})
            .unwrap()
            .loss
    };
    let (a, b) = (loss(&with_sum), loss(&with_mean));
    assert!((a - b).abs() <= 1e-12 * b.abs(), "ReduceSum {a} vs 16 × ReduceMean {b}");
    let problem = Problem::new(m, w, &data, 4).unwrap();
    let v = ParamVector::random_normal(m, 9);
    let hv = problem
        .product_as::<f64>(Curvature::Hessian, &v, &|_| {})
        .unwrap()
        .value;
    let h = 1e-5;
    let at = |s: f64| {
        let mut shifted: Weights = w.clone();
        for (t, d) in shifted.params.iter_mut().zip(&v.tensors) {
            t.data_mut().iter_mut().zip(d.data()).for_each(|(x, dx)| *x += s * dx);
        }
        Problem::new(m, &shifted, &data, 4)
            .unwrap()
            .gradient_as::<f64>(&|_| {})
            .unwrap()
            .value
    };
    let mut fd = at(h);
    fd.axpy(-1.0, &at(-h));
    fd.scale(0.5 / h);
    let err = hv.relative_error(&fd);
    assert!(err < 1e-6, "ReduceSum: H v vs central differences {err:e}");
}

/// InstanceNormalization after the small CNN's first convolution (per-channel
/// scale and bias trainable): H v equals central differences of the gradient.
#[test]
fn instance_normalization_differentiates_exactly() {
    let dir = case("small_cnn");
    let data = NpyDataset::open(&dir.join("inputs.npy"), &dir.join("labels.npy")).unwrap();
    let mut model = ModelProto::decode(std::fs::read(dir.join("legacy.onnx")).unwrap().as_slice()).unwrap();
    let g = model.graph.as_mut().unwrap();
    let k = g.node.iter().position(|n| n.op_type == "Conv").unwrap();
    let conv_out = g.node[k].output[0].clone();
    let channels = 4usize;
    for n in g.node.iter_mut().skip(k + 1) {
        for i in n.input.iter_mut().filter(|i| **i == conv_out) {
            *i = "instance_normalised".into();
        }
    }
    let vector = |name: &str, f: &dyn Fn(usize) -> f32| TensorProto {
        name: name.into(),
        data_type: 1,
        dims: vec![channels as i64],
        float_data: (0..channels).map(f).collect(),
        ..Default::default()
    };
    g.initializer.push(vector("in.weight", &|i| 0.7 + 0.2 * i as f32));
    g.initializer.push(vector("in.bias", &|i| 0.1 * i as f32 - 0.15));
    g.node.insert(
        k + 1,
        NodeProto {
            op_type: "InstanceNormalization".into(),
            name: "in".into(),
            input: vec![conv_out, "in.weight".into(), "in.bias".into()],
            output: vec!["instance_normalised".into()],
            attribute: vec![float_attr("epsilon", 1e-3)],
            ..Default::default()
        },
    );
    let (_scratch, path) = save(&model, "instancenorm");
    let imported = load(&path, &ImportOptions::default()).unwrap();
    let (m, w) = (&imported.model, &imported.weights);
    assert!(m.param_names().contains(&"in.weight") && m.param_names().contains(&"in.bias"));
    let problem = Problem::new(m, w, &data, 4).unwrap();
    let v = ParamVector::random_normal(m, 3);
    let hv = problem
        .product_as::<f64>(Curvature::Hessian, &v, &|_| {})
        .unwrap()
        .value;
    let h = 1e-5;
    let at = |s: f64| {
        let mut shifted: Weights = w.clone();
        for (t, d) in shifted.params.iter_mut().zip(&v.tensors) {
            t.data_mut().iter_mut().zip(d.data()).for_each(|(x, dx)| *x += s * dx);
        }
        Problem::new(m, &shifted, &data, 4)
            .unwrap()
            .gradient_as::<f64>(&|_| {})
            .unwrap()
            .value
    };
    let mut fd = at(h);
    fd.axpy(-1.0, &at(-h));
    fd.scale(0.5 / h);
    let err = hv.relative_error(&fd);
    assert!(err < 1e-6, "InstanceNormalization: H v vs central differences {err:e}");
}

/// The graph operations behind the zoo's models (Slice, Gather, Split, Where
/// with an infinite fill, Expand over the batch, embeddings of token ids, Linear
/// layers on tokens, grouped, dilated and transposed convolutions,
/// GroupNormalization) against central differences in f64: the gradient along
/// a direction equals differences of the loss (the VJP), and the Hessian-vector
/// product equals differences of the gradient (the second-order path).
#[test]
fn zoo_operations_match_central_differences() {
    for zoo in ["vit", "text_transformer", "gpt", "mixer", "unet"] {
        let dir = case("../zoo").join(zoo);
        let data = NpyDataset::open(&dir.join("inputs.npy"), &dir.join("labels.npy")).unwrap();
        for exporter in ["legacy", "dynamo"] {
            let imported = load(&dir.join(format!("{exporter}.onnx")), &ImportOptions::default()).unwrap();
            let (m, w) = (&imported.model, &imported.weights);
            let v = ParamVector::random_normal(m, 5);
            let problem = Problem::new(m, w, &data, 2).unwrap();
            let grad = problem.gradient_as::<f64>(&|_| {}).unwrap().value;
            let hv = problem
                .product_as::<f64>(Curvature::Hessian, &v, &|_| {})
                .unwrap()
                .value;
            let at = |s: f64| {
                let mut shifted: Weights = w.clone();
                for (t, d) in shifted.params.iter_mut().zip(&v.tensors) {
                    t.data_mut().iter_mut().zip(d.data()).for_each(|(x, dx)| *x += s * dx);
                }
                Problem::new(m, &shifted, &data, 2)
                    .unwrap()
                    .gradient_as::<f64>(&|_| {})
                    .unwrap()
            };
            let h = 1e-5;
            let (plus, minus) = (at(h), at(-h));
            let slope = (plus.loss - minus.loss) / (2.0 * h);
            let directional = grad.dot(&v);
            assert!(
                (directional - slope).abs() <= 1e-7 * directional.abs().max(1.0),
                "{zoo} ({exporter}): gradient·v {directional} vs loss differences {slope}"
            );
            let mut fd = plus.value;
            fd.axpy(-1.0, &minus.value);
            fd.scale(0.5 / h);
            let err = hv.relative_error(&fd);
            assert!(err < 1e-6, "{zoo} ({exporter}): H v vs central differences {err:e}");
            eprintln!("{zoo} ({exporter}): gradient·v {directional:.6e} vs {slope:.6e}, H v relative error {err:.1e}");
        }
    }
}
