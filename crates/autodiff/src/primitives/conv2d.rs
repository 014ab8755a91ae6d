//! 2-D convolution (PyTorch's `Conv2d`) with optional bias; grouped and
//! dilated ones through [`grouped_forward`].

use crate::Value;
use hvp_tensor::conv::{self, ConvGeometry, Grouping};
use hvp_tensor::{channel, Float, Tensor};

/// x `[B, C, H, W]`, w `[O, C, kh, kw]`, b `[O]` → `[B, O, Ho, Wo]`.
pub fn forward<T: Float, V: Value<T>>(x: &V, w: &V, b: Option<&V>, g: ConvGeometry) -> V {
    let y = V::bilinear_fused(x, w, |x, w| conv::forward(x, w, g), &|x, dx, w, dw| {
        conv::forward_dual(x, dx, w, dw, g)
    });
    with_bias(y, b)
}

/// Cotangents `(gx, gw, gb)`; `gx` only when `need_input`; `gw` without its value
/// (only its tangent, see [`Value::bilinear_tangent_only`]) when `!weight_value`.
#[allow(clippy::too_many_arguments)]
pub fn vjp<T: Float, V: Value<T>>(
    x: &V,
    w: &V,
    has_bias: bool,
    gy: &V,
    g: ConvGeometry,
    need_input: bool,
    weight_value: bool,
) -> (Option<V>, V, Option<V>) {
    let gb = has_bias.then(|| gy.linear(channel::sum));
    if need_input {
        // Both gradients in one pass (they share the rows of `gy`).
        let (gx, gw) = V::fused_pair(x, gy, w, weight_value, &|(x, dx), (gy, dgy), (w, dw), want_value| {
            let r = conv::backward_dual((x, dx), (gy, dgy), (w, dw), g, want_value);
            ((r.gx, r.dgx), (r.gw, r.dgw))
        });
        return (Some(gx), gw, gb);
    }
    let w_shape = w.primal().shape().to_vec();
    let value = |x: &Tensor<T>, gy: &Tensor<T>| conv::backward_weight(x, gy, &w_shape, g);
    let gw = if weight_value {
        V::bilinear_fused(x, gy, value, &|x, dx, gy, dgy| {
            conv::backward_weight_dual(x, dx, gy, dgy, &w_shape, g)
        })
    } else {
        V::bilinear_tangent_only(x, gy, value, &|x, dx, gy, dgy| {
            conv::backward_weight_tangent(x, dx, gy, dgy, &w_shape, g)
        })
    };
    (None, gw, gb)
}

/// The input's cotangent alone, for an input of spatial size `hw`.
pub fn input_vjp<T: Float, V: Value<T>>(w: &V, gy: &V, hw: (usize, usize), g: ConvGeometry) -> V {
    V::bilinear_fused(gy, w, |gy, w| conv::backward_input(gy, w, hw, g), &|gy, dgy, w, dw| {
        conv::backward_input_dual(gy, dgy, w, dw, hw, g)
    })
}

/// `y` plus a per-channel bias `[O]`.
fn with_bias<T: Float, V: Value<T>>(y: V, b: Option<&V>) -> V {
    match b {
        Some(b) => {
            let shape = y.primal().shape().to_vec();
            y.add(&b.linear(|b| channel::broadcast(b, &shape)))
        }
        None => y,
    }
}

/// A grouped and/or dilated convolution: w `[O, C/groups, kh, kw]`.
pub fn grouped_forward<T: Float, V: Value<T>>(x: &V, w: &V, b: Option<&V>, g: ConvGeometry, grouping: Grouping) -> V {
    let y = V::bilinear_fused(
        x,
        w,
        |x, w| conv::forward_dual_grouped(x, None, w, None, g, grouping).0,
        &|x, dx, w, dw| conv::forward_dual_grouped(x, dx, w, dw, g, grouping),
    );
    with_bias(y, b)
}

/// Cotangents `(gx, gw, gb)` of [`grouped_forward`]; `gx` only when `need_input`.
pub fn grouped_vjp<T: Float, V: Value<T>>(
    x: &V,
    w: &V,
    has_bias: bool,
    gy: &V,
    g: ConvGeometry,
    grouping: Grouping,
    need_input: bool,
) -> (Option<V>, V, Option<V>) {
    let xs = x.primal().shape();
    let hw = (xs[2], xs[3]);
    let w_shape = w.primal().shape().to_vec();
    let gx = need_input.then(|| {
        V::bilinear_fused(
            gy,
            w,
            |gy, w| conv::backward_input_dual_grouped(gy, None, w, None, hw, g, grouping).0,
            &|gy, dgy, w, dw| conv::backward_input_dual_grouped(gy, dgy, w, dw, hw, g, grouping),
        )
    });
    let gw = V::bilinear_fused(
        x,
        gy,
        |x, gy| {
            conv::backward_weight_grouped(x, None, gy, None, &w_shape, g, grouping, true)
                .0
                .expect("value requested")
        },
        &|x, dx, gy, dgy| {
            let (v, t) = conv::backward_weight_grouped(x, dx, gy, dgy, &w_shape, g, grouping, true);
            (v.expect("value requested"), t)
        },
    );
    let gb = has_bias.then(|| gy.linear(channel::sum));
    (gx, gw, gb)
}

/// The transposed convolution (PyTorch's `ConvTranspose2d`): x `[B, Cin, H, W]`,
/// w `[Cin, Cout/groups, kh, kw]` → `[B, Cout, Ho, Wo]` of spatial size `out_hw`,
/// the adjoint of the convolution by `w` in its input.
pub fn transposed_forward<T: Float, V: Value<T>>(
    x: &V,
    w: &V,
    b: Option<&V>,
    out_hw: (usize, usize),
    g: ConvGeometry,
    grouping: Grouping,
) -> V {
    let y = V::bilinear_fused(
        x,
        w,
        |x, w| conv::backward_input_dual_grouped(x, None, w, None, out_hw, g, grouping).0,
        &|x, dx, w, dw| conv::backward_input_dual_grouped(x, dx, w, dw, out_hw, g, grouping),
    );
    with_bias(y, b)
}

/// Cotangents `(gx, gw, gb)` of [`transposed_forward`]: the convolution of the
/// output cotangent for the input, the convolution's weight gradient (with the
/// roles of input and output exchanged) for the weight.
pub fn transposed_vjp<T: Float, V: Value<T>>(
    x: &V,
    w: &V,
    has_bias: bool,
    gy: &V,
    g: ConvGeometry,
    grouping: Grouping,
    need_input: bool,
) -> (Option<V>, V, Option<V>) {
    let w_shape = w.primal().shape().to_vec();
    let gx = need_input.then(|| {
        V::bilinear_fused(
            gy,
            w,
            |gy, w| conv::forward_dual_grouped(gy, None, w, None, g, grouping).0,
            &|gy, dgy, w, dw| conv::forward_dual_grouped(gy, dgy, w, dw, g, grouping),
        )
    });
    let gw = V::bilinear_fused(
        gy,
        x,
        |gy, x| {
            conv::backward_weight_grouped(gy, None, x, None, &w_shape, g, grouping, true)
                .0
                .expect("value requested")
        },
        &|gy, dgy, x, dx| {
            let (v, t) = conv::backward_weight_grouped(gy, dgy, x, dx, &w_shape, g, grouping, true);
            (v.expect("value requested"), t)
        },
    );
    let gb = has_bias.then(|| gy.linear(channel::sum));
    (gx, gw, gb)
}
