//! Every primitive, in f64: JVP against central finite differences, VJP against
//! the JVP by duality ⟨u, J v⟩ = ⟨Jᵀu, v⟩, and the VJP's own JVP (what
//! forward-over-reverse uses) against central differences of the VJP.

use hvp_autodiff::primitives::{activation, batchnorm, conv2d, dense, structural};
use hvp_autodiff::{loss, Dual, Value};
use hvp_tensor::conv::ConvGeometry;
use hvp_tensor::elementwise::dot_f64;
use hvp_tensor::Tensor;

/// Deterministic pseudo-random values in (−1, 1) (SplitMix64).
fn random(shape: &[usize], seed: u64) -> Tensor<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    let n = shape.iter().product();
    let data = (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect();
    Tensor::new(shape.to_vec(), data).unwrap()
}

fn axpy(x: &Tensor<f64>, a: f64, y: &Tensor<f64>) -> Tensor<f64> {
    let d = x.data().iter().zip(y.data()).map(|(p, q)| p + a * q).collect();
    Tensor::new(x.shape().to_vec(), d).unwrap()
}

fn rel_err(a: &Tensor<f64>, b: &Tensor<f64>) -> f64 {
    assert_eq!(a.shape(), b.shape());
    let diff: f64 = a.data().iter().zip(b.data()).map(|(x, y)| (x - y).powi(2)).sum();
    let norm: f64 = b.data().iter().map(|y| y * y).sum();
    diff.sqrt() / norm.sqrt().max(1e-300)
}

type Fwd<'a> = dyn Fn(&[Dual<f64>]) -> Dual<f64> + 'a;
type Vjp<'a> = dyn Fn(&[Dual<f64>], &Dual<f64>) -> Vec<Dual<f64>> + 'a;

fn duals(xs: &[Tensor<f64>], ts: Option<&[Tensor<f64>]>) -> Vec<Dual<f64>> {
    xs.iter()
        .enumerate()
        .map(|(i, x)| Dual::new(x.clone(), ts.map(|t| t[i].clone())))
        .collect()
}

fn check(name: &str, xs: Vec<Tensor<f64>>, fwd: &Fwd<'_>, vjp: &Vjp<'_>) {
    let h = 1e-6;
    let vs: Vec<Tensor<f64>> = xs
        .iter()
        .enumerate()
        .map(|(i, x)| random(x.shape(), 100 + i as u64))
        .collect();
    let plus: Vec<_> = xs.iter().zip(&vs).map(|(x, v)| axpy(x, h, v)).collect();
    let minus: Vec<_> = xs.iter().zip(&vs).map(|(x, v)| axpy(x, -h, v)).collect();

    // JVP vs central differences.
    let y = fwd(&duals(&xs, Some(&vs)));
    let jv = y.tangent_or_zeros();
    let fd = axpy(
        fwd(&duals(&plus, None)).primal(),
        -1.0,
        fwd(&duals(&minus, None)).primal(),
    );
    let fd = Tensor::new(fd.shape().to_vec(), fd.data().iter().map(|d| d / (2.0 * h)).collect()).unwrap();
    let e = rel_err(&jv, &fd);
    assert!(e < 1e-7, "{name}: JVP vs finite differences: relative error {e:e}");

    // Duality ⟨u, J v⟩ = Σ ⟨Jᵀu, v⟩.
    let u = random(y.primal().shape(), 7);
    let cots = vjp(&duals(&xs, None), &Dual::new(u.clone(), None));
    let lhs = dot_f64(&u, &jv);
    let rhs: f64 = cots.iter().zip(&vs).map(|(g, v)| dot_f64(g.primal(), v)).sum();
    assert!(
        (lhs - rhs).abs() <= 1e-10 * lhs.abs().max(1.0),
        "{name}: duality {lhs} vs {rhs}"
    );

    // Forward-over-reverse: the tangent of the VJP (inputs moving along v, the
    // cotangent along u̇) vs central differences of the VJP.
    let du = random(u.shape(), 8);
    let tangent_cots = vjp(&duals(&xs, Some(&vs)), &Dual::new(u.clone(), Some(du.clone())));
    let cp = vjp(&duals(&plus, None), &Dual::new(axpy(&u, h, &du), None));
    let cm = vjp(&duals(&minus, None), &Dual::new(axpy(&u, -h, &du), None));
    for (k, tc) in tangent_cots.iter().enumerate() {
        let fd = axpy(cp[k].primal(), -1.0, cm[k].primal());
        let fd = Tensor::new(fd.shape().to_vec(), fd.data().iter().map(|d| d / (2.0 * h)).collect()).unwrap();
        let e = rel_err(&tc.tangent_or_zeros(), &fd);
        assert!(
            e < 1e-7,
            "{name}: tangent of VJP #{k} vs finite differences: relative error {e:e}"
        );
    }
}

