//! Primitives of imported (ONNX) graphs on N-dimensional values: broadcasting
//! arithmetic, smooth pointwise functions, softmax, matrix products, max
//! pooling, mean reductions and shape changes. As everywhere in this crate, the
//! forward and VJP rules use only the [`Value`] operations, so they run on dual
//! numbers too and forward-over-reverse differentiates them exactly.

use crate::Value;
use hvp_tensor::nd::{self, MaxPoolGeometry};
use hvp_tensor::{elementwise, Float, Tensor};

/// Broadcasting binary arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arith {
    Add,
    Sub,
    Mul,
    Div,
}

/// Smooth (or piecewise-linear) pointwise functions, with their first and
/// second derivatives so that their VJP differentiates again.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pointwise {
    Sigmoid,
    LeakyRelu {
        alpha: f64,
    },
    Erf,
    /// `x Φ(x)` (exact GELU).
    Gelu,
    /// `½x(1 + tanh(√(2/π)(x + 0.044715x³)))`.
    GeluTanh,
    Sqrt,
    Reciprocal,
    /// `x^p` for a constant exponent.
    Pow {
        p: f64,
    },
    Exp,
    Log,
    Neg,
    /// `ln(1 + eˣ)`.
    Softplus,
    /// `x` for x > 0, `α(eˣ − 1)` otherwise.
    Elu {
        alpha: f64,
    },
    /// `clamp(αx + β, 0, 1)`.
    HardSigmoid {
        alpha: f64,
        beta: f64,
    },
    /// `x · clamp(x/6 + ½, 0, 1)`.
    HardSwish,
    /// `clamp(x, min, max)` (ReLU6 is `Clip { min: 0, max: 6 }`).
    Clip {
        min: f64,
        max: f64,
    },
}

const FRAC_2_SQRT_PI: f64 = std::f64::consts::FRAC_2_SQRT_PI;
const GELU_C: f64 = 0.044_715;

