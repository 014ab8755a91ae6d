//! A straight-line program of [`Op`]s and the passes that run it: forward
//! (plain, dual, train mode) and backward (reverse mode, forward-over-reverse).
//! What each operation computes lives with its rule in [`op`].

pub mod op;
mod rule;

use crate::{Dual, Value};
use hvp_tensor::{Float, Tensor};
pub use op::Op;
pub use rule::{Backward, Cotangents, Forward, ParamRefs, Rule};
use std::cell::RefCell;

/// One dimension of a shape fixed when the graph is built: the batch size, the
/// batch merged with other dimensions (attention folds heads into it,
/// `[batch·heads, S, d]`, and sequence-first code merges it under the sequence,
/// `[S·batch, d]`), or a constant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dim {
    Batch,
    /// `outer · batch · inner` elements, row-major: `outer` blocks, each of the
    /// batch's examples, each `inner` long (not both 1).
    Batched {
        outer: usize,
        inner: usize,
    },
    Fixed(usize),
}

impl Dim {
    /// The batch merged between `outer` and `inner` (`Batch` when both are 1).
    pub fn batched(outer: usize, inner: usize) -> Dim {
        if outer == 1 && inner == 1 {
            Dim::Batch
        } else {
            Dim::Batched { outer, inner }
        }
    }

    /// Whether the dimension depends on the batch size.
    pub fn has_batch(self) -> bool {
        !matches!(self, Dim::Fixed(_))
    }

    /// The constant factor (`outer · inner` of a batched dimension, or the size).
    pub fn factor(self) -> usize {
        match self {
            Dim::Batch => 1,
            Dim::Batched { outer, inner } => outer * inner,
            Dim::Fixed(k) => k,
        }
    }

    /// The size for a batch of `batch` examples.
    pub fn resolve(self, batch: usize) -> usize {
        match self {
            Dim::Fixed(n) => n,
            d => batch * d.factor(),
        }
    }
}

/// `shape` with the batch size filled in.
pub fn resolve_shape(shape: &[Dim], batch: usize) -> Vec<usize> {
    shape.iter().map(|d| d.resolve(batch)).collect()
}

/// Index of a node in a [`Graph`].
pub type NodeId = usize;

/// Called by [`Graph::backward_observed`] with (node, op, input value, output cotangent).
pub type LayerObserver<'a, T> = &'a mut dyn FnMut(NodeId, &Op, &Tensor<T>, &Tensor<T>);

/// A straight-line program of primitives; the last node is the output (logits).
#[derive(Clone, Debug, Default)]
pub struct Graph {
    nodes: Vec<Op>,
    /// Whether a node's value depends on the parameters: only those nodes need a
    /// cotangent, so the input's gradient is never computed.
    needs_grad: Vec<bool>,
    /// Elements of all node values for one example, where the builder knew
    /// them (imported graphs): what one example's activations cost.
    example_elements: Option<usize>,
}

/// A graph cut by [`Graph::split_frozen`].
#[derive(Clone, Debug)]
pub struct FrozenSplit {
    /// Input → the frontier node (its last node), no parameters read.
    pub prefix: Graph,
    /// The frontier's value → the output, with the same parameters and buffers.
    pub tail: Graph,
    /// The frontier's index in the whole graph.
    pub frontier: NodeId,
}

/// The value of every node of one forward pass, consumed by the backward pass.
/// `None` where no later pass reads a value: a node run fused with the ReLU
/// after it, or one freed after its last user.
#[derive(Clone)]
pub struct Tape<V> {
    values: Vec<Option<V>>,
    /// BatchNorm ran on batch statistics (train mode): its backward differs.
    train: bool,
}

/// Batch statistics a train-mode forward pass measured at one BatchNorm, for the
/// running-statistics update (`var` is the unbiased variance, as PyTorch keeps).
#[derive(Clone, Debug)]
pub struct BatchNormUpdate {
    pub mean_buffer: usize,
    pub var_buffer: usize,
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
}

impl<V> Tape<V> {
    /// The output node's value.
    pub fn output(&self) -> &V {
        self.values
            .last()
            .and_then(|v| v.as_ref())
            .expect("a tape holds the output until the backward pass")
    }

