//! Gradient, Hessian-vector and Gauss-Newton-vector products of the training
//! loss `L(θ) = (1/N) Σ_i ℓ(f(x_i; θ), y_i)` over a whole dataset, streamed batch
//! by batch: memory is one batch of activations (plus their tangents) whatever
//! N is, and per-batch results are accumulated in f64 whatever the compute dtype,
//! so the result does not depend on the batch size beyond rounding.
//!
//! * Hessian: forward-over-reverse (the backward pass on dual numbers whose
//!   tangent is `v`); the gradient's tangent is `H v`.
//! * GGN: `Jᵀ H_out J v` — a JVP of the logits, the loss's output-space
//!   Hessian, then one plain VJP.
//!
//! The loss is softmax cross-entropy on class labels, or mean squared error
//! when the data carries float regression targets ([`hvp_data::Dataset::target_width`]).

pub mod frozen;
pub mod subsample;
use hvp_autodiff::loss::{self, Targets};
use hvp_autodiff::{Dual, Graph, Tape, Value};
use hvp_data::{check_labels, check_token_ids, Batch, DataError, Dataset};
use hvp_model::{Model, ParamVector, Weights};
use hvp_tensor::{DType, Float, Tensor};
use rayon::prelude::*;

/// What a batch's outputs are compared with: its float targets (MSE) when it
/// has any, else its class labels (softmax cross-entropy).
pub fn batch_targets(batch: &Batch) -> Targets<'_> {
    if batch.targets.is_empty() {
        Targets::Classes(&batch.labels)
    } else {
        Targets::Values(&batch.targets)
    }
}

/// Owned targets of a sub-batch.
enum OwnedTargets {
    Classes(Vec<usize>),
    Values(Vec<f64>),
}

impl OwnedTargets {
    fn as_targets(&self) -> Targets<'_> {
        match self {
            OwnedTargets::Classes(c) => Targets::Classes(c),
            OwnedTargets::Values(v) => Targets::Values(v),
        }
    }
}

/// Node values (activations, and a dual's tangents alike) one sub-batch should
/// hold at most by default: 8 M elements, 16–17 images of the seed ResNet
/// (about 467 k elements each), where `hvp bench` measured its best times (the
/// gradient 7% and the HVP 2% faster than one sub-batch per thread, at a fifth
/// of the memory; docs/performance.md). Models with small activations (MLPs)
/// keep one sub-batch per thread.
pub const SUB_BATCH_ELEMENTS: usize = 8 << 20;

/// `batch` cut into at most `parts` contiguous sub-batches (count, inputs, targets).
fn split_batch(batch: &Batch, sample: usize, parts: usize) -> Vec<(usize, Vec<f64>, OwnedTargets)> {
    let n = batch.len();
    let parts = parts.clamp(1, n.max(1));
    let width = if batch.targets.is_empty() {
        0
    } else {
        batch.targets.len() / n.max(1)
    };
    (0..parts)
        .map(|p| {
            let (lo, hi) = (p * n / parts, (p + 1) * n / parts);
            let targets = if width == 0 {
                OwnedTargets::Classes(batch.labels[lo..hi].to_vec())
            } else {
                OwnedTargets::Values(batch.targets[lo * width..hi * width].to_vec())
            };
            (hi - lo, batch.x[lo * sample..hi * sample].to_vec(), targets)
        })
        .filter(|(count, _, _)| *count > 0)
        .collect()
}

/// Which curvature matrix a product is taken with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Curvature {
    /// The exact Hessian of the training loss.
    Hessian,
    /// The generalised Gauss-Newton matrix `Jᵀ H_out J` (positive semi-definite).
    Ggn,
    /// The empirical Fisher `(1/N) Σ_i ∇ℓ_i ∇ℓ_iᵀ` (positive semi-definite).
    Fisher,
}

