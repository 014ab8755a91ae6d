//! Every solver on small real problems (Fashion-MNIST images average-pooled to
//! 7×7, logistic regression and a small MLP), against the dense solution in f64.

use hvp_curvature::{Curvature, Problem};
use hvp_data::{open_spec, Batch, Dataset, InMemory};
use hvp_model::{Architecture, Model, ParamVector, Weights};
use hvp_solvers::cg::CgOptions;
use hvp_solvers::lissa::LissaOptions;
use hvp_solvers::{cg, direct, lanczos, lissa, CurvatureOperator, Damped, LinearOperator, SolverError};
use hvp_tensor::DType;

/// The first `n` bundled Fashion-MNIST training images, 4×4 average-pooled to 49 features.
fn pooled_fashion(n: usize) -> InMemory {
    let spec = format!("mnist:{}/../../data/fashion-mnist-subset", env!("CARGO_MANIFEST_DIR"));
    let ds = open_spec(&spec).unwrap();
    let mut b = Batch::default();
    ds.read(&(0..n).collect::<Vec<_>>(), &mut b).unwrap();
    let mut x = Vec::with_capacity(n * 49);
    for img in b.x.chunks(784) {
        for by in 0..7 {
            for bx in 0..7 {
                let mut s = 0.0;
                for dy in 0..4 {
                    for dx in 0..4 {
                        s += img[(by * 4 + dy) * 28 + bx * 4 + dx];
                    }
                }
                x.push(s / 16.0);
            }
        }
    }
    InMemory::new(vec![49], x, b.labels).unwrap()
}

struct Setup {
    model: Model,
    weights: Weights,
    data: InMemory,
}

fn setup(arch: &str, n: usize, seed: u64) -> Setup {
    let arch: Architecture = arch.parse().unwrap();
    let model = Model::new(&arch, 1).unwrap();
    let mut weights = Weights::init(&model, seed);
    // Larger weights than the default init, so the curvature is far from trivial.
    for t in &mut weights.params {
        t.data_mut().iter_mut().for_each(|v| *v *= 3.0);
    }
    Setup {
        model,
        weights,
        data: pooled_fashion(n),
    }
}

fn rhs(model: &Model) -> ParamVector {
    ParamVector::random_normal(model, 11)
}

#[test]
fn direct_cg_and_full_rank_arnoldi_agree_on_logistic_regression() {
    let s = setup("logreg:49,10", 300, 1);
    let p = Problem::new(&s.model, &s.weights, &s.data, 128)
        .unwrap()
        .with_dtype(DType::F64);
    let op = CurvatureOperator::new(&p, Curvature::Hessian);
    let damping = 1e-3;
    let g = rhs(&s.model);
    let (x_direct, rep) = direct::solve(&op, damping, &g).unwrap();
    assert!(
        rep.relative_residual < 1e-10,
        "direct residual {:e}",
        rep.relative_residual
    );
    assert!(rep.warnings.is_empty(), "{:?}", rep.warnings);
    assert_eq!(rep.products, 500 + 1, "n columns and one residual check");

    let damped = Damped { inner: &op, damping };
    let opts = CgOptions {
        tol: 1e-12,
        max_iter: 2000,
    };
    let (x_cg, rep) = cg::solve(&damped, &g, &opts, None, "cg").unwrap();
    let e = x_cg.relative_error(&x_direct);
    assert!(rep.converged && e < 1e-8, "CG vs direct: {e:e}, report {rep:?}");

    let (x_arn, rep) = lanczos::solve(&op, damping, &g, 500, 3).unwrap();
    let e = x_arn.relative_error(&x_direct);
    assert!(e < 1e-6, "full-rank Arnoldi vs direct: {e:e}");
    assert_eq!(rep.eigenvalues.as_ref().map(|v| v.len()), Some(500));
}

