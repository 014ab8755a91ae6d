//! Several vectors at once: block products (per-example gradients contracted
//! with all vectors in one pass) equal one product per vector, and block
//! solves equal one solve per right-hand side, in f64.

use hvp_curvature::{Curvature, Problem};
use hvp_data::{open_spec, Dataset, Padded, Subset};
use hvp_model::{Architecture, Model, ParamVector, Weights};
use hvp_solvers::kfac::{block_product, example_gradient_dots, fisher_products_and_dots, FisherKind};
use hvp_solvers::{CurvatureOperator, LinearOperator, SolveStatus, SolverConfig, SolverKind};
use hvp_tensor::DType;

fn fashion() -> Box<dyn Dataset> {
    open_spec(&format!(
        "mnist:{}/../../data/fashion-mnist-subset",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// A model with non-trivial BatchNorm statistics (so γ's gradient uses them).
fn model_and_weights(arch: &str) -> (Model, Weights) {
    let model = Model::new(&arch.parse::<Architecture>().unwrap(), 1).unwrap();
    let mut weights = Weights::init(&model, 5);
    for (spec, b) in model.buffers.iter().zip(weights.buffers.iter_mut()) {
        let shift = if spec.name.ends_with("running_var") { 0.5 } else { 0.1 };
        b.data_mut()
            .iter_mut()
            .enumerate()
            .for_each(|(k, v)| *v += shift * ((k % 5) as f64));
    }
    (model, weights)
}

#[test]
fn block_products_equal_one_product_per_vector() {
    for (arch, pad) in [("mlp:784,12,10", 0), ("resnet-cifar:1,1,1", 2)] {
        let source = fashion();
        let data = Padded::new(Subset::first(source.as_ref(), 20), pad).unwrap();
        let (model, weights) = model_and_weights(arch);
        let problem = Problem::new(&model, &weights, &data, 8)
            .unwrap()
            .with_dtype(DType::F64)
            .with_weight_decay(0.03);
        let vectors: Vec<ParamVector> = (0..3).map(|s| ParamVector::random_normal(&model, s)).collect();
        for (fisher, curvature) in [
            (FisherKind::Empirical, Curvature::Fisher),
            (FisherKind::Exact, Curvature::Ggn),
        ] {
            let block = block_product(&problem, fisher, &vectors, &|_| {}).unwrap().unwrap();
            for (k, (b, v)) in block.iter().zip(&vectors).enumerate() {
                let single = problem.product(curvature, v, &|_| {}).unwrap().value;
                let err = b.relative_error(&single);
                assert!(err <= 1e-12, "{arch} {curvature:?} vector {k}: relative error {err:e}");
            }
        }
        // The operator takes the block path for the Fisher and counts each vector.
        let op = CurvatureOperator::new(&problem, Curvature::Fisher);
        let many = op.apply_many(&vectors).unwrap();
        assert_eq!(op.products(), 3);
        let single = problem.product(Curvature::Fisher, &vectors[1], &|_| {}).unwrap().value;
        assert!(many[1].relative_error(&single) <= 1e-12);
    }
}

#[test]
fn block_solves_equal_one_solve_per_right_hand_side() {
    let source = fashion();
    let data = Subset::first(source.as_ref(), 24);
    let (model, weights) = model_and_weights("mlp:784,6,10");
    let problem = Problem::new(&model, &weights, &data, 8)
        .unwrap()
        .with_dtype(DType::F64)
        .with_weight_decay(0.01);
    let gs: Vec<ParamVector> = (10..13).map(|s| ParamVector::random_normal(&model, s)).collect();
    let cases = [
        (SolverKind::Cg, Curvature::Ggn),
        (SolverKind::Cg, Curvature::Fisher),
        (SolverKind::Cg, Curvature::Hessian),
        (SolverKind::Pcg, Curvature::Fisher),
        (SolverKind::Ekfac, Curvature::Fisher),
        (SolverKind::Kfac, Curvature::Ggn),
        (SolverKind::Direct, Curvature::Fisher),
    ];
    for (kind, curvature) in cases {
        let config = SolverConfig {
            curvature,
            damping: 0.05,
            tol: 1e-9,
            max_iter: 500,
            fisher: FisherKind::Empirical,
            ..SolverConfig::new(kind)
        };
        let prepared = config.prepare(&problem).unwrap();
        let block = prepared.solve_many(&problem, &gs).unwrap();
        assert_eq!(block.len(), gs.len());
        for (k, (g, (x, report))) in gs.iter().zip(&block).enumerate() {
            let (x1, r1) = prepared.solve(&problem, g).unwrap();
            let what = format!("{kind:?} {curvature:?} right-hand side {k}");
            assert_eq!(report.status, r1.status, "{what}");
            assert_eq!(report.block_size, Some(3), "{what}");
            // Products by contraction round differently from the per-vector
            // passes; a recursion that creeps to a tight tolerance may take a
            // step more or less.
            assert!(
                report.iterations.abs_diff(r1.iterations) <= 2 + r1.iterations / 20,
                "{what}: {} vs {} iterations",
                report.iterations,
                r1.iterations
            );
            let tol = if r1.status == SolveStatus::Converged {
                5e-9
            } else {
                1e-12
            };
            assert!(x.relative_error(&x1) <= tol, "{what}: {:e}", x.relative_error(&x1));
            assert!(
                (report.relative_residual - r1.relative_residual).abs() <= 1e-9 + 1e-6 * r1.relative_residual,
                "{what}: residual {} vs {}",
                report.relative_residual,
                r1.relative_residual
            );
        }
    }
}

#[test]
fn dots_with_some_or_no_products_equal_the_dots_and_products_of_all() {
    // 130 vectors: past the count from which dots without products are formed
    // over gathered rows instead of a batch at a time.
    for (arch, pad) in [("mlp:784,12,10", 0), ("resnet-cifar:1,1,1", 2)] {
        let source = fashion();
        let data = Padded::new(Subset::first(source.as_ref(), 20), pad).unwrap();
        let (model, weights) = model_and_weights(arch);
        let problem = Problem::new(&model, &weights, &data, 8).unwrap().with_dtype(DType::F64);
        for q in [3, 130] {
            let vectors: Vec<ParamVector> = (0..q).map(|s| ParamVector::random_normal(&model, s as u64)).collect();
            let (all, dots) = fisher_products_and_dots(&problem, &vectors, q, &|_| {})
                .unwrap()
                .unwrap();
            let batchwise = example_gradient_dots(&problem, &vectors, &|_| {}).unwrap().unwrap();
            for k in [0, 1, 2] {
                let (some, some_dots) = fisher_products_and_dots(&problem, &vectors, k, &|_| {})
                    .unwrap()
                    .unwrap();
                assert_eq!(some.len(), k, "{arch}, q = {q}");
                for (j, (p, a)) in some.iter().zip(&all).enumerate() {
                    let err = p.relative_error(a);
                    assert!(err <= 1e-12, "{arch}, q = {q}, k = {k}, product {j}: {err:e}");
                }
                for (v, (d, (a, b))) in some_dots.iter().zip(dots.iter().zip(&batchwise)).enumerate() {
                    let scale = a.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                    for (i, ((x, y), z)) in d.iter().zip(a).zip(b).enumerate() {
                        assert!(
                            (x - y).abs() <= 1e-12 * scale && (x - z).abs() <= 1e-12 * scale,
                            "{arch}, q = {q}, k = {k}, vector {v}, example {i}: {x} vs {y} vs {z}"
                        );
                    }
                }
            }
        }
    }
}
