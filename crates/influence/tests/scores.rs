//! Influence scores through the library alone (no binary): the one-pass JVP
//! scores equal explicit per-example gradients against s_test, failed solves
//! are typed errors, and the solver configuration is honoured.

mod common;

use common::{explain_with, mnist};
use hvp_curvature::{Curvature, Problem};
use hvp_data::{Dataset, Subset};
use hvp_influence::scores::{scores, test_gradient, top_k};
use hvp_influence::InfluenceError;
use hvp_model::{Architecture, Model, Weights};
use hvp_solvers::{Residuals, SolveStatus, SolverConfig, SolverKind};
use hvp_tensor::DType;

#[test]
fn scores_equal_per_example_gradients_against_s_test() {
    let (train, test) = (mnist("train"), mnist("test"));
    let data = Subset::first(train.as_ref(), 60);
    let model = Model::new(&"mlp:784,6,10".parse::<Architecture>().unwrap(), 1).unwrap();
    let weights = Weights::init(&model, 3);
    let problem = Problem::new(&model, &weights, &data, 16)
        .map(|p| p.with_dtype(DType::F64))
        .unwrap()
        .with_weight_decay(0.01);
    let config = SolverConfig {
        curvature: Curvature::Ggn,
        damping: 0.01,
        tol: 1e-10,
        max_iter: 1000,
        ..SolverConfig::new(SolverKind::Cg)
    };
    let e = explain_with(&problem, test.as_ref(), 4, &config, false).unwrap();
    assert_eq!(e.report.status, SolveStatus::Converged);
    assert!(e.report.relative_residual <= 1e-10);
    assert_eq!((e.test_index, e.label), (4, test.label(4)));
    // The same s_test, then score(i) = ∇ℓ_iᵀ s_test / N from explicit gradients.
    let (g, loss) = test_gradient(&problem, test.as_ref(), 4).unwrap();
    assert!((loss - e.test_loss).abs() < 1e-15);
    let (s_test, _) = hvp_solvers::solve(&problem, &config, &g).unwrap();
    let n = data.len() as f64;
    for i in [0usize, 7, 31, 59] {
        let one = Subset::new(&data, vec![i]).unwrap();
        let gi = Problem::new(&model, &weights, &one, 1)
            .unwrap()
            .gradient_as::<f64>(&|_| {})
            .unwrap()
            .value;
        let explicit = gi.dot(&s_test) / n;
        assert!(
            (explicit - e.scores[i]).abs() <= 1e-10 * explicit.abs().max(1e-12),
            "example {i}: JVP {} vs explicit {explicit}",
            e.scores[i]
        );
    }
    let again = scores(&problem, &s_test, &|_| {}).unwrap();
    assert_eq!(again, e.scores);
    let (help, harm) = top_k(&e.scores, 3);
    assert!(e.scores[help[0]] >= e.scores[help[2]] && e.scores[harm[0]] <= e.scores[harm[2]]);
}

#[test]
fn a_failed_solve_is_a_typed_error_unless_allowed() {
    let (train, test) = (mnist("train"), mnist("test"));
    let data = Subset::first(train.as_ref(), 40);
    let model = Model::new(&"mlp:784,6,10".parse::<Architecture>().unwrap(), 1).unwrap();
    let weights = Weights::init(&model, 3);
    let problem = Problem::new(&model, &weights, &data, 16)
        .unwrap()
        .with_dtype(DType::F64);
    let config = SolverConfig {
        curvature: Curvature::Ggn,
        damping: 0.01,
        max_iter: 1,
        ..SolverConfig::new(SolverKind::Cg)
    };
    match explain_with(&problem, test.as_ref(), 0, &config, false) {
        Err(InfluenceError::SolveFailed { test_index, report }) => {
            assert_eq!(test_index, 0);
            assert_eq!(report.status, SolveStatus::Failed);
        }
        other => panic!("expected SolveFailed, got {:?}", other.map(|e| e.report)),
    }
    let e = explain_with(&problem, test.as_ref(), 0, &config, true).unwrap();
    assert_eq!(e.report.status, SolveStatus::Failed);
    assert_eq!(e.scores.len(), 40);
    // EK-FAC is an approximation, with a damping it needs.
    let ekfac = SolverConfig {
        damping: 0.0,
        ..SolverConfig::new(SolverKind::Ekfac)
    };
    assert!(explain_with(&problem, test.as_ref(), 0, &ekfac, false).is_err());
    let ekfac = SolverConfig { damping: 0.1, ..ekfac };
    let e = explain_with(&problem, test.as_ref(), 0, &ekfac, false).unwrap();
    assert_eq!(e.report.status, SolveStatus::Approximate);
}

/// The one-pass contraction of per-example gradients with several vectors
/// equals one forward-mode (JVP) pass per vector, on dense layers with biases
/// and on a ResNet's convolutions and BatchNorms.
#[test]
fn one_pass_multi_query_scores_equal_per_query_jvp_scores() {
    let train = mnist("train");
    for (arch, pad) in [("mlp:784,12,10", 0), ("resnet-cifar:1,1,1", 2)] {
        let data = Subset::first(train.as_ref(), 24);
        let padded = hvp_data::Padded::new(data, pad).unwrap();
        let model = Model::new(&arch.parse::<Architecture>().unwrap(), 1).unwrap();
        let mut weights = Weights::init(&model, 9);
        // Running statistics away from (0, 1), so BatchNorm's gradient uses them.
        for (spec, b) in model.buffers.iter().zip(weights.buffers.iter_mut()) {
            let shift = if spec.name.ends_with("running_var") { 0.5 } else { 0.1 };
            b.data_mut()
                .iter_mut()
                .enumerate()
                .for_each(|(k, v)| *v += shift * ((k % 5) as f64));
        }
        let problem = Problem::new(&model, &weights, &padded, 10)
            .unwrap()
            .with_dtype(DType::F64);
        let vectors: Vec<_> = (0..3)
            .map(|s| hvp_model::ParamVector::random_normal(&model, s))
            .collect();
        let many = hvp_influence::scores::scores_many(&problem, &vectors, &|_| {}).unwrap();
        let dots = hvp_solvers::kfac::example_gradient_dots(&problem, &vectors, &|_| {}).unwrap();
        assert!(dots.is_some(), "{arch}: every parameter is covered");
        for (q, v) in vectors.iter().enumerate() {
            let one = scores(&problem, v, &|_| {}).unwrap();
            let scale = one.iter().fold(0.0f64, |m, s| m.max(s.abs()));
            for (i, (a, b)) in many[q].iter().zip(&one).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-10 * scale,
                    "{arch} query {q} example {i}: {a} vs {b}"
                );
            }
        }
    }
}

