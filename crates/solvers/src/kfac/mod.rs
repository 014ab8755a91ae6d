//! K-FAC and EK-FAC (Martens & Grosse 2015; Grosse & Martens 2016 for
//! convolutions; George et al. 2018 and Grosse et al. 2023 for the eigenvalue
//! correction). Each Linear and Conv2d layer's block of the Fisher of the mean
//! loss is approximated as `S ⊗ A` (row-major vec of the `[out, in]` weight, the
//! bias as an extra input column):
//!
//! * `A = (1/N) Σ_i (1/T) Σ_t ā_t ā_tᵀ` — layer inputs (im2col patches for
//!   convolutions, T = output positions), augmented with 1 when there is a bias;
//! * `S = (1/N) Σ_i Σ_t g_t g_tᵀ` — gradients of example i's loss with respect to
//!   the layer's outputs, with the output cotangent drawn from the model's
//!   predictive distribution (`Mc`, the true Fisher), the true label
//!   (`Empirical`), or all of the output Hessian's square-root columns (`Exact`,
//!   so S is exact for the GGN and K-FAC is exact for a single Linear layer and
//!   one example);
//! * EK-FAC replaces the eigenvalues `s_i a_j` of `S ⊗ A` in its eigenbasis by
//!   `Λ*_ij = (1/N) Σ_i (Q_Sᵀ G_i Q_A)_ij²`, G_i the per-example weight gradient.
//!
//! **Rule for other parameters**: BatchNorm γ and β (and any parameter outside a
//! Linear/Conv2d layer) get the diagonal of the same Fisher, `(1/N) Σ_i g_ij²`,
//! from the same per-example cotangents.
//!
//! An inverse product then costs two small matrix products per layer on each
//! side, independent of N.
//!
//! `sampling`: the output cotangents behind S; `io`: saving and loading
//! factors; `self_influence`: per-example `∇ℓ_iᵀ (F̂ + λI)⁻¹ ∇ℓ_i`.

mod cache;
mod checkpoint;
mod contract;
pub use cache::{cache_key, FactorSource, CHECKPOINT_EVERY};
pub use checkpoint::Checkpoint;
mod io;
mod sampling;
mod self_influence;
mod statistics;
pub use contract::{block_product, covers_all_parameters, example_gradient_dots, fisher_products_and_dots};

use sampling::cotangent_samples;

use crate::{finish, LinearOperator, SolveReport, SolverError};
use hvp_autodiff::loss::{self, Targets};
use hvp_autodiff::{op, Graph, NodeId, Op, Tape};
use hvp_curvature::{batch_targets, Problem};
use hvp_model::io::{read_safetensors, write_safetensors};
use hvp_model::{Model, ModelError, ParamVector};
use hvp_tensor::conv::{self, ConvGeometry};
use hvp_tensor::linalg::{gemm_into, matmul_with, Par};
use hvp_tensor::{DType, Float, Tensor};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rayon::prelude::*;
use std::borrow::Cow;
use std::path::Path;
use std::time::Instant;

/// How the output cotangents behind S are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FisherKind {
    /// One label sampled per example from the model's predictive distribution.
    Mc,
    /// The true label (empirical Fisher).
    Empirical,
    /// Every column of the output Hessian's square root (C backward passes).
    Exact,
}

/// K-FAC or EK-FAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FactorKind {
    Kfac,
    Ekfac,
}

/// One Linear or Conv2d layer's factors, eigendecomposed.
#[derive(Clone, Debug)]
pub struct LayerFactors {
    pub weight: usize,
    pub bias: Option<usize>,
    /// The first weight row (output channel) covered: 0, or a group's first.
    pub row0: usize,
    pub a_vals: Vec<f64>,
    /// `[a, a]` row-major, eigenvectors in columns.
    pub a_vecs: Vec<f64>,
    pub s_vals: Vec<f64>,
    pub s_vecs: Vec<f64>,
    /// EK-FAC's corrected eigenvalues `[s, a]`.
    pub corrected: Option<Vec<f64>>,
}

impl LayerFactors {
    fn a_dim(&self) -> usize {
        self.a_vals.len()
    }
    fn s_dim(&self) -> usize {
        self.s_vals.len()
    }
}

/// The factors of every layer plus the diagonal of the other parameters.
#[derive(Clone, Debug)]
pub struct Factors {
    pub kind: FactorKind,
    pub layers: Vec<LayerFactors>,
    /// `(parameter index, diagonal)` for parameters outside Linear/Conv2d layers.
    pub diagonal: Vec<(usize, Vec<f64>)>,
    pub examples: usize,
}

/// A Linear/Conv2d node as K-FAC sees it; a grouped convolution is one layer
/// per group, each the rows of the weight (and bias) its group computes.
#[derive(Clone, Copy)]
struct Layer {
    node: NodeId,
    weight: usize,
    bias: Option<usize>,
    conv: Option<ConvGeometry>,
    /// `(k, groups)`: this layer is group `k` of a grouped convolution.
    group: Option<(usize, usize)>,
    s_dim: usize,
    a_dim: usize,
}

impl Layer {
    /// The first weight row (output channel) this layer covers.
    fn row0(&self) -> usize {
        self.group.map_or(0, |(k, _)| k * self.s_dim)
    }

