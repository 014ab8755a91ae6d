use crate::primitives::{activation, batchnorm, conv2d, dense, structural};
use crate::Value;
use hvp_tensor::conv::ConvGeometry;
use hvp_tensor::{Float, Tensor};

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
}

impl Op {
    fn inputs(&self) -> Vec<NodeId> {
        match *self {
            Op::Input => vec![],
            Op::Dense { input, .. }
            | Op::Conv2d { input, .. }
            | Op::BatchNorm { input, .. }
            | Op::Relu { input }
            | Op::Tanh { input }
            | Op::GlobalAvgPool { input }
            | Op::AvgPool { input, .. }
            | Op::Flatten { input } => vec![input],
            Op::Add { a, b } => vec![a, b],
        }
    }

    fn has_params(&self) -> bool {
        matches!(self, Op::Dense { .. } | Op::Conv2d { .. } | Op::BatchNorm { .. })
    }
}

/// A straight-line program of primitives; the last node is the output (logits).
#[derive(Clone, Debug, Default)]
pub struct Graph {
    nodes: Vec<Op>,
    /// Whether a node's value depends on the parameters: only those nodes need a
    /// cotangent, so the input's gradient is never computed.
    needs_grad: Vec<bool>,
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

    /// Multiply-add FLOPs (2 per multiply-add) of the Conv2d and Dense nodes in
    /// one forward pass of a single example of `sample_shape`, given the
    /// parameter shapes. The unit the benchmark reports throughput in.
    pub fn forward_flops(&self, sample_shape: &[usize], param_shapes: &[Vec<usize>]) -> f64 {
        let mut shapes: Vec<Vec<usize>> = Vec::with_capacity(self.nodes.len());
        let mut flops = 0.0;
        for op in &self.nodes {
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
                } => {
                    let (x, w) = (&shapes[input], &param_shapes[weight]);
                    let ho = hvp_tensor::pool::out_size(x[1], w[2], geometry.stride, geometry.padding);
                    let wo = hvp_tensor::pool::out_size(x[2], w[3], geometry.stride, geometry.padding);
                    flops += 2.0 * (w[0] * w[1] * w[2] * w[3] * ho * wo) as f64;
                    vec![w[0], ho, wo]
                }
                Op::GlobalAvgPool { input } => vec![shapes[input][0]],
                Op::AvgPool { input, kernel, stride } => {
                    let x = &shapes[input];
                    vec![
                        x[0],
                        hvp_tensor::pool::out_size(x[1], kernel, stride, 0),
                        hvp_tensor::pool::out_size(x[2], kernel, stride, 0),
                    ]
                }
                Op::Flatten { input } => vec![shapes[input].iter().product()],
                Op::BatchNorm { input, .. } | Op::Relu { input } | Op::Tanh { input } | Op::Add { a: input, .. } => {
                    shapes[input].clone()
                }
            };
            shapes.push(shape);
        }
        flops
    }

    /// Runs the graph on `input`, keeping every node's value for [`Graph::backward`].
    pub fn forward<T: Float, V: Value<T>>(&self, params: &[V], buffers: &[Tensor<T>], input: V) -> Tape<V> {
        self.run_forward(params, buffers, input, None)
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
        let tape = self.run_forward(params, buffers, input, Some(&mut stats));
        (tape, stats)
    }

    fn run_forward<T: Float, V: Value<T>>(
        &self,
        params: &[V],
        buffers: &[Tensor<T>],
        input: V,
        mut train_stats: Option<&mut Vec<BatchNormUpdate>>,
    ) -> Tape<V> {
        let train = train_stats.is_some();
        let mut values: Vec<Option<V>> = Vec::with_capacity(self.nodes.len());
        let mut input = Some(input);
        for op in &self.nodes {
            let val = |i: NodeId| values[i].as_ref().expect("earlier node has a value");
            let out = match *op {
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
                } => {
                    if let Some(sink) = train_stats.as_mut() {
                        let x = val(input).primal();
                        let (y, m, v) =
                            batchnorm::train_forward(x, params[weight].primal(), params[bias].primal(), eps);
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
                        let st = batchnorm::Stats {
                            mean: &buffers[mean],
                            var: &buffers[var],
                            eps,
                        };
                        batchnorm::forward(val(input), &params[weight], &params[bias], &st)
                    }
                }
                Op::Relu { input } => activation::relu(val(input)),
                Op::Tanh { input } => activation::tanh(val(input)),
                Op::Add { a, b } => val(a).add(val(b)),
                Op::GlobalAvgPool { input } => structural::global_avg_pool(val(input)),
                Op::AvgPool { input, kernel, stride } => structural::avg_pool(val(input), kernel, stride),
                Op::Flatten { input } => structural::flatten(val(input)),
            };
            values.push(Some(out));
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
        mut observer: Option<LayerObserver<T>>,
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
                    let (gx, gw, gb) =
                        conv2d::vjp(val(input), &params[weight], bias.is_some(), &gy, geometry, need(input));
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
                    let (gx, gg, gb) = if train {
                        let (gx, gg, gb) =
                            batchnorm::train_vjp(val(input).primal(), params[weight].primal(), gy.primal(), eps);
                        (need(input).then(|| V::constant(gx)), V::constant(gg), V::constant(gb))
                    } else {
                        let st = batchnorm::Stats {
                            mean: &buffers[mean],
                            var: &buffers[var],
                            eps,
                        };
                        batchnorm::vjp(val(input), &params[weight], &params[bias], &st, &gy, need(input))
                    };
                    to_inputs.extend(gx.map(|g| (input, g)));
                    accumulate(&mut grads[weight], gg);
                    accumulate(&mut grads[bias], gb);
                }
                Op::Relu { input } => to_inputs.push((input, activation::relu_vjp(val(input), &gy))),
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