impl Pointwise {
    /// `(f(x), f'(x), f''(x))`.
    fn eval(self, x: f64) -> (f64, f64, f64) {
        match self {
            Pointwise::Sigmoid => {
                let s = if x >= 0.0 {
                    1.0 / (1.0 + (-x).exp())
                } else {
                    let e = x.exp();
                    e / (1.0 + e)
                };
                (s, s * (1.0 - s), s * (1.0 - s) * (1.0 - 2.0 * s))
            }
            Pointwise::LeakyRelu { alpha } => {
                if x > 0.0 {
                    (x, 1.0, 0.0)
                } else {
                    (alpha * x, alpha, 0.0)
                }
            }
            Pointwise::Erf => {
                let d = FRAC_2_SQRT_PI * (-x * x).exp();
                (libm::erf(x), d, -2.0 * x * d)
            }
            Pointwise::Gelu => {
                let phi = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
                let cdf = 0.5 * (1.0 + libm::erf(x / std::f64::consts::SQRT_2));
                (x * cdf, cdf + x * phi, phi * (2.0 - x * x))
            }
            Pointwise::GeluTanh => {
                let k = (2.0 / std::f64::consts::PI).sqrt();
                let u = k * (x + GELU_C * x * x * x);
                let du = k * (1.0 + 3.0 * GELU_C * x * x);
                let ddu = k * 6.0 * GELU_C * x;
                let t = u.tanh();
                let sech2 = 1.0 - t * t;
                let f = 0.5 * x * (1.0 + t);
                let d1 = 0.5 * (1.0 + t) + 0.5 * x * sech2 * du;
                let d2 = sech2 * du + 0.5 * x * (-2.0 * t * sech2 * du * du + sech2 * ddu);
                (f, d1, d2)
            }
            Pointwise::Sqrt => {
                let r = x.sqrt();
                (r, 0.5 / r, -0.25 / (r * x))
            }
            Pointwise::Reciprocal => (1.0 / x, -1.0 / (x * x), 2.0 / (x * x * x)),
            Pointwise::Pow { p } => {
                if p == 0.0 {
                    return (1.0, 0.0, 0.0);
                }
                (x.powf(p), p * x.powf(p - 1.0), p * (p - 1.0) * x.powf(p - 2.0))
            }
            Pointwise::Exp => {
                let e = x.exp();
                (e, e, e)
            }
            Pointwise::Log => (x.ln(), 1.0 / x, -1.0 / (x * x)),
            Pointwise::Neg => (-x, -1.0, 0.0),
            Pointwise::Softplus => {
                // ln(1 + eˣ) without overflow; its derivatives are σ(x) and σ(1 − σ).
                let f = if x > 0.0 {
                    x + (-x).exp().ln_1p()
                } else {
                    x.exp().ln_1p()
                };
                let (s, _, _) = Pointwise::Sigmoid.eval(x);
                (f, s, s * (1.0 - s))
            }
            Pointwise::Elu { alpha } => {
                if x > 0.0 {
                    (x, 1.0, 0.0)
                } else {
                    let e = alpha * x.exp();
                    (e - alpha, e, e)
                }
            }
            Pointwise::HardSigmoid { alpha, beta } => {
                let y = alpha * x + beta;
                if y <= 0.0 {
                    (0.0, 0.0, 0.0)
                } else if y >= 1.0 {
                    (1.0, 0.0, 0.0)
                } else {
                    (y, alpha, 0.0)
                }
            }
            Pointwise::HardSwish => {
                if x <= -3.0 {
                    (0.0, 0.0, 0.0)
                } else if x >= 3.0 {
                    (x, 1.0, 0.0)
                } else {
                    (x * (x + 3.0) / 6.0, (2.0 * x + 3.0) / 6.0, 1.0 / 3.0)
                }
            }
            Pointwise::Clip { min, max } => {
                if x < min {
                    (min, 0.0, 0.0)
                } else if x > max {
                    (max, 0.0, 0.0)
                } else {
                    (x, 1.0, 0.0)
                }
            }
        }
    }

    fn apply<T: Float>(self, x: &Tensor<T>, which: usize) -> Tensor<T> {
        elementwise::map(x, |v| {
            let e = self.eval(v.to_f64());
            T::from_f64([e.0, e.1, e.2][which])
        })
    }
}

fn zip_mul<T: Float>(a: &Tensor<T>, b: &Tensor<T>) -> Tensor<T> {
    let shape = nd::broadcast_shape(a.shape(), b.shape()).expect("shapes checked at import");
    nd::zip_broadcast(a, b, &shape, |x, y| x * y)
}

fn negate<T: Float>(t: &Tensor<T>) -> Tensor<T> {
    elementwise::map(t, |v| -v)
}

fn sub<T: Float, V: Value<T>>(a: &V, b: &V) -> V {
    a.add(&b.linear(negate))
}

/// `1 / b`, with its JVP `−ḃ / b²`.
fn reciprocal<T: Float, V: Value<T>>(b: &V) -> V {
    b.nonlinear(
        |b| elementwise::map(b, |v| T::ONE / v),
        |b, db| nd::zip_broadcast(b, db, b.shape(), |v, d| -d / (v * v)),
    )
}

/// `a ∘ b` with numpy broadcasting.
pub fn arith<T: Float, V: Value<T>>(op: Arith, a: &V, b: &V) -> V {
    let shape = nd::broadcast_shape(a.primal().shape(), b.primal().shape()).expect("shapes checked at import");
    let grow = |t: &Tensor<T>| nd::expand(t, &shape);
    let full = |v: &V| v.primal().shape() == shape.as_slice();
    match op {
        Arith::Add if full(a) && full(b) => a.add(b),
        Arith::Add if full(a) => a.add(&b.linear(grow)),
        Arith::Add if full(b) => b.add(&a.linear(grow)),
        Arith::Add => a.linear(grow).add(&b.linear(grow)),
        Arith::Sub => sub(&a.linear(grow), &b.linear(grow)),
        Arith::Mul => V::bilinear(a, b, zip_mul),
        Arith::Div => V::bilinear(a, &reciprocal(b), zip_mul),
    }
}