#[derive(Debug, thiserror::Error)]
pub enum CurvatureError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("the data does not fit the model: {0}")]
    Input(String),
    #[error("the dataset is empty")]
    Empty,
    #[error(transparent)]
    Memory(#[from] hvp_io::IoError),
    #[error("interrupted")]
    Interrupted,
    #[error("the {what} contains NaN or infinite values after batch {batch}; the model or vector overflows in this dtype (try `dtype` f64)")]
    NonFinite { what: &'static str, batch: usize },
}

/// A model, its weights and a dataset: the training loss whose derivatives we take.
pub struct Problem<'a> {
    pub model: &'a Model,
    pub weights: &'a Weights,
    pub data: &'a dyn Dataset,
    pub batch_size: usize,
    /// L2 coefficient w of the objective `L(θ) + (w/2)‖θ‖²`: adds `wθ` to the
    /// gradient and `w·I` to every curvature (0 by default).
    pub weight_decay: f64,
    /// Sub-batches each batch is cut into (`None`: see [`Problem::sub_batch_count`]).
    /// Private, so that a `Problem` exists only through [`Problem::new`].
    sub_batches: Option<usize>,
    /// Elements of all node values of one example (what a sub-batch holds per example).
    example_elements: usize,
    /// The compute dtype of every pass (see [`Problem::with_dtype`]).
    dtype: DType,
    /// Told of each batch before it is read (see [`Problem::with_watch`]).
    watch: Option<Watch>,
}

/// Called before each batch of every pass — gradients, products, scores,
/// factors, and so every solver iteration — with the batch's number of
/// examples: a progress bar that also covers solves, and a way to stop. `false`
/// stops the pass with [`CurvatureError::Interrupted`] (e.g. on Ctrl-C).
pub type Watch = std::sync::Arc<dyn Fn(usize) -> bool + Send + Sync>;

/// Result of one pass over the data.
#[derive(Clone, Debug)]
pub struct PassResult {
    /// Mean loss over the N examples.
    pub loss: f64,
    /// Gradient or product, in f64.
    pub value: ParamVector,
    pub examples: usize,
}

impl<'a> Problem<'a> {
    /// Checks that the data fits the model (shape, label range) before any pass.
    pub fn new(
        model: &'a Model,
        weights: &'a Weights,
        data: &'a dyn Dataset,
        batch_size: usize,
    ) -> Result<Self, CurvatureError> {
        if data.is_empty() {
            return Err(CurvatureError::Empty);
        }
        model.check_input(&data.sample_shape()).map_err(CurvatureError::Input)?;
        if let Some(vocab) = model.token_vocab() {
            check_token_ids(data, vocab)?;
        }
        let param_shapes: Vec<Vec<usize>> = model.params.iter().map(|p| p.shape.clone()).collect();
        let elements = model.graph.activation_elements(&data.sample_shape(), &param_shapes);
        // Values and tangents of every node (f64 at most), plus cotangents.
        let bytes = (batch_size.min(data.len()) as u64)
            .saturating_mul(elements as u64)
            .saturating_mul(8 * 3);
        hvp_io::memory::check_fits(
            bytes,
            &format!("a batch of {} examples", batch_size.min(data.len())),
            "use a smaller `batch_size`",
        )?;
        match data.target_width() {
            None => check_labels(data, model.num_classes)?,
            Some(k) if k != model.num_classes => {
                return Err(CurvatureError::Input(format!(
                    "the regression targets have {k} values per example but the model has {} outputs",
                    model.num_classes
                )))
            }
            Some(_) => {}
        }
        Ok(Problem {
            model,
            weights,
            data,
            batch_size: batch_size.max(1),
            weight_decay: 0.0,
            sub_batches: None,
            example_elements: elements,
            dtype: DType::F32,
            watch: None,
        })
    }

    /// The same problem with the objective's L2 term `(w/2)‖θ‖²`.
    pub fn with_weight_decay(mut self, w: f64) -> Self {
        self.weight_decay = w;
        self
    }

    /// The same problem with each batch cut into `n` sub-batches (each run whole
    /// by one worker) instead of the default ([`Problem::sub_batch_count`]); `1`
    /// runs each batch as one piece with the threads inside the kernels.
    pub fn with_sub_batches(mut self, n: usize) -> Self {
        self.sub_batches = Some(n.max(1));
        self
    }

    /// The same problem computed in `dtype` (f32 by default). The one place a
    /// compute dtype is chosen: [`Problem::gradient`], [`Problem::product`] and
    /// every pass built on them (solvers, factors, scores) run in it; sums over
    /// batches are accumulated in f64 either way. The `_as::<T>` methods run one
    /// pass in an explicit float type.
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The same problem with every pass reporting its batches to `watch`,
    /// which may stop it between batches.
    pub fn with_watch(mut self, watch: Watch) -> Self {
        self.watch = Some(watch);
        self
    }