    /// Maps every stored value (e.g. dual → primal, to run a plain backward pass
    /// after a forward-mode pass).
    pub fn map<W>(self, f: impl Fn(V) -> W) -> Tape<W> {
        Tape {
            values: self.values.into_iter().map(|v| v.map(&f)).collect(),
            train: self.train,
        }
    }
}

fn accumulate<T: Float, V: Value<T>>(slot: &mut Option<V>, v: V) {
    match slot {
        Some(s) => s.add_assign(&v),
        None => *slot = Some(v),
    }
}

impl Graph {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the elements of all node values for one example.
    pub fn set_example_elements(&mut self, elements: usize) {
        self.example_elements = Some(elements);
    }

    /// Elements of all node values for one example, when known.
    pub fn example_elements(&self) -> Option<usize> {
        self.example_elements
    }

    /// Adds the input node (node 0).
    pub fn input(&mut self) -> NodeId {
        assert!(self.nodes.is_empty(), "the input must be the first node");
        self.push(op::Input)
    }

    /// Appends a node whose operands are earlier nodes.
    pub fn push(&mut self, op: impl Into<Op>) -> NodeId {
        let op = op.into();
        let id = self.nodes.len();
        let inputs = op.inputs();
        for &i in &inputs {
            assert!(i < id, "node {id} uses node {i}, which is not earlier");
        }
        let needs = !op.params().is_empty() || inputs.iter().any(|&i| self.needs_grad[i]);
        self.nodes.push(op);
        self.needs_grad.push(needs);
        id
    }

    pub fn nodes(&self) -> &[Op] {
        &self.nodes
    }

    /// Cuts the graph where the parameters start to matter: `prefix` computes,
    /// from the input, the one node (`frontier`) through which the input
    /// reaches every node that depends on a parameter; `tail` is the rest, with
    /// that node's value as its input. Running `tail` on `prefix`'s outputs
    /// runs the same operations on the same values as the whole graph, so a
    /// frozen feature extractor is evaluated once per example, not once per
    /// pass. `None` when there is nothing to cut: the parameters act on the
    /// input directly, the output depends on no parameter, or the input reaches
    /// the parameter-dependent nodes through more than one node.
    pub fn split_frozen(&self) -> Option<FrozenSplit> {
        let n = self.nodes.len();
        // Nodes whose value depends on the input but on no parameter.
        let mut frozen = vec![false; n];
        for (i, op) in self.nodes.iter().enumerate() {
            frozen[i] = !self.needs_grad[i] && (matches!(op, Op::Input(_)) || op.inputs().iter().any(|&j| frozen[j]));
        }
        if n == 0 || frozen[n - 1] {
            return None;
        }
        let mut frontier: Option<NodeId> = None;
        for (i, op) in self.nodes.iter().enumerate() {
            if frozen[i] {
                continue;
            }
            for j in op.inputs() {
                if frozen[j] {
                    match frontier {
                        None => frontier = Some(j),
                        Some(f) if f == j => {}
                        Some(_) => return None,
                    }
                }
            }
        }
        let frontier = frontier.filter(|&f| f != 0)?;
        // The prefix: the frontier's ancestors, in order.
        let mut wanted = vec![false; n];
        wanted[frontier] = true;
        for i in (0..=frontier).rev() {
            if wanted[i] {
                for j in self.nodes[i].inputs() {
                    wanted[j] = true;
                }
            }
        }
        let renumbered = |keep: &dyn Fn(NodeId) -> bool, first: Option<(NodeId, Op)>| {
            let mut graph = Graph::new();
            let mut map = vec![usize::MAX; n];
            if let Some((from, op)) = first {
                map[from] = graph.push(op);
            }
            for (i, op) in self.nodes.iter().enumerate() {
                if keep(i) && map[i] == usize::MAX {
                    let mut op = op.clone();
                    for input in op.inputs_mut() {
                        *input = map[*input];
                    }
                    map[i] = graph.push(op);
                }
            }
            graph.example_elements = self.example_elements;
            graph
        };
        let prefix = renumbered(&|i| wanted[i], None);
        let tail = renumbered(&|i| !frozen[i], Some((frontier, Op::Input(op::Input))));
        Some(FrozenSplit { prefix, tail, frontier })
    }