    /// The shape of this layer's block of the weight.
    fn w_shape(&self, model: &Model) -> Vec<usize> {
        let mut shape = model.params[self.weight].shape.clone();
        shape[0] = self.s_dim;
        shape
    }

    /// The layer's own input channels and output cotangent rows of the node's
    /// observed values (all of them, but for one group of a grouped convolution).
    fn view<'t, T: Float>(&self, x: &'t Tensor<T>, gy: &'t Tensor<T>) -> (Cow<'t, Tensor<T>>, Cow<'t, Tensor<T>>) {
        match self.group {
            None => (Cow::Borrowed(x), Cow::Borrowed(gy)),
            Some((k, groups)) => {
                let c = x.shape()[1] / groups;
                (
                    Cow::Owned(hvp_tensor::nd::slice_along(x, 1, k * c, c)),
                    Cow::Owned(hvp_tensor::nd::slice_along(gy, 1, self.row0(), self.s_dim)),
                )
            }
        }
    }

    /// How the layer's factors are named in a saved file.
    fn stored_name(&self, model: &Model) -> String {
        let name = &model.params[self.weight].name;
        match self.group {
            None => name.clone(),
            Some((k, _)) => format!("{name}.group{k}"),
        }
    }
}

fn layers_of(model: &Model) -> Vec<Layer> {
    let shape = |p: usize| &model.params[p].shape;
    model
        .graph
        .nodes()
        .iter()
        .enumerate()
        .filter_map(|(node, op)| match *op {
            Op::Dense(op::Dense { weight, bias, .. }) => Some(Layer {
                node,
                weight,
                bias,
                conv: None,
                group: None,
                s_dim: shape(weight)[0],
                a_dim: shape(weight)[1] + bias.is_some() as usize,
            }),
            Op::TokenDense(op::TokenDense { weight, bias, .. }) => Some(Layer {
                node,
                weight,
                bias,
                conv: None,
                group: None,
                s_dim: shape(weight)[0],
                a_dim: shape(weight)[1] + bias.is_some() as usize,
            }),
            Op::Conv2d(op::Conv2d {
                weight, bias, geometry, ..
            }) => Some(Layer {
                node,
                weight,
                bias,
                conv: Some(geometry),
                group: None,
                s_dim: shape(weight)[0],
                a_dim: shape(weight)[1..].iter().product::<usize>() + bias.is_some() as usize,
            }),
            _ => None,
        })
        .chain(grouped_layers(model))
        .collect()
}

/// One layer per group of every grouped convolution whose weight (and bias)
/// are parameters, undilated and not transposed (dilated patches are not
/// what `conv::patches` forms).
fn grouped_layers(model: &Model) -> Vec<Layer> {
    let nodes = model.graph.nodes();
    let param = |n: NodeId| match nodes[n] {
        Op::Param(op::Param { index }) => Some(index),
        _ => None,
    };
    let mut out = Vec::new();
    for (node, op) in nodes.iter().enumerate() {
        let Op::GroupedConv(gc) = op else { continue };
        let Some(weight) = param(gc.weight) else { continue };
        if gc.transposed_hw.is_some() || gc.grouping.dilation != 1 {
            continue;
        }
        let bias = gc.bias.and_then(param);
        let shape = &model.params[weight].shape;
        let groups = gc.grouping.groups;
        for k in 0..groups {
            out.push(Layer {
                node,
                weight,
                bias,
                conv: Some(gc.geometry),
                group: Some((k, groups)),
                s_dim: shape[0] / groups,
                a_dim: shape[1..].iter().product::<usize>() + bias.is_some() as usize,
            });
        }
    }
    out
}

/// The parameters BatchNorm nodes read (γ and β): those K-FAC gives a diagonal.
fn batch_norm_params(model: &Model) -> Vec<usize> {
    model
        .graph
        .nodes()
        .iter()
        .filter_map(|op| match op {
            Op::BatchNorm(bn) => Some([bn.weight, bn.bias]),
            _ => None,
        })
        .flatten()
        .collect()
}

/// Sums per-process accumulators over all processes (no-op in one process).
fn allreduce_nested(parts: &mut [Vec<f64>]) {
    if !hvp_dist::is_distributed() {
        return;
    }
    let mut flat: Vec<f64> = parts.iter().flatten().copied().collect();
    hvp_dist::allreduce_sum(&mut flat);
    let mut at = 0;
    for p in parts.iter_mut() {
        let n = p.len();
        p.copy_from_slice(&flat[at..at + n]);
        at += n;
    }
}

/// `[rows, cols]` row-major f64 tensor.
fn mat(rows: usize, cols: usize, data: Vec<f64>) -> Tensor<f64> {
    Tensor::new(vec![rows, cols], data).expect("rows*cols")
}

