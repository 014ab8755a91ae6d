//! Per-example gradients contracted with many vectors in one pass over the
//! data: `∇ℓ_iᵀ v_q` for every example i and vector q. Each Linear/Conv2d
//! layer's per-example gradient `G_i = Σ_t g_t ā_tᵀ` is formed from the layer's
//! input and output cotangent (as K-FAC observes them), a batch at a time, and
//! multiplied with all vectors at once as one `[B, O·A] × [O·A, Q]` product;
//! BatchNorm's γ and β gradients are per-channel sums. Nothing of size `N × P`
//! is ever held. With Q influence queries this is the cost of one gradient-like
//! pass plus the contraction, instead of Q forward-mode passes.
//!
//! The same pass gives curvature products of many vectors (`block_product`):
//! with `D = G V` complete for a batch, `Gᵀ D` summed over batches is the
//! empirical Fisher (or, over the output Hessian's square-root columns, the
//! GGN) times every vector at once.

use super::statistics::example_gradient;
use super::*;
use hvp_tensor::linalg::gemm_into;

/// One covered layer's vectors: `[O·A, Q]`, the weight's rows with the bias as
/// the last column of each row, as `G_i` is laid out.
struct LayerVectors {
    layer: Layer,
    stacked: Tensor<f64>,
}

/// A BatchNorm's γ and β entries of every vector (`[q][channel]`).
struct BatchNormVectors {
    node: NodeId,
    gamma: Vec<Vec<f64>>,
    beta: Vec<Vec<f64>>,
}

/// Whether every parameter of `model` lies in a layer whose per-example
/// gradients [`example_gradient_dots`] forms (Linear, Conv2d, BatchNorm).
pub fn covers_all_parameters(model: &Model) -> bool {
    let mut covered = vec![false; model.params.len()];
    for l in layers_of(model) {
        covered[l.weight] = true;
        if let Some(b) = l.bias {
            covered[b] = true;
        }
    }
    for op in model.graph.nodes() {
        if let Op::BatchNorm(bn) = op {
            covered[bn.weight] = true;
            covered[bn.bias] = true;
        }
    }
    covered.iter().all(|&c| c)
}

/// The vectors laid out per covered layer and BatchNorm, as the per-example
/// gradients are.
struct Stacked {
    layers: Vec<LayerVectors>,
    norms: Vec<BatchNormVectors>,
    q: usize,
}

impl Stacked {
    fn new(model: &Model, vectors: &[ParamVector]) -> Self {
        let q = vectors.len();
        let mut layers = Vec::new();
        for l in layers_of(model) {
            let width = l.a_dim - l.bias.is_some() as usize;
            let mut stacked = vec![0.0; l.s_dim * l.a_dim * q];
            for (k, v) in vectors.iter().enumerate() {
                let w = v.tensors[l.weight].data();
                let b = l.bias.map(|b| v.tensors[b].data());
                for o in 0..l.s_dim {
                    let row = l.row0() + o;
                    for a in 0..width {
                        stacked[(o * l.a_dim + a) * q + k] = w[row * width + a];
                    }
                    if let Some(b) = b {
                        stacked[(o * l.a_dim + width) * q + k] = b[row];
                    }
                }
            }
            layers.push(LayerVectors {
                layer: l,
                stacked: mat(l.s_dim * l.a_dim, q, stacked),
            });
        }
        let mut norms = Vec::new();
        for (node, op) in model.graph.nodes().iter().enumerate() {
            if let Op::BatchNorm(bn) = op {
                norms.push(BatchNormVectors {
                    node,
                    gamma: vectors.iter().map(|v| v.tensors[bn.weight].data().to_vec()).collect(),
                    beta: vectors.iter().map(|v| v.tensors[bn.bias].data().to_vec()).collect(),
                });
            }
        }
        Stacked { layers, norms, q }
    }
}