#[test]
fn dense_with_bias() {
    let xs = vec![random(&[5, 4], 1), random(&[3, 4], 2), random(&[3], 3)];
    check("dense", xs, &|d| dense::forward(&d[0], &d[1], Some(&d[2])), &|d, g| {
        let (gx, gw, gb) = dense::vjp(&d[0], &d[1], true, g, true);
        vec![gx.unwrap(), gw, gb.unwrap()]
    });
}

#[test]
fn conv2d_with_and_without_stride() {
    for (stride, padding) in [(1, 1), (2, 1), (1, 0)] {
        let g = ConvGeometry { stride, padding };
        let xs = vec![random(&[2, 3, 6, 5], 4), random(&[4, 3, 3, 3], 5), random(&[4], 6)];
        check(
            "conv2d",
            xs,
            &move |d| conv2d::forward(&d[0], &d[1], Some(&d[2]), g),
            &move |d, gy| {
                let (gx, gw, gb) = conv2d::vjp(&d[0], &d[1], true, gy, g, true, true);
                vec![gx.unwrap(), gw, gb.unwrap()]
            },
        );
    }
}

#[test]
fn batchnorm_eval_mode() {
    let mean = random(&[3], 9);
    let var = Tensor::new(vec![3], random(&[3], 10).data().iter().map(|v| v.abs() + 0.5).collect()).unwrap();
    let xs = vec![random(&[2, 3, 2, 2], 11), random(&[3], 12), random(&[3], 13)];
    check(
        "batchnorm",
        xs,
        &|d| {
            batchnorm::forward(
                &d[0],
                &d[1],
                &d[2],
                &batchnorm::Stats {
                    mean: &mean,
                    var: &var,
                    eps: 1e-5,
                },
            )
        },
        &|d, g| {
            let st = batchnorm::Stats {
                mean: &mean,
                var: &var,
                eps: 1e-5,
            };
            let (gx, gg, gb) = batchnorm::vjp(&d[0], &d[1], &d[2], &st, g, true);
            vec![gx.unwrap(), gg, gb]
        },
    );
}

#[test]
fn activations() {
    // Values away from 0 so the ReLU's kink is not crossed by the differences.
    let x = Tensor::new(
        vec![4, 6],
        random(&[4, 6], 14)
            .data()
            .iter()
            .map(|v| v + v.signum() * 0.1)
            .collect(),
    )
    .unwrap();
    check("relu", vec![x.clone()], &|d| activation::relu(&d[0]), &|d, g| {
        vec![activation::relu_vjp(&activation::relu(&d[0]), g.clone())]
    });
    check("tanh", vec![x], &|d| activation::tanh(&d[0]), &|d, g| {
        vec![activation::tanh_vjp(&d[0], g)]
    });
}

#[test]
fn structural_ops() {
    let x = random(&[2, 3, 4, 4], 15);
    check(
        "add",
        vec![x.clone(), random(&[2, 3, 4, 4], 16)],
        &|d| d[0].add(&d[1]),
        &|_, g| vec![g.clone(), g.clone()],
    );
    check(
        "global_avg_pool",
        vec![x.clone()],
        &|d| structural::global_avg_pool(&d[0]),
        &|_, g| vec![structural::global_avg_pool_vjp(g, 4, 4)],
    );
    check(
        "avg_pool",
        vec![x.clone()],
        &|d| structural::avg_pool(&d[0], 2, 2),
        &|_, g| vec![structural::avg_pool_vjp(g, 2, 2, 4, 4)],
    );
    check("flatten", vec![x], &|d| structural::flatten(&d[0]), &|_, g| {
        vec![structural::flatten_vjp(g, &[2, 3, 4, 4])]
    });
}

