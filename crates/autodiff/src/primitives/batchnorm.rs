//! BatchNorm in evaluation mode: `y = (x − μ) / √(σ² + ε) · γ + β` with the running
//! statistics μ, σ² as constants, so the loss of each example depends on that
//! example alone and a sum over batches is exactly the full-data loss.
//!
//! Written as `y = x · s + t` with `s = γ/√(σ²+ε)` (linear in γ) and
//! `t = β − μ·s`, so the rule is one bilinear and two linear maps.

use crate::Value;
use hvp_tensor::{channel, elementwise, Float, Tensor};

/// Per-channel constants of an eval-mode BatchNorm.
pub struct Stats<'a, T> {
    pub mean: &'a Tensor<T>,
    pub var: &'a Tensor<T>,
    pub eps: f64,
}

impl<T: Float> Stats<'_, T> {
    fn inv_std(&self) -> Tensor<T> {
        let eps = T::from_f64(self.eps);
        elementwise::map(self.var, |v| T::ONE / (v + eps).sqrt())
    }
}

fn scale_and_shift<T: Float, V: Value<T>>(gamma: &V, beta: &V, st: &Stats<T>) -> (V, V) {
    let inv_std = st.inv_std();
    let s = gamma.linear(|g| elementwise::mul(g, &inv_std));
    let neg_mean = elementwise::scale(st.mean, -T::ONE);
    let t = beta.add(&s.linear(|s| elementwise::mul(s, &neg_mean)));
    (s, t)
}

/// x `[B, C, ...]`, γ and β `[C]` → `[B, C, ...]`.
pub fn forward<T: Float, V: Value<T>>(x: &V, gamma: &V, beta: &V, st: &Stats<T>) -> V {
    let (s, t) = scale_and_shift(gamma, beta, st);
    V::channel_affine(x, &s, Some(&t))
}

/// [`forward`] followed by a ReLU, `max(BN(x), 0)`, in one pass: the graph runs
/// it where a ReLU is a BatchNorm's only user. The ReLU's backward reads its own
/// output for the mask, so the BatchNorm's output is never stored.
pub fn forward_relu<T: Float, V: Value<T>>(x: &V, gamma: &V, beta: &V, st: &Stats<T>) -> V {
    let (s, t) = scale_and_shift(gamma, beta, st);
    V::channel_affine_relu(x, &s, Some(&t))
}

/// [`forward`], the residual sum with `residual` and the sum's ReLU,
/// `max(BN(x) + r, 0)`, in one pass: the graph runs it where a BatchNorm's only
/// user is a sum whose only user is a ReLU. Neither the BatchNorm's output nor
/// the sum is stored (their VJPs do not read them).
pub fn forward_add_relu<T: Float, V: Value<T>>(x: &V, gamma: &V, beta: &V, st: &Stats<T>, residual: &V) -> V {
    let (s, t) = scale_and_shift(gamma, beta, st);
    V::channel_affine_add_relu(x, &s, Some(&t), residual)
}

/// Cotangents `(gx, gγ, gβ)`; `gx` only when `need_input`; the reductions and
/// the input's scaling in one pass over `gy` ([`Value::channel_affine_backward`]).
pub fn vjp<T: Float, V: Value<T>>(
    x: &V,
    gamma: &V,
    beta: &V,
    st: &Stats<T>,
    gy: &V,
    need_input: bool,
) -> (Option<V>, V, V) {
    masked_vjp(None, x, gamma, beta, st, gy, need_input)
}

/// [`vjp`] of a BatchNorm whose output went through a ReLU, `relu_out` being the
/// ReLU's output: the ReLU's mask, the reductions and the input's scaling in
/// one pass over the cotangent ([`Value::channel_affine_backward`]), bit for bit
/// what the ReLU's VJP followed by [`vjp`] gives.
#[allow(clippy::too_many_arguments)]
pub fn vjp_through_relu<T: Float, V: Value<T>>(
    relu_out: &Tensor<T>,
    x: &V,
    gamma: &V,
    beta: &V,
    st: &Stats<T>,
    gy: &V,
    need_input: bool,
) -> (Option<V>, V, V) {
    masked_vjp(Some(relu_out), x, gamma, beta, st, gy, need_input)
}

/// [`vjp`] with `gy` masked by `relu_out > 0` where given, in the same pass.
#[allow(clippy::too_many_arguments)]
fn masked_vjp<T: Float, V: Value<T>>(
    relu_out: Option<&Tensor<T>>,
    x: &V,
    gamma: &V,
    beta: &V,
    st: &Stats<T>,
    gy: &V,
    need_input: bool,
) -> (Option<V>, V, V) {
    let s = need_input.then(|| scale_and_shift(gamma, beta, st).0);
    let (gx, gs, gt) = V::channel_affine_backward(relu_out, x, gy, s.as_ref());
    // s = γ·inv_std and t = β − μ·s, so gγ = (gs − μ·gt)·inv_std and gβ = gt.
    let inv_std = st.inv_std();
    let neg_mean = elementwise::scale(st.mean, -T::ONE);
    let gs_total = gs.add(&gt.linear(|g| elementwise::mul(g, &neg_mean)));
    let g_gamma = gs_total.linear(|g| elementwise::mul(g, &inv_std));
    (gx, g_gamma, gt)
}

