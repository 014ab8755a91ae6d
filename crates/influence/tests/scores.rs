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
use hvp_solvers::{SolveStatus, SolverConfig, SolverKind};
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