/// Inputs of one example as the columns of `[a_dim, T]` (bias row of ones appended).
fn example_inputs(layer: &Layer, x: &Tensor<f64>, w_shape: &[usize], i: usize) -> Tensor<f64> {
    match layer.conv {
        Some(g) => {
            let s = x.shape();
            let size = s[1] * s[2] * s[3];
            let mut cols = conv::patches(&x.data()[i * size..(i + 1) * size], &s[1..], w_shape, g);
            let t = cols.len() / (layer.a_dim - layer.bias.is_some() as usize);
            if layer.bias.is_some() {
                cols.extend(std::iter::repeat_n(1.0, t));
            }
            mat(layer.a_dim, t, cols)
        }
        None => {
            // `[in, T]` (T = 1, or an example's tokens).
            let width = x.rows_cols().1;
            let mut a = x.data()[i * width..(i + 1) * width].to_vec();
            let t = width / (layer.a_dim - layer.bias.is_some() as usize);
            if layer.bias.is_some() {
                a.extend(std::iter::repeat_n(1.0, t));
            }
            mat(layer.a_dim, t, a)
        }
    }
}

/// Output cotangent of one example as `[s_dim, T]`.
fn example_grads(layer: &Layer, gy: &Tensor<f64>, i: usize) -> Tensor<f64> {
    let (b, per) = gy.rows_cols();
    debug_assert!(i < b);
    let t = per / layer.s_dim;
    mat(layer.s_dim, t, gy.data()[i * per..(i + 1) * per].to_vec())
}

/// Example i's weight gradient `G_i = Σ_t g_t ā_tᵀ` in the factors' eigenbases, `Q_Sᵀ G_i Q_A`.
fn projected_gradient(
    l: &Layer,
    x: &Tensor<f64>,
    gy: &Tensor<f64>,
    w_shape: &[usize],
    i: usize,
    qs: &Tensor<f64>,
    qa: &Tensor<f64>,
) -> Tensor<f64> {
    let a = example_inputs(l, x, w_shape, i);
    let g = example_grads(l, gy, i);
    let grad = matmul_with(&g, false, &a, true, Par::Serial);
    matmul_with(
        &matmul_with(qs, true, &grad, false, Par::Serial),
        false,
        qa,
        false,
        Par::Serial,
    )
}

/// `Σ_i f(i)` over the examples of a batch, in parallel over fixed groups of
/// examples summed in order, so the result does not depend on the thread count.
fn sum_over_examples(b: usize, len: usize, f: impl Fn(usize, &mut [f64]) + Sync) -> Vec<f64> {
    sum_over_examples_with(b, len, || (), |_, i, acc| f(i, acc))
}

/// [`sum_over_examples`] with buffers made by `init` once per group of
/// examples and handed to every `f` of the group.
fn sum_over_examples_with<S>(
    b: usize,
    len: usize,
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, usize, &mut [f64]) + Sync,
) -> Vec<f64> {
    const GROUP: usize = 8;
    let starts: Vec<usize> = (0..b).step_by(GROUP).collect();
    let parts: Vec<Vec<f64>> = starts
        .par_iter()
        .map(|&s| {
            let mut acc = vec![0.0; len];
            let mut buffers = init();
            for i in s..(s + GROUP).min(b) {
                f(&mut buffers, i, &mut acc);
            }
            acc
        })
        .collect();
    let mut total = vec![0.0; len];
    for p in parts {
        total.iter_mut().zip(p).for_each(|(t, v)| *t += v);
    }
    total
}

/// Accumulators of one pass.
struct Sums {
    a: Vec<Vec<f64>>,
    s: Vec<Vec<f64>>,
    corrected: Vec<Vec<f64>>,
    diag: Vec<Vec<f64>>,
}

/// Sees (node, op, input, output cotangent, first cotangent sample of the batch).
type Visitor<'a> = TypedVisitor<'a, f64>;

/// A [`Visitor`] of values in the compute dtype `T`.
type TypedVisitor<'a, T> = &'a mut dyn FnMut(NodeId, &Op, &Tensor<T>, &Tensor<T>, bool);

/// Streams the data once in the problem's dtype, showing each batch's observed
/// layers to `visit`, once per cotangent sample (one backward pass each), and
/// calling `sample_end(batch size)` after each sample's backward pass.
fn stream_observed(
    problem: &Problem,
    fisher: FisherKind,
    seed: u64,
    progress: &dyn Fn(usize),
    visit: Visitor,
    sample_end: &mut dyn FnMut(usize),
) -> Result<(), SolverError> {
    let mut visit_f32 = |node: NodeId, op: &Op, x: &Tensor<f32>, gy: &Tensor<f32>, first: bool| {
        visit(node, op, &x.cast(), &gy.cast(), first)
    };
    match problem.dtype() {
        DType::F32 => stream_observed_as::<f32>(problem, fisher, seed, progress, &mut visit_f32, sample_end),
        DType::F64 => stream_observed_as::<f64>(problem, fisher, seed, progress, visit, sample_end),
    }
}

/// `t` `[..., features]` with the batch at `batch_axis` as `[B, features, tokens]`:
/// each example's tokens side by side, as a convolution's output positions lie.
fn by_example<T: Float>(t: &Tensor<T>, batch_axis: usize) -> Tensor<T> {
    let rank = t.shape().len();
    let mut perm = vec![batch_axis, rank - 1];
    perm.extend((0..rank - 1).filter(|&a| a != batch_axis));
    let moved = hvp_tensor::nd::permute(t, &perm);
    let (b, f) = (moved.shape()[0], moved.shape()[1]);
    let tokens = moved.numel() / (b * f).max(1);
    moved.reshape(&[b, f, tokens]).expect("same elements")
}

