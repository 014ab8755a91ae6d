//! Fully connected layer `y = x Wᵀ + b` (PyTorch's `Linear`).

use crate::Value;
use hvp_tensor::linalg::{gemm_into, matmul, Par};
use hvp_tensor::{channel, nd, Float, Tensor};

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

/// `x` `[..., in]` as rows times `wᵀ` (`w` `[out, in]`) → `[..., out]`.
fn rows_times_wt<T: Float>(x: &Tensor<T>, w: &Tensor<T>) -> Tensor<T> {
    let (n, k) = (w.shape()[0], w.shape()[1]);
    let rows = x.numel() / k;
    let mut out = vec![T::ZERO; rows * n];
    gemm_into(&mut out, x.data(), false, w.data(), true, rows, n, k, false, Par::Pool);
    let mut shape = x.shape().to_vec();
    *shape.last_mut().expect("rank checked at import") = n;
    Tensor::new(shape, out).expect("rows*out")
}

/// A Linear layer applied to every token: x `[..., in]` (the batch among the
/// leading dimensions), w `[out, in]`, b `[out]` → `[..., out]`.
pub fn tokens_forward<T: Float, V: Value<T>>(x: &V, w: &V, b: Option<&V>) -> V {
    let y = V::bilinear(x, w, rows_times_wt);
    match b {
        Some(b) => {
            let shape = y.primal().shape().to_vec();
            y.add(&b.linear(|b| nd::expand(b, &shape)))
        }
        None => y,
    }
}

/// Cotangents `(gx, gw, gb)` of [`tokens_forward`]; `gx` only when `need_input`.
pub fn tokens_vjp<T: Float, V: Value<T>>(
    x: &V,
    w: &V,
    has_bias: bool,
    gy: &V,
    need_input: bool,
) -> (Option<V>, V, Option<V>) {
    let gx = need_input.then(|| {
        V::bilinear(gy, w, |g, w| {
            let (n, k) = (w.shape()[0], w.shape()[1]);
            let rows = g.numel() / n;
            let mut out = vec![T::ZERO; rows * k];
            gemm_into(&mut out, g.data(), false, w.data(), false, rows, k, n, false, Par::Pool);
            let mut shape = g.shape().to_vec();
            *shape.last_mut().expect("rank") = k;
            Tensor::new(shape, out).expect("rows*in")
        })
    });
    let gw = V::bilinear(gy, x, |g, x| {
        let n = *g.shape().last().expect("rank");
        let k = *x.shape().last().expect("rank");
        let rows = g.numel() / n;
        let mut out = vec![T::ZERO; n * k];
        gemm_into(&mut out, g.data(), true, x.data(), false, n, k, rows, false, Par::Pool);
        Tensor::new(vec![n, k], out).expect("out*in")
    });
    let gb = has_bias.then(|| gy.linear(|g| nd::reduce_to(g, &g.shape()[g.shape().len() - 1..])));
    (gx, gw, gb)
}
