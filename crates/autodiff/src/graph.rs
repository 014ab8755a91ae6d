use crate::primitives::nd::{self as ndp, Arith, Pointwise};
use crate::primitives::{activation, batchnorm, conv2d, dense, structural};
use crate::{Dual, Value};
use hvp_tensor::conv::ConvGeometry;
use hvp_tensor::nd::MaxPoolGeometry;
use hvp_tensor::{Float, Tensor};

/// One dimension of a shape fixed when the graph is built: the batch size, or a
/// constant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dim {
    Batch,
    Fixed(usize),
}

/// `shape` with the batch size filled in.
pub fn resolve_shape(shape: &[Dim], batch: usize) -> Vec<usize> {
    shape
        .iter()
        .map(|d| match *d {
            Dim::Batch => batch,
            Dim::Fixed(n) => n,
        })
        .collect()
}

/// Index of a node in a [`Graph`].
pub type NodeId = usize;

/// Called by [`Graph::backward_observed`] with (node, op, input value, output cotangent).
pub type LayerObserver<'a, T> = &'a mut dyn FnMut(NodeId, &Op, &Tensor<T>, &Tensor<T>);

/// One primitive application. Parameter and buffer operands are indices into the
/// parameter list and buffer list passed to [`Graph::forward`].
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// The batch of inputs (always node 0).
    Input,
    Dense {
        input: NodeId,
        weight: usize,
        bias: Option<usize>,
    },
    Conv2d {
        input: NodeId,
        weight: usize,
        bias: Option<usize>,
        geometry: ConvGeometry,
    },
    /// Eval-mode BatchNorm; `mean` and `var` are buffers (constants).
    BatchNorm {
        input: NodeId,
        weight: usize,
        bias: usize,
        mean: usize,
        var: usize,
        eps: f64,
    },
    Relu {
        input: NodeId,
    },
    Tanh {
        input: NodeId,
    },
    Add {
        a: NodeId,
        b: NodeId,
    },
    GlobalAvgPool {
        input: NodeId,
    },
    AvgPool {
        input: NodeId,
        kernel: usize,
        stride: usize,
    },
    Flatten {
        input: NodeId,
    },
    // The operations below come from imported (ONNX) graphs, where weights are
    // ordinary operands: a parameter or constant enters as its own node.
    /// A trainable parameter as a value (no batch dimension).
    Param {
        index: usize,
    },
    /// A constant buffer as a value (no batch dimension).
    Constant {
        buffer: usize,
    },
    /// Convolution whose weight (and bias) are nodes, e.g. constants.
    ConvNode {
        input: NodeId,
        weight: NodeId,
        bias: Option<NodeId>,
        geometry: ConvGeometry,
    },
    /// Eval-mode BatchNorm whose scale and shift are nodes.
    BatchNormNode {
        input: NodeId,
        weight: NodeId,
        bias: NodeId,
        mean: usize,
        var: usize,
        eps: f64,
    },
    Pointwise {
        input: NodeId,
        func: Pointwise,
    },
    Arith {
        a: NodeId,
        b: NodeId,
        op: Arith,
    },
    MatMul {
        a: NodeId,
        b: NodeId,
        trans_b: bool,
    },
    Softmax {
        input: NodeId,
        axis: usize,
        log: bool,
    },
    MaxPool {
        input: NodeId,
        geometry: MaxPoolGeometry,
    },
    /// Mean over `axes`, which stay as size-1 dimensions.
    ReduceMean {
        input: NodeId,
        axes: Vec<usize>,
    },
    Reshape {
        input: NodeId,
        shape: Vec<Dim>,
    },
    Transpose {
        input: NodeId,
        perm: Vec<usize>,
    },
    Concat {
        inputs: Vec<NodeId>,
        axis: usize,
    },
}

