//! Fully connected layer `y = x Wᵀ + b` (PyTorch's `Linear`).

use crate::Value;
use hvp_tensor::{channel, linalg::matmul, Float};

/// x `[B, in]`, w `[out, in]`, b `[out]` → `[B, out]`.
pub fn forward<T: Float, V: Value<T>>(x: &V, w: &V, b: Option<&V>) -> V {
    let y = V::bilinear(x, w, |x, w| matmul(x, false, w, true));
    match b {
        Some(b) => {
            let shape = y.primal().shape().to_vec();
            y.add(&b.linear(|b| channel::broadcast(b, &shape)))
        }
        None => y,
    }
}

/// Cotangents `(gx, gw, gb)` for the output cotangent `gy`; `gx` only when
/// `need_input` (the input of the first layer needs none).
pub fn vjp<T: Float, V: Value<T>>(x: &V, w: &V, has_bias: bool, gy: &V, need_input: bool) -> (Option<V>, V, Option<V>) {
    let gx = need_input.then(|| V::bilinear(gy, w, |g, w| matmul(g, false, w, false)));
    let gw = V::bilinear(gy, x, |g, x| matmul(g, true, x, false));
    let gb = has_bias.then(|| gy.linear(channel::sum));
    (gx, gw, gb)
}
