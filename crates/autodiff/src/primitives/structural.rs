//! Linear shape-changing primitives: residual addition, pooling, flattening.
//! Being linear, their JVP is the map itself and their VJP its adjoint.

use crate::Value;
use hvp_tensor::{pool, Float};

/// `[B, C, H, W] → [B, C]`, mean over space.
pub fn global_avg_pool<T: Float, V: Value<T>>(x: &V) -> V {
    x.linear(pool::global_avg)
}

pub fn global_avg_pool_vjp<T: Float, V: Value<T>>(gy: &V, h: usize, w: usize) -> V {
    gy.linear(|g| pool::global_avg_backward(g, h, w))
}

/// `AvgPool2d(kernel, stride)` without padding.
pub fn avg_pool<T: Float, V: Value<T>>(x: &V, kernel: usize, stride: usize) -> V {
    x.linear(|x| pool::avg2d(x, kernel, stride))
}

pub fn avg_pool_vjp<T: Float, V: Value<T>>(gy: &V, kernel: usize, stride: usize, h: usize, w: usize) -> V {
    gy.linear(|g| pool::avg2d_backward(g, kernel, stride, h, w))
}

/// `[B, ...] → [B, rest]`.
pub fn flatten<T: Float, V: Value<T>>(x: &V) -> V {
    let (rows, cols) = x.primal().rows_cols();
    x.linear(|x| x.clone().reshape(&[rows, cols]).expect("same element count"))
}

pub fn flatten_vjp<T: Float, V: Value<T>>(gy: &V, input_shape: &[usize]) -> V {
    gy.linear(|g| g.clone().reshape(input_shape).expect("same element count"))
}