/// [`stream_observed`] showing the layers' values in the compute dtype `T`.
pub(super) fn stream_observed_as<T: Float>(
    problem: &Problem,
    fisher: FisherKind,
    seed: u64,
    progress: &dyn Fn(usize),
    visit: TypedVisitor<T>,
    sample_end: &mut dyn FnMut(usize),
) -> Result<(), SolverError> {
    stream_observed_from(problem, fisher, seed, 0, progress, visit, sample_end, &mut |_| Ok(()))
}

/// [`stream_observed_as`] from batch number `first_batch` on (a resumed
/// pass: the examples before it are counted as done), calling
/// `batch_end(batches done)` after each batch.
#[allow(clippy::too_many_arguments)]
fn stream_observed_from<T: Float>(
    problem: &Problem,
    fisher: FisherKind,
    seed: u64,
    first_batch: usize,
    progress: &dyn Fn(usize),
    visit: TypedVisitor<T>,
    sample_end: &mut dyn FnMut(usize),
    batch_end: &mut dyn FnMut(usize) -> Result<(), SolverError>,
) -> Result<(), SolverError> {
    let model = problem.model;
    let params: Vec<Tensor<T>> = problem.weights.params_as();
    let buffers: Vec<Tensor<T>> = problem.weights.buffers_as();
    let graph: &Graph = &model.graph;
    let skipped = (first_batch * problem.batch_size.max(1)).min(hvp_dist::shard(problem.data.len()).len());
    if skipped > 0 {
        progress(skipped * hvp_dist::size());
    }
    problem.for_each_batch_from(first_batch, |k, idx, batch| {
        let start = idx[0];
        let mut shape = vec![idx.len()];
        shape.extend(problem.data.sample_shape());
        let x = Tensor::new(shape, batch.x.iter().map(|&v| T::from_f64(v)).collect()).expect("batch shape");
        let tape: Tape<Tensor<T>> = graph.forward(&params, &buffers, x);
        let logits = tape.output().cast::<f64>();
        let samples = cotangent_samples(&logits, batch_targets(batch), fisher, seed, start);
        let last = samples.len() - 1;
        let mut tape = Some(tape);
        for (k, cot) in samples.iter().enumerate() {
            let first = k == 0;
            let mut obs = |node: NodeId, op: &Op, input: &Tensor<T>, gy: &Tensor<T>| match op {
                // Tokens laid out as a 1×1 convolution's positions: `[B, features, T]`.
                Op::TokenDense(td) => {
                    let (x, g) = (by_example(input, td.batch_axis), by_example(gy, td.batch_axis));
                    visit(node, op, &x, &g, first)
                }
                _ => visit(node, op, input, gy, first),
            };
            // Each backward pass consumes a tape: copy it only while more samples follow.
            let this = if k == last { tape.take() } else { tape.clone() }.expect("tape kept until the last sample");
            graph.observe_backward(&params, &buffers, this, cot.cast::<T>(), &mut obs);
            sample_end(idx.len());
        }
        progress(idx.len() * hvp_dist::size());
        batch_end(k + 1)
    })
}

/// [`stream_observed_from`] handing `sums` to `saver` after each batch (the
/// factor passes' checkpoints).
#[allow(clippy::too_many_arguments)]
fn stream_checkpointed<T: Float>(
    problem: &Problem,
    fisher: FisherKind,
    seed: u64,
    first_batch: usize,
    progress: &dyn Fn(usize),
    visit: TypedVisitor<T>,
    sums: &std::cell::RefCell<&mut Sums>,
    saver: &mut Option<checkpoint::Saver>,
) -> Result<(), SolverError> {
    let mut batch_end = |done: usize| match saver {
        Some(saver) => saver.after_batch(done, &sums.borrow()),
        None => Ok(()),
    };
    stream_observed_from::<T>(
        problem,
        fisher,
        seed,
        first_batch,
        progress,
        visit,
        &mut |_| {},
        &mut batch_end,
    )
}

impl Factors {
    /// Computes the factors of `problem` (one pass; EK-FAC a second one).
    pub fn compute(
        problem: &Problem,
        kind: FactorKind,
        fisher: FisherKind,
        seed: u64,
        progress: &dyn Fn(usize),
    ) -> Result<Factors, SolverError> {
        Self::compute_checkpointed(problem, kind, fisher, seed, progress, None)
    }