    /// How many nodes read each node's value.
    fn user_counts(&self) -> Vec<usize> {
        let mut users = vec![0usize; self.nodes.len()];
        for op in &self.nodes {
            for j in op.inputs() {
                users[j] += 1;
            }
        }
        users
    }

    /// `true` at each node that fuses with a ReLU (eval-mode BatchNorm, residual
    /// sum) whose only user is the ReLU right after it: the forward pass runs
    /// the two as one ([`Rule::forward_relu`]).
    fn fused_with_relu(&self) -> Vec<bool> {
        let users = self.user_counts();
        (0..self.nodes.len())
            .map(|i| {
                self.nodes[i].fuses_relu()
                    && users[i] == 1
                    && matches!(self.nodes.get(i + 1), Some(Op::Relu(r)) if r.input == i)
            })
            .collect()
    }

    /// For each node run as one with the residual sum after it and that sum's
    /// ReLU ([`Rule::forward_add_relu`]): the sum's other operand. That is an
    /// eval-mode BatchNorm whose only user is the sum right after it, the sum
    /// fused with its ReLU (`relu_fused`, from [`Graph::fused_with_relu`]), and
    /// the other operand computed before the BatchNorm.
    fn fused_into_sum(&self, relu_fused: &[bool]) -> Vec<Option<NodeId>> {
        let users = self.user_counts();
        (0..self.nodes.len())
            .map(|i| {
                if !self.nodes[i].fuses_add_relu() || users[i] != 1 || !relu_fused.get(i + 1).copied().unwrap_or(false)
                {
                    return None;
                }
                let Some(Op::Add(sum)) = self.nodes.get(i + 1) else {
                    return None;
                };
                let other = if sum.a == i { sum.b } else { sum.a };
                (other < i).then_some(other)
            })
            .collect()
    }

    /// Multiply-add FLOPs (2 per multiply-add) of the Conv2d and Dense nodes in
    /// one forward pass of a single example of `sample_shape`, given the
    /// parameter shapes. The unit the benchmark reports throughput in. Only the
    /// built-in layer types are counted; shapes after an imported-graph
    /// operation are unknown here and the layers that follow count as zero.
    pub fn forward_flops(&self, sample_shape: &[usize], param_shapes: &[Vec<usize>]) -> f64 {
        self.walk_shapes(sample_shape, param_shapes).0
    }

    /// Elements of all node values for one example of `sample_shape`: recorded
    /// by the builder (imported graphs) or inferred for the built-in layers.
    pub fn activation_elements(&self, sample_shape: &[usize], param_shapes: &[Vec<usize>]) -> usize {
        self.example_elements
            .unwrap_or_else(|| self.walk_shapes(sample_shape, param_shapes).1)
    }

    /// FLOPs and activation elements of the built-in layers for one example.
    fn walk_shapes(&self, sample_shape: &[usize], param_shapes: &[Vec<usize>]) -> (f64, usize) {
        let mut shapes: Vec<Vec<usize>> = Vec::with_capacity(self.nodes.len());
        let mut flops = 0.0;
        let mut elements = 0usize;
        for op in &self.nodes {
            let shape = if let Op::Input(_) = op {
                sample_shape.to_vec()
            } else {
                let inputs: Vec<&[usize]> = op.inputs().iter().map(|&i| shapes[i].as_slice()).collect();
                if inputs.iter().any(|s| s.is_empty()) {
                    Vec::new()
                } else {
                    op.example_shape(&inputs, param_shapes, &mut flops)
                }
            };
            elements = elements.saturating_add(shape.iter().product::<usize>());
            shapes.push(shape);
        }
        (flops, elements)
    }

    /// Runs the graph on `input`, keeping every node's value for [`Graph::backward`].
    pub fn forward<T: Float, V: Value<T>>(&self, params: &[V], buffers: &[Tensor<T>], input: V) -> Tape<V> {
        self.run_forward(params, buffers, input, None, false)
    }