    /// The same model, weights and settings (batch size, weight decay, dtype,
    /// sub-batches) on another dataset, checked as [`Problem::new`] checks.
    pub fn on<'b>(&self, data: &'b dyn Dataset) -> Result<Problem<'b>, CurvatureError>
    where
        'a: 'b,
    {
        let mut p = Problem::new(self.model, self.weights, data, self.batch_size)?;
        p.weight_decay = self.weight_decay;
        p.sub_batches = self.sub_batches;
        p.dtype = self.dtype;
        p.watch = self.watch.clone();
        Ok(p)
    }

    /// `∇L(θ)` in the problem's dtype.
    pub fn gradient(&self, progress: &dyn Fn(usize)) -> Result<PassResult, CurvatureError> {
        match self.dtype {
            DType::F32 => self.gradient_as::<f32>(progress),
            DType::F64 => self.gradient_as::<f64>(progress),
        }
    }

    /// `M v` in the problem's dtype.
    pub fn product(
        &self,
        curvature: Curvature,
        v: &ParamVector,
        progress: &dyn Fn(usize),
    ) -> Result<PassResult, CurvatureError> {
        match self.dtype {
            DType::F32 => self.product_as::<f32>(curvature, v, progress),
            DType::F64 => self.product_as::<f64>(curvature, v, progress),
        }
    }

    /// [`Problem::loss_directional_as`] in the problem's dtype.
    pub fn loss_directional(&self, s: &ParamVector, progress: &dyn Fn(usize)) -> Result<Vec<f64>, CurvatureError> {
        match self.dtype {
            DType::F32 => self.loss_directional_as::<f32>(s, progress),
            DType::F64 => self.loss_directional_as::<f64>(s, progress),
        }
    }

    /// Predicted classes in the problem's dtype.
    pub fn predictions(&self) -> Result<Vec<usize>, CurvatureError> {
        match self.dtype {
            DType::F32 => self.predictions_as::<f32>(),
            DType::F64 => self.predictions_as::<f64>(),
        }
    }

    /// Per-example losses in the problem's dtype.
    pub fn losses(&self) -> Result<Vec<f64>, CurvatureError> {
        match self.dtype {
            DType::F32 => self.losses_as::<f32>(),
            DType::F64 => self.losses_as::<f64>(),
        }
    }

    /// Sub-batches a batch of `examples` is cut into: as many as asked
    /// ([`Problem::with_sub_batches`]), else one per worker thread, and more (a
    /// multiple of the workers) where a sub-batch's node values would exceed
    /// [`SUB_BATCH_ELEMENTS`]. Each sub-batch runs whole on one worker, layer
    /// after layer, so a small one keeps each layer's activations in that core's
    /// cache between the passes over them (rayon hands the sub-batches to the
    /// workers as they free up).
    pub fn sub_batch_count(&self, examples: usize) -> usize {
        if let Some(n) = self.sub_batches {
            return n;
        }
        let per_part = (SUB_BATCH_ELEMENTS / self.example_elements.max(1)).max(1);
        // A multiple of the workers, so that none idles at a batch's end.
        let threads = rayon::current_num_threads().max(1);
        examples.div_ceil(per_part).div_ceil(threads).max(1) * threads
    }

    fn theta(&self) -> ParamVector {
        ParamVector {
            tensors: self.weights.params.clone(),
        }
    }

    /// The one loop over the data: this rank's shard (all of it in one process)
    /// in batches of `batch_size`, read one at a time into a reused buffer;
    /// `f(batch number, example indices, batch)`. Every streamed pass — sums,
    /// per-example values, K-FAC statistics — walks the data through here.
    pub fn for_each_batch<E: From<CurvatureError>>(
        &self,
        f: impl FnMut(usize, &[usize], &Batch) -> Result<(), E>,
    ) -> Result<(), E> {
        self.for_each_batch_from(0, f)
    }

    /// [`Problem::for_each_batch`] from batch number `first` on (the batches
    /// before it are neither read nor shown to `f`): a pass resumed where an
    /// earlier one stopped.
    pub fn for_each_batch_from<E: From<CurvatureError>>(
        &self,
        first: usize,
        mut f: impl FnMut(usize, &[usize], &Batch) -> Result<(), E>,
    ) -> Result<(), E> {
        let shard = hvp_dist::shard(self.data.len());
        let size = self.batch_size.max(1);
        let mut batch = Batch::default();
        let mut indices = Vec::with_capacity(size);
        for (k, start) in shard.clone().step_by(size).enumerate().skip(first) {
            indices.clear();
            indices.extend(start..(start + size).min(shard.end));
            if self.watch.as_ref().is_some_and(|watch| !watch(indices.len())) {
                return Err(CurvatureError::Interrupted.into());
            }
            self.data.read(&indices, &mut batch).map_err(CurvatureError::from)?;
            f(k, &indices, &batch)?;
        }
        Ok(())
    }

    /// Per-example values of every example, in order: this rank streams its shard
    /// in batches, each cut into one sub-batch per worker thread, calls
    /// `f(inputs, targets)` on each (returning one value per example), and the
    /// shards are gathered over processes.
    fn per_example<T: Float>(
        &self,
        what: &'static str,
        progress: &dyn Fn(usize),
        f: impl Fn(Tensor<T>, Targets) -> Vec<f64> + Sync,
    ) -> Result<Vec<f64>, CurvatureError> {
        let sample: usize = self.data.sample_shape().iter().product();
        let mut out = Vec::with_capacity(hvp_dist::shard(self.data.len()).len());
        self.for_each_batch(|k, idx, batch| {
            let parts = split_batch(batch, sample, self.sub_batch_count(batch.len()));
            let values: Vec<Vec<f64>> = parts
                .par_iter()
                .map(|part| f(self.sub_batch_input(part), part.2.as_targets()))
                .collect();
            let before = out.len();
            out.extend(values.into_iter().flatten());
            if out[before..].iter().any(|v| !v.is_finite()) {
                return Err(CurvatureError::NonFinite { what, batch: k });
            }
            progress(idx.len() * hvp_dist::size());
            Ok(())
        })?;
        Ok(hvp_dist::gather_shards(self.data.len(), &out))
    }

    /// Per-example directional derivatives `∇ℓ_i(θ) · s` for every example, in
    /// order — a JVP of the per-example loss vector (one forward pass carrying the
    /// tangent `s`), with no per-example gradient ever formed. Influence scores
    /// are these divided by N.
    pub fn loss_directional_as<T: Float>(
        &self,
        s: &ParamVector,
        progress: &dyn Fn(usize),
    ) -> Result<Vec<f64>, CurvatureError> {
        let duals: Vec<Dual<T>> = self
            .weights
            .params_as::<T>()
            .into_iter()
            .zip(s.as_dtype::<T>())
            .map(|(p, t)| Dual::new(p, Some(t)))
            .collect();
        let buffers: Vec<Tensor<T>> = self.weights.buffers_as();
        self.per_example::<T>("per-example loss derivative", progress, |x, targets| {
            let tape = self.model.graph.forward(&duals, &buffers, Dual::constant(x));
            loss::directional(tape.output(), targets)
        })
    }

    /// Predicted class (argmax of the logits) of every example.
    pub fn predictions_as<T: Float>(&self) -> Result<Vec<usize>, CurvatureError> {
        let all = self.per_logits::<T>("logits", |z, _| {
            let c = z.rows_cols().1;
            z.data()
                .chunks(c)
                .map(|row| (0..c).fold(0, |best, k| if row[k] > row[best] { k } else { best }) as f64)
                .collect()
        })?;
        Ok(all.into_iter().map(|k| k as usize).collect())
    }

    /// Per-example losses `ℓ_i(θ)` (no regulariser).
    pub fn losses_as<T: Float>(&self) -> Result<Vec<f64>, CurvatureError> {
        self.per_logits::<T>("per-example loss", |z, targets| loss::apply(z, targets, 1.0).losses)
    }

    /// `f(logits, targets)` per example, for every example.
    fn per_logits<T: Float>(
        &self,
        what: &'static str,
        f: impl Fn(&Tensor<T>, Targets) -> Vec<f64> + Sync,
    ) -> Result<Vec<f64>, CurvatureError> {
        let params: Vec<Tensor<T>> = self.weights.params_as();
        let buffers: Vec<Tensor<T>> = self.weights.buffers_as();
        self.per_example::<T>(what, &|_| {}, |x, targets| {
            f(self.model.graph.forward(&params, &buffers, x).output(), targets)
        })
    }

    fn sub_batch_input<T: Float>(&self, (count, x, _): &(usize, Vec<f64>, OwnedTargets)) -> Tensor<T> {
        let mut shape = vec![*count];
        shape.extend(self.data.sample_shape());
        Tensor::new(shape, x.iter().map(|&v| T::from_f64(v)).collect()).expect("sub-batch matches sample shape")
    }

    /// Streams the data in batches, calling `per_batch(input, labels)` with the loss
    /// weight 1/N, and sums the returned (loss, parameter tensors) in f64.
    fn stream<T: Float>(
        &self,
        progress: &dyn Fn(usize),
        what: &'static str,
        per_batch: impl Fn(Tensor<T>, Targets, f64) -> (f64, Vec<Option<Tensor<T>>>) + Sync,
    ) -> Result<PassResult, CurvatureError> {
        let n = self.data.len();
        let weight = 1.0 / n as f64;
        let mut acc = ParamVector::zeros(self.model);
        let mut loss_sum = 0.0;
        let sample: usize = self.data.sample_shape().iter().product();
        self.for_each_batch(|k, indices, batch| {
            // Sub-batches each run whole by one worker: no synchronisation
            // between layers, and each worker's activations stay in its own
            // cache. Every sub-batch's sums are added in f64.
            let parts = split_batch(batch, sample, self.sub_batch_count(batch.len()));
            let results: Vec<(f64, Vec<Option<Tensor<T>>>)> = parts
                .par_iter()
                .map(|part| per_batch(self.sub_batch_input(part), part.2.as_targets(), weight))
                .collect();
            let mut loss = 0.0;
            for (l, part) in results {
                loss += l;
                for (a, p) in acc.tensors.iter_mut().zip(part) {
                    if let Some(p) = p {
                        a.data_mut()
                            .iter_mut()
                            .zip(p.data())
                            .for_each(|(x, &y)| *x += y.to_f64());
                    }
                }
            }
            loss_sum += loss;
            if !loss.is_finite() || acc.tensors.iter().any(|t| !t.all_finite()) {
                return Err(CurvatureError::NonFinite { what, batch: k });
            }
            // Ranks advance at about the same pace: show the job's progress.
            progress(indices.len() * hvp_dist::size());
            Ok(())
        })?;
        if hvp_dist::is_distributed() {
            // One f64 allreduce of the loss and every partial sum.
            let mut flat = acc.to_flat();
            flat.push(loss_sum);
            hvp_dist::allreduce_sum(&mut flat);
            loss_sum = flat.pop().expect("loss appended");
            acc = acc.with_flat(&flat);
        }
        Ok(PassResult {
            loss: loss_sum / n as f64,
            value: acc,
            examples: n,
        })
    }

    /// `∇L(θ)`.
    pub fn gradient_as<T: Float>(&self, progress: &dyn Fn(usize)) -> Result<PassResult, CurvatureError> {
        let params: Vec<Tensor<T>> = self.weights.params_as();
        let buffers: Vec<Tensor<T>> = self.weights.buffers_as();
        let graph = &self.model.graph;
        self.stream(progress, "gradient", |x, labels, w| {
            let tape = graph.forward(&params, &buffers, x);
            let out = loss::apply(tape.output(), labels, w);
            let grads = graph.backward(&params, &buffers, tape, out.cotangent);
            (out.losses.iter().sum(), grads)
        })
        .map(|mut r| {
            if self.weight_decay != 0.0 {
                let theta = self.theta();
                r.value.axpy(self.weight_decay, &theta);
                r.loss += 0.5 * self.weight_decay * theta.dot(&theta);
            }
            r
        })
    }

    /// `M v` with M the Hessian or the GGN of L at θ.
    pub fn product_as<T: Float>(
        &self,
        curvature: Curvature,
        v: &ParamVector,
        progress: &dyn Fn(usize),
    ) -> Result<PassResult, CurvatureError> {
        let duals: Vec<Dual<T>> = self
            .weights
            .params_as::<T>()
            .into_iter()
            .zip(v.as_dtype::<T>())
            .map(|(p, t)| Dual::new(p, Some(t)))
            .collect();
        let buffers: Vec<Tensor<T>> = self.weights.buffers_as();
        let graph = &self.model.graph;
        let what = match curvature {
            Curvature::Hessian => "Hessian-vector product",
            Curvature::Ggn => "GGN-vector product",
            Curvature::Fisher => "Fisher-vector product",
        };
        let result = match curvature {
            Curvature::Hessian => self.stream(progress, what, |x, labels, w| {
                hessian_batch(graph, &duals, &buffers, x, labels, w)
            }),
            Curvature::Ggn => {
                let primals: Vec<Tensor<T>> = duals.iter().map(|d| d.primal().clone()).collect();
                self.stream(progress, what, |x, labels, w| {
                    ggn_batch(graph, &duals, &primals, &buffers, x, labels, w)
                })
            }
            Curvature::Fisher => {
                let primals: Vec<Tensor<T>> = duals.iter().map(|d| d.primal().clone()).collect();
                self.stream(progress, what, |x, labels, w| {
                    fisher_batch(graph, &duals, &primals, &buffers, x, labels, w)
                })
            }
        };
        result.map(|mut r| {
            if self.weight_decay != 0.0 {
                r.value.axpy(self.weight_decay, v);
            }
            r
        })
    }
}

