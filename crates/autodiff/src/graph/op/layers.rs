//! Layers with weights: dense, convolution, BatchNorm — as built-in layers
//! (weights are parameters, K-FAC sees them) and as imported nodes (weights are
//! operands, e.g. constants).

use super::super::rule::{Backward, Cotangents, Forward, ParamRefs, Rule};
use super::super::{BatchNormUpdate, NodeId};
use crate::primitives::{batchnorm, conv2d, dense, normalize};
use crate::Value;
use hvp_tensor::conv::{ConvGeometry, Grouping};
use hvp_tensor::pool::out_size;
use hvp_tensor::Float;

/// Sends a layer's (input, weight, bias) cotangents: the input's only where it
/// was computed, the bias's only where the layer has one.
fn weighted_layer_cotangents<V>(
    out: &mut Cotangents<V>,
    input: NodeId,
    weight: usize,
    bias: Option<usize>,
    (gx, gw, gb): (Option<V>, V, Option<V>),
) {
    if let Some(g) = gx {
        out.input(input, g);
    }
    out.param(weight, gw);
    if let (Some(b), Some(gb)) = (bias, gb) {
        out.param(b, gb);
    }
}

/// [`weighted_layer_cotangents`] for a layer whose weight and bias are nodes.
fn node_layer_cotangents<V>(
    out: &mut Cotangents<V>,
    input: NodeId,
    weight: NodeId,
    bias: Option<NodeId>,
    (gx, gw, gb): (Option<V>, V, Option<V>),
) {
    if let Some(g) = gx {
        out.input(input, g);
    }
    out.input(weight, gw);
    if let (Some(b), Some(gb)) = (bias, gb) {
        out.input(b, gb);
    }
}

/// `y = x Wᵀ + b` with parameters `weight` `[out, in]` and `bias` `[out]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Dense {
    pub input: NodeId,
    pub weight: usize,
    pub bias: Option<usize>,
}

impl Rule for Dense {
    fn inputs(&self) -> Vec<NodeId> {
        vec![self.input]
    }
    fn inputs_mut(&mut self) -> Vec<&mut NodeId> {
        vec![&mut self.input]
    }
    fn params(&self) -> ParamRefs {
        ParamRefs {
            conv_weight: None,
            other: [self.weight].into_iter().chain(self.bias).collect(),
        }
    }
    fn example_shape(&self, _: &[&[usize]], param_shapes: &[Vec<usize>], flops: &mut f64) -> Vec<usize> {
        let w = &param_shapes[self.weight];
        *flops += 2.0 * (w[0] * w[1]) as f64;
        vec![w[0]]
    }
    fn forward<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>) -> V {
        dense::forward(
            cx.value(self.input),
            cx.param(self.weight),
            self.bias.map(|b| cx.param(b)),
        )
    }
    fn vjp<T: Float, V: Value<T>>(&self, cx: &Backward<'_, T, V>, gy: V, out: &mut Cotangents<V>) {
        let (gx, gw, gb) = dense::vjp(
            cx.value(self.input),
            cx.param(self.weight),
            self.bias.is_some(),
            &gy,
            cx.needs(self.input),
        );
        weighted_layer_cotangents(out, self.input, self.weight, self.bias, (gx, gw, gb));
    }
    fn observed_input(&self) -> Option<NodeId> {
        Some(self.input)
    }
}

/// A Linear layer on every token of `input` `[..., in]` (the batch at
/// `batch_axis`, other leading dimensions tokens), with parameters `weight`
/// `[out, in]` and `bias` `[out]`: what K-FAC treats like a 1×1 convolution
/// whose positions are the example's tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenDense {
    pub input: NodeId,
    pub weight: usize,
    pub bias: Option<usize>,
    pub batch_axis: usize,
}

impl Rule for TokenDense {
    fn inputs(&self) -> Vec<NodeId> {
        vec![self.input]
    }
    fn inputs_mut(&mut self) -> Vec<&mut NodeId> {
        vec![&mut self.input]
    }
    fn params(&self) -> ParamRefs {
        ParamRefs {
            conv_weight: None,
            other: [self.weight].into_iter().chain(self.bias).collect(),
        }
    }
    fn forward<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>) -> V {
        dense::tokens_forward(
            cx.value(self.input),
            cx.param(self.weight),
            self.bias.map(|b| cx.param(b)),
        )
    }
    fn vjp<T: Float, V: Value<T>>(&self, cx: &Backward<'_, T, V>, gy: V, out: &mut Cotangents<V>) {
        let (gx, gw, gb) = dense::tokens_vjp(
            cx.value(self.input),
            cx.param(self.weight),
            self.bias.is_some(),
            &gy,
            cx.needs(self.input),
        );
        weighted_layer_cotangents(out, self.input, self.weight, self.bias, (gx, gw, gb));
    }
    fn observed_input(&self) -> Option<NodeId> {
        Some(self.input)
    }
}