    /// [`Graph::forward`] for a pass whose tangents are wanted at the output only
    /// (`J v` for the GGN and Fisher products, followed by a plain backward pass):
    /// each node's tangent is freed as soon as its last user has run, so their
    /// memory is reused within the pass instead of all being held to the end.
    pub fn forward_output_tangent<T: Float, V: Value<T>>(
        &self,
        params: &[V],
        buffers: &[Tensor<T>],
        input: V,
    ) -> Tape<V> {
        self.run_forward(params, buffers, input, None, true)
    }

    /// Train-mode forward pass (BatchNorm on batch statistics, as PyTorch's
    /// `model.train()`), for reverse mode only; also returns each BatchNorm's batch
    /// statistics for the running-statistics update.
    pub fn forward_train<T: Float>(
        &self,
        params: &[Tensor<T>],
        buffers: &[Tensor<T>],
        input: Tensor<T>,
    ) -> (Tape<Tensor<T>>, Vec<BatchNormUpdate>) {
        let stats = RefCell::new(Vec::new());
        let tape = self.run_forward(params, buffers, input, Some(&stats), false);
        (tape, stats.into_inner())
    }

    fn run_forward<T: Float, V: Value<T>>(
        &self,
        params: &[V],
        buffers: &[Tensor<T>],
        input: V,
        train_stats: Option<&RefCell<Vec<BatchNormUpdate>>>,
        free_tangents: bool,
    ) -> Tape<V> {
        let train = train_stats.is_some();
        // The last node reading each node's value (its tangent's last reader).
        let mut last_user: Vec<Option<NodeId>> = vec![None; self.nodes.len()];
        if free_tangents {
            for (i, op) in self.nodes.iter().enumerate() {
                for j in op.inputs() {
                    last_user[j] = Some(i);
                }
            }
        }
        let batch = input.primal().shape().first().copied().unwrap_or(1);
        let input = RefCell::new(Some(input));
        let mut values: Vec<Option<V>> = Vec::with_capacity(self.nodes.len());
        let fused = if train {
            vec![false; self.nodes.len()]
        } else {
            self.fused_with_relu()
        };
        let into_sum = if train {
            vec![None; self.nodes.len()]
        } else {
            self.fused_into_sum(&fused)
        };
        // The output of a node fused with its ReLU, held for the ReLU's node.
        let mut pending_relu: Option<V> = None;
        for (i, op) in self.nodes.iter().enumerate() {
            let cx = Forward {
                values: &values,
                params,
                buffers,
                batch,
                input: &input,
                train_stats,
            };
            // A fused node's own slot stays empty: nothing reads it, since the
            // ReLU's backward masks with its own output.
            let out = if let Some(other) = into_sum[i] {
                // This node, the sum after it and the sum's ReLU at once: the
                // result waits (through the sum's empty slot) for the ReLU's node.
                pending_relu = Some(op.forward_add_relu(&cx, cx.value(other)));
                None
            } else if i > 0 && into_sum[i - 1].is_some() {
                None
            } else if fused[i] {
                pending_relu = Some(op.forward_relu(&cx));
                None
            } else {
                match (op, pending_relu.take()) {
                    (Op::Relu(_), Some(fused_output)) => Some(fused_output),
                    _ => Some(op.forward(&cx)),
                }
            };
            values.push(out);
            if free_tangents {
                for j in op.inputs() {
                    if let (Some(v), true) = (values[j].as_mut(), last_user[j] == Some(i)) {
                        v.forget_tangent();
                    }
                }
            }
        }
        Tape { values, train }
    }

    /// Replays `tape` backwards from the output cotangent `output_cot` and returns
    /// each parameter's cotangent (`None` for parameters the output does not use).
    /// Node values are freed as soon as no earlier node needs them.
    pub fn backward<T: Float, V: Value<T>>(
        &self,
        params: &[V],
        buffers: &[Tensor<T>],
        tape: Tape<V>,
        output_cot: V,
    ) -> Vec<Option<V>> {
        self.backward_observed(params, buffers, tape, output_cot, None)
    }

    /// [`Graph::backward`], showing `observer` the input value and output cotangent
    /// (primal parts) of every node with K-FAC statistics ([`Rule::observed_input`]:
    /// Dense, Conv2d, BatchNorm).
    pub fn backward_observed<T: Float, V: Value<T>>(
        &self,
        params: &[V],
        buffers: &[Tensor<T>],
        tape: Tape<V>,
        output_cot: V,
        observer: Option<LayerObserver<T>>,
    ) -> Vec<Option<V>> {
        self.run_backward(params, buffers, tape, output_cot, observer, &[], true)
    }

