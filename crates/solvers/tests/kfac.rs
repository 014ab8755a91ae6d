//! K-FAC and EK-FAC: exact where the factorisation is exact, measured errors
//! elsewhere, preconditioned CG, save/load, and the BatchNorm diagonal rule.

use hvp_curvature::{Curvature, Problem};
use hvp_data::{open_spec, Batch, Dataset, InMemory, Subset};
use hvp_model::{Architecture, Model, ParamVector, Weights};
use hvp_solvers::cg::CgOptions;
use hvp_solvers::kfac::{FactorKind, Factors, FisherKind};
use hvp_solvers::{cg, direct, CurvatureOperator, Damped};
use hvp_tensor::DType;

fn fashion(n: usize, pool: bool) -> InMemory {
    let spec = format!("mnist:{}/../../data/fashion-mnist-subset", env!("CARGO_MANIFEST_DIR"));
    let ds = open_spec(&spec).unwrap();
    let mut b = Batch::default();
    ds.read(&(0..n).collect::<Vec<_>>(), &mut b).unwrap();
    if !pool {
        return InMemory::new(vec![1, 28, 28], b.x, b.labels).unwrap();
    }
    let x =
        b.x.chunks(784)
            .flat_map(|img| {
                (0..49).map(move |k| {
                    let (by, bx) = (k / 7, k % 7);
                    (0..16)
                        .map(|d| img[(by * 4 + d / 4) * 28 + bx * 4 + d % 4])
                        .sum::<f64>()
                        / 16.0
                })
            })
            .collect();
    InMemory::new(vec![49], x, b.labels).unwrap()
}

/// PyTorch-default initial weights scaled by `gain` (larger weights, less trivial curvature).
fn model(arch: &str, channels: usize, seed: u64, gain: f64) -> (Model, Weights) {
    let arch: Architecture = arch.parse().unwrap();
    let m = Model::new(&arch, channels).unwrap();
    let mut w = Weights::init(&m, seed);
    for t in &mut w.params {
        t.data_mut().iter_mut().for_each(|v| *v *= gain);
    }
    (m, w)
}

#[test]
fn kfac_and_ekfac_are_exact_for_one_linear_layer_and_one_example() {
    let (m, w) = model("logreg:49,10", 1, 1, 3.0);
    let data = fashion(40, true);
    let one = Subset::new(&data, vec![17]).unwrap();
    let p = Problem::new(&m, &w, &one, 8).unwrap().with_dtype(DType::F64);
    let op = CurvatureOperator::new(&p, Curvature::Ggn);
    let damping = 1e-3;
    let g = ParamVector::random_normal(&m, 2);
    let (x_direct, _) = direct::solve(&op, damping, &g).unwrap();
    for kind in [FactorKind::Kfac, FactorKind::Ekfac] {
        let f = Factors::compute(&p, kind, FisherKind::Exact, 0, &|_| {}).unwrap();
        let x = f.inverse_product(&g, damping);
        let e = x.relative_error(&x_direct);
        assert!(e < 1e-9, "{kind:?} on one example of logreg: {e:e}");
    }
}

