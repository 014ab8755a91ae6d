//! Sources (input, parameters, constants), pooling and shape operations.

use super::super::rule::{Backward, Cotangents, Forward, ParamRefs, Rule};
use super::super::{resolve_shape, Dim, NodeId};
use crate::primitives::nd as ndp;
use crate::primitives::structural;
use crate::Value;
use hvp_tensor::nd::MaxPoolGeometry;
use hvp_tensor::pool::out_size;
use hvp_tensor::Float;

/// The batch of inputs (always node 0).
#[derive(Clone, Debug, PartialEq)]
pub struct Input;

impl Rule for Input {
    fn inputs(&self) -> Vec<NodeId> {
        Vec::new()
    }
    fn inputs_mut(&mut self) -> Vec<&mut NodeId> {
        Vec::new()
    }
    fn forward<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>) -> V {
        cx.take_input()
    }
    fn vjp<T: Float, V: Value<T>>(&self, _: &Backward<'_, T, V>, _: V, _: &mut Cotangents<V>) {}
}

/// A trainable parameter as a value (no batch axis); imported graphs use it
/// where a weight is an ordinary operand.
#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    pub index: usize,
}

impl Rule for Param {
    fn inputs(&self) -> Vec<NodeId> {
        Vec::new()
    }
    fn inputs_mut(&mut self) -> Vec<&mut NodeId> {
        Vec::new()
    }
    fn params(&self) -> ParamRefs {
        ParamRefs {
            conv_weight: None,
            other: vec![self.index],
        }
    }
    fn forward<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>) -> V {
        cx.param(self.index).clone()
    }
    fn vjp<T: Float, V: Value<T>>(&self, _: &Backward<'_, T, V>, gy: V, out: &mut Cotangents<V>) {
        out.param(self.index, gy);
    }
}

/// A constant buffer as a value (no batch axis).
#[derive(Clone, Debug, PartialEq)]
pub struct Constant {
    pub buffer: usize,
}

impl Rule for Constant {
    fn inputs(&self) -> Vec<NodeId> {
        Vec::new()
    }
    fn inputs_mut(&mut self) -> Vec<&mut NodeId> {
        Vec::new()
    }
    fn forward<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>) -> V {
        V::constant(cx.buffer(self.buffer).clone())
    }
    fn vjp<T: Float, V: Value<T>>(&self, _: &Backward<'_, T, V>, _: V, _: &mut Cotangents<V>) {}
}

/// Mean over the spatial axes of NCHW → `[N, C]`.
#[derive(Clone, Debug, PartialEq)]
pub struct GlobalAvgPool {
    pub input: NodeId,
}

impl Rule for GlobalAvgPool {
    fn inputs(&self) -> Vec<NodeId> {
        vec![self.input]
    }
    fn inputs_mut(&mut self) -> Vec<&mut NodeId> {
        vec![&mut self.input]
    }
    fn example_shape(&self, inputs: &[&[usize]], _: &[Vec<usize>], _: &mut f64) -> Vec<usize> {
        inputs[0].first().map(|&c| vec![c]).unwrap_or_default()
    }
    fn forward<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>) -> V {
        structural::global_avg_pool(cx.value(self.input))
    }
    fn vjp<T: Float, V: Value<T>>(&self, cx: &Backward<'_, T, V>, gy: V, out: &mut Cotangents<V>) {
        let s = cx.value(self.input).primal().shape();
        out.input(self.input, structural::global_avg_pool_vjp(&gy, s[2], s[3]));
    }
}

/// Square average pooling without padding.
#[derive(Clone, Debug, PartialEq)]
pub struct AvgPool {
    pub input: NodeId,
    pub kernel: usize,
    pub stride: usize,
}

impl Rule for AvgPool {
    fn inputs(&self) -> Vec<NodeId> {
        vec![self.input]
    }
    fn inputs_mut(&mut self) -> Vec<&mut NodeId> {
        vec![&mut self.input]
    }
    fn example_shape(&self, inputs: &[&[usize]], _: &[Vec<usize>], _: &mut f64) -> Vec<usize> {
        match inputs[0] {
            &[c, h, w] => vec![
                c,
                out_size(h, self.kernel, self.stride, 0),
                out_size(w, self.kernel, self.stride, 0),
            ],
            _ => Vec::new(),
        }
    }
    fn forward<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>) -> V {
        structural::avg_pool(cx.value(self.input), self.kernel, self.stride)
    }
    fn vjp<T: Float, V: Value<T>>(&self, cx: &Backward<'_, T, V>, gy: V, out: &mut Cotangents<V>) {
        let s = cx.value(self.input).primal().shape();
        out.input(
            self.input,
            structural::avg_pool_vjp(&gy, self.kernel, self.stride, s[2], s[3]),
        );
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct MaxPool {
    pub input: NodeId,
    pub geometry: MaxPoolGeometry,
}

impl Rule for MaxPool {
    fn inputs(&self) -> Vec<NodeId> {
        vec![self.input]
    }
    fn inputs_mut(&mut self) -> Vec<&mut NodeId> {
        vec![&mut self.input]
    }
    fn forward<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>) -> V {
        ndp::max_pool(cx.value(self.input), self.geometry)
    }
    fn vjp<T: Float, V: Value<T>>(&self, cx: &Backward<'_, T, V>, gy: V, out: &mut Cotangents<V>) {
        out.input(self.input, ndp::max_pool_vjp(cx.value(self.input), self.geometry, &gy));
    }
}

