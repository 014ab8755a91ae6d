//! Whole-model checks of the streamed gradient, Hessian and GGN products (f64):
//! finite differences on smooth (tanh) models, symmetry, GGN = Hessian for
//! logistic regression, batch-size invariance, f32 against f64.

use hvp_curvature::{Curvature, Problem};
use hvp_data::InMemory;
use hvp_model::{Architecture, Model, ParamVector, Weights};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

fn setup(arch: &str, channels: usize, sample: &[usize], n: usize, seed: u64) -> (Model, Weights, InMemory) {
    let arch: Architecture = arch.parse().unwrap();
    let model = Model::new(&arch, channels).unwrap();
    let mut w = Weights::init(&model, seed);
    let mut rng = StdRng::seed_from_u64(seed + 1);
    // Non-trivial BatchNorm statistics and affine parameters.
    for (spec, t) in model.buffers.iter().zip(&mut w.buffers) {
        let var = spec.name.ends_with("running_var");
        t.data_mut().iter_mut().for_each(|v| {
            *v = if var {
                rng.random_range(0.5..1.5)
            } else {
                rng.random_range(-0.3..0.3)
            }
        });
    }
    for (spec, t) in model.params.iter().zip(&mut w.params) {
        if spec.shape.len() == 1 {
            t.data_mut().iter_mut().for_each(|v| *v += rng.random_range(-0.2..0.2));
        }
    }
    let size: usize = sample.iter().product();
    let x = (0..n * size).map(|_| rng.random_range(-1.0..1.0)).collect();
    let labels = (0..n).map(|_| rng.random_range(0..model.num_classes)).collect();
    (model, w, InMemory::new(sample.to_vec(), x, labels).unwrap())
}

fn shifted(w: &Weights, v: &ParamVector, h: f64) -> Weights {
    let mut out = w.clone();
    for (p, d) in out.params.iter_mut().zip(&v.tensors) {
        p.data_mut().iter_mut().zip(d.data()).for_each(|(a, b)| *a += h * b);
    }
    out
}

fn no_progress(_: usize) {}

/// `H v` against the central difference of the gradient along v, and the
/// gradient against the central difference of the loss.
fn check_fd(model: &Model, w: &Weights, data: &InMemory) {
    // A unit direction keeps the finite differences' truncation error small.
    let mut v = ParamVector::random_normal(model, 7);
    v.scale(1.0 / v.norm());
    let p = Problem::new(model, w, data, 4).unwrap();
    let hv = p.product_as::<f64>(Curvature::Hessian, &v, &no_progress).unwrap().value;
    let h = 1e-5;
    let (wp, wm) = (shifted(w, &v, h), shifted(w, &v, -h));
    let gp = Problem::new(model, &wp, data, 4)
        .unwrap()
        .gradient_as::<f64>(&no_progress)
        .unwrap();
    let gm = Problem::new(model, &wm, data, 4)
        .unwrap()
        .gradient_as::<f64>(&no_progress)
        .unwrap();
    let mut fd = gp.value.clone();
    fd.axpy(-1.0, &gm.value);
    fd.scale(1.0 / (2.0 * h));
    let e = hv.relative_error(&fd);
    assert!(
        e < 1e-7,
        "{}: HVP vs finite differences of the gradient: {e:e}",
        model.arch
    );
    let g = p.gradient_as::<f64>(&no_progress).unwrap().value;
    // Loss differences lose ~1e-11 absolute to rounding (loss ≈ 2, step 1e-5).
    let fd_loss = (gp.loss - gm.loss) / (2.0 * h);
    let dir = g.dot(&v);
    assert!(
        (dir - fd_loss).abs() < 1e-6 * dir.abs() + 1e-9,
        "{}: ⟨g, v⟩ {dir} vs {fd_loss}",
        model.arch
    );
}

#[test]
fn mlp_hvp_matches_finite_differences() {
    let (m, w, d) = setup("mlp-tanh:6,5,4,3", 1, &[6], 13, 1);
    check_fd(&m, &w, &d);
}