/// One batch's (and cotangent sample's) per-example gradients of a layer, kept
/// until the sample's dots are complete when products are wanted.
enum ExampleGradients<T> {
    /// `[B, O·A]` of the layer at this index of [`Stacked::layers`], in the compute dtype.
    Layer(usize, Tensor<T>),
    /// Per example `(γ gradient, β gradient)` of the BatchNorm at this index of [`Stacked::norms`].
    Norm(usize, Vec<(Vec<f64>, Vec<f64>)>),
}

/// Told, after each cotangent sample of a batch, (batch size, dots, kept gradients).
type SampleSink<'a, T> = &'a mut dyn FnMut(usize, &[f64], Vec<ExampleGradients<T>>);

/// One pass over the data forming every example's gradient (per cotangent
/// sample of `fisher`) layer by layer, with `on_sample(b, dots, gradients)`
/// called after each sample: `dots` is `[b][q]`, `gradients` the sample's
/// per-example gradients (kept only when `keep`).
///
/// Per-example gradients and their products with the vectors are formed in the
/// problem's compute dtype (as every other pass); the dots are summed over
/// layers, and the products over batches, in f64.
fn contract_pass<T: Float>(
    problem: &Problem,
    fisher: FisherKind,
    stacked: &Stacked,
    keep: bool,
    progress: &dyn Fn(usize),
    on_sample: SampleSink<T>,
) -> Result<(), SolverError> {
    let model = problem.model;
    let buffers = &problem.weights.buffers;
    let q = stacked.q;
    let vectors: Vec<Tensor<T>> = stacked.layers.iter().map(|lv| lv.stacked.cast()).collect();
    // The current sample's dots `[example][q]` and kept gradients, shared by the two callbacks.
    let current = std::cell::RefCell::new((Vec::<f64>::new(), Vec::<ExampleGradients<T>>::new()));
    let mut visit = |node: NodeId, op: &Op, x: &Tensor<T>, gy: &Tensor<T>, _: bool| {
        let mut current = current.borrow_mut();
        let (dots, kept) = &mut *current;
        let b = x.shape()[0];
        if dots.len() < b * q {
            dots.resize(b * q, 0.0);
        }
        for (li, lv) in stacked
            .layers
            .iter()
            .enumerate()
            .filter(|(_, lv)| lv.layer.node == node)
        {
            let l = &lv.layer;
            let w_shape = l.w_shape(model);
            let (x, gy) = l.view(x, gy);
            let width = l.s_dim * l.a_dim;
            let mut per_example = vec![T::ZERO; b * width];
            per_example
                .par_chunks_mut(width.max(1))
                .enumerate()
                .for_each(|(i, row)| row.copy_from_slice(&example_gradient(l, &x, &gy, &w_shape, i)));
            let per_example = Tensor::new(vec![b, width], per_example).expect("rows*cols");
            let d = matmul_with(&per_example, false, &vectors[li], false, Par::Pool);
            dots.iter_mut().zip(d.data()).for_each(|(c, d)| *c += d.to_f64());
            if keep {
                kept.push(ExampleGradients::Layer(li, per_example));
            }
        }
        if let (Op::BatchNorm(bn), Some(ni)) = (op, stacked.norms.iter().position(|n| n.node == node)) {
            let v = &stacked.norms[ni];
            let st = &bn.stats;
            let per_example = bn_example_grads(x, gy, &buffers[st.mean], &buffers[st.var], st.eps);
            let dot = |grad: &[f64], vec: &[f64]| grad.iter().zip(vec).map(|(a, b)| a * b).sum::<f64>();
            for (i, (gg, gb)) in per_example.iter().enumerate() {
                for k in 0..q {
                    dots[i * q + k] += dot(gg, &v.gamma[k]) + dot(gb, &v.beta[k]);
                }
            }
            if keep {
                kept.push(ExampleGradients::Norm(ni, per_example));
            }
        }
    };
    let mut end = |b: usize| {
        let mut current = current.borrow_mut();
        let (dots, kept) = &mut *current;
        dots.resize(b * q, 0.0);
        on_sample(b, dots, std::mem::take(kept));
        dots.clear();
    };
    stream_observed_as::<T>(problem, fisher, 0, progress, &mut visit, &mut end)
}