/// 2-D convolution (NCHW) with parameters `weight` `[O, C, kh, kw]` and `bias` `[O]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Conv2d {
    pub input: NodeId,
    pub weight: usize,
    pub bias: Option<usize>,
    pub geometry: ConvGeometry,
}

impl Rule for Conv2d {
    fn inputs(&self) -> Vec<NodeId> {
        vec![self.input]
    }
    fn inputs_mut(&mut self) -> Vec<&mut NodeId> {
        vec![&mut self.input]
    }
    fn params(&self) -> ParamRefs {
        ParamRefs {
            conv_weight: Some(self.weight),
            other: self.bias.into_iter().collect(),
        }
    }
    fn example_shape(&self, inputs: &[&[usize]], param_shapes: &[Vec<usize>], flops: &mut f64) -> Vec<usize> {
        let x = inputs[0];
        if x.len() != 3 {
            return Vec::new();
        }
        let w = &param_shapes[self.weight];
        let g = self.geometry;
        let ho = out_size(x[1], w[2], g.stride, g.padding);
        let wo = out_size(x[2], w[3], g.stride, g.padding);
        *flops += 2.0 * (w[0] * w[1] * w[2] * w[3] * ho * wo) as f64;
        vec![w[0], ho, wo]
    }
    fn forward<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>) -> V {
        conv2d::forward(
            cx.value(self.input),
            cx.param(self.weight),
            self.bias.map(|b| cx.param(b)),
            self.geometry,
        )
    }
    fn vjp<T: Float, V: Value<T>>(&self, cx: &Backward<'_, T, V>, gy: V, out: &mut Cotangents<V>) {
        if !cx.params_wanted() {
            if cx.needs(self.input) {
                let hw = cx.value(self.input).primal().shape();
                let gx = conv2d::input_vjp(cx.param(self.weight), &gy, (hw[2], hw[3]), self.geometry);
                out.input(self.input, gx);
            }
            return;
        }
        let (gx, gw, gb) = conv2d::vjp(
            cx.value(self.input),
            cx.param(self.weight),
            self.bias.is_some(),
            &gy,
            self.geometry,
            cx.needs(self.input),
            cx.param_value_wanted(self.weight),
        );
        weighted_layer_cotangents(out, self.input, self.weight, self.bias, (gx, gw, gb));
    }
    fn observed_input(&self) -> Option<NodeId> {
        Some(self.input)
    }
}

/// Convolution whose weight (and bias) are nodes, e.g. constants.
#[derive(Clone, Debug, PartialEq)]
pub struct ConvNode {
    pub input: NodeId,
    pub weight: NodeId,
    pub bias: Option<NodeId>,
    pub geometry: ConvGeometry,
}

impl Rule for ConvNode {
    fn inputs(&self) -> Vec<NodeId> {
        [self.input, self.weight].into_iter().chain(self.bias).collect()
    }
    fn inputs_mut(&mut self) -> Vec<&mut NodeId> {
        [&mut self.input, &mut self.weight]
            .into_iter()
            .chain(self.bias.as_mut())
            .collect()
    }
    fn forward<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>) -> V {
        conv2d::forward(
            cx.value(self.input),
            cx.value(self.weight),
            self.bias.map(|b| cx.value(b)),
            self.geometry,
        )
    }
    fn vjp<T: Float, V: Value<T>>(&self, cx: &Backward<'_, T, V>, gy: V, out: &mut Cotangents<V>) {
        let (gx, gw, gb) = conv2d::vjp(
            cx.value(self.input),
            cx.value(self.weight),
            self.bias.is_some(),
            &gy,
            self.geometry,
            cx.needs(self.input),
            true,
        );
        node_layer_cotangents(out, self.input, self.weight, self.bias, (gx, gw, gb));
    }
}

/// A grouped (depthwise when groups = channels) or dilated convolution, or the
/// transposed convolution of that kind when `transposed_hw` gives its output's
/// spatial size; weight (`[O, C/groups, kh, kw]`, or `[Cin, Cout/groups, kh, kw]`
/// transposed) and bias are nodes (parameters or constants).
#[derive(Clone, Debug, PartialEq)]
pub struct GroupedConv {
    pub input: NodeId,
    pub weight: NodeId,
    pub bias: Option<NodeId>,
    pub geometry: ConvGeometry,
    pub grouping: Grouping,
    pub transposed_hw: Option<(usize, usize)>,
}

