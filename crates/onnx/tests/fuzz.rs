//! Fuzz tests of the ONNX importer: the exported fixtures mutated thousands of
//! times, both as bytes (bit flips, truncations) and as messages (dimensions,
//! data types, attributes, operator names, wiring and external-data locations
//! set to hostile values). Every mutant must be imported or refused with an
//! error; an imported one must then run a gradient pass without panicking.

use hvp_curvature::Problem;
use hvp_data::InMemory;
use hvp_io::fuzz::{run_cases, Mutator};
use hvp_onnx::proto::{ModelProto, StringStringEntryProto};
use hvp_onnx::{load, ImportOptions, SUPPORTED_OPS};
use prost::Message;
use std::path::Path;

fn fixture(name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/onnx")
        .join(name);
    std::fs::read(p).unwrap()
}

/// A fresh scratch folder (removed when the guard drops) with a `model/`
/// folder and files inside and outside it.
fn temp_dir(tag: &str) -> tempfile::TempDir {
    let guard = tempfile::Builder::new()
        .prefix(&format!("hvp-fuzz-onnx-{tag}-"))
        .tempdir()
        .unwrap();
    let d = guard.path();
    std::fs::create_dir_all(d.join("model")).unwrap();
    std::fs::write(d.join("outside.bin"), vec![1u8; 4096]).unwrap();
    std::fs::write(d.join("model/w.bin"), vec![0u8; 4096]).unwrap();
    guard
}

const EXTREME_DIMS: [i64; 8] = [0, -1, 1, 7, 1 << 20, 1 << 31, 1 << 40, i64::MAX];

/// One structural mutation of the model.
fn mutate_message(m: &mut Mutator, model: &mut ModelProto) {
    let Some(g) = model.graph.as_mut() else { return };
    match m.below(9) {
        0 if !g.initializer.is_empty() => {
            let k = m.below(g.initializer.len());
            let t = &mut g.initializer[k];
            if t.dims.is_empty() {
                t.dims.push(EXTREME_DIMS[m.below(8)]);
            } else {
                let d = m.below(t.dims.len());
                t.dims[d] = EXTREME_DIMS[m.below(8)];
            }
        }
        1 if !g.initializer.is_empty() => {
            let k = m.below(g.initializer.len());
            let t = &mut g.initializer[k];
            match m.below(3) {
                0 => t.raw_data.truncate(m.below(t.raw_data.len() + 1)),
                1 => t.data_type = m.below(20) as i32,
                _ => {
                    // Point the tensor at external data, inside or (hostile) outside the folder.
                    let locations = [
                        "w.bin",
                        "../outside.bin",
                        "/etc/passwd",
                        "/dev/zero",
                        "missing.bin",
                        ".",
                    ];
                    t.data_location = 1;
                    t.raw_data.clear();
                    t.external_data = vec![StringStringEntryProto {
                        key: "location".into(),
                        value: locations[m.below(locations.len())].into(),
                    }];
                    if m.below(2) == 0 {
                        t.external_data.push(StringStringEntryProto {
                            key: ["offset", "length"][m.below(2)].into(),
                            value: ["0", "4000", "18446744073709551615", "-3", "x"][m.below(5)].into(),
                        });
                    }
                }
            }
        }
        2 if !g.node.is_empty() => {
            let k = m.below(g.node.len());
            let ops = SUPPORTED_OPS;
            g.node[k].op_type = if m.below(5) == 0 {
                "NoSuchOp".into()
            } else {
                ops[m.below(ops.len())].into()
            };
        }
        3 if !g.node.is_empty() => {
            let k = m.below(g.node.len());
            let n = &mut g.node[k];
            match m.below(3) {
                0 => {
                    let _ = n.input.pop();
                }
                1 if !n.input.is_empty() => {
                    let i = m.below(n.input.len());
                    n.input[i] = "no_such_value".into();
                }
                _ => {
                    let dup = n.input.first().cloned().unwrap_or_default();
                    n.input.push(dup);
                }
            }
        }
        4 if !g.node.is_empty() => {
            let k = m.below(g.node.len());
            let n = &mut g.node[k];
            if !n.attribute.is_empty() {
                let a = m.below(n.attribute.len());
                let attr = &mut n.attribute[a];
                attr.i = EXTREME_DIMS[m.below(8)];
                for v in attr.ints.iter_mut() {
                    if m.below(2) == 0 {
                        *v = EXTREME_DIMS[m.below(8)];
                    }
                }
                attr.f = [f32::NAN, f32::INFINITY, -1.0, 0.0, 1e30][m.below(5)];
            }
        }
        5 => {
            if let Some(input) = g.input.first_mut() {
                if let Some(shape) = input
                    .r#type
                    .as_mut()
                    .and_then(|t| t.tensor_type.as_mut())
                    .and_then(|t| t.shape.as_mut())
                {
                    if !shape.dim.is_empty() {
                        let d = m.below(shape.dim.len());
                        shape.dim[d].dim_value = Some(EXTREME_DIMS[m.below(8)]);
                    }
                }
            }
        }
        6 if !g.node.is_empty() => {
            let k = m.below(g.node.len());
            let j = m.below(g.node.len());
            g.node.swap(k, j);
        }
        7 => {
            if m.below(2) == 0 {
                g.output.clear();
            } else if let Some(o) = g.output.first().cloned() {
                g.output.push(o);
            }
        }
        _ => {
            if let Some(o) = model.opset_import.first_mut() {
                o.version = [1, 7, 12, 13, 18, 99, -1][m.below(7)];
            }
        }
    }
}