/// Block products `M v_q` and, when asked for, every example's dots `[q][i]`.
pub type ProductsAndDots = (Vec<ParamVector>, Vec<Vec<f64>>);

/// Batches whose `Gᵀ D` are summed in the compute dtype (by the GEMM itself)
/// before they are added to the f64 totals: the f64 pass over `P × Q` numbers
/// then runs once per this many batches instead of after every batch, where
/// it cost as much as the GEMMs at Q = 100.
const BATCHES_PER_FLUSH: usize = 8;

/// The running sums of a block product: `Gᵀ D` per layer (in the compute
/// dtype since the last flush, then in f64), BatchNorm's per channel, and
/// (when wanted) every example's dots.
struct ProductSums<'a, T> {
    q: usize,
    layers: &'a mut [Vec<f64>],
    pending: Vec<Vec<T>>,
    pending_batches: usize,
    norms: &'a mut [(Vec<f64>, Vec<f64>)],
    dots: &'a mut [Vec<f64>],
}

impl<'a, T: Float> ProductSums<'a, T> {
    fn new(
        q: usize,
        layers: &'a mut [Vec<f64>],
        norms: &'a mut [(Vec<f64>, Vec<f64>)],
        dots: &'a mut [Vec<f64>],
    ) -> Self {
        let pending = layers.iter().map(|l| vec![T::ZERO; l.len()]).collect();
        ProductSums {
            q,
            layers,
            pending,
            pending_batches: 0,
            norms,
            dots,
        }
    }

    fn add(&mut self, b: usize, dots: &[f64], kept: Vec<ExampleGradients<T>>) {
        let q = self.q;
        for i in 0..b {
            for (k, o) in self.dots.iter_mut().enumerate() {
                o.push(dots[i * q + k]);
            }
        }
        let d: Vec<T> = dots.iter().map(|&v| T::from_f64(v)).collect();
        let accumulate = self.pending_batches > 0;
        for g in kept {
            match g {
                ExampleGradients::Layer(li, per_example) => {
                    let width = per_example.numel() / b.max(1);
                    let pending = &mut self.pending[li];
                    gemm_into(
                        pending,
                        per_example.data(),
                        true,
                        &d,
                        false,
                        width,
                        q,
                        b,
                        accumulate,
                        Par::Pool,
                    );
                }
                ExampleGradients::Norm(ni, per_example) => {
                    let (sg, sb) = &mut self.norms[ni];
                    let c = sg.len() / q;
                    for (i, (gg, gb)) in per_example.iter().enumerate() {
                        for k in 0..q {
                            let w = dots[i * q + k];
                            for ch in 0..c {
                                sg[k * c + ch] += w * gg[ch];
                                sb[k * c + ch] += w * gb[ch];
                            }
                        }
                    }
                }
            }
        }
        self.pending_batches += 1;
        if self.pending_batches == BATCHES_PER_FLUSH {
            self.flush();
        }
    }

    /// Adds the compute-dtype partial sums to the f64 totals.
    fn flush(&mut self) {
        if self.pending_batches == 0 {
            return;
        }
        for (total, pending) in self.layers.iter_mut().zip(&self.pending) {
            total.iter_mut().zip(pending).for_each(|(a, v)| *a += v.to_f64());
        }
        self.pending_batches = 0;
    }
}

