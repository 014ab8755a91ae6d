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
    let shape = x.primal().shape().to_vec();
    V::bilinear(x, &s, channel::scale).add(&t.linear(|t| channel::broadcast(t, &shape)))
}

/// Cotangents `(gx, gγ, gβ)`; `gx` only when `need_input`.
pub fn vjp<T: Float, V: Value<T>>(
    x: &V,
    gamma: &V,
    beta: &V,
    st: &Stats<T>,
    gy: &V,
    need_input: bool,
) -> (Option<V>, V, V) {
    let (s, _) = scale_and_shift(gamma, beta, st);
    let gx = need_input.then(|| V::bilinear(gy, &s, channel::scale));
    let gs = V::bilinear(x, gy, channel::dot);
    let gt = gy.linear(channel::sum);
    // s = γ·inv_std and t = β − μ·s, so gγ = (gs − μ·gt)·inv_std and gβ = gt.
    let inv_std = st.inv_std();
    let neg_mean = elementwise::scale(st.mean, -T::ONE);
    let gs_total = gs.add(&gt.linear(|g| elementwise::mul(g, &neg_mean)));
    let g_gamma = gs_total.linear(|g| elementwise::mul(g, &inv_std));
    (gx, g_gamma, gt)
}