#[test]
fn resnet_hvp_matches_finite_differences() {
    let (m, w, d) = setup("resnet-cifar-tanh:1,1,1", 2, &[2, 8, 8], 5, 2);
    check_fd(&m, &w, &d);
}

#[test]
fn hessian_and_ggn_are_symmetric_and_ggn_is_psd() {
    let (m, w, d) = setup("resnet-cifar:1,1,1", 1, &[1, 8, 8], 6, 3);
    let p = Problem::new(&m, &w, &d, 4).unwrap();
    let (u, v) = (ParamVector::random_normal(&m, 1), ParamVector::random_normal(&m, 2));
    for c in [Curvature::Hessian, Curvature::Ggn] {
        let mu = p.product_as::<f64>(c, &u, &no_progress).unwrap().value;
        let mv = p.product_as::<f64>(c, &v, &no_progress).unwrap().value;
        let (a, b) = (u.dot(&mv), mu.dot(&v));
        assert!(
            (a - b).abs() < 1e-10 * a.abs().max(b.abs()),
            "{c:?}: ⟨u, Mv⟩ {a} vs ⟨Mu, v⟩ {b}"
        );
        if c == Curvature::Ggn {
            assert!(
                v.dot(&mv) > 0.0 && u.dot(&mu) > 0.0,
                "GGN quadratic forms must be positive"
            );
        }
    }
}

#[test]
fn ggn_equals_hessian_for_logistic_regression() {
    let (m, w, d) = setup("logreg:7,4", 1, &[7], 21, 4);
    let p = Problem::new(&m, &w, &d, 8).unwrap();
    let v = ParamVector::random_normal(&m, 3);
    let h = p.product_as::<f64>(Curvature::Hessian, &v, &no_progress).unwrap().value;
    let g = p.product_as::<f64>(Curvature::Ggn, &v, &no_progress).unwrap().value;
    let e = g.relative_error(&h);
    assert!(e < 1e-13, "GGN vs Hessian for logreg: {e:e}");
}

#[test]
fn products_do_not_depend_on_the_batch_size() {
    let (m, w, d) = setup("resnet-cifar:1,1,1", 3, &[3, 8, 8], 11, 5);
    let v = ParamVector::random_normal(&m, 4);
    let reference = Problem::new(&m, &w, &d, 11).unwrap();
    for c in [Curvature::Hessian, Curvature::Ggn] {
        let full = reference.product_as::<f64>(c, &v, &no_progress).unwrap();
        for bs in [1, 4, 8] {
            let p = Problem::new(&m, &w, &d, bs).unwrap();
            let r = p.product_as::<f64>(c, &v, &no_progress).unwrap();
            let e = r.value.relative_error(&full.value);
            assert!(e < 1e-13, "{c:?} batch {bs}: {e:e}");
            assert!((r.loss - full.loss).abs() < 1e-13);
        }
    }
}

#[test]
fn f32_agrees_with_f64() {
    let (m, w, d) = setup("resnet-cifar:1,1,1", 1, &[1, 8, 8], 7, 6);
    let p = Problem::new(&m, &w, &d, 4).unwrap();
    let v = ParamVector::random_normal(&m, 5);
    for c in [Curvature::Hessian, Curvature::Ggn] {
        let a = p.product_as::<f32>(c, &v, &no_progress).unwrap().value;
        let b = p.product_as::<f64>(c, &v, &no_progress).unwrap().value;
        let e = a.relative_error(&b);
        assert!(e < 1e-5, "{c:?}: f32 vs f64 {e:e}");
    }
    let a = p.gradient_as::<f32>(&no_progress).unwrap().value;
    let b = p.gradient_as::<f64>(&no_progress).unwrap().value;
    assert!(a.relative_error(&b) < 1e-5);
}

