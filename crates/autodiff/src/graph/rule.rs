//! What a graph node is: a [`Rule`] with its forward and VJP side by side, and
//! the views of the graph a rule sees while it runs.

use super::{BatchNormUpdate, NodeId};
use crate::Value;
use hvp_tensor::{Float, Tensor};
use std::cell::RefCell;

/// The parameters a node reads directly (built-in layers and `Param`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParamRefs {
    /// The weight of a built-in convolution: its cotangent comes from the
    /// convolution VJP alone, which can skip the value (see
    /// [`Graph::backward_tangents`](super::Graph::backward_tangents)).
    pub conv_weight: Option<usize>,
    /// Every other parameter read.
    pub other: Vec<usize>,
}

impl ParamRefs {
    pub fn is_empty(&self) -> bool {
        self.conv_weight.is_none() && self.other.is_empty()
    }
}

/// One operation of a [`Graph`](super::Graph): which nodes it reads, its
/// forward rule and its VJP rule. Both rules are generic over [`Value`], so the
/// same code runs in reverse mode, forward mode and forward-over-reverse.
pub trait Rule {
    /// The nodes whose values this operation reads, in operand order.
    fn inputs(&self) -> Vec<NodeId>;

    /// The same operands, to renumber them when a graph is cut
    /// ([`Graph::split_frozen`](super::Graph::split_frozen)).
    fn inputs_mut(&mut self) -> Vec<&mut NodeId>;

    /// The parameters it reads directly.
    fn params(&self) -> ParamRefs {
        ParamRefs::default()
    }

    /// One example's output shape (no batch axis) from its inputs' shapes
    /// (empty where unknown), adding its multiply-add FLOPs to `flops`. Only the
    /// built-in layers know theirs; imported graphs record their sizes at load
    /// time instead.
    fn example_shape(&self, _inputs: &[&[usize]], _param_shapes: &[Vec<usize>], _flops: &mut f64) -> Vec<usize> {
        Vec::new()
    }

    fn forward<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>) -> V;

    /// Whether [`Rule::forward_relu`] runs this node and the ReLU after it as one.
    fn fuses_relu(&self) -> bool {
        false
    }

    /// This node followed by a ReLU, in one pass (only where [`Rule::fuses_relu`]).
    fn forward_relu<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>) -> V {
        crate::primitives::activation::relu(&self.forward(cx))
    }

    /// Whether [`Rule::forward_add_relu`] runs this node, the residual sum
    /// reading it and that sum's ReLU as one.
    fn fuses_add_relu(&self) -> bool {
        false
    }

    /// `max(this node + residual, 0)` in one pass (only where [`Rule::fuses_add_relu`]).
    fn forward_add_relu<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>, residual: &V) -> V {
        self.forward(cx).add_relu(residual)
    }

    /// Sends the cotangents of this node's inputs and parameters, given its
    /// output cotangent `gy`, to `out`.
    fn vjp<T: Float, V: Value<T>>(&self, cx: &Backward<'_, T, V>, gy: V, out: &mut Cotangents<V>);

    /// [`Rule::vjp`] of a node run with its ReLU ([`Rule::forward_relu`]), given
    /// the cotangent `gy` of the ReLU's output `relu_out` (not yet masked): a
    /// node may fold the mask into its own passes. By default, masked first.
    fn vjp_relu<T: Float, V: Value<T>>(&self, cx: &Backward<'_, T, V>, gy: V, relu_out: &V, out: &mut Cotangents<V>) {
        self.vjp(cx, crate::primitives::activation::relu_vjp(relu_out, gy), out)
    }

    /// For layers with K-FAC statistics: the input whose value, with the
    /// output cotangent, [`Graph::backward_observed`](super::Graph::backward_observed) shows.
    fn observed_input(&self) -> Option<NodeId> {
        None
    }
}

/// What a forward rule reads: earlier nodes' values, parameters, buffers.
pub struct Forward<'a, T: Float, V> {
    pub(super) values: &'a [Option<V>],
    pub(super) params: &'a [V],
    pub(super) buffers: &'a [Tensor<T>],
    pub(super) batch: usize,
    pub(super) input: &'a RefCell<Option<V>>,
    /// Present in a train-mode pass: BatchNorm uses batch statistics and records them.
    pub(super) train_stats: Option<&'a RefCell<Vec<BatchNormUpdate>>>,
}

impl<'a, T: Float, V> Forward<'a, T, V> {
    pub fn value(&self, node: NodeId) -> &'a V {
        self.values[node]
            .as_ref()
            .expect("an earlier node's value is kept until its last user ran")
    }
    pub fn param(&self, index: usize) -> &'a V {
        &self.params[index]
    }
    pub fn buffer(&self, index: usize) -> &'a Tensor<T> {
        &self.buffers[index]
    }
    /// The batch size of this pass.
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// The batch of inputs (the input node reads it once).
    pub fn take_input(&self) -> V {
        self.input.borrow_mut().take().expect("a graph has a single input node")
    }
    pub fn is_train(&self) -> bool {
        self.train_stats.is_some()
    }
    pub fn record_batch_norm(&self, update: BatchNormUpdate) {
        if let Some(sink) = self.train_stats {
            sink.borrow_mut().push(update);
        }
    }
}

