//! A frozen feature extractor evaluated once: with only some parameters
//! trainable (`params`), the model cut after its frozen prefix, run on the
//! prefix's features, gives the same loss, gradient, products and per-example
//! values as the whole model (to rounding in f64, bit for bit in f32).

use hvp_curvature::frozen::FrozenPrefix;
use hvp_curvature::{Curvature, Problem};
use hvp_data::{NpyDataset, Subset};
use hvp_model::ParamVector;
use hvp_onnx::{load, ImportOptions};
use hvp_tensor::DType;
use std::path::PathBuf;

fn case(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/onnx")
        .join(name)
}

fn relative(a: &ParamVector, b: &ParamVector) -> f64 {
    a.relative_error(b)
}

#[test]
fn products_through_the_frozen_prefix_equal_the_whole_model() {
    for (name, glob, file) in [
        ("small_cnn", "fc.*", "legacy.onnx"),
        ("seed_resnet", "fc.*", "dynamo.onnx"),
        ("seed_resnet", "layer3.*", "legacy.onnx"),
    ] {
        let dir = case(name);
        let options = ImportOptions {
            params_glob: Some(glob.into()),
        };
        let imported = load(&dir.join(file), &options).unwrap();
        let (model, weights) = (&imported.model, &imported.weights);
        let data = NpyDataset::open(&dir.join("inputs.npy"), &dir.join("labels.npy")).unwrap();
        let frozen = FrozenPrefix::of(model, weights, &data_shape(&data))
            .unwrap_or_else(|| panic!("{name} {glob}: a frozen prefix to cut"));
        assert_eq!(frozen.tail.params.len(), model.params.len());
        assert!(frozen.tail.graph.nodes().len() < model.graph.nodes().len());
        let v = ParamVector::random_normal(model, 3);
        for dtype in [DType::F64, DType::F32] {
            let features = frozen.features(weights, &data, None, 3, dtype, &|_| {}).unwrap();
            let whole = Problem::new(model, weights, &data, 3).unwrap().with_dtype(dtype);
            let cut = Problem::new(&frozen.tail, weights, &features, 3)
                .unwrap()
                .with_dtype(dtype);
            let tol = if dtype == DType::F64 { 1e-12 } else { 0.0 };
            let what = format!("{name} {glob} {dtype:?}");
            let (g1, g2) = (whole.gradient(&|_| {}).unwrap(), cut.gradient(&|_| {}).unwrap());
            assert!((g1.loss - g2.loss).abs() <= tol * g1.loss.abs(), "{what}: loss");
            assert!(relative(&g2.value, &g1.value) <= tol, "{what}: gradient");
            for curvature in [Curvature::Hessian, Curvature::Ggn, Curvature::Fisher] {
                let a = whole.product(curvature, &v, &|_| {}).unwrap().value;
                let b = cut.product(curvature, &v, &|_| {}).unwrap().value;
                let e = relative(&b, &a);
                assert!(e <= tol, "{what} {curvature:?}: {e:e}");
            }
            let (d1, d2) = (
                whole.loss_directional(&v, &|_| {}).unwrap(),
                cut.loss_directional(&v, &|_| {}).unwrap(),
            );
            for (a, b) in d1.iter().zip(&d2) {
                assert!(
                    (a - b).abs() <= tol * a.abs().max(1e-30),
                    "{what}: directional {a} vs {b}"
                );
            }
        }
        // Features of some examples only: those are read, the others refused.
        let some = frozen
            .features(weights, &data, Some(&[0, 2]), 2, DType::F64, &|_| {})
            .unwrap();
        let one = Subset::new(&some, vec![2]).unwrap();
        assert!(Problem::new(&frozen.tail, weights, &one, 1)
            .unwrap()
            .gradient(&|_| {})
            .is_ok());
        let missing = Subset::new(&some, vec![1]).unwrap();
        let err = Problem::new(&frozen.tail, weights, &missing, 1)
            .unwrap()
            .gradient(&|_| {})
            .unwrap_err();
        assert!(err.to_string().contains("not computed"), "{err}");
    }
}