#[test]
fn ekfac_errors_preconditioned_cg_and_save_load() {
    let (m, w) = model("mlp:49,16,10", 1, 3, 1.0);
    let data = fashion(300, true);
    let p = Problem::new(&m, &w, &data, 100).unwrap().with_dtype(DType::F64);
    let op = CurvatureOperator::new(&p, Curvature::Ggn);
    let damping = 1e-4;
    let g = ParamVector::random_normal(&m, 4);
    let (x_direct, _) = direct::solve(&op, damping, &g).unwrap();
    let kfac = Factors::compute(&p, FactorKind::Kfac, FisherKind::Exact, 0, &|_| {}).unwrap();
    let ekfac = Factors::compute(&p, FactorKind::Ekfac, FisherKind::Exact, 0, &|_| {}).unwrap();
    let e_kfac = kfac.inverse_product(&g, damping).relative_error(&x_direct);
    let e_ekfac = ekfac.inverse_product(&g, damping).relative_error(&x_direct);
    eprintln!("MLP GGN inverse: K-FAC error {e_kfac:.3}, EK-FAC error {e_ekfac:.3}");
    // Bounds stated in the README (solver table): measured 2026-11-28.
    assert!(
        e_kfac < 0.4 && e_ekfac < 0.4 && e_ekfac <= e_kfac,
        "K-FAC {e_kfac}, EK-FAC {e_ekfac}"
    );

    let damped = Damped { inner: &op, damping };
    let opts = CgOptions {
        tol: 1e-10,
        max_iter: 2000,
    };
    let (x_cg, plain) = cg::solve(&damped, &g, &opts, None, "cg").unwrap();
    let precond = |r: &ParamVector| Ok(ekfac.inverse_product(r, damping));
    let (x_pcg, pre) = cg::solve(&damped, &g, &opts, Some(&precond), "pcg").unwrap();
    assert!(x_pcg.relative_error(&x_direct) < 1e-8 && x_cg.relative_error(&x_direct) < 1e-8);
    // On this two-layer MLP the block-diagonal preconditioner does not cut the
    // iteration count (measured: even the exact block-diagonal GGN inverse needs
    // 86 iterations to CG's 77 at 1e-2); PCG must still converge to the solution.
    eprintln!("CG {} iterations, EK-FAC PCG {}", plain.iterations, pre.iterations);
    assert!(pre.converged && pre.iterations < 2 * plain.iterations);

    let scratch = scratch_dir("hvp-kfac-");
    let file = scratch.path().join("ekfac.safetensors");
    ekfac.save(&m, &file).unwrap();
    let back = Factors::load(&m, &file).unwrap();
    assert_eq!(back.kind, FactorKind::Ekfac);
    assert_eq!(back.inverse_product(&g, damping), ekfac.inverse_product(&g, damping));
}

#[test]
fn resnet_factors_cover_conv_layers_and_batchnorm_diagonals() {
    let (m, w) = model("resnet-cifar:1,1,1", 1, 5, 1.0);
    let data = fashion(12, false);
    let p = Problem::new(&m, &w, &data, 6).unwrap().with_dtype(DType::F32);
    let f = Factors::compute(&p, FactorKind::Ekfac, FisherKind::Mc, 1, &|_| {}).unwrap();
    // 9 convolutions and the fc layer; every BatchNorm γ and β has a diagonal.
    assert_eq!(f.layers.len(), 10);
    let bn_params = m
        .params
        .iter()
        .filter(|p| p.name.contains("bn") || p.name.contains("downsample.1"))
        .count();
    assert_eq!(f.diagonal.len(), bn_params);
    assert!(f.diagonal.iter().all(|(_, d)| d.iter().all(|v| *v >= 0.0)));
    // A's trace for the first conv: mean over examples and positions of ‖patch‖².
    let g = ParamVector::random_normal(&m, 6);
    let x = f.inverse_product(&g, 0.1);
    assert!(x.all_finite() && x.norm() > 0.0);
    // PCG on the exact GGN with these factors converges.
    let p = p.on(&data).unwrap().with_dtype(DType::F64);
    let op = CurvatureOperator::new(&p, Curvature::Ggn);
    let damped = Damped {
        inner: &op,
        damping: 0.1,
    };
    let precond = |r: &ParamVector| Ok(f.inverse_product(r, 0.1));
    let (_, rep) = cg::solve(
        &damped,
        &g,
        &CgOptions {
            tol: 1e-6,
            max_iter: 200,
        },
        Some(&precond),
        "pcg",
    )
    .unwrap();
    assert!(rep.converged && rep.relative_residual < 1e-5, "{rep:?}");
}

#[test]
fn cached_factors_are_reused_bit_for_bit_and_keyed_by_the_weights() {
    use hvp_solvers::kfac::{cache_key, FactorSource};
    let (m, w) = model("mlp:49,8,10", 1, 3, 1.0);
    let data = fashion(40, true);
    let p = Problem::new(&m, &w, &data, 16).unwrap().with_dtype(DType::F64);
    let scratch = scratch_dir("hvp-kfac-cache-test-");
    // A cache folder that does not exist yet: `cached` creates it.
    let dir = scratch.path().join("cache");
    let (first, s1) = Factors::cached(&p, FactorKind::Ekfac, FisherKind::Mc, 4, &dir, &|_| {}).unwrap();
    assert!(matches!(s1, FactorSource::Computed(Some(_))), "{s1:?}");
    let (again, s2) = Factors::cached(&p, FactorKind::Ekfac, FisherKind::Mc, 4, &dir, &|_| {}).unwrap();
    assert!(matches!(s2, FactorSource::Cached(_)), "{s2:?}");
    let g = ParamVector::random_normal(&m, 2);
    let (a, b) = (first.inverse_product(&g, 0.1), again.inverse_product(&g, 0.1));
    for (x, y) in a.tensors.iter().zip(&b.tensors) {
        assert_eq!(x.data(), y.data());
    }
    // Other weights, another seed or another kind: another key.
    let key = cache_key(&p, FactorKind::Ekfac, FisherKind::Mc, 4).unwrap();
    assert_ne!(key, cache_key(&p, FactorKind::Ekfac, FisherKind::Mc, 5).unwrap());
    assert_ne!(key, cache_key(&p, FactorKind::Kfac, FisherKind::Mc, 4).unwrap());
    let mut w2 = w.clone();
    w2.params[0].data_mut()[0] += 1e-9;
    let p2 = Problem::new(&m, &w2, &data, 16).unwrap().with_dtype(DType::F64);
    assert_ne!(key, cache_key(&p2, FactorKind::Ekfac, FisherKind::Mc, 4).unwrap());
}

