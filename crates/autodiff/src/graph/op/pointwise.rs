//! Activations and normalised exponentials: one input, one output of its shape.

use super::super::rule::{Backward, Cotangents, Forward, Rule};
use super::super::NodeId;
use crate::primitives::activation;
use crate::primitives::nd as ndp;
use crate::Value;
use hvp_tensor::Float;

#[derive(Clone, Debug, PartialEq)]
pub struct Relu {
    pub input: NodeId,
}

impl Rule for Relu {
    fn inputs(&self) -> Vec<NodeId> {
        vec![self.input]
    }
    fn inputs_mut(&mut self) -> Vec<&mut NodeId> {
        vec![&mut self.input]
    }
    fn example_shape(&self, inputs: &[&[usize]], _: &[Vec<usize>], _: &mut f64) -> Vec<usize> {
        inputs[0].to_vec()
    }
    fn forward<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>) -> V {
        activation::relu(cx.value(self.input))
    }
    fn vjp<T: Float, V: Value<T>>(&self, cx: &Backward<'_, T, V>, gy: V, out: &mut Cotangents<V>) {
        // Masked by its own output, so a fused producer need not keep its input.
        out.input(self.input, activation::relu_vjp(cx.output(), gy));
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Tanh {
    pub input: NodeId,
}

impl Rule for Tanh {
    fn inputs(&self) -> Vec<NodeId> {
        vec![self.input]
    }
    fn inputs_mut(&mut self) -> Vec<&mut NodeId> {
        vec![&mut self.input]
    }
    fn example_shape(&self, inputs: &[&[usize]], _: &[Vec<usize>], _: &mut f64) -> Vec<usize> {
        inputs[0].to_vec()
    }
    fn forward<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>) -> V {
        activation::tanh(cx.value(self.input))
    }
    fn vjp<T: Float, V: Value<T>>(&self, cx: &Backward<'_, T, V>, gy: V, out: &mut Cotangents<V>) {
        out.input(self.input, activation::tanh_vjp(cx.value(self.input), &gy));
    }
}

/// An elementwise function of one input (sigmoid, erf, GELU, …).
#[derive(Clone, Debug, PartialEq)]
pub struct Pointwise {
    pub input: NodeId,
    pub func: ndp::Pointwise,
}

impl Rule for Pointwise {
    fn inputs(&self) -> Vec<NodeId> {
        vec![self.input]
    }
    fn inputs_mut(&mut self) -> Vec<&mut NodeId> {
        vec![&mut self.input]
    }
    fn forward<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>) -> V {
        ndp::pointwise(self.func, cx.value(self.input))
    }
    fn vjp<T: Float, V: Value<T>>(&self, cx: &Backward<'_, T, V>, gy: V, out: &mut Cotangents<V>) {
        out.input(self.input, ndp::pointwise_vjp(self.func, cx.value(self.input), &gy));
    }
}

/// Softmax (or log-softmax when `log`) along `axis`.
#[derive(Clone, Debug, PartialEq)]
pub struct Softmax {
    pub input: NodeId,
    pub axis: usize,
    pub log: bool,
}

impl Rule for Softmax {
    fn inputs(&self) -> Vec<NodeId> {
        vec![self.input]
    }
    fn inputs_mut(&mut self) -> Vec<&mut NodeId> {
        vec![&mut self.input]
    }
    fn forward<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>) -> V {
        ndp::softmax(cx.value(self.input), self.axis, self.log)
    }
    fn vjp<T: Float, V: Value<T>>(&self, cx: &Backward<'_, T, V>, gy: V, out: &mut Cotangents<V>) {
        out.input(
            self.input,
            ndp::softmax_vjp(cx.value(self.input), Some(cx.output()), &gy, self.axis, self.log),
        );
    }
}