/// With every parameter trainable only the input normalisation is frozen:
/// a cut, but not one worth keeping features for.
#[test]
fn nothing_to_cut_when_every_parameter_is_trainable() {
    let dir = case("small_cnn");
    let imported = load(&dir.join("legacy.onnx"), &ImportOptions::default()).unwrap();
    let split = imported.model.graph.split_frozen().unwrap();
    assert_eq!(split.prefix.nodes().len(), 5, "(x - mean) / std");
    let data = NpyDataset::open(&dir.join("inputs.npy"), &dir.join("labels.npy")).unwrap();
    assert!(FrozenPrefix::of(&imported.model, &imported.weights, &data_shape(&data)).is_none());
}

/// Features kept in a scratch file read back as the in-memory ones, bit for
/// bit, in any order; the file goes with them; an unusable directory is named.
#[test]
fn features_on_disk_equal_the_in_memory_ones_bit_for_bit() {
    use hvp_curvature::frozen::FeatureStore;
    use hvp_data::{Batch, Dataset};
    let dir = case("seed_resnet");
    let options = ImportOptions {
        params_glob: Some("layer3.*".into()),
    };
    let imported = load(&dir.join("legacy.onnx"), &options).unwrap();
    let (model, weights) = (&imported.model, &imported.weights);
    let data = NpyDataset::open(&dir.join("inputs.npy"), &dir.join("labels.npy")).unwrap();
    let frozen = FrozenPrefix::of(model, weights, &data_shape(&data)).unwrap();
    let scratch_dir = tempfile::Builder::new().prefix("hvp-features-test-").tempdir().unwrap();
    let scratch = scratch_dir.path().to_path_buf();
    let n = data.len();
    let order: Vec<usize> = (0..n).rev().chain(0..n).collect();
    let v = ParamVector::random_normal(model, 5);
    for dtype in [DType::F32, DType::F64] {
        let store = |s: FeatureStore| frozen.features_in(weights, &data, None, 3, dtype, &s, &|_| {}).unwrap();
        let memory = store(FeatureStore::Memory);
        let disk = store(FeatureStore::Disk(scratch.clone()));
        let file = disk.on_disk().expect("kept on disk");
        assert_eq!(file.parent(), Some(scratch.as_path()));
        assert!(disk.describe().contains("scratch file"), "{}", disk.describe());
        let (mut a, mut b) = (Batch::default(), Batch::default());
        memory.read(&order, &mut a).unwrap();
        disk.read(&order, &mut b).unwrap();
        assert_eq!(a.x, b.x, "{dtype:?}");
        assert_eq!(a.labels, b.labels);
        let product = |f: &dyn Dataset| {
            Problem::new(&frozen.tail, weights, f, 3)
                .unwrap()
                .with_dtype(dtype)
                .product(Curvature::Ggn, &v, &|_| {})
                .unwrap()
                .value
        };
        let (pm, pd) = (product(&memory), product(&disk));
        for (x, y) in pm.tensors.iter().zip(&pd.tensors) {
            assert_eq!(x.data(), y.data(), "{dtype:?}");
        }
        drop(disk);
        assert_eq!(
            std::fs::read_dir(&scratch).unwrap().count(),
            0,
            "the scratch file is removed"
        );
    }
    let missing = FeatureStore::Disk(scratch.join("no-such-directory"));
    let err = frozen
        .features_in(weights, &data, None, 3, DType::F32, &missing, &|_| {})
        .err()
        .expect("an unusable scratch directory is an error")
        .to_string();
    assert!(err.contains("no-such-directory") && err.contains("TMPDIR"), "{err}");
}

fn data_shape(d: &dyn hvp_data::Dataset) -> Vec<usize> {
    d.sample_shape()
}