    /// The backward pass for `observer` alone ([`Graph::backward_observed`]'s
    /// observations, bit for bit): only the nodes' cotangents are propagated;
    /// parameters' cotangents are not formed (a convolution skips its
    /// weight-gradient products, a third of the backward pass's GEMMs).
    pub fn observe_backward<T: Float, V: Value<T>>(
        &self,
        params: &[V],
        buffers: &[Tensor<T>],
        tape: Tape<V>,
        output_cot: V,
        observer: LayerObserver<T>,
    ) {
        self.run_backward(params, buffers, tape, output_cot, Some(observer), &[], false);
    }

    /// Forward-over-reverse's result alone: the tangent of every parameter's
    /// cotangent (`H v` when the output cotangent is a loss's), without the
    /// cotangents' values (the gradient). The weight-gradient products of the
    /// convolutions' values — one of the nine convolution-sized products per layer —
    /// are skipped; everything else equals [`Graph::backward`]'s tangents bit for bit.
    pub fn backward_tangents<T: Float>(
        &self,
        params: &[Dual<T>],
        buffers: &[Tensor<T>],
        tape: Tape<Dual<T>>,
        output_cot: Dual<T>,
    ) -> Vec<Option<Tensor<T>>> {
        let value_free = self.conv_only_params(params.len());
        self.run_backward(params, buffers, tape, output_cot, None, &value_free, true)
            .into_iter()
            .map(|g| g.and_then(|d| d.into_parts().1))
            .collect()
    }

    /// Parameters used only as built-in convolutions' weights: their cotangents
    /// come from the convolution VJP alone, so an empty value never meets a full one.
    fn conv_only_params(&self, n_params: usize) -> Vec<bool> {
        let mut conv = vec![false; n_params];
        let mut other = vec![false; n_params];
        for op in &self.nodes {
            let refs = op.params();
            if let Some(w) = refs.conv_weight {
                conv[w] = true;
            }
            for p in refs.other {
                other[p] = true;
            }
        }
        conv.iter().zip(&other).map(|(&c, &o)| c && !o).collect()
    }

    /// The backward pass; `value_free[p]` (when present and true) lets parameter
    /// `p`'s cotangent skip its value (see [`Graph::backward_tangents`]); without
    /// `params_wanted` no parameter cotangent is kept (see [`Graph::observe_backward`]).
    #[allow(clippy::too_many_arguments)]
    fn run_backward<T: Float, V: Value<T>>(
        &self,
        params: &[V],
        buffers: &[Tensor<T>],
        tape: Tape<V>,
        output_cot: V,
        mut observer: Option<LayerObserver<T>>,
        value_free: &[bool],
        params_wanted: bool,
    ) -> Vec<Option<V>> {
        let train = tape.train;
        let mut values = tape.values;
        let n = self.nodes.len();
        assert_eq!(values.len(), n, "tape from another graph");
        let mut cots: Vec<Option<V>> = (0..n).map(|_| None).collect();
        let mut grads: Vec<Option<V>> = (0..params.len()).map(|_| None).collect();
        cots[n - 1] = Some(output_cot);
        // Nodes run with their ReLU in the forward pass (as `run_forward` chose)
        // also take its mask into their own VJP; not where an observer must see
        // each node's masked cotangent.
        let fused = if train || observer.is_some() {
            vec![false; n]
        } else {
            self.fused_with_relu()
        };
        // The output of the ReLU after a fused node, held for that node's VJP.
        let mut relu_out: Option<V> = None;
        for i in (0..n).rev() {
            let Some(gy) = cots[i].take() else {
                values[i] = None;
                continue;
            };
            if i > 0 && fused[i - 1] && values[i].is_some() {
                // This is the ReLU reading node i − 1, its only user: the
                // cotangent passes unmasked, with the ReLU's output for the mask.
                if self.needs_grad[i - 1] {
                    relu_out = values[i].take();
                    debug_assert!(cots[i - 1].is_none(), "a fused node's only user is its ReLU");
                    cots[i - 1] = Some(gy);
                }
                values[i] = None;
                continue;
            }
            let op = &self.nodes[i];
            let cx = Backward {
                node: i,
                values: &values,
                params,
                buffers,
                needs_grad: &self.needs_grad,
                value_free,
                params_wanted,
                train,
            };
            if let (Some(obs), Some(input)) = (observer.as_mut(), op.observed_input()) {
                obs(i, op, cx.value(input).primal(), gy.primal());
            }
            let mut out = Cotangents::new();
            match relu_out.take() {
                Some(y) if fused[i] => op.vjp_relu(&cx, gy, &y, &mut out),
                _ => op.vjp(&cx, gy, &mut out),
            }
            for (j, g) in out.inputs {
                if self.needs_grad[j] {
                    accumulate(&mut cots[j], g);
                }
            }
            if params_wanted {
                for (p, g) in out.params {
                    accumulate(&mut grads[p], g);
                }
            }
            values[i] = None;
        }
        grads
    }
}

