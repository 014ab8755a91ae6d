//! Pointwise activations.

use crate::Value;
use hvp_tensor::{elementwise, Float};

/// `max(x, 0)`; derivative `1[x > 0]` (0 at the kink, as PyTorch).
pub fn relu<T: Float, V: Value<T>>(x: &V) -> V {
    x.nonlinear(elementwise::relu, elementwise::relu_mask)
}

/// `gx = gy · 1[y > 0]` with `y = relu(x)` the ReLU's *output* (`y > 0` exactly
/// where `x > 0`, so the input need not be kept): linear in `gy`; the mask's
/// derivative is 0 almost everywhere. Masks `gy` in place.
pub fn relu_vjp<T: Float, V: Value<T>>(y: &V, gy: V) -> V {
    let y = y.primal();
    gy.linear_owned(|mut g| {
        elementwise::relu_mask_in_place(y, &mut g);
        g
    })
}

/// `tanh(x)`, smooth: used where finite differences must converge (tests).
pub fn tanh<T: Float, V: Value<T>>(x: &V) -> V {
    x.nonlinear(
        |x| elementwise::map(x, |v| v.tanh()),
        |x, dx| elementwise::mul(&tanh_slope(x), dx),
    )
}

fn tanh_slope<T: Float>(x: &hvp_tensor::Tensor<T>) -> hvp_tensor::Tensor<T> {
    elementwise::map(x, |v| {
        let t = v.tanh();
        T::ONE - t * t
    })
}

/// `gx = gy · (1 − tanh²x)`, the slope itself a differentiable function of `x`
/// (its JVP `−2 tanh x (1 − tanh²x) ẋ`), so the rule differentiates again.
pub fn tanh_vjp<T: Float, V: Value<T>>(x: &V, gy: &V) -> V {
    let slope = x.nonlinear(tanh_slope, |x, dx| {
        let two = T::from_f64(2.0);
        let curvature = elementwise::map(x, |v| {
            let t = v.tanh();
            -two * t * (T::ONE - t * t)
        });
        elementwise::mul(&curvature, dx)
    });
    V::bilinear(gy, &slope, elementwise::mul)
}