impl Op {
    pub fn inputs(&self) -> Vec<NodeId> {
        match self {
            Op::Input | Op::Param { .. } | Op::Constant { .. } => vec![],
            Op::Dense { input, .. }
            | Op::Conv2d { input, .. }
            | Op::BatchNorm { input, .. }
            | Op::Relu { input }
            | Op::Tanh { input }
            | Op::GlobalAvgPool { input }
            | Op::AvgPool { input, .. }
            | Op::Flatten { input }
            | Op::Pointwise { input, .. }
            | Op::Softmax { input, .. }
            | Op::MaxPool { input, .. }
            | Op::ReduceMean { input, .. }
            | Op::Reshape { input, .. }
            | Op::Transpose { input, .. } => vec![*input],
            Op::Add { a, b } | Op::Arith { a, b, .. } | Op::MatMul { a, b, .. } => vec![*a, *b],
            Op::ConvNode {
                input, weight, bias, ..
            } => [*input, *weight].into_iter().chain(*bias).collect(),
            Op::BatchNormNode {
                input, weight, bias, ..
            } => vec![*input, *weight, *bias],
            Op::Concat { inputs, .. } => inputs.clone(),
        }
    }

    fn has_params(&self) -> bool {
        matches!(
            self,
            Op::Dense { .. } | Op::Conv2d { .. } | Op::BatchNorm { .. } | Op::Param { .. }
        )
    }
}

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

/// The value of every node of one forward pass, consumed by the backward pass.
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

/// The constant operands of an eval- or train-mode BatchNorm.
struct BatchNormRefs {
    mean: usize,
    var: usize,
    eps: f64,
    train: bool,
}

impl BatchNormRefs {
    #[allow(clippy::too_many_arguments)]
    fn vjp<T: Float, V: Value<T>>(
        &self,
        x: &V,
        weight: &V,
        bias: &V,
        buffers: &[Tensor<T>],
        gy: &V,
        need_input: bool,
    ) -> (Option<V>, V, V) {
        if self.train {
            let (gx, gg, gb) = batchnorm::train_vjp(x.primal(), weight.primal(), gy.primal(), self.eps);
            (need_input.then(|| V::constant(gx)), V::constant(gg), V::constant(gb))
        } else {
            let st = eval_stats(buffers, self.mean, self.var, self.eps);
            batchnorm::vjp(x, weight, bias, &st, gy, need_input)
        }
    }
}