/// Runs [`contract_pass`] keeping every batch's gradients, summing `Gᵀ D`
/// into `layers` and BatchNorm's into `norms` and collecting the dots.
fn product_pass<T: Float>(
    problem: &Problem,
    fisher: FisherKind,
    stacked: &Stacked,
    progress: &dyn Fn(usize),
    layers: &mut [Vec<f64>],
    norms: &mut [(Vec<f64>, Vec<f64>)],
    dots: &mut [Vec<f64>],
) -> Result<(), SolverError> {
    let mut sums = ProductSums::<T>::new(stacked.q, layers, norms, dots);
    contract_pass::<T>(problem, fisher, stacked, true, progress, &mut |b, d, kept| {
        sums.add(b, d, kept)
    })?;
    sums.flush();
    Ok(())
}

/// `dots[q][i] = ∇ℓ_iᵀ v_q` (true labels, no regulariser) for every example of
/// `problem` in order — or `None` when a parameter lies outside the layers whose
/// per-example gradients this forms (Linear, Conv2d, BatchNorm), in which case
/// [`Problem::loss_directional`] per vector gives the same numbers.
pub fn example_gradient_dots(
    problem: &Problem,
    vectors: &[ParamVector],
    progress: &dyn Fn(usize),
) -> Result<Option<Vec<Vec<f64>>>, SolverError> {
    if !covers_all_parameters(problem.model) {
        return Ok(None);
    }
    let stacked = Stacked::new(problem.model, vectors);
    let q = vectors.len();
    let mut out: Vec<Vec<f64>> = vec![Vec::new(); q];
    let mut collect = |b: usize, dots: &[f64]| {
        for i in 0..b {
            for (k, o) in out.iter_mut().enumerate() {
                o.push(dots[i * q + k]);
            }
        }
    };
    let empirical = FisherKind::Empirical;
    match problem.dtype() {
        DType::F32 => contract_pass::<f32>(problem, empirical, &stacked, false, progress, &mut |b, d, _| {
            collect(b, d)
        })?,
        DType::F64 => contract_pass::<f64>(problem, empirical, &stacked, false, progress, &mut |b, d, _| {
            collect(b, d)
        })?,
    }
    let n = problem.data.len();
    Ok(Some(out.iter().map(|o| hvp_dist::gather_shards(n, o)).collect()))
}

/// `M v_q` for every vector at once, where M is the Fisher-form curvature whose
/// cotangent samples `fisher` draws: `Empirical` gives the empirical Fisher
/// `(1/N) Σ_i ∇ℓ_i ∇ℓ_iᵀ`, `Exact` the GGN `(1/N) Σ_i J_iᵀ H_i J_i` (through the
/// output Hessian's square-root columns, C backward passes per batch) — plus
/// the problem's weight decay, as [`Problem::product`] gives. One pass over the
/// data: each example's gradients are formed a batch at a time, `D = G V` and
/// `Gᵀ D` are GEMMs over the batch, so an extra vector costs two small products
/// per example instead of a pass. `None` when a parameter lies outside the
/// layers this covers (Linear, Conv2d, BatchNorm).
pub fn block_product(
    problem: &Problem,
    fisher: FisherKind,
    vectors: &[ParamVector],
    progress: &dyn Fn(usize),
) -> Result<Option<Vec<ParamVector>>, SolverError> {
    Ok(block_product_pass(problem, fisher, vectors, false, progress)?.map(|(products, _)| products))
}

/// The empirical Fisher products of [`block_product`] and the per-example
/// dots of [`example_gradient_dots`] (`[q][i]`) of the same vectors, from one
/// pass: for solutions `x_q` of `(F + λI) x = g_q` the first give their exact
/// residuals and the second their influence scores (× N).
pub fn fisher_products_and_dots(
    problem: &Problem,
    vectors: &[ParamVector],
    progress: &dyn Fn(usize),
) -> Result<Option<ProductsAndDots>, SolverError> {
    block_product_pass(problem, FisherKind::Empirical, vectors, true, progress)
}