/// Imports `bytes`; if accepted, runs a gradient pass on two random examples.
fn import_and_run(dir: &Path, bytes: &[u8]) -> bool {
    let path = dir.join("model/m.onnx");
    std::fs::write(&path, bytes).unwrap();
    let Ok(imported) = load(&path, &ImportOptions::default()) else {
        return false;
    };
    let model = &imported.model;
    let hvp_model::Architecture::Onnx { input_shape, .. } = &model.arch else {
        panic!("an ONNX import is an ONNX architecture")
    };
    let numel: usize = input_shape.iter().product();
    if numel > 1 << 16 || model.num_params() > 1 << 20 {
        return true; // accepted, too large to evaluate in a unit test
    }
    let x: Vec<f64> = (0..2 * numel).map(|i| ((i * 37) % 101) as f64 / 101.0).collect();
    let data = InMemory::new(input_shape.clone(), x, vec![0, model.num_classes.saturating_sub(1)]).unwrap();
    if let Ok(p) = Problem::new(model, &imported.weights, &data, 2) {
        let _ = p.gradient_as::<f64>(&|_| {});
    }
    true
}

fn fuzz_model(name: &str, cases: u64) {
    let scratch = temp_dir(&name.replace('/', "-"));
    let dir = scratch.path();
    let valid = fixture(name);
    assert!(import_and_run(dir, &valid), "{name}: the unmutated fixture imports");
    let parsed = ModelProto::decode(&valid[..]).unwrap();
    let mut accepted = 0;
    let panics = run_cases(cases, |seed| {
        let mut m = Mutator::new(seed);
        let bytes = if seed % 4 == 0 {
            m.mutate(&valid)
        } else {
            let mut model = parsed.clone();
            for _ in 0..1 + m.below(2) {
                mutate_message(&mut m, &mut model);
            }
            model.encode_to_vec()
        };
        if import_and_run(dir, &bytes) {
            accepted += 1;
        }
    });
    assert!(
        panics.is_empty(),
        "{name}: {} panics, first {:?}",
        panics.len(),
        panics.first()
    );
    eprintln!("{name}: {accepted} of {cases} mutants imported and evaluated");
    assert!(accepted < cases, "{name}: every mutant accepted?");
}

#[test]
fn mlp_exports_survive_mutation() {
    fuzz_model("mlp/dynamo.onnx", 1500);
    fuzz_model("mlp/legacy.onnx", 1500);
}

#[test]
fn small_cnn_exports_survive_mutation() {
    fuzz_model("small_cnn/dynamo.onnx", 1500);
    fuzz_model("small_cnn/legacy.onnx", 1500);
}

#[test]
fn seed_resnet_exports_survive_mutation() {
    fuzz_model("seed_resnet/dynamo.onnx", 300);
    fuzz_model("seed_resnet/legacy.onnx", 300);
}

#[test]
fn external_data_is_read_only_from_inside_the_model_folder() {
    let scratch = temp_dir("external");
    let dir = scratch.path();
    let mut model = ModelProto::decode(&fixture("mlp/legacy.onnx")[..]).unwrap();
    let g = model.graph.as_mut().unwrap();
    let k = g.initializer.iter().position(|t| t.name == "0.bias").unwrap();
    let values: Vec<u8> = (0..16).flat_map(|i| (i as f64).to_le_bytes()).collect();
    std::fs::write(dir.join("model/bias.bin"), &values).unwrap();
    std::fs::write(dir.join("outside.bin"), &values).unwrap();
    std::os::unix::fs::symlink(dir.join("outside.bin"), dir.join("model/link.bin")).unwrap();
    let mut with_location = |location: &str| {
        let t = &mut model.graph.as_mut().unwrap().initializer[k];
        t.raw_data.clear();
        t.double_data.clear();
        t.data_location = 1;
        t.external_data = vec![StringStringEntryProto {
            key: "location".into(),
            value: location.into(),
        }];
        let path = dir.join("model/m.onnx");
        std::fs::write(&path, model.encode_to_vec()).unwrap();
        load(&path, &ImportOptions::default()).map_err(|e| e.to_string())
    };
    let ok = with_location("bias.bin").expect("inside the folder");
    let bias = ok.model.params.iter().position(|p| p.name == "0.bias").unwrap();
    assert_eq!(ok.weights.params[bias].data()[3], 3.0);
    for hostile in [
        "../outside.bin",
        "/etc/passwd",
        "link.bin",
        "/dev/zero",
        "model/../../outside.bin",
    ] {
        let e = with_location(hostile)
            .err()
            .unwrap_or_else(|| panic!("{hostile} was read"));
        assert!(e.contains("outside the folder"), "{hostile}: {e}");
    }
}