/// Cotangents of `a ∘ b` for its two operands (each summed down to its shape).
/// `t` summed down to `shape`, without a copy when it already has it.
fn down<T: Float>(t: Tensor<T>, shape: &[usize]) -> Tensor<T> {
    if t.shape() == shape {
        t
    } else {
        nd::reduce_to(&t, shape)
    }
}

/// The cotangents of `a` and `b` (each only when `need` says so) of `a ∘ b`.
pub fn arith_vjp<T: Float, V: Value<T>>(op: Arith, a: &V, b: &V, gy: V, need: (bool, bool)) -> (Option<V>, Option<V>) {
    let (sa, sb) = (a.primal().shape().to_vec(), b.primal().shape().to_vec());
    match op {
        Arith::Add | Arith::Sub => {
            // The cotangent moves to whichever side needs it; copied only for both.
            let (ga, gb) = match need {
                (true, true) => (Some(gy.clone()), Some(gy)),
                (true, false) => (Some(gy), None),
                (false, true) => (None, Some(gy)),
                (false, false) => (None, None),
            };
            let ga = ga.map(|g| g.linear_owned(|g| down(g, &sa)));
            let gb = gb.map(|g| {
                g.linear_owned(|g| {
                    let g = down(g, &sb);
                    if op == Arith::Sub {
                        negate(&g)
                    } else {
                        g
                    }
                })
            });
            (ga, gb)
        }
        Arith::Mul => (
            need.0.then(|| V::bilinear(&gy, b, |g, b| down(zip_mul(g, b), &sa))),
            need.1.then(|| V::bilinear(&gy, a, |g, a| down(zip_mul(g, a), &sb))),
        ),
        Arith::Div => {
            let ga = need.0.then(|| {
                let inv = reciprocal(b);
                V::bilinear(&gy, &inv, |g, r| down(zip_mul(g, r), &sa))
            });
            let gb = need.1.then(|| {
                // d(a/b)/db = −a / b²; −1/b² is itself a function of b (JVP 2ḃ/b³).
                let minus_inv_sq = b.nonlinear(
                    |b| elementwise::map(b, |v| -T::ONE / (v * v)),
                    |b, db| nd::zip_broadcast(b, db, b.shape(), |v, d| T::from_f64(2.0) * d / (v * v * v)),
                );
                let g_times_a = V::bilinear(&gy, a, zip_mul);
                V::bilinear(&g_times_a, &minus_inv_sq, |t, s| down(zip_mul(t, s), &sb))
            });
            (ga, gb)
        }
    }
}

pub fn pointwise<T: Float, V: Value<T>>(f: Pointwise, x: &V) -> V {
    x.nonlinear(|x| f.apply(x, 0), move |x, dx| elementwise::mul(&f.apply(x, 1), dx))
}

/// `gy · f'(x)`, with `f'(x)` differentiable in `x` through `f''`.
pub fn pointwise_vjp<T: Float, V: Value<T>>(f: Pointwise, x: &V, gy: &V) -> V {
    let slope = x.nonlinear(|x| f.apply(x, 1), move |x, dx| elementwise::mul(&f.apply(x, 2), dx));
    V::bilinear(gy, &slope, elementwise::mul)
}

/// Sum along `axis`, broadcast back over it.
fn sum_back<T: Float>(t: &Tensor<T>, axis: usize) -> Tensor<T> {
    nd::expand(&nd::sum_axes_keep(t, &[axis]), t.shape())
}