/// Every axis after the batch axis as one.
#[derive(Clone, Debug, PartialEq)]
pub struct Flatten {
    pub input: NodeId,
}

impl Rule for Flatten {
    fn inputs(&self) -> Vec<NodeId> {
        vec![self.input]
    }
    fn inputs_mut(&mut self) -> Vec<&mut NodeId> {
        vec![&mut self.input]
    }
    fn example_shape(&self, inputs: &[&[usize]], _: &[Vec<usize>], _: &mut f64) -> Vec<usize> {
        match inputs[0] {
            [] => Vec::new(),
            x => vec![x.iter().product()],
        }
    }
    fn forward<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>) -> V {
        structural::flatten(cx.value(self.input))
    }
    fn vjp<T: Float, V: Value<T>>(&self, cx: &Backward<'_, T, V>, gy: V, out: &mut Cotangents<V>) {
        let s = cx.value(self.input).primal().shape().to_vec();
        out.input(self.input, structural::flatten_vjp(&gy, &s));
    }
}

/// Mean over `axes`, which stay as size-1 axes.
#[derive(Clone, Debug, PartialEq)]
pub struct ReduceMean {
    pub input: NodeId,
    pub axes: Vec<usize>,
}

impl Rule for ReduceMean {
    fn inputs(&self) -> Vec<NodeId> {
        vec![self.input]
    }
    fn inputs_mut(&mut self) -> Vec<&mut NodeId> {
        vec![&mut self.input]
    }
    fn forward<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>) -> V {
        ndp::reduce_mean(cx.value(self.input), &self.axes)
    }
    fn vjp<T: Float, V: Value<T>>(&self, cx: &Backward<'_, T, V>, gy: V, out: &mut Cotangents<V>) {
        out.input(self.input, ndp::reduce_mean_vjp(cx.value(self.input), &self.axes, &gy));
    }
}

/// The same elements in `shape` (which may name the batch size).
#[derive(Clone, Debug, PartialEq)]
pub struct Reshape {
    pub input: NodeId,
    pub shape: Vec<Dim>,
}

impl Rule for Reshape {
    fn inputs(&self) -> Vec<NodeId> {
        vec![self.input]
    }
    fn inputs_mut(&mut self) -> Vec<&mut NodeId> {
        vec![&mut self.input]
    }
    fn forward<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>) -> V {
        ndp::reshape(cx.value(self.input), &resolve_shape(&self.shape, cx.batch()))
    }
    fn vjp<T: Float, V: Value<T>>(&self, cx: &Backward<'_, T, V>, gy: V, out: &mut Cotangents<V>) {
        let s = cx.value(self.input).primal().shape().to_vec();
        out.input(self.input, ndp::reshape_owned(gy, &s));
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Transpose {
    pub input: NodeId,
    pub perm: Vec<usize>,
}

impl Rule for Transpose {
    fn inputs(&self) -> Vec<NodeId> {
        vec![self.input]
    }
    fn inputs_mut(&mut self) -> Vec<&mut NodeId> {
        vec![&mut self.input]
    }
    fn forward<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>) -> V {
        ndp::transpose(cx.value(self.input), &self.perm)
    }
    fn vjp<T: Float, V: Value<T>>(&self, _: &Backward<'_, T, V>, gy: V, out: &mut Cotangents<V>) {
        out.input(self.input, ndp::transpose_vjp(&gy, &self.perm));
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Concat {
    pub inputs: Vec<NodeId>,
    pub axis: usize,
}

impl Rule for Concat {
    fn inputs(&self) -> Vec<NodeId> {
        self.inputs.clone()
    }
    fn inputs_mut(&mut self) -> Vec<&mut NodeId> {
        self.inputs.iter_mut().collect()
    }
    fn forward<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>) -> V {
        let parts: Vec<&V> = self.inputs.iter().map(|&i| cx.value(i)).collect();
        ndp::concat(&parts, self.axis)
    }
    fn vjp<T: Float, V: Value<T>>(&self, cx: &Backward<'_, T, V>, gy: V, out: &mut Cotangents<V>) {
        let parts: Vec<&V> = self.inputs.iter().map(|&j| cx.value(j)).collect();
        for (k, &j) in self.inputs.iter().enumerate() {
            if cx.needs(j) {
                out.input(j, ndp::concat_vjp(&parts, k, self.axis, &gy));
            }
        }
    }
}