/// EK-FAC on the empirical Fisher for a group of test points: the exact
/// residuals and the scores come from one pass that forms each training
/// example's gradient once; both equal those of each test point alone (a
/// Fisher product and a JVP pass).
#[test]
fn grouped_ekfac_residuals_and_scores_equal_single_test_points() {
    resnet_ekfac_case(0.01, |problem, test: &dyn Dataset| {
        let config = SolverConfig {
            curvature: Curvature::Fisher,
            damping: 0.1,
            fisher: hvp_solvers::kfac::FisherKind::Empirical,
            ..SolverConfig::new(SolverKind::Ekfac)
        };
        let prepared = config.prepare(problem).unwrap();
        let group = hvp_influence::scores::explain_all(problem, test, &[3, 0, 2], &prepared, false, &|_| {}).unwrap();
        for e in &group {
            let alone = explain_with(problem, test, e.test_index, &config, false).unwrap();
            assert_eq!(e.report.block_size, Some(3));
            assert_eq!(e.report.status, SolveStatus::Approximate);
            let r = (e.report.relative_residual - alone.report.relative_residual).abs();
            assert!(
                r <= 1e-10 * alone.report.relative_residual,
                "test {}: residual {r:e}",
                e.test_index
            );
            let scale = alone.scores.iter().fold(0.0f64, |m, s| m.max(s.abs()));
            for (i, (a, b)) in e.scores.iter().zip(&alone.scores).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-10 * scale,
                    "test {} example {i}: {a} vs {b}",
                    e.test_index
                );
            }
        }
    });
}

#[test]
fn ekfac_residuals_of_the_first_k_test_points_leave_scores_unchanged() {
    resnet_ekfac_case(0.0, |problem, test: &dyn Dataset| {
        let all = SolverConfig {
            curvature: Curvature::Fisher,
            damping: 0.1,
            fisher: hvp_solvers::kfac::FisherKind::Empirical,
            ..SolverConfig::new(SolverKind::Ekfac)
        };
        let explain = |config: &SolverConfig| {
            let prepared = config.prepare(problem).unwrap();
            hvp_influence::scores::explain_all(problem, test, &[3, 0, 2], &prepared, false, &|_| {}).unwrap()
        };
        let reference = explain(&all);
        for k in [0, 1, 2, 3, 5] {
            let config = SolverConfig {
                residuals: Residuals::First(k),
                ..all.clone()
            };
            for (j, (e, r)) in explain(&config).iter().zip(&reference).enumerate() {
                assert_eq!(e.report.status, SolveStatus::Approximate, "k = {k}, point {j}");
                assert_eq!(e.report.block_size, Some(3));
                if j < k {
                    let d = (e.report.relative_residual - r.report.relative_residual).abs();
                    assert!(
                        d <= 1e-12 * r.report.relative_residual,
                        "k = {k}, point {j}: residual {d:e}"
                    );
                    assert!(e.report.warnings.iter().all(|w| !w.contains("not measured")));
                } else {
                    assert!(e.report.relative_residual.is_nan(), "k = {k}, point {j}");
                    assert!(
                        e.report.warnings.iter().any(|w| w.contains("residual not measured")),
                        "{:?}",
                        e.report.warnings
                    );
                }
                let scale = r.scores.iter().fold(0.0f64, |m, s| m.max(s.abs()));
                for (a, b) in e.scores.iter().zip(&r.scores) {
                    assert!((a - b).abs() <= 1e-12 * scale, "k = {k}, point {j}: {a} vs {b}");
                }
            }
        }
        // Only approximate solvers may skip residuals: an exact one needs its own.
        let cg = SolverConfig {
            residuals: Residuals::First(0),
            ..SolverConfig::new(SolverKind::Cg)
        };
        let err = cg.prepare(problem).err().expect("cg without residuals is refused");
        assert!(err.to_string().contains("kfac and ekfac"), "{err}");
    });
}

/// A BatchNorm ResNet in f64 on 30 padded MNIST images (with `weight_decay`)
/// and 4 test images, for the grouped EK-FAC tests.
fn resnet_ekfac_case(weight_decay: f64, run: impl FnOnce(&Problem, &dyn Dataset)) {
    let (train, test) = (mnist("train"), mnist("test"));
    let data = Subset::first(train.as_ref(), 30);
    let padded = hvp_data::Padded::new(data, 2).unwrap();
    let test = hvp_data::Padded::new(Subset::first(test.as_ref(), 4), 2).unwrap();
    let model = Model::new(&"resnet-cifar:1,1,1".parse::<Architecture>().unwrap(), 1).unwrap();
    let weights = Weights::init(&model, 4);
    let problem = Problem::new(&model, &weights, &padded, 8)
        .unwrap()
        .with_dtype(DType::F64)
        .with_weight_decay(weight_decay);
    run(&problem, &test);
}