#[cfg(test)]
mod tests {
    use super::op::*;
    use super::*;
    use crate::loss;
    use crate::primitives::nd::Arith as ArithOp;
    use hvp_tensor::conv::ConvGeometry;

    fn pseudo(shape: &[usize], seed: f64) -> Tensor<f64> {
        let n = shape.iter().product();
        Tensor::new(
            shape.to_vec(),
            (0..n).map(|i| ((i as f64 + seed) * 0.7131).sin()).collect(),
        )
        .unwrap()
    }

    /// conv → BN → ReLU → (+ BN of the conv output) → ReLU → conv (+ the first conv's
    /// weight again as a `Param` node when `tie`) → pool → dense.
    fn small_net(tie: bool) -> (Graph, Vec<Vec<usize>>) {
        small_net_with(tie, false)
    }

    /// [`small_net`]; `split` puts an identity reshape before each ReLU, so
    /// neither runs fused with the BatchNorm or sum before it.
    fn small_net_with(tie: bool, split: bool) -> (Graph, Vec<Vec<usize>>) {
        let mut g = Graph::new();
        let x = g.input();
        let geometry = ConvGeometry { stride: 1, padding: 1 };
        let c1 = g.push(Conv2d {
            input: x,
            weight: 0,
            bias: None,
            geometry,
        });
        // A BatchNorm of the first conv's output (all share its parameters), and,
        // when `split`, an identity reshape after a node so nothing fuses with it.
        let batch_norm = |g: &mut Graph, input: NodeId| {
            g.push(BatchNorm {
                input,
                weight: 1,
                bias: 2,
                stats: BatchNormStats {
                    mean: 0,
                    var: 1,
                    eps: 1e-5,
                },
            })
        };
        let seam = |g: &mut Graph, input: NodeId| {
            if split {
                g.push(Reshape {
                    input,
                    shape: vec![Dim::Batch, Dim::Fixed(4), Dim::Fixed(5), Dim::Fixed(5)],
                })
            } else {
                input
            }
        };
        let bn = batch_norm(&mut g, c1);
        let bn = seam(&mut g, bn);
        let r = g.push(Relu { input: bn });
        // A BatchNorm on the shortcut, then the residual sum and its ReLU.
        let shortcut = batch_norm(&mut g, c1);
        let shortcut = seam(&mut g, shortcut);
        let sum = g.push(Add { a: r, b: shortcut });
        let sum = seam(&mut g, sum);
        let r = g.push(Relu { input: sum });
        let c2 = g.push(Conv2d {
            input: r,
            weight: 3,
            bias: Some(4),
            geometry: ConvGeometry { stride: 2, padding: 1 },
        });
        let mut last = g.push(GlobalAvgPool { input: c2 });
        if tie {
            // Σ of the first conv's weight, broadcast onto the pooled features.
            let w = g.push(Param { index: 0 });
            let s = g.push(ReduceMean {
                input: w,
                axes: vec![0, 1, 2, 3],
            });
            let s = g.push(Reshape {
                input: s,
                shape: vec![Dim::Fixed(1), Dim::Fixed(1)],
            });
            last = g.push(Arith {
                a: last,
                b: s,
                op: ArithOp::Mul,
            });
        }
        g.push(Dense {
            input: last,
            weight: 5,
            bias: Some(6),
        });
        let shapes = vec![
            vec![4, 2, 3, 3],
            vec![4],
            vec![4],
            vec![3, 4, 3, 3],
            vec![3],
            vec![2, 3],
            vec![2],
        ];
        (g, shapes)
    }

