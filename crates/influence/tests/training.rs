//! Training (deterministic, BatchNorm running statistics) and mislabel detection
//! by self-influence on the bundled Fashion-MNIST subset.

use hvp_curvature::Problem;
use hvp_data::{open_spec, Dataset, Relabelled, Subset};
use hvp_influence::train::{train, Optimizer, TrainOptions};
use hvp_model::{Architecture, Model, Weights};
use hvp_solvers::kfac::{FactorKind, Factors, FisherKind};
use hvp_tensor::DType;
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::{RngExt, SeedableRng};
use std::collections::BTreeMap;

fn fashion() -> Box<dyn Dataset> {
    open_spec(&format!(
        "mnist:{}/../../data/fashion-mnist-subset",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn opts(epochs: usize, lr: f64, seed: u64) -> TrainOptions {
    TrainOptions {
        epochs,
        batch_size: 32,
        lr,
        momentum: 0.9,
        weight_decay: 1e-4,
        optimizer: Optimizer::Sgd,
        seed,
    }
}

#[test]
fn resnet_training_is_deterministic_and_updates_running_statistics() {
    let data = fashion();
    let few = Subset::first(data.as_ref(), 96);
    let model = Model::new(&"resnet-cifar:1,1,1".parse::<Architecture>().unwrap(), 1).unwrap();
    let run = || {
        let mut w = Weights::init(&model, 1);
        let r = train(&model, &mut w, &few, &opts(2, 0.05, 7), DType::F32, &mut |_, _, _| {}).unwrap();
        (w, r)
    };
    let (a, ra) = run();
    let (b, _) = run();
    assert_eq!(a.params, b.params, "same seed and threads, same weights");
    assert_eq!(a.buffers, b.buffers);
    // Running variance moved away from its initial 1 (momentum 0.1 per step).
    let var = &a.buffers[model.buffers.iter().position(|s| s.name == "bn.running_var").unwrap()];
    assert!(var.data().iter().any(|v| (v - 1.0).abs() > 1e-3));
    assert!(ra.iter().all(|r| r.loss.is_finite()));
}

#[test]
fn mlp_learns_and_self_influence_finds_flipped_labels() {
    let data = fashion();
    let n = data.len();
    let mut rng = StdRng::seed_from_u64(5);
    let flipped: BTreeMap<usize, usize> = sample(&mut rng, n, n / 20)
        .into_iter()
        .map(|i| (i, (data.label(i) + rng.random_range(1..10)) % 10))
        .collect();
    let noisy = Relabelled::new(data, flipped.clone());
    let model = Model::new(&"mlp:784,64,10".parse::<Architecture>().unwrap(), 1).unwrap();
    let mut w = Weights::init(&model, 2);
    let reports = train(&model, &mut w, &noisy, &opts(8, 0.05, 3), DType::F32, &mut |_, _, _| {}).unwrap();
    let (first, last) = (&reports[0], reports.last().unwrap());
    assert!(last.loss < first.loss && last.accuracy > 0.75, "{reports:?}");

    let problem = Problem::new(&model, &w, &noisy, 256).unwrap().with_dtype(DType::F32);
    let f = Factors::compute(&problem, FactorKind::Ekfac, FisherKind::Mc, 0, &|_| {}).unwrap();
    let si = f.self_influence(&problem, 1e-3, &|_| {}).unwrap();
    assert_eq!(si.len(), n);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| si[b].total_cmp(&si[a]));
    let caught = |frac: f64| {
        let top = &order[..(frac * n as f64) as usize];
        top.iter().filter(|i| flipped.contains_key(i)).count() as f64 / flipped.len() as f64
    };
    let (c10, c20) = (caught(0.1), caught(0.2));
    eprintln!("flipped labels in the top 10% of self-influence: {c10:.2}, top 20%: {c20:.2}");
    // Random ranking would catch 0.10 and 0.20.
    assert!(c10 >= 0.4 && c20 >= 0.6, "top 10%: {c10}, top 20%: {c20}");
}