#[test]
fn softmax_cross_entropy_cotangent() {
    let labels = [2usize, 0, 4];
    // The cotangent map z ↦ ∂ℓ/∂z is itself checked as a primitive: its JVP is the
    // output-space Hessian H_out ż, which must be symmetric (duality with itself).
    let z = random(&[3, 5], 17);
    let f = move |d: &[Dual<f64>]| loss::softmax_cross_entropy(&d[0], &labels, 0.5).cotangent;
    let h = 1e-6;
    let v = random(&[3, 5], 18);
    let jv = f(&[Dual::new(z.clone(), Some(v.clone()))]).tangent_or_zeros();
    let fp = f(&[Dual::new(axpy(&z, h, &v), None)]).into_primal();
    let fm = f(&[Dual::new(axpy(&z, -h, &v), None)]).into_primal();
    let fd = Tensor::new(
        vec![3, 5],
        fp.data()
            .iter()
            .zip(fm.data())
            .map(|(a, b)| (a - b) / (2.0 * h))
            .collect(),
    )
    .unwrap();
    assert!(rel_err(&jv, &fd) < 1e-7);
    let u = random(&[3, 5], 19);
    let ju = f(&[Dual::new(z.clone(), Some(u.clone()))]).tangent_or_zeros();
    assert!((dot_f64(&u, &jv) - dot_f64(&ju, &v)).abs() < 1e-12);
    // The loss JVP equals ⟨∂ℓ/∂z, ż⟩ and the losses' finite differences.
    let dl = loss::softmax_cross_entropy_jvp(&Dual::new(z.clone(), Some(v.clone())), &labels);
    let lp = loss::softmax_cross_entropy(&axpy(&z, h, &v), &labels, 1.0).losses;
    let lm = loss::softmax_cross_entropy(&axpy(&z, -h, &v), &labels, 1.0).losses;
    for i in 0..3 {
        let fd = (lp[i] - lm[i]) / (2.0 * h);
        assert!((dl[i] - fd).abs() < 1e-8, "example {i}: {} vs {fd}", dl[i]);
    }
}

/// MSE: the cotangent is the finite difference of the losses, its tangent is
/// the output Hessian (2/K)·weight·ż, and the loss JVP matches differences.
#[test]
fn mse_cotangent_and_directional_derivative() {
    let z = random(&[3, 4], 21);
    let t = random(&[3, 4], 22);
    let targets = t.data().to_vec();
    let v = random(&[3, 4], 23);
    let out = loss::mse(&Dual::new(z.clone(), Some(v.clone())), &targets, 0.5);
    let expected_tangent: Vec<f64> = v.data().iter().map(|d| 2.0 * 0.5 / 4.0 * d).collect();
    assert!(out
        .cotangent
        .tangent_or_zeros()
        .data()
        .iter()
        .zip(&expected_tangent)
        .all(|(a, b)| (a - b).abs() < 1e-15));
    let h = 1e-6;
    let dl = loss::directional(&Dual::new(z.clone(), Some(v.clone())), loss::Targets::Values(&targets));
    let lp = loss::mse(&axpy(&z, h, &v), &targets, 1.0).losses;
    let lm = loss::mse(&axpy(&z, -h, &v), &targets, 1.0).losses;
    for i in 0..3 {
        let fd = (lp[i] - lm[i]) / (2.0 * h);
        assert!((dl[i] - fd).abs() < 1e-8, "example {i}: {} vs {fd}", dl[i]);
    }
    // ℓ_i is the mean over the row, as torch.nn.MSELoss.
    let row0: f64 = (0..4).map(|k| (z.data()[k] - targets[k]).powi(2)).sum::<f64>() / 4.0;
    assert!((loss::mse(&z, &targets, 1.0).losses[0] - row0).abs() < 1e-15);
}

#[test]
fn batchnorm_train_mode_vjp_matches_finite_differences() {
    // Train mode is reverse-only: check ⟨gy, d forward⟩ = Σ ⟨vjp, direction⟩ by central differences.
    let (x, g, b) = (random(&[3, 2, 2, 2], 30), random(&[2], 31), random(&[2], 32));
    let (dx, dg, db) = (random(&[3, 2, 2, 2], 33), random(&[2], 34), random(&[2], 35));
    let gy = random(&[3, 2, 2, 2], 36);
    let h = 1e-6;
    let f = |s: f64| batchnorm::train_forward(&axpy(&x, s, &dx), &axpy(&g, s, &dg), &axpy(&b, s, &db), 1e-5).0;
    let fd = axpy(&f(h), -1.0, &f(-h));
    let lhs = dot_f64(&gy, &fd) / (2.0 * h);
    let (gx, gg, gb) = batchnorm::train_vjp(&x, &g, &gy, 1e-5);
    let rhs = dot_f64(&gx, &dx) + dot_f64(&gg, &dg) + dot_f64(&gb, &db);
    assert!((lhs - rhs).abs() < 1e-7 * lhs.abs().max(1.0), "{lhs} vs {rhs}");
    // Batch statistics: the output is normalised per channel.
    let (y, mean, var) = batchnorm::train_forward(
        &x,
        &Tensor::new(vec![2], vec![1.0, 1.0]).unwrap(),
        &Tensor::zeros(&[2]),
        0.0,
    );
    let (ym, yv) = batchnorm::batch_stats(&y);
    assert!(ym.iter().all(|m| m.abs() < 1e-12) && yv.iter().all(|v| (v - 1.0).abs() < 1e-9));
    assert_eq!((mean.len(), var.len()), (2, 2));
}