    /// [`Factors::compute`] saving its running sums to `checkpoint` as it
    /// goes and, when the checkpoint holds an earlier run of the same
    /// configuration, continuing from it: the result is bit for bit the
    /// uninterrupted one (the sums are added batch by batch in the same order).
    /// The caller removes the checkpoint ([`Checkpoint::discard`]) once the
    /// factors are stored. Under MPI the checkpoint is not used.
    pub fn compute_checkpointed(
        problem: &Problem,
        kind: FactorKind,
        fisher: FisherKind,
        seed: u64,
        progress: &dyn Fn(usize),
        checkpoint: Option<&Checkpoint>,
    ) -> Result<Factors, SolverError> {
        let checkpoint = checkpoint.filter(|_| !hvp_dist::is_distributed());
        let model = problem.model;
        let layers = layers_of(model);
        let n = problem.data.len() as f64;
        let in_layer: Vec<bool> = (0..model.params.len())
            .map(|p| layers.iter().any(|l| l.weight == p || l.bias == Some(p)))
            .collect();
        // The factors, their eigenbases and the per-thread partial sums: about
        // four copies of every A (in×in) and S (out×out) matrix, in f64.
        let elements = layers.iter().fold(0u64, |acc, l| {
            let (a, s) = (l.a_dim as u64, l.s_dim as u64);
            acc.saturating_add((a * a).saturating_add(s * s).saturating_add(a * s))
        });
        hvp_io::memory::check_fits(
            elements.saturating_mul(8 * 4),
            "the Kronecker factors",
            "restrict the parameters (`params`) or use `solver` cg",
        )
        .map_err(|e| SolverError::BadOption(e.to_string()))?;
        let mut sums = Sums {
            a: layers.iter().map(|l| vec![0.0; l.a_dim * l.a_dim]).collect(),
            s: layers.iter().map(|l| vec![0.0; l.s_dim * l.s_dim]).collect(),
            corrected: layers.iter().map(|l| vec![0.0; l.s_dim * l.a_dim]).collect(),
            diag: model.params.iter().map(|p| vec![0.0; p.numel()]).collect(),
        };
        let key = checkpoint.map(|_| cache_key(problem, kind, fisher, seed)).transpose()?;
        let mut saver = match (checkpoint, &key) {
            (Some(c), Some(key)) => Some(checkpoint::Saver::new(c, key, problem.batch_size)),
            _ => None,
        };
        let at_stage = |saver: &mut Option<checkpoint::Saver>, stage| {
            if let Some(s) = saver.as_mut() {
                s.stage = stage;
            }
        };
        let resumed = match (checkpoint, &key) {
            (Some(c), Some(key)) if c.resume => checkpoint::load(c, key, problem.batch_size, &mut sums)?,
            _ => None,
        };
        let (stage, first_batch) = resumed.unwrap_or((checkpoint::Stage::Covariance, 0));
        if stage == checkpoint::Stage::Covariance {
            at_stage(&mut saver, checkpoint::Stage::Covariance);
            match problem.dtype() {
                DType::F32 => Self::first_pass::<f32>(
                    problem,
                    &layers,
                    fisher,
                    seed,
                    first_batch,
                    progress,
                    &mut sums,
                    &mut saver,
                )?,
                DType::F64 => Self::first_pass::<f64>(
                    problem,
                    &layers,
                    fisher,
                    seed,
                    first_batch,
                    progress,
                    &mut sums,
                    &mut saver,
                )?,
            }
        } else {
            // The first pass is complete in the checkpoint.
            progress(problem.data.len());
        }
        allreduce_nested(&mut sums.a);
        allreduce_nested(&mut sums.s);
        allreduce_nested(&mut sums.diag);
        let mut out_layers = Vec::with_capacity(layers.len());
        for (li, l) in layers.iter().enumerate() {
            let a: Vec<f64> = sums.a[li].iter().map(|v| v / n).collect();
            let s: Vec<f64> = sums.s[li].iter().map(|v| v / n).collect();
            let (a_vals, a_vecs) = crate::dense::sym_eigen(l.a_dim, &a)?;
            let (s_vals, s_vecs) = crate::dense::sym_eigen(l.s_dim, &s)?;
            out_layers.push(LayerFactors {
                weight: l.weight,
                bias: l.bias,
                row0: l.row0(),
                a_vals,
                a_vecs,
                s_vals,
                s_vecs,
                corrected: None,
            });
        }
        if kind == FactorKind::Ekfac {
            let first_batch = if stage == checkpoint::Stage::Correction {
                first_batch
            } else {
                0
            };
            at_stage(&mut saver, checkpoint::Stage::Correction);
            let factors = &out_layers;
            match problem.dtype() {
                DType::F32 => Self::correction_pass::<f32>(
                    problem,
                    &layers,
                    factors,
                    fisher,
                    seed,
                    first_batch,
                    progress,
                    &mut sums,
                    &mut saver,
                )?,
                DType::F64 => Self::correction_pass::<f64>(
                    problem,
                    &layers,
                    factors,
                    fisher,
                    seed,
                    first_batch,
                    progress,
                    &mut sums,
                    &mut saver,
                )?,
            }
            allreduce_nested(&mut sums.corrected);
            for (li, f) in out_layers.iter_mut().enumerate() {
                f.corrected = Some(sums.corrected[li].iter().map(|v| v / n).collect());
            }
        }
        // Only BatchNorm's γ and β get a diagonal; any other parameter outside
        // the layers has no curvature estimate and is left to the damping.
        let with_diagonal = batch_norm_params(model);
        let diagonal = (0..model.params.len())
            .filter(|&p| !in_layer[p] && with_diagonal.contains(&p))
            .map(|p| (p, sums.diag[p].iter().map(|v| v / n).collect()))
            .collect();
        Ok(Factors {
            kind,
            layers: out_layers,
            diagonal,
            examples: problem.data.len(),
        })
    }