    /// Dual parameters (tangent = a direction), BatchNorm buffers and a batch of
    /// three inputs for [`small_net`].
    fn small_net_operands(shapes: &[Vec<usize>]) -> (Vec<Dual<f64>>, Vec<Tensor<f64>>, Tensor<f64>) {
        let params = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| Dual::new(pseudo(s, i as f64), Some(pseudo(s, 10.0 + i as f64))))
            .collect();
        let buffers = vec![pseudo(&[4], 3.0), elementwise_abs_plus(pseudo(&[4], 4.0))];
        (params, buffers, pseudo(&[3, 2, 5, 5], 7.0))
    }

    #[test]
    fn fused_relus_equal_the_separate_ops_bit_for_bit() {
        let (fused, shapes) = small_net_with(false, false);
        let (split, _) = small_net_with(false, true);
        assert_eq!(fused.fused_with_relu().iter().filter(|&&f| f).count(), 2);
        assert_eq!(
            fused.fused_into_sum(&fused.fused_with_relu()).iter().flatten().count(),
            1
        );
        assert!(!split.fused_with_relu().contains(&true));
        assert!(split
            .fused_into_sum(&split.fused_with_relu())
            .iter()
            .all(Option::is_none));
        let (params, buffers, input) = small_net_operands(&shapes);
        let hvp = |graph: &Graph| -> (Tensor<f64>, Vec<Tensor<f64>>) {
            let tape = graph.forward(&params, &buffers, Dual::constant(input.clone()));
            let logits_tangent = tape.output().tangent().unwrap().clone();
            let out = loss::softmax_cross_entropy(tape.output(), &[0, 1, 1], 1.0);
            let hv = graph.backward_tangents(&params, &buffers, tape, out.cotangent);
            (logits_tangent, hv.into_iter().map(|t| t.unwrap()).collect())
        };
        let ((jv_a, hv_a), (jv_b, hv_b)) = (hvp(&fused), hvp(&split));
        assert_eq!(jv_a.data(), jv_b.data(), "forward tangent");
        for (p, (a, b)) in hv_a.iter().zip(&hv_b).enumerate() {
            assert_eq!(a.data(), b.data(), "H v block of parameter {p}");
        }
        // The backward pass too (the BatchNorm's VJP takes the ReLU's mask into
        // its own pass), in reverse mode and for a dual's value and tangent.
        let primal: Vec<Tensor<f64>> = params.iter().map(|p| p.primal().clone()).collect();
        let gradient = |graph: &Graph| -> Vec<Tensor<f64>> {
            let tape = graph.forward(&primal, &buffers, input.clone());
            let out = loss::softmax_cross_entropy(tape.output(), &[0, 1, 1], 1.0);
            let g = graph.backward(&primal, &buffers, tape, out.cotangent);
            g.into_iter().map(|g| g.unwrap()).collect()
        };
        let dual_backward = |graph: &Graph| -> Vec<Dual<f64>> {
            let tape = graph.forward(&params, &buffers, Dual::constant(input.clone()));
            let out = loss::softmax_cross_entropy(tape.output(), &[0, 1, 1], 1.0);
            graph
                .backward(&params, &buffers, tape, out.cotangent)
                .into_iter()
                .map(|g| g.unwrap())
                .collect()
        };
        assert_eq!(gradient(&fused), gradient(&split), "gradient");
        for (p, (a, b)) in dual_backward(&fused).iter().zip(&dual_backward(&split)).enumerate() {
            assert_eq!(a.primal().data(), b.primal().data(), "gradient of parameter {p}");
            assert_eq!(a.tangent(), b.tangent(), "tangent of parameter {p}'s gradient");
        }
    }

    #[test]
    fn tangents_alone_equal_the_full_backward_pass_bit_for_bit() {
        for tie in [false, true] {
            let (graph, shapes) = small_net(tie);
            assert_eq!(
                graph.conv_only_params(shapes.len()),
                [!tie, false, false, true, false, false, false]
            );
            let (params, buffers, input) = small_net_operands(&shapes);
            let run = |tangents_only: bool| -> Vec<Tensor<f64>> {
                let tape = graph.forward(&params, &buffers, Dual::constant(input.clone()));
                let out = loss::softmax_cross_entropy(tape.output(), &[0, 1, 1], 1.0);
                if tangents_only {
                    graph
                        .backward_tangents(&params, &buffers, tape, out.cotangent)
                        .into_iter()
                        .map(|t| t.unwrap())
                        .collect()
                } else {
                    graph
                        .backward(&params, &buffers, tape, out.cotangent)
                        .into_iter()
                        .map(|d| d.unwrap().tangent().unwrap().clone())
                        .collect()
                }
            };
            let (full, alone) = (run(false), run(true));
            for (p, (a, b)) in full.iter().zip(&alone).enumerate() {
                assert_eq!(a.shape(), b.shape(), "parameter {p}");
                assert_eq!(a.data(), b.data(), "parameter {p} (tie = {tie})");
            }
        }
    }

    #[test]
    fn observing_without_parameter_cotangents_sees_the_same_bit_for_bit() {
        let (graph, shapes) = small_net(false);
        let (params, buffers, input) = small_net_operands(&shapes);
        let params: Vec<Tensor<f64>> = params.iter().map(|p| p.primal().clone()).collect();
        let run = |full: bool| -> Vec<(NodeId, Tensor<f64>, Tensor<f64>)> {
            let tape = graph.forward(&params, &buffers, input.clone());
            let out = loss::softmax_cross_entropy(tape.output(), &[0, 1, 1], 1.0);
            let mut seen = Vec::new();
            let mut obs = |node: NodeId, _: &Op, x: &Tensor<f64>, gy: &Tensor<f64>| {
                seen.push((node, x.clone(), gy.clone()));
            };
            if full {
                let grads = graph.backward_observed(&params, &buffers, tape, out.cotangent, Some(&mut obs));
                assert!(grads.iter().all(Option::is_some));
            } else {
                graph.observe_backward(&params, &buffers, tape, out.cotangent, &mut obs);
            }
            seen
        };
        let (full, alone) = (run(true), run(false));
        // Two convolutions, the two BatchNorms and the dense layer.
        assert_eq!(full.len(), 5);
        assert_eq!(full.len(), alone.len());
        for ((na, xa, ga), (nb, xb, gb)) in full.iter().zip(&alone) {
            assert_eq!(na, nb);
            assert_eq!(xa.data(), xb.data(), "input of node {na}");
            assert_eq!(ga.data(), gb.data(), "output cotangent of node {na}");
        }
    }

    #[test]
    fn output_tangent_pass_frees_the_inner_tangents_only() {
        for tie in [false, true] {
            let (graph, shapes) = small_net(tie);
            let (params, buffers, input) = small_net_operands(&shapes);
            let full = graph.forward(&params, &buffers, Dual::constant(input.clone()));
            let lean = graph.forward_output_tangent(&params, &buffers, Dual::constant(input.clone()));
            assert_eq!(lean.output().primal().data(), full.output().primal().data());
            assert_eq!(
                lean.output().tangent().unwrap().data(),
                full.output().tangent().unwrap().data(),
                "J v (tie = {tie})"
            );
            let n = lean.values.len();
            for (i, (a, b)) in lean.values.iter().zip(&full.values).enumerate().take(n - 1) {
                // A node fused with its ReLU keeps no value in either pass.
                let (Some(a), Some(b)) = (a.as_ref(), b.as_ref()) else {
                    assert!(a.is_none() && b.is_none(), "node {i}: a value in one pass only");
                    continue;
                };
                assert_eq!(a.primal().data(), b.primal().data(), "node {i} value kept");
                assert!(a.tangent().is_none(), "node {i} tangent freed (tie = {tie})");
            }
        }
    }

    fn elementwise_abs_plus(t: Tensor<f64>) -> Tensor<f64> {
        let d = t.data().iter().map(|v| v.abs() + 0.5).collect();
        Tensor::new(t.shape().to_vec(), d).unwrap()
    }
}