/// What a VJP rule reads: the values the forward pass kept, parameters, buffers.
pub struct Backward<'a, T: Float, V> {
    pub(super) node: NodeId,
    pub(super) values: &'a [Option<V>],
    pub(super) params: &'a [V],
    pub(super) buffers: &'a [Tensor<T>],
    pub(super) needs_grad: &'a [bool],
    pub(super) value_free: &'a [bool],
    pub(super) params_wanted: bool,
    pub(super) train: bool,
}

impl<'a, T: Float, V> Backward<'a, T, V> {
    pub fn value(&self, node: NodeId) -> &'a V {
        self.values[node]
            .as_ref()
            .expect("an input's value is kept until its users ran backwards")
    }
    /// This node's own output value.
    pub fn output(&self) -> &'a V {
        self.value(self.node)
    }
    pub fn param(&self, index: usize) -> &'a V {
        &self.params[index]
    }
    pub fn buffer(&self, index: usize) -> &'a Tensor<T> {
        &self.buffers[index]
    }
    /// Whether `node`'s value depends on the parameters (only then is its
    /// cotangent wanted).
    pub fn needs(&self, node: NodeId) -> bool {
        self.needs_grad[node]
    }
    /// Whether parameter `index`'s cotangent needs its value, not only its tangent.
    pub fn param_value_wanted(&self, index: usize) -> bool {
        !self.value_free.get(index).copied().unwrap_or(false)
    }
    /// Whether parameters' cotangents are wanted at all: a pass run only for
    /// the layers' observed inputs and output cotangents (K-FAC) skips them,
    /// and a rule may then skip computing them.
    pub fn params_wanted(&self) -> bool {
        self.params_wanted
    }
    /// BatchNorm ran on batch statistics in the forward pass.
    pub fn is_train(&self) -> bool {
        self.train
    }
}

/// The cotangents one VJP rule sends to its inputs and parameters.
pub struct Cotangents<V> {
    pub(super) inputs: Vec<(NodeId, V)>,
    pub(super) params: Vec<(usize, V)>,
}

impl<V> Cotangents<V> {
    pub(super) fn new() -> Self {
        Self {
            inputs: Vec::with_capacity(3),
            params: Vec::with_capacity(2),
        }
    }
    /// Adds `g` to input node `node`'s cotangent (dropped where not needed).
    pub fn input(&mut self, node: NodeId, g: V) {
        self.inputs.push((node, g));
    }
    pub fn param(&mut self, index: usize, g: V) {
        self.params.push((index, g));
    }
}

/// Declares the graph's operations: `Op` with one variant per rule type, and
/// its dispatch to the rules. A new operation is one rule type and one name here.
macro_rules! operations {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// One primitive application. Parameter and buffer operands are indices
        /// into the lists passed to [`Graph::forward`](super::Graph::forward).
        #[derive(Clone, Debug, PartialEq)]
        pub enum Op {
            $($(#[$doc])* $name($name),)*
        }

        $(impl From<$name> for Op {
            fn from(op: $name) -> Op {
                Op::$name(op)
            }
        })*

        impl Op {
            pub fn inputs(&self) -> Vec<NodeId> {
                match self { $(Op::$name(op) => op.inputs(),)* }
            }
            pub fn inputs_mut(&mut self) -> Vec<&mut NodeId> {
                match self { $(Op::$name(op) => op.inputs_mut(),)* }
            }
            pub fn params(&self) -> ParamRefs {
                match self { $(Op::$name(op) => op.params(),)* }
            }
            pub fn observed_input(&self) -> Option<NodeId> {
                match self { $(Op::$name(op) => op.observed_input(),)* }
            }
            pub(in crate::graph) fn example_shape(&self, inputs: &[&[usize]], param_shapes: &[Vec<usize>], flops: &mut f64) -> Vec<usize> {
                match self { $(Op::$name(op) => op.example_shape(inputs, param_shapes, flops),)* }
            }
            pub(in crate::graph) fn fuses_relu(&self) -> bool {
                match self { $(Op::$name(op) => op.fuses_relu(),)* }
            }
            pub(in crate::graph) fn forward<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>) -> V {
                match self { $(Op::$name(op) => op.forward(cx),)* }
            }
            pub(in crate::graph) fn forward_relu<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>) -> V {
                match self { $(Op::$name(op) => op.forward_relu(cx),)* }
            }
            pub(in crate::graph) fn fuses_add_relu(&self) -> bool {
                match self { $(Op::$name(op) => op.fuses_add_relu(),)* }
            }
            pub(in crate::graph) fn forward_add_relu<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>, residual: &V) -> V {
                match self { $(Op::$name(op) => op.forward_add_relu(cx, residual),)* }
            }
            pub(in crate::graph) fn vjp<T: Float, V: Value<T>>(&self, cx: &Backward<'_, T, V>, gy: V, out: &mut Cotangents<V>) {
                match self { $(Op::$name(op) => op.vjp(cx, gy, out),)* }
            }
            pub(in crate::graph) fn vjp_relu<T: Float, V: Value<T>>(&self, cx: &Backward<'_, T, V>, gy: V, relu_out: &V, out: &mut Cotangents<V>) {
                match self { $(Op::$name(op) => op.vjp_relu(cx, gy, relu_out, out),)* }
            }
        }
    };
}
pub(super) use operations;