/// One batch of forward-over-reverse: returns the batch loss and, per parameter,
/// its block of `H v` (the gradient's tangent; the gradient itself is not formed).
pub fn hessian_batch<T: Float>(
    graph: &Graph,
    params: &[Dual<T>],
    buffers: &[Tensor<T>],
    x: Tensor<T>,
    labels: Targets,
    weight: f64,
) -> (f64, Vec<Option<Tensor<T>>>) {
    let tape = graph.forward(params, buffers, Dual::constant(x));
    let out = loss::apply(tape.output(), labels, weight);
    let hv = graph.backward_tangents(params, buffers, tape, out.cotangent);
    (out.losses.iter().sum(), hv)
}

/// One batch of `Jᵀ H_out J v`: a forward pass carrying tangents (J v), the
/// output Hessian applied to the logits' tangent, then a plain backward pass.
pub fn ggn_batch<T: Float>(
    graph: &Graph,
    duals: &[Dual<T>],
    primals: &[Tensor<T>],
    buffers: &[Tensor<T>],
    x: Tensor<T>,
    labels: Targets,
    weight: f64,
) -> (f64, Vec<Option<Tensor<T>>>) {
    let tape = graph.forward_output_tangent(duals, buffers, Dual::constant(x));
    let out = loss::apply(tape.output(), labels, weight);
    let h_out_jv = out.cotangent.tangent_or_zeros();
    let tape: Tape<Tensor<T>> = tape.map(Dual::into_primal);
    let products = graph.backward(primals, buffers, tape, h_out_jv);
    (out.losses.iter().sum(), products)
}