#[test]
fn mlp_ggn_solvers_and_their_stated_errors() {
    let s = setup("mlp:49,12,10", 400, 2);
    let p = Problem::new(&s.model, &s.weights, &s.data, 128)
        .unwrap()
        .with_dtype(DType::F64);
    let op = CurvatureOperator::new(&p, Curvature::Ggn);
    let damping = 1e-2;
    let g = rhs(&s.model);
    let (x_direct, rep) = direct::solve(&op, damping, &g).unwrap();
    assert!(rep.relative_residual < 1e-10);
    let damped = Damped { inner: &op, damping };
    let (x_cg, _) = cg::solve(
        &damped,
        &g,
        &CgOptions {
            tol: 1e-12,
            max_iter: 3000,
        },
        None,
        "cg",
    )
    .unwrap();
    assert!(x_cg.relative_error(&x_direct) < 1e-8);

    // Low-rank Arnoldi: the error shrinks with k and is exact at full rank.
    let n = op.dim();
    let e_small = lanczos::solve(&op, damping, &g, 50, 4)
        .unwrap()
        .0
        .relative_error(&x_direct);
    let e_full = lanczos::solve(&op, damping, &g, n, 4)
        .unwrap()
        .0
        .relative_error(&x_direct);
    assert!(
        e_full < 1e-6 && e_full < e_small,
        "Arnoldi k=50: {e_small:e}, k=n: {e_full:e}"
    );

    // LiSSA on mini-batches of 64: error bound measured here (README: LiSSA row).
    let mut rng_state = 0u64;
    let data = &s.data;
    let mut sampler = |v: &ParamVector| -> Result<ParamVector, SolverError> {
        rng_state += 1;
        let idx: Vec<usize> = (0..64)
            .map(|k| ((rng_state * 7919 + k * 104729) % 400) as usize)
            .collect();
        let sub = hvp_data::Subset::new(data, idx).unwrap();
        let pp = Problem::new(&s.model, &s.weights, &sub, 64)?;
        Ok(pp.product_as::<f64>(Curvature::Ggn, v, &|_| {})?.value)
    };
    // Too shallow for λ = 1e-2: the report says so.
    let shallow = LissaOptions {
        depth: 400,
        repeats: 1,
        scale: None,
        power_iterations: 20,
    };
    let (_, rep) = lissa::solve(&damped, &mut sampler, damping, &g, &shallow).unwrap();
    assert!(
        rep.warnings.iter().any(|w| w.contains("raise `depth`")),
        "{:?}",
        rep.warnings
    );
    let deep = LissaOptions { depth: 3000, ..shallow };
    let (x_lissa, rep) = lissa::solve(&damped, &mut sampler, damping, &g, &deep).unwrap();
    let e = x_lissa.relative_error(&x_direct);
    eprintln!(
        "LiSSA (depth 3000, batch 64) error {e:.3}, residual {:.3}",
        rep.relative_residual
    );
    assert!(
        e < 0.25,
        "LiSSA error {e:e} above the stated bound 0.25; report {rep:?}"
    );
    assert!(rep.scale.unwrap() > 0.0 && rep.minibatch_products.unwrap() >= 3000);
}