/// `s ⊙ (ẋ − Σ s ẋ)`: the softmax's JVP.
fn softmax_jvp<T: Float>(x: &Tensor<T>, dx: &Tensor<T>, axis: usize) -> Tensor<T> {
    let s = nd::softmax(x, axis);
    let sdx = elementwise::mul(&s, dx);
    elementwise::sub(&sdx, &elementwise::mul(&s, &sum_back(&sdx, axis)))
}

fn softmax_value<T: Float, V: Value<T>>(x: &V, axis: usize) -> V {
    x.nonlinear(|x| nd::softmax(x, axis), move |x, dx| softmax_jvp(x, dx, axis))
}

/// Softmax (or log-softmax) along `axis`.
pub fn softmax<T: Float, V: Value<T>>(x: &V, axis: usize, log: bool) -> V {
    if log {
        x.nonlinear(
            |x| nd::log_softmax(x, axis),
            move |x, dx| {
                let s = nd::softmax(x, axis);
                elementwise::sub(dx, &sum_back(&elementwise::mul(&s, dx), axis))
            },
        )
    } else {
        softmax_value(x, axis)
    }
}

/// The input cotangent of a (log-)softmax; `output` is the forward value when
/// the caller kept it (a softmax's output is `s` itself, saving its recomputation).
pub fn softmax_vjp<T: Float, V: Value<T>>(x: &V, output: Option<&V>, gy: &V, axis: usize, log: bool) -> V {
    let s = match output {
        Some(s) if !log => s.clone(),
        _ => softmax_value(x, axis),
    };
    if log {
        // gx = gy − s Σgy
        let total = gy.linear(|g| sum_back(g, axis));
        sub(gy, &V::bilinear(&s, &total, elementwise::mul))
    } else {
        // gx = s ⊙ (gy − Σ gy s)
        let gs = V::bilinear(gy, &s, elementwise::mul);
        let centred = sub(gy, &gs.linear(|t| sum_back(t, axis)));
        V::bilinear(&s, &centred, elementwise::mul)
    }
}

/// `a · b` (`b` transposed in its last two dimensions when `trans_b`).
pub fn matmul<T: Float, V: Value<T>>(a: &V, b: &V, trans_b: bool) -> V {
    V::bilinear(a, b, |a, b| nd::matmul(a, b, trans_b))
}

pub fn matmul_vjp<T: Float, V: Value<T>>(a: &V, b: &V, trans_b: bool, gy: &V, need_a: bool) -> (Option<V>, V) {
    let b_shape = b.primal().shape().to_vec();
    let ga = need_a.then(|| {
        V::bilinear(gy, b, |g, b| {
            // g · bᵀ (or g · b when b is stored transposed).
            if trans_b {
                nd::matmul(g, b, false)
            } else {
                nd::matmul(g, b, true)
            }
        })
    });
    let gb = V::bilinear(a, gy, |a, g| nd::matmul_weight_grad(a, g, &b_shape, trans_b));
    (ga, gb)
}

/// Max pooling: the argmax pattern comes from the primal and is locally constant,
/// so the map is linear in `x` given it.
pub fn max_pool<T: Float, V: Value<T>>(x: &V, g: MaxPoolGeometry) -> V {
    let (idx, shape) = nd::max_pool_argmax(x.primal(), g);
    x.linear(|t| nd::gather_flat(t, &idx, &shape))
}

pub fn max_pool_vjp<T: Float, V: Value<T>>(x: &V, g: MaxPoolGeometry, gy: &V) -> V {
    let (idx, _) = nd::max_pool_argmax(x.primal(), g);
    let in_shape = x.primal().shape().to_vec();
    gy.linear(|t| nd::scatter_add_flat(t, &idx, &in_shape))
}

/// Mean over `axes`, kept as size-1 dimensions.
pub fn reduce_mean<T: Float, V: Value<T>>(x: &V, axes: &[usize]) -> V {
    let count: usize = axes.iter().map(|&a| x.primal().shape()[a]).product();
    let scale = T::from_f64(1.0 / count as f64);
    x.linear(|t| elementwise::scale(&nd::sum_axes_keep(t, axes), scale))
}