    /// The first pass: `A` and `S` of every layer (batched GEMMs in the compute
    /// dtype `T`, summed in f64) and the diagonal of the other parameters.
    #[allow(clippy::too_many_arguments)]
    fn first_pass<T: Float>(
        problem: &Problem,
        layers: &[Layer],
        fisher: FisherKind,
        seed: u64,
        first_batch: usize,
        progress: &dyn Fn(usize),
        sums: &mut Sums,
        saver: &mut Option<checkpoint::Saver>,
    ) -> Result<(), SolverError> {
        let model = problem.model;
        let buffers = &problem.weights.buffers;
        let sums = std::cell::RefCell::new(sums);
        let mut visit = |node: NodeId, op: &Op, x: &Tensor<T>, gy: &Tensor<T>, first: bool| {
            let mut sums = sums.borrow_mut();
            let sums = &mut **sums;
            for (li, l) in layers.iter().enumerate().filter(|(_, l)| l.node == node) {
                let (x, gy) = l.view(x, gy);
                let a = if first { Some(sums.a[li].as_mut_slice()) } else { None };
                statistics::add_covariances(l, &x, &gy, &l.w_shape(model), &mut sums.s[li], a);
            }
            if let Op::BatchNorm(op::BatchNorm {
                weight,
                bias,
                stats: op::BatchNormStats { mean, var, eps },
                ..
            }) = *op
            {
                bn_diagonal(x, gy, &buffers[mean], &buffers[var], eps, &mut sums.diag, weight, bias);
            }
        };
        stream_checkpointed::<T>(problem, fisher, seed, first_batch, progress, &mut visit, &sums, saver)
    }

    /// EK-FAC's second pass: each layer's per-example gradients in the factors'
    /// eigenbases, squared and summed.
    #[allow(clippy::too_many_arguments)]
    fn correction_pass<T: Float>(
        problem: &Problem,
        layers: &[Layer],
        factors: &[LayerFactors],
        fisher: FisherKind,
        seed: u64,
        first_batch: usize,
        progress: &dyn Fn(usize),
        sums: &mut Sums,
        saver: &mut Option<checkpoint::Saver>,
    ) -> Result<(), SolverError> {
        let model = problem.model;
        let bases: Vec<(Tensor<T>, Tensor<T>)> = layers
            .iter()
            .zip(factors)
            .map(|(l, f)| {
                (
                    mat(l.a_dim, l.a_dim, f.a_vecs.clone()).cast(),
                    mat(l.s_dim, l.s_dim, f.s_vecs.clone()).cast(),
                )
            })
            .collect();
        let sums = std::cell::RefCell::new(sums);
        let mut visit = |node: NodeId, _: &Op, x: &Tensor<T>, gy: &Tensor<T>, _: bool| {
            let mut sums = sums.borrow_mut();
            for (li, l) in layers.iter().enumerate().filter(|(_, l)| l.node == node) {
                let (qa, qs) = &bases[li];
                let (x, gy) = l.view(x, gy);
                statistics::add_corrections(l, &x, &gy, &l.w_shape(model), qa, qs, &mut sums.corrected[li]);
            }
        };
        stream_checkpointed::<T>(problem, fisher, seed, first_batch, progress, &mut visit, &sums, saver)
    }

    /// Names of the parameters with neither Kronecker factors nor a diagonal
    /// (outside Linear/Conv2d layers and BatchNorm: LayerNorm scales, grouped
    /// convolutions, attention weights used through MatMul, embeddings): the
    /// approximation treats their block as zero, so its inverse is `1/λ` there.
    pub fn uncovered(&self, model: &Model) -> Vec<String> {
        let mut covered = vec![false; model.params.len()];
        for f in &self.layers {
            covered[f.weight] = true;
            if let Some(b) = f.bias {
                covered[b] = true;
            }
        }
        for (p, _) in &self.diagonal {
            covered[*p] = true;
        }
        (0..model.params.len())
            .filter(|&p| !covered[p])
            .map(|p| model.params[p].name.clone())
            .collect()
    }

    /// `(F̂ + λI)⁻¹ v` with F̂ the K-FAC / EK-FAC approximation. Parameters with
    /// neither factors nor a diagonal get `v / λ`.
    pub fn inverse_product(&self, v: &ParamVector, damping: f64) -> ParamVector {
        let mut out = self.inverse_products(std::slice::from_ref(v), damping);
        out.pop().expect("one vector in, one out")
    }

    /// [`Factors::inverse_product`] of every vector, each layer's rotations
    /// done for all vectors at once: with the vectors' `[s, a]` blocks laid
    /// side by side (`[s, Q·a]`, or `[s·Q, a]` read the other way) the
    /// eigenbasis products are four GEMMs per layer instead of four per vector.
    pub fn inverse_products(&self, vs: &[ParamVector], damping: f64) -> Vec<ParamVector> {
        self.inverse_products_in(DType::F64, vs, damping)
    }