#[test]
fn indefinite_hessian_is_reported_and_lissa_divergence_is_an_error() {
    let s = setup("mlp-tanh:49,8,10", 200, 5);
    let p = Problem::new(&s.model, &s.weights, &s.data, 128)
        .unwrap()
        .with_dtype(DType::F64);
    let op = CurvatureOperator::new(&p, Curvature::Hessian);
    let like = ParamVector::zeros(&s.model);
    let ritz = lanczos::lanczos(&op, 60, &lanczos::random_unit(&like, 1)).unwrap();
    let smallest = ritz.values[0];
    assert!(
        smallest < 0.0,
        "this MLP's Hessian must be indefinite for the test, smallest {smallest:e}"
    );
    let g = rhs(&s.model);

    // A small damping removes softmax's exact null space but not the negative eigenvalues.
    let damping = 1e-3;
    let (_, rep) = direct::solve(&op, damping, &g).unwrap();
    assert!(
        rep.warnings.iter().any(|w| w.contains("indefinite")),
        "{:?}",
        rep.warnings
    );
    assert!(
        rep.relative_residual < 1e-8,
        "the eigen-decomposition solve is still exact"
    );

    let damped = Damped { inner: &op, damping };
    let (_, rep) = cg::solve(
        &damped,
        &g,
        &CgOptions {
            tol: 1e-12,
            max_iter: 500,
        },
        None,
        "cg",
    )
    .unwrap();
    // Negative curvature is a failed solve, with the reason and the fix.
    assert_eq!(rep.status, hvp_solvers::SolveStatus::Failed, "{rep:?}");
    assert!(!rep.converged);
    let why = rep.failure.as_deref().unwrap_or("");
    assert!(
        why.contains("negative curvature") && why.contains("use `curvature` ggn"),
        "{why}"
    );

    // A scale far below λ_max makes the recursion blow up: an error, not a NaN.
    let mut sampler = |v: &ParamVector| -> Result<ParamVector, SolverError> { op.apply(v) };
    let opts = LissaOptions {
        depth: 100,
        repeats: 1,
        scale: Some(ritz.values.last().unwrap() * 0.01),
        power_iterations: 0,
    };
    match lissa::solve(&damped, &mut sampler, damping, &g, &opts) {
        Err(SolverError::Diverged(msg)) => assert!(msg.contains("Increase `scale`"), "{msg}"),
        other => panic!("expected divergence, got {:?}", other.map(|r| r.1)),
    }
}

#[test]
fn spectrum_estimates_match_the_dense_eigenvalues() {
    let s = setup("logreg:49,10", 200, 6);
    let p = Problem::new(&s.model, &s.weights, &s.data, 128)
        .unwrap()
        .with_dtype(DType::F64);
    let op = CurvatureOperator::new(&p, Curvature::Hessian);
    let like = ParamVector::zeros(&s.model);
    let dense = direct::dense_matrix(&op, &like).unwrap();
    let (vals, _) = hvp_solvers::dense::sym_eigen(500, &dense).unwrap();
    let ritz = lanczos::lanczos(&op, 40, &lanczos::random_unit(&like, 2)).unwrap();
    let top = *ritz.values.last().unwrap();
    assert!(
        (top - vals[499]).abs() < 1e-8 * vals[499],
        "λ_max {top} vs {}",
        vals[499]
    );
    let trace: f64 = (0..500).map(|i| dense[i * 500 + i]).sum();
    let (est, se) = lanczos::hutchinson_trace(&op, &like, 30, 3).unwrap();
    assert!((est - trace).abs() < 4.0 * se + 1e-12, "trace {est} ± {se} vs {trace}");
}