/// The input's cotangent alone (eval mode): `gy` scaled per channel by `γ/σ`.
pub fn input_vjp<T: Float, V: Value<T>>(gamma: &V, beta: &V, st: &Stats<T>, gy: &V) -> V {
    let (s, _) = scale_and_shift(gamma, beta, st);
    V::channel_affine(gy, &s, None)
}

/// Per-channel batch statistics of a train-mode BatchNorm: mean and biased
/// variance (the one normalised with), over batch and space.
pub fn batch_stats<T: Float>(x: &Tensor<T>) -> (Vec<f64>, Vec<f64>) {
    let s = x.shape();
    let (b, c) = (s[0], s[1]);
    let inner: usize = s[2..].iter().product();
    let n = (b * inner) as f64;
    let (mut mean, mut var) = (vec![0.0; c], vec![0.0; c]);
    for i in 0..b {
        for (ch, m) in mean.iter_mut().enumerate() {
            let at = (i * c + ch) * inner;
            *m += x.data()[at..at + inner].iter().map(|v| v.to_f64()).sum::<f64>();
        }
    }
    mean.iter_mut().for_each(|m| *m /= n);
    for i in 0..b {
        for ch in 0..c {
            let at = (i * c + ch) * inner;
            var[ch] += x.data()[at..at + inner]
                .iter()
                .map(|v| (v.to_f64() - mean[ch]).powi(2))
                .sum::<f64>();
        }
    }
    var.iter_mut().for_each(|v| *v /= n);
    (mean, var)
}

/// Train-mode BatchNorm (PyTorch's `model.train()`): normalised with the batch's
/// own statistics. Reverse mode only (used by `hvp train`; curvature is always
/// taken in eval mode). Returns the output and the batch mean and biased variance.
pub fn train_forward<T: Float>(
    x: &Tensor<T>,
    gamma: &Tensor<T>,
    beta: &Tensor<T>,
    eps: f64,
) -> (Tensor<T>, Vec<f64>, Vec<f64>) {
    let (mean, var) = batch_stats(x);
    let scale: Vec<f64> = var
        .iter()
        .zip(gamma.data())
        .map(|(v, g)| g.to_f64() / (v + eps).sqrt())
        .collect();
    let s = Tensor::new(vec![scale.len()], scale.iter().map(|&v| T::from_f64(v)).collect()).expect("c");
    let t = Tensor::new(
        vec![scale.len()],
        beta.data()
            .iter()
            .zip(&mean)
            .zip(&scale)
            .map(|((b, m), sc)| T::from_f64(b.to_f64() - m * sc))
            .collect(),
    )
    .expect("c");
    let y = elementwise::add(&channel::scale(x, &s), &channel::broadcast(&t, x.shape()));
    (y, mean, var)
}

/// VJP of [`train_forward`]: `gx = γ/σ · (gy − mean(gy) − x̂ · mean(gy · x̂))` per
/// channel, `gγ = Σ gy · x̂`, `gβ = Σ gy`.
pub fn train_vjp<T: Float>(
    x: &Tensor<T>,
    gamma: &Tensor<T>,
    gy: &Tensor<T>,
    eps: f64,
) -> (Tensor<T>, Tensor<T>, Tensor<T>) {
    let (mean, var) = batch_stats(x);
    let s = x.shape();
    let (b, c) = (s[0], s[1]);
    let inner: usize = s[2..].iter().product();
    let n = (b * inner) as f64;
    let inv: Vec<f64> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let (mut sum_g, mut sum_gx) = (vec![0.0; c], vec![0.0; c]);
    for i in 0..b {
        for ch in 0..c {
            let at = (i * c + ch) * inner;
            for k in at..at + inner {
                let g = gy.data()[k].to_f64();
                sum_g[ch] += g;
                sum_gx[ch] += g * (x.data()[k].to_f64() - mean[ch]) * inv[ch];
            }
        }
    }
    let mut gx = Tensor::zeros(s);
    for i in 0..b {
        for ch in 0..c {
            let at = (i * c + ch) * inner;
            let k0 = gamma.data()[ch].to_f64() * inv[ch];
            for k in at..at + inner {
                let xhat = (x.data()[k].to_f64() - mean[ch]) * inv[ch];
                let g = gy.data()[k].to_f64();
                gx.data_mut()[k] = T::from_f64(k0 * (g - sum_g[ch] / n - xhat * sum_gx[ch] / n));
            }
        }
    }
    let to_t = |v: Vec<f64>| Tensor::new(vec![c], v.into_iter().map(T::from_f64).collect()).expect("c");
    (gx, to_t(sum_gx), to_t(sum_g))
}
