//! Operations of two inputs: sums, broadcasting arithmetic, matrix products.

use super::super::rule::{Backward, Cotangents, Forward, Rule};
use super::super::NodeId;
use crate::primitives::nd as ndp;
use crate::Value;
use hvp_tensor::Float;

/// `a + b` of equal shapes (residual sums).
#[derive(Clone, Debug, PartialEq)]
pub struct Add {
    pub a: NodeId,
    pub b: NodeId,
}

impl Rule for Add {
    fn inputs(&self) -> Vec<NodeId> {
        vec![self.a, self.b]
    }
    fn inputs_mut(&mut self) -> Vec<&mut NodeId> {
        vec![&mut self.a, &mut self.b]
    }
    fn example_shape(&self, inputs: &[&[usize]], _: &[Vec<usize>], _: &mut f64) -> Vec<usize> {
        inputs[0].to_vec()
    }
    fn forward<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>) -> V {
        cx.value(self.a).add(cx.value(self.b))
    }
    fn fuses_relu(&self) -> bool {
        true
    }
    fn forward_relu<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>) -> V {
        cx.value(self.a).add_relu(cx.value(self.b))
    }
    fn vjp<T: Float, V: Value<T>>(&self, cx: &Backward<'_, T, V>, gy: V, out: &mut Cotangents<V>) {
        if cx.needs(self.a) {
            out.input(self.a, gy.clone());
        }
        out.input(self.b, gy);
    }
}

/// Broadcasting `a ∘ b` for ∘ in + − × ÷.
#[derive(Clone, Debug, PartialEq)]
pub struct Arith {
    pub a: NodeId,
    pub b: NodeId,
    pub op: ndp::Arith,
}

impl Rule for Arith {
    fn inputs(&self) -> Vec<NodeId> {
        vec![self.a, self.b]
    }
    fn inputs_mut(&mut self) -> Vec<&mut NodeId> {
        vec![&mut self.a, &mut self.b]
    }
    fn forward<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>) -> V {
        ndp::arith(self.op, cx.value(self.a), cx.value(self.b))
    }
    fn vjp<T: Float, V: Value<T>>(&self, cx: &Backward<'_, T, V>, gy: V, out: &mut Cotangents<V>) {
        let need = (cx.needs(self.a), cx.needs(self.b));
        let (ga, gb) = ndp::arith_vjp(self.op, cx.value(self.a), cx.value(self.b), gy, need);
        if let Some(g) = ga {
            out.input(self.a, g);
        }
        if let Some(g) = gb {
            out.input(self.b, g);
        }
    }
}

/// Batched `a · b` (`a · bᵀ` when `trans_b`).
#[derive(Clone, Debug, PartialEq)]
pub struct MatMul {
    pub a: NodeId,
    pub b: NodeId,
    pub trans_b: bool,
}

impl Rule for MatMul {
    fn inputs(&self) -> Vec<NodeId> {
        vec![self.a, self.b]
    }
    fn inputs_mut(&mut self) -> Vec<&mut NodeId> {
        vec![&mut self.a, &mut self.b]
    }
    fn forward<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>) -> V {
        ndp::matmul(cx.value(self.a), cx.value(self.b), self.trans_b)
    }
    fn vjp<T: Float, V: Value<T>>(&self, cx: &Backward<'_, T, V>, gy: V, out: &mut Cotangents<V>) {
        let (ga, gb) = ndp::matmul_vjp(cx.value(self.a), cx.value(self.b), self.trans_b, &gy, cx.needs(self.a));
        if let Some(g) = ga {
            out.input(self.a, g);
        }
        if cx.needs(self.b) {
            out.input(self.b, gb);
        }
    }
}