impl Rule for GroupedConv {
    fn inputs(&self) -> Vec<NodeId> {
        [self.input, self.weight].into_iter().chain(self.bias).collect()
    }
    fn inputs_mut(&mut self) -> Vec<&mut NodeId> {
        [&mut self.input, &mut self.weight]
            .into_iter()
            .chain(self.bias.as_mut())
            .collect()
    }
    fn forward<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>) -> V {
        let (x, w, b) = (
            cx.value(self.input),
            cx.value(self.weight),
            self.bias.map(|b| cx.value(b)),
        );
        match self.transposed_hw {
            None => conv2d::grouped_forward(x, w, b, self.geometry, self.grouping),
            Some(hw) => conv2d::transposed_forward(x, w, b, hw, self.geometry, self.grouping),
        }
    }
    fn vjp<T: Float, V: Value<T>>(&self, cx: &Backward<'_, T, V>, gy: V, out: &mut Cotangents<V>) {
        let (x, w, has_bias, need_input) = (
            cx.value(self.input),
            cx.value(self.weight),
            self.bias.is_some(),
            cx.needs(self.input),
        );
        let (gx, gw, gb) = match self.transposed_hw {
            None => conv2d::grouped_vjp(x, w, has_bias, &gy, self.geometry, self.grouping, need_input),
            Some(_) => conv2d::transposed_vjp(x, w, has_bias, &gy, self.geometry, self.grouping, need_input),
        };
        node_layer_cotangents(out, self.input, self.weight, self.bias, (gx, gw, gb));
    }
    /// K-FAC factors a grouped convolution group by group.
    fn observed_input(&self) -> Option<NodeId> {
        self.transposed_hw.is_none().then_some(self.input)
    }
}

/// `(x − mean) / √(var + ε)` over each example's last `dims` dimensions
/// (LayerNorm, InstanceNorm, GroupNorm without their scale and bias).
#[derive(Clone, Debug, PartialEq)]
pub struct Normalize {
    pub input: NodeId,
    pub dims: usize,
    pub eps: f64,
}

impl Rule for Normalize {
    fn inputs(&self) -> Vec<NodeId> {
        vec![self.input]
    }
    fn inputs_mut(&mut self) -> Vec<&mut NodeId> {
        vec![&mut self.input]
    }
    fn forward<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>) -> V {
        normalize::forward(cx.value(self.input), self.dims, self.eps)
    }
    fn vjp<T: Float, V: Value<T>>(&self, cx: &Backward<'_, T, V>, gy: V, out: &mut Cotangents<V>) {
        out.input(
            self.input,
            normalize::vjp(cx.value(self.input), cx.output(), &gy, self.dims, self.eps),
        );
    }
}

/// The constant operands of a BatchNorm: running statistics (buffers) and epsilon.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNormStats {
    pub mean: usize,
    pub var: usize,
    pub eps: f64,
}

impl BatchNormStats {
    fn eval<'a, T: Float>(
        &self,
        buffers: (&'a hvp_tensor::Tensor<T>, &'a hvp_tensor::Tensor<T>),
    ) -> batchnorm::Stats<'a, T> {
        batchnorm::Stats {
            mean: buffers.0,
            var: buffers.1,
            eps: self.eps,
        }
    }

    /// Eval mode: normalise with the running statistics. Train mode: with the
    /// batch's, recording them for the running-statistics update (`var`
    /// unbiased, as PyTorch keeps it).
    fn forward<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>, input: NodeId, weight: &V, bias: &V) -> V {
        let x = cx.value(input);
        if cx.is_train() {
            let (y, mean, var) = batchnorm::train_forward(x.primal(), weight.primal(), bias.primal(), self.eps);
            let n = (x.primal().numel() / x.primal().shape()[1]) as f64;
            cx.record_batch_norm(BatchNormUpdate {
                mean_buffer: self.mean,
                var_buffer: self.var,
                mean,
                var: var.iter().map(|v| v * n / (n - 1.0).max(1.0)).collect(),
            });
            V::constant(y)
        } else {
            batchnorm::forward(x, weight, bias, &self.eval((cx.buffer(self.mean), cx.buffer(self.var))))
        }
    }

    /// (input, scale, shift) cotangents.
    fn vjp<T: Float, V: Value<T>>(
        &self,
        cx: &Backward<'_, T, V>,
        input: NodeId,
        weight: &V,
        bias: &V,
        gy: &V,
    ) -> (Option<V>, V, V) {
        let x = cx.value(input);
        let need_input = cx.needs(input);
        if cx.is_train() {
            let (gx, gg, gb) = batchnorm::train_vjp(x.primal(), weight.primal(), gy.primal(), self.eps);
            (need_input.then(|| V::constant(gx)), V::constant(gg), V::constant(gb))
        } else {
            let st = self.eval((cx.buffer(self.mean), cx.buffer(self.var)));
            batchnorm::vjp(x, weight, bias, &st, gy, need_input)
        }
    }
}