/// The one entry point runs what the configuration names, with the same result
/// as calling each solver directly; factor files of the wrong kind are refused.
#[test]
fn solver_configuration_dispatches_to_each_solver() {
    let s = setup("logreg:49,10", 200, 4);
    let p = Problem::new(&s.model, &s.weights, &s.data, 64)
        .unwrap()
        .with_dtype(DType::F64);
    let g = rhs(&s.model);
    let op = CurvatureOperator::new(&p, Curvature::Hessian);
    let damping = 1e-2;
    let config = |kind| hvp_solvers::SolverConfig {
        damping,
        tol: 1e-10,
        max_iter: 500,
        ..hvp_solvers::SolverConfig::new(kind)
    };
    let (x_direct, _) = direct::solve_to(&op, damping, &g, 1e-10).unwrap();
    let (x, rep) = hvp_solvers::solve(&p, &config(hvp_solvers::SolverKind::Direct), &g).unwrap();
    assert_eq!(x.to_flat(), x_direct.to_flat());
    assert_eq!(rep.status, hvp_solvers::SolveStatus::Converged);
    let (x, rep) = hvp_solvers::solve(&p, &config(hvp_solvers::SolverKind::Cg), &g).unwrap();
    assert!(x.relative_error(&x_direct) < 1e-8 && rep.solver == "cg", "{rep:?}");
    let (_, rep) = hvp_solvers::solve(&p, &config(hvp_solvers::SolverKind::Arnoldi), &g).unwrap();
    assert_eq!(rep.status, hvp_solvers::SolveStatus::Approximate);
    // K-FAC factors saved to a file: the ekfac solver refuses them, kfac uses them.
    let scratch = tempfile::Builder::new().prefix("hvp-dispatch-").tempdir().unwrap();
    let path = scratch.path().join("kfac.safetensors");
    let f = hvp_solvers::kfac::Factors::compute(
        &p,
        hvp_solvers::kfac::FactorKind::Kfac,
        hvp_solvers::kfac::FisherKind::Empirical,
        0,
        &|_| {},
    )
    .unwrap();
    f.save(&s.model, &path).unwrap();
    let with_file = |kind| hvp_solvers::SolverConfig {
        factors: Some(path.clone()),
        ..config(kind)
    };
    assert!(hvp_solvers::solve(&p, &with_file(hvp_solvers::SolverKind::Ekfac), &g).is_err());
    let (x, rep) = hvp_solvers::solve(&p, &with_file(hvp_solvers::SolverKind::Kfac), &g).unwrap();
    let damped = Damped { inner: &op, damping };
    let (x_kfac, _) = hvp_solvers::kfac::solve(&f, &damped, (damping, hvp_tensor::DType::F64), &g).unwrap();
    assert_eq!(x.to_flat(), x_kfac.to_flat());
    assert_eq!(rep.status, hvp_solvers::SolveStatus::Approximate);
}

#[test]
fn subset_study_errors_shrink_with_the_subset_and_vanish_on_all_the_data() {
    use hvp_solvers::subset::{mean_sd, subset_errors, SubsetStudy};
    let s = setup("mlp:49,8,10", 200, 4);
    let p = Problem::new(&s.model, &s.weights, &s.data, 64)
        .unwrap()
        .with_dtype(DType::F64);
    let v = ParamVector::random_normal(&s.model, 1);
    let study = SubsetStudy {
        curvature: Curvature::Ggn,
        sizes: vec![10, 100, 200, 500],
        repeats: 4,
        predict_batches: 6,
        predict_batch_size: 20,
        seed: 2,
        solver: Some(hvp_solvers::SolverConfig {
            curvature: Curvature::Ggn,
            damping: 0.1,
            tol: 1e-10,
            max_iter: 500,
            ..hvp_solvers::SolverConfig::new(hvp_solvers::SolverKind::Cg)
        }),
    };
    let mut seen = 0;
    let rows = subset_errors(&p, &v, None, &study, &mut |_| seen += 1).unwrap();
    assert_eq!((rows.len(), seen), (3, 3), "sizes beyond N are skipped");
    let (e10, e100, e200) = (
        mean_sd(&rows[0].measured).0,
        mean_sd(&rows[1].measured).0,
        mean_sd(&rows[2].measured).0,
    );
    assert!(e10 > e100 && e100 > 0.0, "{e10} {e100}");
    assert!(e200 < 1e-12, "the full data has no subsampling error: {e200}");
    assert_eq!(rows[0].inverse_errors.len(), 4);
    assert!(rows[2].inverse_errors.iter().all(|e| *e < 1e-8));
    // The prediction is within a factor 3 of the measurement at m = 10 and 100.
    for r in &rows[..2] {
        let m = mean_sd(&r.measured).0;
        assert!(
            r.predicted > m / 3.0 && r.predicted < 3.0 * m,
            "m = {}: {} vs {m}",
            r.m,
            r.predicted
        );
    }
    let bad = SubsetStudy {
        predict_batches: 1,
        ..study
    };
    assert!(
        matches!(subset_errors(&p, &v, None, &bad, &mut |_| {}), Err(SolverError::BadOption(m)) if m.contains("`predict_batches`"))
    );
}