#[test]
fn loss_directional_equals_explicit_per_example_gradients() {
    let (m, w, d) = setup("resnet-cifar:1,1,1", 1, &[1, 8, 8], 5, 9);
    let p = Problem::new(&m, &w, &d, 2).unwrap();
    let s = ParamVector::random_normal(&m, 10);
    let jvp = p.loss_directional_as::<f64>(&s, &no_progress).unwrap();
    for (i, &ji) in jvp.iter().enumerate() {
        let one = hvp_data::Subset::new(&d, vec![i]).unwrap();
        let g = Problem::new(&m, &w, &one, 1)
            .unwrap()
            .gradient_as::<f64>(&no_progress)
            .unwrap()
            .value;
        let explicit = g.dot(&s);
        assert!(
            (ji - explicit).abs() < 1e-12 * explicit.abs().max(1.0),
            "example {i}: {ji} vs {explicit}"
        );
    }
}

#[test]
fn weight_decay_adds_to_gradient_and_curvature() {
    let (m, w, d) = setup("mlp-tanh:6,5,3", 1, &[6], 9, 11);
    let v = ParamVector::random_normal(&m, 12);
    let plain = Problem::new(&m, &w, &d, 4).unwrap();
    let decayed = Problem::new(&m, &w, &d, 4).unwrap().with_weight_decay(0.3);
    let theta = ParamVector {
        tensors: w.params.clone(),
    };
    let mut want = plain.gradient_as::<f64>(&no_progress).unwrap().value;
    want.axpy(0.3, &theta);
    assert!(
        decayed
            .gradient_as::<f64>(&no_progress)
            .unwrap()
            .value
            .relative_error(&want)
            < 1e-14
    );
    let mut want = plain
        .product_as::<f64>(Curvature::Hessian, &v, &no_progress)
        .unwrap()
        .value;
    want.axpy(0.3, &v);
    assert!(
        decayed
            .product_as::<f64>(Curvature::Hessian, &v, &no_progress)
            .unwrap()
            .value
            .relative_error(&want)
            < 1e-14
    );
}

#[test]
fn sub_batches_follow_the_activation_size_and_leave_results_unchanged() {
    let in_pool = |threads: usize, f: &(dyn Fn() -> usize + Sync)| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(f)
    };
    // The seed ResNet on CIFAR-shaped images: ~467 k node values per image, so
    // a batch of 250 is cut into sub-batches of at most 17 images, rounded up to
    // a multiple of the workers.
    let (m, w, d) = setup("resnet-cifar:2,2,2", 3, &[3, 32, 32], 250, 8);
    let p = Problem::new(&m, &w, &d, 250).unwrap();
    assert_eq!(in_pool(2, &|| p.sub_batch_count(250)), 16);
    assert_eq!(in_pool(3, &|| p.sub_batch_count(250)), 15);
    assert_eq!(in_pool(2, &|| p.sub_batch_count(10)), 2, "never fewer than the workers");
    let asked = Problem::new(&m, &w, &d, 250).unwrap().with_sub_batches(5);
    assert_eq!(in_pool(2, &|| asked.sub_batch_count(250)), 5);
    // A small MLP: one sub-batch per worker.
    let (m, w, d) = setup("mlp:64,32,10", 1, &[64], 300, 9);
    let p = Problem::new(&m, &w, &d, 300).unwrap();
    assert_eq!(in_pool(2, &|| p.sub_batch_count(300)), 2);
    // However a batch is cut, the sums agree to rounding in f64.
    let (m, w, d) = setup("resnet-cifar:1,1,1", 3, &[3, 8, 8], 11, 5);
    let v = ParamVector::random_normal(&m, 4);
    let whole = Problem::new(&m, &w, &d, 11).unwrap().with_sub_batches(1);
    let reference = whole.product_as::<f64>(Curvature::Hessian, &v, &no_progress).unwrap();
    for parts in [2, 3, 11] {
        let p = Problem::new(&m, &w, &d, 11).unwrap().with_sub_batches(parts);
        let r = p.product_as::<f64>(Curvature::Hessian, &v, &no_progress).unwrap();
        let e = r.value.relative_error(&reference.value);
        assert!(e < 1e-13, "{parts} sub-batches: {e:e}");
    }
}