#[test]
fn inverse_products_of_many_vectors_equal_one_at_a_time_and_in_f32_within_its_rounding() {
    // Biased dense layers (MLP) and convolutions with BatchNorm diagonals (ResNet).
    let cases = [("mlp:49,16,10", true), ("resnet-cifar:1,1,1", false)];
    for (arch, pool) in cases {
        let (m, w) = model(arch, 1, 7, 1.0);
        let data = fashion(12, pool);
        let p = Problem::new(&m, &w, &data, 6).unwrap().with_dtype(DType::F64);
        let ekfac = Factors::compute(&p, FactorKind::Ekfac, FisherKind::Empirical, 0, &|_| {}).unwrap();
        let gs: Vec<ParamVector> = (0..3).map(|k| ParamVector::random_normal(&m, 20 + k)).collect();
        for f in [ekfac.clone(), ekfac.without_corrections()] {
            let together = f.inverse_products(&gs, 0.05);
            assert_eq!(together.len(), gs.len());
            for (g, x) in gs.iter().zip(&together) {
                let e = x.relative_error(&f.inverse_product(g, 0.05));
                assert!(e < 1e-13, "{arch} {:?}: {e:e}", f.kind);
            }
            // In f64 the same numbers; in f32 (an f32 problem's solves) within its rounding.
            assert_eq!(f.inverse_products_in(DType::F64, &gs, 0.05), together);
            for (x32, x) in f.inverse_products_in(DType::F32, &gs, 0.05).iter().zip(&together) {
                let e = x32.relative_error(x);
                // Measured 2e-7 (MLP) and 4.6e-7 (ResNet).
                assert!(e > 0.0 && e < 2e-6, "{arch} {:?} f32: {e:e}", f.kind);
            }
        }
    }
}