    /// [`Factors::inverse_products`] with the rotations and eigenvalue
    /// scaling computed in `dtype` (the results are f64 either way). An f32
    /// problem's solves use f32: on the seed ResNet (N = 2,000, 100 test
    /// points) its scores moved by under 1e-6 of their largest, against the
    /// 2e-4 that the f32 per-example gradients themselves differ from f64,
    /// and the products took 0.32 s instead of 0.46 s.
    pub fn inverse_products_in(&self, dtype: DType, vs: &[ParamVector], damping: f64) -> Vec<ParamVector> {
        match dtype {
            DType::F32 => self.inverse_products_as::<f32>(vs, damping),
            DType::F64 => self.inverse_products_as::<f64>(vs, damping),
        }
    }

    fn inverse_products_as<T: Float>(&self, vs: &[ParamVector], damping: f64) -> Vec<ParamVector> {
        let q_all = vs.len();
        let mut outs: Vec<ParamVector> = vs.to_vec();
        if q_all == 0 {
            return outs;
        }
        let tensors = vs[0].tensors.len();
        let mut done = vec![false; tensors];
        // The vectors a chunk at a time, in two buffers sized once for the
        // largest layer: at a thousand vectors the `[s, Q, a]` blocks of one
        // layer took 300 MB each, and every one was fresh memory to fault in.
        const CHUNK: usize = 32;
        let largest = self.layers.iter().map(|f| f.s_dim() * f.a_dim()).max().unwrap_or(0);
        let mut vm = vec![T::ZERO; largest * CHUNK.min(q_all)];
        let mut left = vec![T::ZERO; vm.len()];
        for f in &self.layers {
            let (s, a) = (f.s_dim(), f.a_dim());
            let win = a - f.bias.is_some() as usize;
            let rows = f.row0..f.row0 + s;
            let s_vecs: Cow<[T]> = T::from_f64_slice(&f.s_vecs);
            let a_vecs: Cow<[T]> = T::from_f64_slice(&f.a_vecs);
            for first in (0..q_all).step_by(CHUNK) {
                let chunk = &vs[first..(first + CHUNK).min(q_all)];
                let q = chunk.len();
                let (vm, left) = (&mut vm[..s * q * a], &mut left[..s * q * a]);
                // `[s, Q, a]`: row r of every vector's block, vector after
                // vector; rows in parallel.
                vm.par_chunks_mut((q * a).max(1)).enumerate().for_each(|(r, block)| {
                    let wr = f.row0 + r;
                    for (v, at) in chunk.iter().zip(block.chunks_exact_mut(a.max(1))) {
                        let w = &v.tensors[f.weight].data()[wr * win..(wr + 1) * win];
                        at[..win].iter_mut().zip(w).for_each(|(x, &y)| *x = T::from_f64(y));
                        if let Some(b) = f.bias {
                            at[a - 1] = T::from_f64(v.tensors[b].data()[wr]);
                        }
                    }
                });
                // Q_Sᵀ V Q_A: `[s, s]ᵀ × [s, Q·a]`, then `[s·Q, a] × [a, a]`.
                gemm_into(left, &s_vecs, true, vm, false, s, q * a, s, false, Par::Pool);
                gemm_into(vm, left, false, &a_vecs, false, s * q, a, a, false, Par::Pool);
                // Row r of every vector's block at a time, in parallel (not an
                // index division and remainder per entry on one thread).
                vm.par_chunks_mut((q * a).max(1)).enumerate().for_each(|(r, block)| {
                    for row in block.chunks_exact_mut(a.max(1)) {
                        match &f.corrected {
                            Some(corr) => row
                                .iter_mut()
                                .zip(&corr[r * a..(r + 1) * a])
                                .for_each(|(x, e)| *x = T::from_f64(x.to_f64() / (e.max(0.0) + damping))),
                            None => row.iter_mut().zip(&f.a_vals).for_each(|(x, av)| {
                                *x = T::from_f64(x.to_f64() / ((f.s_vals[r] * av).max(0.0) + damping))
                            }),
                        }
                    }
                });
                // Back: `[s, s] × [s, Q·a]`, then `[s·Q, a] × [a, a]ᵀ`.
                gemm_into(left, &s_vecs, false, vm, false, s, q * a, s, false, Par::Pool);
                gemm_into(vm, left, false, &a_vecs, true, s * q, a, a, false, Par::Pool);
                outs[first..first + q].par_iter_mut().enumerate().for_each(|(k, out)| {
                    let wt = out.tensors[f.weight].data_mut();
                    for (r, wr) in rows.clone().enumerate() {
                        let at = (r * q + k) * a;
                        wt[wr * win..(wr + 1) * win]
                            .iter_mut()
                            .zip(&vm[at..at + win])
                            .for_each(|(x, y)| *x = y.to_f64());
                    }
                    if let Some(b) = f.bias {
                        let bias = out.tensors[b].data_mut();
                        for (r, wr) in rows.clone().enumerate() {
                            bias[wr] = vm[(r * q + k) * a + a - 1].to_f64();
                        }
                    }
                });
            }
            done[f.weight] = true;
            if let Some(b) = f.bias {
                done[b] = true;
            }
        }
        for (p, _) in &self.diagonal {
            done[*p] = true;
        }
        for out in &mut outs {
            for (p, d) in &self.diagonal {
                out.tensors[*p]
                    .data_mut()
                    .iter_mut()
                    .zip(d)
                    .for_each(|(x, di)| *x /= di.max(0.0) + damping);
            }
            for (p, t) in out.tensors.iter_mut().enumerate() {
                if !done[p] {
                    t.data_mut().iter_mut().for_each(|x| *x /= damping);
                }
            }
        }
        outs
    }