pub fn reduce_mean_vjp<T: Float, V: Value<T>>(x: &V, axes: &[usize], gy: &V) -> V {
    let shape = x.primal().shape().to_vec();
    let count: usize = axes.iter().map(|&a| shape[a]).product();
    let scale = T::from_f64(1.0 / count as f64);
    gy.linear(|g| elementwise::scale(&nd::expand(g, &shape), scale))
}

pub fn reshape<T: Float, V: Value<T>>(x: &V, shape: &[usize]) -> V {
    x.linear(|t| t.clone().reshape(shape).expect("element count checked at import"))
}

/// [`reshape`] of an owned value: no copy.
pub fn reshape_owned<T: Float, V: Value<T>>(x: V, shape: &[usize]) -> V {
    x.linear_owned(|t| t.reshape(shape).expect("element count checked at import"))
}

pub fn transpose<T: Float, V: Value<T>>(x: &V, perm: &[usize]) -> V {
    x.linear(|t| nd::permute(t, perm))
}

pub fn transpose_vjp<T: Float, V: Value<T>>(gy: &V, perm: &[usize]) -> V {
    let inv = nd::inverse_permutation(perm);
    gy.linear(|g| nd::permute(g, &inv))
}

/// Concatenation along `axis`: the sum of each part placed at its offset.
pub fn concat<T: Float, V: Value<T>>(parts: &[&V], axis: usize) -> V {
    let mut shape = parts[0].primal().shape().to_vec();
    shape[axis] = parts.iter().map(|p| p.primal().shape()[axis]).sum();
    let mut start = 0;
    let mut out: Option<V> = None;
    for p in parts {
        let placed = p.linear(|t| nd::place_along(t, &shape, axis, start));
        start += p.primal().shape()[axis];
        out = Some(match out {
            Some(o) => o.add(&placed),
            None => placed,
        });
    }
    out.expect("concat of at least one part")
}