/// BatchNorm with parameters `weight` (scale) and `bias` (shift); `mean` and
/// `var` are buffers (constants).
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNorm {
    pub input: NodeId,
    pub weight: usize,
    pub bias: usize,
    pub stats: BatchNormStats,
}

impl Rule for BatchNorm {
    fn inputs(&self) -> Vec<NodeId> {
        vec![self.input]
    }
    fn inputs_mut(&mut self) -> Vec<&mut NodeId> {
        vec![&mut self.input]
    }
    fn params(&self) -> ParamRefs {
        ParamRefs {
            conv_weight: None,
            other: vec![self.weight, self.bias],
        }
    }
    fn example_shape(&self, inputs: &[&[usize]], _: &[Vec<usize>], _: &mut f64) -> Vec<usize> {
        inputs[0].to_vec()
    }
    fn forward<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>) -> V {
        self.stats
            .forward(cx, self.input, cx.param(self.weight), cx.param(self.bias))
    }
    fn fuses_relu(&self) -> bool {
        true
    }
    fn forward_relu<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>) -> V {
        let st = self.stats.eval((cx.buffer(self.stats.mean), cx.buffer(self.stats.var)));
        batchnorm::forward_relu(cx.value(self.input), cx.param(self.weight), cx.param(self.bias), &st)
    }
    fn fuses_add_relu(&self) -> bool {
        true
    }
    fn forward_add_relu<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>, residual: &V) -> V {
        let st = self.stats.eval((cx.buffer(self.stats.mean), cx.buffer(self.stats.var)));
        let (x, gamma, beta) = (cx.value(self.input), cx.param(self.weight), cx.param(self.bias));
        batchnorm::forward_add_relu(x, gamma, beta, &st, residual)
    }
    fn vjp<T: Float, V: Value<T>>(&self, cx: &Backward<'_, T, V>, gy: V, out: &mut Cotangents<V>) {
        if !cx.params_wanted() && !cx.is_train() {
            // The scale and shift's reductions skipped: only the input's cotangent.
            if cx.needs(self.input) {
                let st = self.stats.eval((cx.buffer(self.stats.mean), cx.buffer(self.stats.var)));
                let gx = batchnorm::input_vjp(cx.param(self.weight), cx.param(self.bias), &st, &gy);
                out.input(self.input, gx);
            }
            return;
        }
        let (gx, gg, gb) = self
            .stats
            .vjp(cx, self.input, cx.param(self.weight), cx.param(self.bias), &gy);
        if let Some(g) = gx {
            out.input(self.input, g);
        }
        out.param(self.weight, gg);
        out.param(self.bias, gb);
    }
    fn vjp_relu<T: Float, V: Value<T>>(&self, cx: &Backward<'_, T, V>, gy: V, relu_out: &V, out: &mut Cotangents<V>) {
        if !cx.params_wanted() || cx.is_train() {
            return self.vjp(cx, crate::primitives::activation::relu_vjp(relu_out, gy), out);
        }
        let st = self.stats.eval((cx.buffer(self.stats.mean), cx.buffer(self.stats.var)));
        let (gx, gg, gb) = batchnorm::vjp_through_relu(
            relu_out.primal(),
            cx.value(self.input),
            cx.param(self.weight),
            cx.param(self.bias),
            &st,
            &gy,
            cx.needs(self.input),
        );
        if let Some(g) = gx {
            out.input(self.input, g);
        }
        out.param(self.weight, gg);
        out.param(self.bias, gb);
    }
    fn observed_input(&self) -> Option<NodeId> {
        Some(self.input)
    }
}

/// BatchNorm whose scale and shift are nodes.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNormNode {
    pub input: NodeId,
    pub weight: NodeId,
    pub bias: NodeId,
    pub stats: BatchNormStats,
}

impl Rule for BatchNormNode {
    fn inputs(&self) -> Vec<NodeId> {
        vec![self.input, self.weight, self.bias]
    }
    fn inputs_mut(&mut self) -> Vec<&mut NodeId> {
        vec![&mut self.input, &mut self.weight, &mut self.bias]
    }
    fn forward<T: Float, V: Value<T>>(&self, cx: &Forward<'_, T, V>) -> V {
        self.stats
            .forward(cx, self.input, cx.value(self.weight), cx.value(self.bias))
    }
    fn vjp<T: Float, V: Value<T>>(&self, cx: &Backward<'_, T, V>, gy: V, out: &mut Cotangents<V>) {
        let (gx, gg, gb) = self
            .stats
            .vjp(cx, self.input, cx.value(self.weight), cx.value(self.bias), &gy);
        if let Some(g) = gx {
            out.input(self.input, g);
        }
        out.input(self.weight, gg);
        out.input(self.bias, gb);
    }
}