    /// The K-FAC view of these factors: EK-FAC's corrected eigenvalues dropped.
    pub fn without_corrections(mut self) -> Factors {
        self.kind = FactorKind::Kfac;
        self.layers.iter_mut().for_each(|l| l.corrected = None);
        self
    }
}

/// Per-example gradients of BatchNorm's γ and β: `(Σ gy·x̂, Σ gy)` per channel.
fn bn_example_grads<T: Float>(
    x: &Tensor<T>,
    gy: &Tensor<T>,
    mean: &Tensor<f64>,
    var: &Tensor<f64>,
    eps: f64,
) -> Vec<(Vec<f64>, Vec<f64>)> {
    let c = x.shape()[1];
    bn_example_rows(x, gy, mean, var, eps)
        .chunks_exact(2 * c.max(1))
        .map(|row| (row[..c].to_vec(), row[c..].to_vec()))
        .collect()
}

/// [`bn_example_grads`] as rows `[B, 2C]`: each example's γ gradient, then its β gradient.
fn bn_example_rows<T: Float>(
    x: &Tensor<T>,
    gy: &Tensor<T>,
    mean: &Tensor<f64>,
    var: &Tensor<f64>,
    eps: f64,
) -> Vec<f64> {
    // Σ gy·(x − μ)/σ = (Σ gy·x − μ Σ gy)/σ: two plane reductions in the
    // compute dtype (as the gradient pass sums them), combined in f64.
    let c = x.shape()[1];
    let (dots, sums) = hvp_tensor::channel::dot_and_sum_per_example(x, gy);
    let mut rows = Vec::with_capacity(2 * dots.len());
    for (d, s) in dots.chunks_exact(c.max(1)).zip(sums.chunks_exact(c.max(1))) {
        let stats = mean.data().iter().zip(var.data()).take(c);
        rows.extend(d.iter().zip(s).zip(stats).map(|((d, s), (&mu, &v))| {
            let (d, s) = (d.to_f64(), s.to_f64());
            (d - mu * s) / (v + eps).sqrt()
        }));
        rows.extend(s.iter().map(|v| v.to_f64()));
    }
    rows
}

/// Adds the squared per-example gradients of BatchNorm's γ and β to `diag`.
#[allow(clippy::too_many_arguments)]
fn bn_diagonal<T: Float>(
    x: &Tensor<T>,
    gy: &Tensor<T>,
    mean: &Tensor<f64>,
    var: &Tensor<f64>,
    eps: f64,
    diag: &mut [Vec<f64>],
    gamma: usize,
    beta: usize,
) {
    for (gg, gb) in bn_example_grads(x, gy, mean, var, eps) {
        diag[gamma].iter_mut().zip(&gg).for_each(|(d, g)| *d += g * g);
        diag[beta].iter_mut().zip(&gb).for_each(|(d, g)| *d += g * g);
    }
}

/// `x = (F̂ + λI)⁻¹ g` from the factors, with the residual measured on the exact
/// operator `exact` (= M + λI).
pub fn solve(
    factors: &Factors,
    exact: &dyn LinearOperator,
    (damping, dtype): (f64, DType),
    g: &ParamVector,
) -> Result<(ParamVector, SolveReport), SolverError> {
    let start = Instant::now();
    let p0 = exact.products();
    let x = factors
        .inverse_products_in(dtype, std::slice::from_ref(g), damping)
        .remove(0);
    let report = SolveReport {
        iterations: 1,
        ..SolveReport::approximate(match factors.kind {
            FactorKind::Kfac => "kfac",
            FactorKind::Ekfac => "ekfac",
        })
    };
    let report = finish(exact, g, &x, report, p0, start)?;
    Ok((x, report))
}

/// [`solve`] for several right-hand sides, the exact residuals of the first
/// `measured` from one block product (the others' reports say theirs was not
/// measured).
pub fn solve_many(
    factors: &Factors,
    exact: &dyn LinearOperator,
    (damping, dtype): (f64, DType),
    gs: &[ParamVector],
    measured: usize,
) -> Result<Vec<(ParamVector, SolveReport)>, SolverError> {
    let start = Instant::now();
    let xs: Vec<ParamVector> = factors.inverse_products_in(dtype, gs, damping);
    let report = SolveReport {
        iterations: 1,
        ..SolveReport::approximate(match factors.kind {
            FactorKind::Kfac => "kfac",
            FactorKind::Ekfac => "ekfac",
        })
    };
    let measured = measured.min(gs.len());
    let measured = crate::finish_many(
        exact,
        &gs[..measured],
        &xs[..measured],
        vec![report.clone(); measured],
        start,
    )?;
    let reports = crate::with_unmeasured(measured, &report, &xs, start);
    Ok(xs.into_iter().zip(reports).collect())
}