fn block_product_pass(
    problem: &Problem,
    fisher: FisherKind,
    vectors: &[ParamVector],
    want_dots: bool,
    progress: &dyn Fn(usize),
) -> Result<Option<ProductsAndDots>, SolverError> {
    let model = problem.model;
    if !covers_all_parameters(model) || vectors.is_empty() || fisher == FisherKind::Mc {
        return Ok(None);
    }
    let stacked = Stacked::new(model, vectors);
    let q = vectors.len();
    // The batch's per-example gradients of every layer are held until its dots
    // are complete: `B × P` numbers.
    let batch = problem.batch_size.min(problem.data.len().max(1));
    hvp_io::memory::check_fits(
        (batch as u64)
            .saturating_mul(model.num_params() as u64)
            .saturating_mul(8),
        "one batch's per-example gradients",
        "lower `batch_size`",
    )
    .map_err(|e| SolverError::BadOption(e.to_string()))?;
    let mut layer_sums: Vec<Vec<f64>> = stacked.layers.iter().map(|lv| vec![0.0; lv.stacked.numel()]).collect();
    // `[q][channel]` sums of each BatchNorm's γ and β.
    let mut norm_sums: Vec<(Vec<f64>, Vec<f64>)> = stacked
        .norms
        .iter()
        .map(|n| {
            let c = n.gamma.first().map_or(0, Vec::len);
            (vec![0.0; q * c], vec![0.0; q * c])
        })
        .collect();
    let mut all_dots: Vec<Vec<f64>> = vec![Vec::new(); if want_dots { q } else { 0 }];
    let (layers, norms, dots) = (&mut layer_sums, &mut norm_sums, &mut all_dots);
    match problem.dtype() {
        DType::F32 => product_pass::<f32>(problem, fisher, &stacked, progress, layers, norms, dots)?,
        DType::F64 => product_pass::<f64>(problem, fisher, &stacked, progress, layers, norms, dots)?,
    }
    allreduce_nested(&mut layer_sums);
    let mut flat_norms: Vec<Vec<f64>> = norm_sums.iter().flat_map(|(g, b)| [g.clone(), b.clone()]).collect();
    allreduce_nested(&mut flat_norms);
    let n = problem.data.len() as f64;
    let mut out: Vec<ParamVector> = vectors.iter().map(ParamVector::zeros_like).collect();
    for (lv, sums) in stacked.layers.iter().zip(&layer_sums) {
        let l = &lv.layer;
        let width = l.a_dim - l.bias.is_some() as usize;
        for (k, o) in out.iter_mut().enumerate() {
            let w = o.tensors[l.weight].data_mut();
            for r in 0..l.s_dim {
                let row = l.row0() + r;
                for a in 0..width {
                    w[row * width + a] = sums[(r * l.a_dim + a) * q + k] / n;
                }
            }
            if let Some(b) = l.bias {
                let bias = o.tensors[b].data_mut();
                for r in 0..l.s_dim {
                    bias[l.row0() + r] = sums[(r * l.a_dim + width) * q + k] / n;
                }
            }
        }
    }
    let mut norm_params = model.graph.nodes().iter().filter_map(|op| match op {
        Op::BatchNorm(bn) => Some((bn.weight, bn.bias)),
        _ => None,
    });
    for pair in flat_norms.chunks(2) {
        let Some((gamma, beta)) = norm_params.next() else { break };
        let c = pair[0].len() / q;
        for (k, o) in out.iter_mut().enumerate() {
            for (ch, v) in o.tensors[gamma].data_mut().iter_mut().enumerate() {
                *v = pair[0][k * c + ch] / n;
            }
            for (ch, v) in o.tensors[beta].data_mut().iter_mut().enumerate() {
                *v = pair[1][k * c + ch] / n;
            }
        }
    }
    if problem.weight_decay != 0.0 {
        for (o, v) in out.iter_mut().zip(vectors) {
            o.axpy(problem.weight_decay, v);
        }
    }
    let n = problem.data.len();
    let all_dots = all_dots.iter().map(|d| hvp_dist::gather_shards(n, d)).collect();
    Ok(Some((out, all_dots)))
}