/// One batch of the empirical Fisher product `Σ_i ∇ℓ_i (∇ℓ_i · v) · weight`: the
/// per-example directional derivatives `∇ℓ_i · v` from one forward pass carrying
/// tangents, then one backward pass with each example's cotangent scaled by its
/// own — no per-example gradient is stored.
pub fn fisher_batch<T: Float>(
    graph: &Graph,
    duals: &[Dual<T>],
    primals: &[Tensor<T>],
    buffers: &[Tensor<T>],
    x: Tensor<T>,
    labels: Targets,
    weight: f64,
) -> (f64, Vec<Option<Tensor<T>>>) {
    let tape = graph.forward_output_tangent(duals, buffers, Dual::constant(x));
    let directional = loss::directional(tape.output(), labels);
    let tape: Tape<Tensor<T>> = tape.map(Dual::into_primal);
    let out = loss::apply(tape.output(), labels, 1.0);
    let mut cot = out.cotangent;
    let c = cot.rows_cols().1;
    for (row, d) in cot.data_mut().chunks_mut(c).zip(&directional) {
        let s = T::from_f64(d * weight);
        row.iter_mut().for_each(|v| *v *= s);
    }
    let products = graph.backward(primals, buffers, tape, cot);
    (out.losses.iter().sum(), products)
}