#[test]
fn factors_resumed_from_a_checkpoint_equal_the_uninterrupted_ones_bit_for_bit() {
    use hvp_solvers::kfac::Checkpoint;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let (m, w) = model("resnet-cifar:1,1,1", 1, 5, 1.0);
    let data = fashion(24, false);
    // 6 batches per pass: EK-FAC's two passes see 12.
    let p = Problem::new(&m, &w, &data, 4).unwrap().with_dtype(DType::F32);
    let scratch = scratch_dir("hvp-kfac-resume-test-");
    let dir = scratch.path();
    let whole = Factors::compute(&p, FactorKind::Ekfac, FisherKind::Mc, 3, &|_| {}).unwrap();
    whole.save(&m, &dir.join("whole.safetensors")).unwrap();
    let expected = std::fs::read(dir.join("whole.safetensors")).unwrap();
    // Stopped in the covariance pass, then in the correction pass.
    for stop_at in [3, 9] {
        let checkpoint = Checkpoint {
            path: dir.join(format!("stopped-{stop_at}.partial")),
            every: std::time::Duration::ZERO,
            resume: true,
        };
        let batches = Arc::new(AtomicUsize::new(0));
        let seen = batches.clone();
        let watched = Problem::new(&m, &w, &data, 4)
            .unwrap()
            .with_dtype(DType::F32)
            .with_watch(Arc::new(move |_| seen.fetch_add(1, Ordering::SeqCst) < stop_at));
        let stopped = Factors::compute_checkpointed(
            &watched,
            FactorKind::Ekfac,
            FisherKind::Mc,
            3,
            &|_| {},
            Some(&checkpoint),
        );
        assert!(stopped.is_err(), "the watch stops the pass at batch {stop_at}");
        assert!(checkpoint.path.is_file());
        let resumed_batches = Arc::new(AtomicUsize::new(0));
        let counted = resumed_batches.clone();
        let again = Problem::new(&m, &w, &data, 4)
            .unwrap()
            .with_dtype(DType::F32)
            .with_watch(Arc::new(move |_| {
                counted.fetch_add(1, Ordering::SeqCst);
                true
            }));
        let resumed =
            Factors::compute_checkpointed(&again, FactorKind::Ekfac, FisherKind::Mc, 3, &|_| {}, Some(&checkpoint))
                .unwrap();
        // Only the batches after the checkpoint ran again.
        assert_eq!(resumed_batches.load(Ordering::SeqCst), 12 - stop_at);
        let out = dir.join(format!("resumed-{stop_at}.safetensors"));
        resumed.save(&m, &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), expected, "stopped at batch {stop_at}");
        // Another configuration refuses the checkpoint, naming it.
        let err = Factors::compute_checkpointed(&p, FactorKind::Ekfac, FisherKind::Mc, 4, &|_| {}, Some(&checkpoint))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("another model, data or setting") && err.contains("stopped-"),
            "{err}"
        );
        // Other batches would put the saved count at other boundaries: refused.
        let other = Problem::new(&m, &w, &data, 6).unwrap().with_dtype(DType::F32);
        let err =
            Factors::compute_checkpointed(&other, FactorKind::Ekfac, FisherKind::Mc, 3, &|_| {}, Some(&checkpoint))
                .unwrap_err()
                .to_string();
        assert!(err.contains("batches of 4") && err.contains("--batch-size 4"), "{err}");
        checkpoint.discard();
        assert!(!checkpoint.path.exists());
    }
}

#[test]
fn the_factor_cache_resumes_an_interrupted_computation_of_its_key() {
    use hvp_solvers::kfac::{cache_key, Checkpoint, FactorSource};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let (m, w) = model("mlp:49,8,10", 1, 3, 1.0);
    let data = fashion(40, true);
    let p = Problem::new(&m, &w, &data, 8).unwrap().with_dtype(DType::F64);
    let scratch = scratch_dir("hvp-kfac-cache-resume-test-");
    let dir = scratch.path();
    let whole = Factors::compute(&p, FactorKind::Ekfac, FisherKind::Empirical, 2, &|_| {}).unwrap();
    // A run stopped after 7 of its 10 batches left the cache's checkpoint behind.
    let key = cache_key(&p, FactorKind::Ekfac, FisherKind::Empirical, 2).unwrap();
    let checkpoint = Checkpoint {
        path: dir.join(format!("ekfac-{key}.partial")),
        every: std::time::Duration::ZERO,
        resume: true,
    };
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    let stopped = Problem::new(&m, &w, &data, 8)
        .unwrap()
        .with_dtype(DType::F64)
        .with_watch(Arc::new(move |_| counter.fetch_add(1, Ordering::SeqCst) < 7));
    assert!(Factors::compute_checkpointed(
        &stopped,
        FactorKind::Ekfac,
        FisherKind::Empirical,
        2,
        &|_| {},
        Some(&checkpoint)
    )
    .is_err());
    let ran = Arc::new(AtomicUsize::new(0));
    let counter = ran.clone();
    let again = Problem::new(&m, &w, &data, 8)
        .unwrap()
        .with_dtype(DType::F64)
        .with_watch(Arc::new(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
            true
        }));
    let (cached, source) = Factors::cached(&again, FactorKind::Ekfac, FisherKind::Empirical, 2, dir, &|_| {}).unwrap();
    assert!(matches!(source, FactorSource::Computed(Some(_))), "{source:?}");
    assert_eq!(ran.load(Ordering::SeqCst), 3, "only the batches after the checkpoint");
    assert!(!checkpoint.path.exists(), "removed once the factors are stored");
    let g = ParamVector::random_normal(&m, 2);
    let (a, b) = (whole.inverse_product(&g, 0.1), cached.inverse_product(&g, 0.1));
    for (x, y) in a.tensors.iter().zip(&b.tensors) {
        assert_eq!(x.data(), y.data());
    }
}

/// A fresh scratch folder, removed when the returned guard drops (also when a
/// test fails).
fn scratch_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(prefix).tempdir().unwrap()
}