/// The cotangent of part `index` of a concatenation.
pub fn concat_vjp<T: Float, V: Value<T>>(parts: &[&V], index: usize, axis: usize, gy: &V) -> V {
    let start: usize = parts[..index].iter().map(|p| p.primal().shape()[axis]).sum();
    let len = parts[index].primal().shape()[axis];
    gy.linear(|g| nd::slice_along(g, axis, start, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Dual;

    fn t(shape: &[usize], f: impl Fn(usize) -> f64) -> Tensor<f64> {
        let n = shape.iter().product();
        Tensor::new(shape.to_vec(), (0..n).map(f).collect()).unwrap()
    }

    type Vjp<'a> = &'a dyn Fn(&Dual<f64>, &Dual<f64>) -> Dual<f64>;

    fn dot(a: &Tensor<f64>, b: &Tensor<f64>) -> f64 {
        a.data().iter().zip(b.data()).map(|(x, y)| x * y).sum()
    }

    /// Checks, for a scalar function `L(x) = <c, f(x)>`: the JVP of `f` against
    /// central differences, the VJP against the JVP, and the VJP's own tangent
    /// (what forward-over-reverse uses) against differences of the VJP.
    fn check(x0: &Tensor<f64>, dir: &Tensor<f64>, c: &Tensor<f64>, f: &dyn Fn(&Dual<f64>) -> Dual<f64>, vjp: Vjp) {
        let h = 1e-5;
        let shifted = |s: f64| {
            let mut x = x0.clone();
            for (a, d) in x.data_mut().iter_mut().zip(dir.data()) {
                *a += s * d;
            }
            x
        };
        let y = f(&Dual::new(x0.clone(), Some(dir.clone())));
        let jvp = dot(c, y.tangent().unwrap());
        let fd = (dot(c, f(&Dual::constant(shifted(h))).primal()) - dot(c, f(&Dual::constant(shifted(-h))).primal()))
            / (2.0 * h);
        assert!((jvp - fd).abs() < 1e-7 * (1.0 + fd.abs()), "JVP {jvp} vs FD {fd}");
        let g = vjp(&Dual::constant(x0.clone()), &Dual::constant(c.clone()));
        assert!(
            (dot(g.primal(), dir) - jvp).abs() < 1e-10 * (1.0 + jvp.abs()),
            "VJP/JVP duality"
        );
        let gd = vjp(&Dual::new(x0.clone(), Some(dir.clone())), &Dual::constant(c.clone()));
        let gp = vjp(&Dual::constant(shifted(h)), &Dual::constant(c.clone()));
        let gm = vjp(&Dual::constant(shifted(-h)), &Dual::constant(c.clone()));
        for ((t, p), m) in gd
            .tangent_or_zeros()
            .data()
            .iter()
            .zip(gp.primal().data())
            .zip(gm.primal().data())
        {
            let fd = (p - m) / (2.0 * h);
            assert!((t - fd).abs() < 1e-6 * (1.0 + fd.abs()), "VJP tangent {t} vs FD {fd}");
        }
    }

    #[test]
    fn pointwise_functions_differentiate_twice() {
        // Points away from the kinks (0 for ELU, ±3 for HardSwish, the clip
        // bounds), where central differences hold.
        let x = t(&[2, 5], |i| i as f64 * 0.45 - 2.12);
        let d = t(&[2, 5], |i| ((i * 7) % 5) as f64 * 0.3 - 0.6);
        let c = t(&[2, 5], |i| (i as f64).sin());
        for f in [
            Pointwise::Sigmoid,
            Pointwise::Erf,
            Pointwise::Gelu,
            Pointwise::GeluTanh,
            Pointwise::LeakyRelu { alpha: 0.1 },
            Pointwise::Exp,
            Pointwise::Neg,
            Pointwise::Softplus,
            Pointwise::Elu { alpha: 0.7 },
            Pointwise::HardSigmoid { alpha: 0.2, beta: 0.5 },
            Pointwise::HardSwish,
            Pointwise::Clip { min: -1.0, max: 1.5 },
            Pointwise::Pow { p: 2.0 },
            Pointwise::Pow { p: 3.0 },
        ] {
            check(&x, &d, &c, &|x| pointwise(f, x), &|x, g| pointwise_vjp(f, x, g));
        }
        // Functions of positive arguments.
        let pos = t(&[2, 5], |i| 0.3 + i as f64 * 0.41);
        for f in [
            Pointwise::Sqrt,
            Pointwise::Reciprocal,
            Pointwise::Log,
            Pointwise::Pow { p: -0.5 },
            Pointwise::Pow { p: 1.7 },
        ] {
            check(&pos, &d, &c, &|x| pointwise(f, x), &|x, g| pointwise_vjp(f, x, g));
        }
    }

    #[test]
    fn broadcasting_arithmetic_differentiates_in_both_operands() {
        let a = t(&[2, 3], |i| 0.3 * i as f64 - 0.7);
        let b = t(&[3], |i| 1.5 + 0.25 * i as f64);
        let c = t(&[2, 3], |i| (i as f64 * 1.3).cos());
        let (da, db) = (t(&[2, 3], |i| 0.1 * i as f64), t(&[3], |i| 0.2 - 0.1 * i as f64));
        for op in [Arith::Add, Arith::Sub, Arith::Mul, Arith::Div] {
            // In a (b fixed) and in b (a fixed); the second also exercises Div's b-side.
            let bc = Dual::constant(b.clone());
            check(&a, &da, &c, &|x| arith(op, x, &bc), &|x, g| {
                arith_vjp(op, x, &bc, g.clone(), (true, false)).0.unwrap()
            });
            let ac = Dual::constant(a.clone());
            check(&b, &db, &c, &|x| arith(op, &ac, x), &|x, g| {
                arith_vjp(op, &ac, x, g.clone(), (false, true)).1.unwrap()
            });
        }
    }

    #[test]
    fn softmax_and_log_softmax_differentiate_twice() {
        let x = t(&[2, 4, 3], |i| (i as f64 * 0.77).sin() * 2.0);
        let d = t(&[2, 4, 3], |i| (i as f64 * 0.31).cos());
        let c = t(&[2, 4, 3], |i| (i % 5) as f64 - 2.0);
        for axis in [1, 2] {
            for log in [false, true] {
                check(&x, &d, &c, &|x| softmax(x, axis, log), &|x, g| {
                    softmax_vjp(x, None, g, axis, log)
                });
            }
        }
    }

    #[test]
    fn matmul_and_linear_maps_are_adjoint() {
        let a = t(&[2, 3, 4], |i| (i as f64 * 0.37).sin());
        let b = t(&[4, 5], |i| (i as f64 * 0.11).cos());
        let c = t(&[2, 3, 5], |i| (i as f64 * 0.5).sin());
        let da = t(&[2, 3, 4], |i| (i % 3) as f64 * 0.2);
        let bc = Dual::constant(b.clone());
        check(&a, &da, &c, &|x| matmul(x, &bc, false), &|x, g| {
            matmul_vjp(x, &bc, false, g, true).0.unwrap()
        });
        let ac = Dual::constant(a.clone());
        let db = t(&[4, 5], |i| 0.05 * i as f64);
        check(&b, &db, &c, &|x| matmul(&ac, x, false), &|x, g| {
            matmul_vjp(&ac, x, false, g, false).1
        });
        let bt = t(&[5, 4], |i| (i as f64 * 0.23).sin());
        check(
            &bt,
            &t(&[5, 4], |i| 0.1 - 0.01 * i as f64),
            &c,
            &|x| matmul(&ac, x, true),
            &|x, g| matmul_vjp(&ac, x, true, g, false).1,
        );
        let x = t(&[2, 3, 4], |i| (i as f64 * 0.9).cos());
        let cr = t(&[2, 1, 4], |i| i as f64 - 3.0);
        check(&x, &da, &cr, &|x| reduce_mean(x, &[1]), &|x, g| {
            reduce_mean_vjp(x, &[1], g)
        });
        let ct = t(&[4, 2, 3], |i| (i as f64).sqrt());
        check(&x, &da, &ct, &|x| transpose(x, &[2, 0, 1]), &|_, g| {
            transpose_vjp(g, &[2, 0, 1])
        });
    }

    #[test]
    fn max_pool_routes_to_the_argmax() {
        let x = t(&[1, 2, 4, 4], |i| ((i * 37) % 17) as f64 * 0.1);
        let g = MaxPoolGeometry {
            kernel: [2, 2],
            stride: [2, 2],
            pad_begin: [0, 0],
            pad_end: [0, 0],
        };
        let d = t(&[1, 2, 4, 4], |i| (i as f64 * 0.05).cos() * 1e-3);
        let c = t(&[1, 2, 2, 2], |i| i as f64 + 1.0);
        check(&x, &d, &c, &|x| max_pool(x, g), &|x, gy| max_pool_vjp(x, g, gy));
    }

    #[test]
    fn concat_parts_get_their_slices() {
        let a = Dual::new(t(&[2, 1], |i| i as f64), Some(t(&[2, 1], |_| 1.0)));
        let b = Dual::constant(t(&[2, 2], |i| 10.0 + i as f64));
        let y = concat(&[&a, &b], 1);
        assert_eq!(y.primal().data(), &[0.0, 10.0, 11.0, 1.0, 12.0, 13.0]);
        assert_eq!(y.tangent().unwrap().data(), &[1.0, 0.0, 0.0, 1.0, 0.0, 0.0]);
        let g = concat_vjp(&[&a, &b], 1, 1, &Dual::constant(y.primal().clone()));
        assert_eq!(g.primal(), b.primal());
    }
}