/// An eval-mode BatchNorm's running statistics, from the buffers.
fn eval_stats<T: Float>(buffers: &[Tensor<T>], mean: usize, var: usize, eps: f64) -> batchnorm::Stats<'_, T> {
    batchnorm::Stats {
        mean: &buffers[mean],
        var: &buffers[var],
        eps,
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
        self.push(Op::Input)
    }

    /// Appends a node whose operands are earlier nodes.
    pub fn push(&mut self, op: Op) -> NodeId {
        let id = self.nodes.len();
        for i in op.inputs() {
            assert!(i < id, "node {id} uses node {i}, which is not earlier");
        }
        let needs = op.has_params() || op.inputs().iter().any(|&i| self.needs_grad[i]);
        self.nodes.push(op);
        self.needs_grad.push(needs);
        id
    }

    pub fn nodes(&self) -> &[Op] {
        &self.nodes
    }

    /// `true` at each eval-mode BatchNorm and each sum whose only user is the ReLU
    /// right after it: the forward pass runs the two as one
    /// (`batchnorm::forward_relu`, `Value::add_relu`).
    fn fused_with_relu(&self) -> Vec<bool> {
        let mut users = vec![0usize; self.nodes.len()];
        for op in &self.nodes {
            for j in op.inputs() {
                users[j] += 1;
            }
        }
        (0..self.nodes.len())
            .map(|i| {
                matches!(self.nodes[i], Op::BatchNorm { .. } | Op::Add { .. })
                    && users[i] == 1
                    && matches!(self.nodes.get(i + 1), Some(&Op::Relu { input }) if input == i)
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
            let known = |i: NodeId| -> Option<&Vec<usize>> { Some(&shapes[i]).filter(|s| !s.is_empty()) };
            let shape = match *op {
                Op::Input => sample_shape.to_vec(),
                Op::Dense { weight, .. } => {
                    let w = &param_shapes[weight];
                    flops += 2.0 * (w[0] * w[1]) as f64;
                    vec![w[0]]
                }
                Op::Conv2d {
                    input,
                    weight,
                    geometry,
                    ..
                } => match known(input) {
                    Some(x) if x.len() == 3 => {
                        let w = &param_shapes[weight];
                        let ho = hvp_tensor::pool::out_size(x[1], w[2], geometry.stride, geometry.padding);
                        let wo = hvp_tensor::pool::out_size(x[2], w[3], geometry.stride, geometry.padding);
                        flops += 2.0 * (w[0] * w[1] * w[2] * w[3] * ho * wo) as f64;
                        vec![w[0], ho, wo]
                    }
                    _ => vec![],
                },
                Op::GlobalAvgPool { input } => known(input).map(|x| vec![x[0]]).unwrap_or_default(),
                Op::AvgPool { input, kernel, stride } => known(input)
                    .filter(|x| x.len() == 3)
                    .map(|x| {
                        vec![
                            x[0],
                            hvp_tensor::pool::out_size(x[1], kernel, stride, 0),
                            hvp_tensor::pool::out_size(x[2], kernel, stride, 0),
                        ]
                    })
                    .unwrap_or_default(),
                Op::Flatten { input } => known(input).map(|x| vec![x.iter().product()]).unwrap_or_default(),
                Op::BatchNorm { input, .. } | Op::Relu { input } | Op::Tanh { input } | Op::Add { a: input, .. } => {
                    shapes[input].clone()
                }
                _ => vec![],
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
        let mut stats = Vec::new();
        let tape = self.run_forward(params, buffers, input, Some(&mut stats), false);
        (tape, stats)
    }

    fn run_forward<T: Float, V: Value<T>>(
        &self,
        params: &[V],
        buffers: &[Tensor<T>],
        input: V,
        mut train_stats: Option<&mut Vec<BatchNormUpdate>>,
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
        let mut values: Vec<Option<V>> = Vec::with_capacity(self.nodes.len());
        let mut input = Some(input);
        let fused = if train {
            vec![false; self.nodes.len()]
        } else {
            self.fused_with_relu()
        };
        // The output of a fused BatchNorm + ReLU, held for the ReLU's node.
        let mut pending_relu: Option<V> = None;
        for (i, op) in self.nodes.iter().enumerate() {
            let val = |i: NodeId| values[i].as_ref().expect("earlier node has a value");
            let mut batch_norm = |input: NodeId, weight: &V, bias: &V, mean: usize, var: usize, eps: f64| {
                if let Some(sink) = train_stats.as_mut() {
                    let x = val(input).primal();
                    let (y, m, v) = batchnorm::train_forward(x, weight.primal(), bias.primal(), eps);
                    let n = (x.numel() / x.shape()[1]) as f64;
                    let unbiased = v.iter().map(|v| v * n / (n - 1.0).max(1.0)).collect();
                    sink.push(BatchNormUpdate {
                        mean_buffer: mean,
                        var_buffer: var,
                        mean: m,
                        var: unbiased,
                    });
                    V::constant(y)
                } else {
                    batchnorm::forward(val(input), weight, bias, &eval_stats(buffers, mean, var, eps))
                }
            };
            // A BatchNorm or residual sum fused with the ReLU that follows: its
            // output is held for the ReLU's node, and its own slot stays empty
            // (nothing reads it: the ReLU's backward masks with its own output).
            let out = if fused[i] {
                pending_relu = Some(match *op {
                    Op::BatchNorm {
                        input,
                        weight,
                        bias,
                        mean,
                        var,
                        eps,
                    } => {
                        let st = eval_stats(buffers, mean, var, eps);
                        batchnorm::forward_relu(val(input), &params[weight], &params[bias], &st)
                    }
                    Op::Add { a, b } => val(a).add_relu(val(b)),
                    _ => unreachable!("only BatchNorm and Add fuse with a ReLU"),
                });
                None
            } else {
                Some(match *op {
                    Op::Input => input.take().expect("a single input node"),
                    Op::Dense { input, weight, bias } => {
                        dense::forward(val(input), &params[weight], bias.map(|b| &params[b]))
                    }
                    Op::Conv2d {
                        input,
                        weight,
                        bias,
                        geometry,
                    } => conv2d::forward(val(input), &params[weight], bias.map(|b| &params[b]), geometry),
                    Op::BatchNorm {
                        input,
                        weight,
                        bias,
                        mean,
                        var,
                        eps,
                    } => batch_norm(input, &params[weight], &params[bias], mean, var, eps),
                    Op::BatchNormNode {
                        input,
                        weight,
                        bias,
                        mean,
                        var,
                        eps,
                    } => batch_norm(input, val(weight), val(bias), mean, var, eps),
                    Op::Relu { input } => pending_relu.take().unwrap_or_else(|| activation::relu(val(input))),
                    Op::Tanh { input } => activation::tanh(val(input)),
                    Op::Add { a, b } => val(a).add(val(b)),
                    Op::GlobalAvgPool { input } => structural::global_avg_pool(val(input)),
                    Op::AvgPool { input, kernel, stride } => structural::avg_pool(val(input), kernel, stride),
                    Op::Flatten { input } => structural::flatten(val(input)),
                    Op::Param { index } => params[index].clone(),
                    Op::Constant { buffer } => V::constant(buffers[buffer].clone()),
                    Op::ConvNode {
                        input,
                        weight,
                        bias,
                        geometry,
                    } => conv2d::forward(val(input), val(weight), bias.map(val), geometry),
                    Op::Pointwise { input, func } => ndp::pointwise(func, val(input)),
                    Op::Arith { a, b, op } => ndp::arith(op, val(a), val(b)),
                    Op::MatMul { a, b, trans_b } => ndp::matmul(val(a), val(b), trans_b),
                    Op::Softmax { input, axis, log } => ndp::softmax(val(input), axis, log),
                    Op::MaxPool { input, geometry } => ndp::max_pool(val(input), geometry),
                    Op::ReduceMean { input, ref axes } => ndp::reduce_mean(val(input), axes),
                    Op::Reshape { input, ref shape } => ndp::reshape(val(input), &resolve_shape(shape, batch)),
                    Op::Transpose { input, ref perm } => ndp::transpose(val(input), perm),
                    Op::Concat { ref inputs, axis } => {
                        let parts: Vec<&V> = inputs.iter().map(|&i| val(i)).collect();
                        ndp::concat(&parts, axis)
                    }
                })
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
    /// (primal parts) of every node with parameters (Dense, Conv2d, BatchNorm) —
    /// what Kronecker-factored curvature needs.
    pub fn backward_observed<T: Float, V: Value<T>>(
        &self,
        params: &[V],
        buffers: &[Tensor<T>],
        tape: Tape<V>,
        output_cot: V,
        observer: Option<LayerObserver<T>>,
    ) -> Vec<Option<V>> {
        self.run_backward(params, buffers, tape, output_cot, observer, &[])
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
        self.run_backward(params, buffers, tape, output_cot, None, &value_free)
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
            match *op {
                Op::Conv2d { weight, bias, .. } => {
                    conv[weight] = true;
                    if let Some(b) = bias {
                        other[b] = true;
                    }
                }
                Op::Dense { weight, bias, .. } => {
                    other[weight] = true;
                    if let Some(b) = bias {
                        other[b] = true;
                    }
                }
                Op::BatchNorm { weight, bias, .. } => {
                    other[weight] = true;
                    other[bias] = true;
                }
                Op::Param { index } => other[index] = true,
                _ => {}
            }
        }
        conv.iter().zip(&other).map(|(&c, &o)| c && !o).collect()
    }

    /// The backward pass; `value_free[p]` (when present and true) lets parameter
    /// `p`'s cotangent skip its value (see [`Graph::backward_tangents`]).
    fn run_backward<T: Float, V: Value<T>>(
        &self,
        params: &[V],
        buffers: &[Tensor<T>],
        tape: Tape<V>,
        output_cot: V,
        mut observer: Option<LayerObserver<T>>,
        value_free: &[bool],
    ) -> Vec<Option<V>> {
        let train = tape.train;
        let mut values = tape.values;
        let n = self.nodes.len();
        assert_eq!(values.len(), n, "tape from another graph");
        let mut cots: Vec<Option<V>> = (0..n).map(|_| None).collect();
        let mut grads: Vec<Option<V>> = (0..params.len()).map(|_| None).collect();
        cots[n - 1] = Some(output_cot);
        for i in (0..n).rev() {
            let Some(gy) = cots[i].take() else {
                values[i] = None;
                continue;
            };
            let val = |j: NodeId| values[j].as_ref().expect("input value kept until its users ran");
            let need = |j: NodeId| self.needs_grad[j];
            if let Some(obs) = observer.as_mut() {
                if let Op::Dense { input, .. } | Op::Conv2d { input, .. } | Op::BatchNorm { input, .. } = self.nodes[i]
                {
                    obs(i, &self.nodes[i], val(input).primal(), gy.primal());
                }
            }
            let mut to_inputs: Vec<(NodeId, V)> = Vec::with_capacity(2);
            match self.nodes[i] {
                Op::Input => {}
                Op::Dense { input, weight, bias } => {
                    let (gx, gw, gb) = dense::vjp(val(input), &params[weight], bias.is_some(), &gy, need(input));
                    to_inputs.extend(gx.map(|g| (input, g)));
                    accumulate(&mut grads[weight], gw);
                    if let (Some(b), Some(gb)) = (bias, gb) {
                        accumulate(&mut grads[b], gb);
                    }
                }
                Op::Conv2d {
                    input,
                    weight,
                    bias,
                    geometry,
                } => {
                    let weight_value = !value_free.get(weight).copied().unwrap_or(false);
                    let (gx, gw, gb) = conv2d::vjp(
                        val(input),
                        &params[weight],
                        bias.is_some(),
                        &gy,
                        geometry,
                        need(input),
                        weight_value,
                    );
                    to_inputs.extend(gx.map(|g| (input, g)));
                    accumulate(&mut grads[weight], gw);
                    if let (Some(b), Some(gb)) = (bias, gb) {
                        accumulate(&mut grads[b], gb);
                    }
                }
                Op::BatchNorm {
                    input,
                    weight,
                    bias,
                    mean,
                    var,
                    eps,
                } => {
                    let bn = BatchNormRefs { mean, var, eps, train };
                    let (gx, gg, gb) = bn.vjp(val(input), &params[weight], &params[bias], buffers, &gy, need(input));
                    to_inputs.extend(gx.map(|g| (input, g)));
                    accumulate(&mut grads[weight], gg);
                    accumulate(&mut grads[bias], gb);
                }
                Op::BatchNormNode {
                    input,
                    weight,
                    bias,
                    mean,
                    var,
                    eps,
                } => {
                    let bn = BatchNormRefs { mean, var, eps, train };
                    let (gx, gg, gb) = bn.vjp(val(input), val(weight), val(bias), buffers, &gy, need(input));
                    to_inputs.extend(gx.map(|g| (input, g)));
                    to_inputs.push((weight, gg));
                    to_inputs.push((bias, gb));
                }
                Op::Relu { input } => to_inputs.push((input, activation::relu_vjp(val(i), &gy))),
                Op::Tanh { input } => to_inputs.push((input, activation::tanh_vjp(val(input), &gy))),
                Op::Add { a, b } => {
                    if need(a) {
                        to_inputs.push((a, gy.clone()));
                    }
                    to_inputs.push((b, gy));
                }
                Op::GlobalAvgPool { input } => {
                    let s = val(input).primal().shape();
                    to_inputs.push((input, structural::global_avg_pool_vjp(&gy, s[2], s[3])));
                }
                Op::AvgPool { input, kernel, stride } => {
                    let s = val(input).primal().shape();
                    to_inputs.push((input, structural::avg_pool_vjp(&gy, kernel, stride, s[2], s[3])));
                }
                Op::Flatten { input } => {
                    let s = val(input).primal().shape().to_vec();
                    to_inputs.push((input, structural::flatten_vjp(&gy, &s)));
                }
                Op::Param { index } => accumulate(&mut grads[index], gy),
                Op::Constant { .. } => {}
                Op::ConvNode {
                    input,
                    weight,
                    bias,
                    geometry,
                } => {
                    let (gx, gw, gb) = conv2d::vjp(
                        val(input),
                        val(weight),
                        bias.is_some(),
                        &gy,
                        geometry,
                        need(input),
                        true,
                    );
                    to_inputs.extend(gx.map(|g| (input, g)));
                    to_inputs.push((weight, gw));
                    if let (Some(b), Some(gb)) = (bias, gb) {
                        to_inputs.push((b, gb));
                    }
                }
                Op::Pointwise { input, func } => to_inputs.push((input, ndp::pointwise_vjp(func, val(input), &gy))),
                Op::Arith { a, b, op } => {
                    let (ga, gb) = ndp::arith_vjp(op, val(a), val(b), &gy);
                    to_inputs.push((a, ga));
                    to_inputs.push((b, gb));
                }
                Op::MatMul { a, b, trans_b } => {
                    let (ga, gb) = ndp::matmul_vjp(val(a), val(b), trans_b, &gy, need(a));
                    to_inputs.extend(ga.map(|g| (a, g)));
                    if need(b) {
                        to_inputs.push((b, gb));
                    }
                }
                Op::Softmax { input, axis, log } => {
                    to_inputs.push((input, ndp::softmax_vjp(val(input), &gy, axis, log)))
                }
                Op::MaxPool { input, geometry } => {
                    to_inputs.push((input, ndp::max_pool_vjp(val(input), geometry, &gy)))
                }
                Op::ReduceMean { input, ref axes } => {
                    to_inputs.push((input, ndp::reduce_mean_vjp(val(input), axes, &gy)))
                }
                Op::Reshape { input, .. } => {
                    let s = val(input).primal().shape().to_vec();
                    to_inputs.push((input, ndp::reshape(&gy, &s)));
                }
                Op::Transpose { input, ref perm } => to_inputs.push((input, ndp::transpose_vjp(&gy, perm))),
                Op::Concat { ref inputs, axis } => {
                    let parts: Vec<&V> = inputs.iter().map(|&j| val(j)).collect();
                    for (k, &j) in inputs.iter().enumerate() {
                        if need(j) {
                            to_inputs.push((j, ndp::concat_vjp(&parts, k, axis, &gy)));
                        }
                    }
                }
            }
            for (j, g) in to_inputs {
                if need(j) {
                    accumulate(&mut cots[j], g);
                }
            }
            values[i] = None;
        }
        grads
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss;

    fn pseudo(shape: &[usize], seed: f64) -> Tensor<f64> {
        let n = shape.iter().product();
        Tensor::new(
            shape.to_vec(),
            (0..n).map(|i| ((i as f64 + seed) * 0.7131).sin()).collect(),
        )
        .unwrap()
    }

    /// conv → BN → ReLU → (+ conv output) → ReLU → conv (+ the first conv's
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
        let c1 = g.push(Op::Conv2d {
            input: x,
            weight: 0,
            bias: None,
            geometry,
        });
        let bn = g.push(Op::BatchNorm {
            input: c1,
            weight: 1,
            bias: 2,
            mean: 0,
            var: 1,
            eps: 1e-5,
        });
        let bn = if split {
            g.push(Op::Reshape {
                input: bn,
                shape: vec![Dim::Batch, Dim::Fixed(4), Dim::Fixed(5), Dim::Fixed(5)],
            })
        } else {
            bn
        };
        let r = g.push(Op::Relu { input: bn });
        // A residual sum and its ReLU.
        let sum = g.push(Op::Add { a: r, b: c1 });
        let sum = if split {
            g.push(Op::Reshape {
                input: sum,
                shape: vec![Dim::Batch, Dim::Fixed(4), Dim::Fixed(5), Dim::Fixed(5)],
            })
        } else {
            sum
        };
        let r = g.push(Op::Relu { input: sum });
        let c2 = g.push(Op::Conv2d {
            input: r,
            weight: 3,
            bias: Some(4),
            geometry: ConvGeometry { stride: 2, padding: 1 },
        });
        let mut last = g.push(Op::GlobalAvgPool { input: c2 });
        if tie {
            // Σ of the first conv's weight, broadcast onto the pooled features.
            let w = g.push(Op::Param { index: 0 });
            let s = g.push(Op::ReduceMean {
                input: w,
                axes: vec![0, 1, 2, 3],
            });
            let s = g.push(Op::Reshape {
                input: s,
                shape: vec![Dim::Fixed(1), Dim::Fixed(1)],
            });
            last = g.push(Op::Arith {
                a: last,
                b: s,
                op: Arith::Mul,
            });
        }
        g.push(Op::Dense {
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
        assert!(!split.fused_with_relu().contains(&true));
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
