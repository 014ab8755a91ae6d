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

use super::statistics::example_gradient_into;
use super::*;
use hvp_tensor::conv::ImageGradientScratch;
use hvp_tensor::linalg::gemm_into;

/// One covered layer (its vectors are laid out by [`Stacked::layer_vectors`]).
struct LayerVectors {
    layer: Layer,
}

/// A BatchNorm's γ and β entries of every vector: `[2C, Q]`, γ's C rows then β's.
struct BatchNormVectors {
    node: NodeId,
    channels: usize,
    stacked: Vec<f64>,
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
        let layers = layers_of(model)
            .into_iter()
            .map(|layer| LayerVectors { layer })
            .collect();
        let mut norms = Vec::new();
        for (node, op) in model.graph.nodes().iter().enumerate() {
            if let Op::BatchNorm(bn) = op {
                let channels = vectors.first().map_or(0, |v| v.tensors[bn.weight].numel());
                let mut stacked = Vec::with_capacity(2 * channels * q);
                for p in [bn.weight, bn.bias] {
                    for ch in 0..channels {
                        stacked.extend(vectors.iter().map(|v| v.tensors[p].data()[ch]));
                    }
                }
                norms.push(BatchNormVectors {
                    node,
                    channels,
                    stacked,
                });
            }
        }
        Stacked { layers, norms, q }
    }

    /// Each covered layer's vectors `[O·A, Q]` in the compute dtype: the
    /// weight's rows with the bias as the last column of each row, as `G_i`
    /// is laid out. Gathered 16 entries of a row at a time from every vector
    /// (the output lines of a block stay in cache), rows in parallel.
    fn layer_vectors<T: Float>(&self, vectors: &[ParamVector]) -> Vec<Tensor<T>> {
        const BLOCK: usize = 16;
        let q = self.q;
        self.layers
            .iter()
            .map(|lv| {
                let l = &lv.layer;
                let width = l.a_dim - l.bias.is_some() as usize;
                let mut stacked = vec![T::ZERO; l.s_dim * l.a_dim * q];
                stacked
                    .par_chunks_mut((l.a_dim * q).max(1))
                    .enumerate()
                    .for_each(|(o, out)| {
                        let row = l.row0() + o;
                        for a0 in (0..width).step_by(BLOCK) {
                            let n = BLOCK.min(width - a0);
                            for (k, v) in vectors.iter().enumerate() {
                                let w = &v.tensors[l.weight].data()[row * width + a0..][..n];
                                for (j, &x) in w.iter().enumerate() {
                                    out[(a0 + j) * q + k] = T::from_f64(x);
                                }
                            }
                        }
                        if let Some(b) = l.bias {
                            for (k, v) in vectors.iter().enumerate() {
                                out[width * q + k] = T::from_f64(v.tensors[b].data()[row]);
                            }
                        }
                    });
                Tensor::new(vec![l.s_dim * l.a_dim, q], stacked).expect("[O·A, Q]")
            })
            .collect()
    }
}

/// Where [`contract_pass`] writes each layer's per-example gradient rows and
/// what it is told when a cotangent sample's dots are complete.
trait GradientSink<T> {
    /// Room for the `b` rows `[b, width]` of layer `li` (an index of
    /// [`Stacked::layers`]) of the current sample, which the pass fills.
    fn rows(&mut self, li: usize, b: usize, width: usize) -> &mut [T];
    /// The sample's `b` examples are done: `dots` is `[b][q]`, `norms` the
    /// per-example γ and β gradients `[b, 2C]` of each BatchNorm (an index of
    /// [`Stacked::norms`]) when they were asked for.
    fn sample_done(&mut self, b: usize, dots: &[f64], norms: Vec<NormGradients>);
    /// Whether BatchNorm's per-example gradients are wanted in `sample_done`.
    fn wants_norms(&self) -> bool;
    /// Whether the pass adds the layers' dots `G V` to the sample's dots
    /// (else the sink forms them from the rows it keeps, and `sample_done`
    /// gets BatchNorm's share alone).
    fn layer_dots_in_pass(&self) -> bool {
        true
    }
}

/// One BatchNorm's per-example γ and β gradients, `[b, 2C]`.
type NormGradients = (usize, Vec<f64>);

/// One pass over the data forming every example's gradient (per cotangent
/// sample of `fisher`) layer by layer into the rows `sink` gives, with the
/// sample's dots with every vector told to `sink` when it is complete.
///
/// Per-example gradients and their products with the vectors are formed in the
/// problem's compute dtype (as every other pass); the dots are summed over
/// layers in f64.
fn contract_pass<T: Float>(
    problem: &Problem,
    fisher: FisherKind,
    stacked: &Stacked,
    vectors: &[Tensor<T>],
    progress: &dyn Fn(usize),
    sink: &mut dyn GradientSink<T>,
) -> Result<(), SolverError> {
    let model = problem.model;
    let buffers = &problem.weights.buffers;
    let q = stacked.q;
    let wants_norms = sink.wants_norms();
    let layer_dots_in_pass = sink.layer_dots_in_pass();
    // The current sample's dots `[example][q]`, the BatchNorms' gradients,
    // and the sink: shared by the two callbacks.
    let current = std::cell::RefCell::new((Vec::<f64>::new(), Vec::<NormGradients>::new(), sink));
    let mut visit = |node: NodeId, op: &Op, x: &Tensor<T>, gy: &Tensor<T>, _: bool| {
        let mut current = current.borrow_mut();
        let (dots, norms, sink) = &mut *current;
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
            let rows = sink.rows(li, b, width);
            rows.par_chunks_mut(width.max(1))
                .enumerate()
                .for_each_init(ImageGradientScratch::new, |scratch, (i, row)| {
                    example_gradient_into(l, &x, &gy, &w_shape, i, scratch, row)
                });
            if layer_dots_in_pass {
                add_dots_by_rows(&mut dots[..b * q], &[(&*rows, vectors[li].data())], b, q);
            }
        }
        if let (Op::BatchNorm(bn), Some(ni)) = (op, stacked.norms.iter().position(|n| n.node == node)) {
            let v = &stacked.norms[ni];
            let st = &bn.stats;
            let rows = bn_example_rows(x, gy, &buffers[st.mean], &buffers[st.var], st.eps);
            // `[b, 2C] × [2C, Q]`, added to the dots.
            gemm_into(
                &mut dots[..b * q],
                &rows,
                false,
                &v.stacked,
                false,
                b,
                q,
                2 * v.channels,
                true,
                Par::Serial,
            );
            if wants_norms {
                norms.push((ni, rows));
            }
        }
    };
    let mut end = |b: usize| {
        let mut current = current.borrow_mut();
        let (dots, norms, sink) = &mut *current;
        dots.resize(b * q, 0.0);
        sink.sample_done(b, dots, std::mem::take(norms));
        dots.clear();
    };
    stream_observed_as::<T>(problem, fisher, 0, progress, &mut visit, &mut end)
}

/// `dots[i][q] += Σ_l G_l[i] · V_l[:, q]` over the layers' gathered rows
/// `G_l [rows, width_l]` and vectors `V_l [width_l, Q]`, summed in f64. The
/// rows are split between the workers, each running its share of every layer
/// as one single-threaded GEMM: at these shapes (a few hundred rows, Q
/// columns, an inner dimension up to 37k) that ran 1.2× faster than each
/// layer's product split by the GEMM's own threads.
fn add_dots_by_rows<T: Float>(dots: &mut [f64], layers: &[(&[T], &[T])], rows: usize, q: usize) {
    let per_worker = rows.div_ceil(rayon::current_num_threads().max(1)).max(1);
    dots[..rows * q]
        .par_chunks_mut(per_worker * q.max(1))
        .enumerate()
        .for_each(|(c, dots)| {
            let (first, n) = (c * per_worker, dots.len() / q.max(1));
            let mut layer_dots = vec![T::ZERO; n * q];
            for &(g, v) in layers {
                let width = v.len() / q.max(1);
                let g = &g[first * width..(first + n) * width];
                gemm_into(&mut layer_dots, g, false, v, false, n, q, width, false, Par::Serial);
                dots.iter_mut().zip(&layer_dots).for_each(|(c, d)| *c += d.to_f64());
            }
        });
}

/// The scores-only sink: each layer's rows in one reused buffer, the dots
/// collected `[q][i]`.
struct DotsOnly<T> {
    scratch: Vec<T>,
    dots: Vec<Vec<f64>>,
}

impl<T: Float> GradientSink<T> for DotsOnly<T> {
    fn rows(&mut self, _: usize, b: usize, width: usize) -> &mut [T] {
        self.scratch.resize(b * width, T::ZERO);
        &mut self.scratch[..b * width]
    }

    fn sample_done(&mut self, b: usize, dots: &[f64], _: Vec<NormGradients>) {
        let q = self.dots.len();
        for i in 0..b {
            for (k, o) in self.dots.iter_mut().enumerate() {
                o.push(dots[i * q + k]);
            }
        }
    }

    fn wants_norms(&self) -> bool {
        false
    }
}

/// Block products `M v_q` and, when asked for, every example's dots `[q][i]`.
pub type ProductsAndDots = (Vec<ParamVector>, Vec<Vec<f64>>);

/// Per-example gradient rows gathered (over batches and cotangent samples)
/// before one `Gᵀ D` product: with batches of 64 the product's inner
/// dimension was 64, and reading and writing its `P × Q` output after every
/// batch cost as much as its multiplications at Q = 100.
const ROWS_PER_PRODUCT: usize = 256;

/// `Gᵀ D` products summed in the compute dtype (by the GEMM itself) before
/// they are added to the f64 totals: the f64 pass over `P × Q` numbers runs
/// once per this many products.
const PRODUCTS_PER_FLUSH: usize = 4;

/// The running sums of a block product: the gathered rows of every layer's
/// per-example gradients, with BatchNorm's, until `D = G V` and `Gᵀ D` are
/// formed for all of them at once (`D` over 256 rows instead of one batch's
/// 64: its operands are read from memory once for four times the work);
/// `Gᵀ D` per layer (in the compute dtype since the last flush, then in
/// f64), BatchNorm's per channel, and (when wanted) every example's dots.
struct ProductSums<'a, T> {
    q: usize,
    /// The first k vectors get products `Gᵀ D` (all q get dots).
    k: usize,
    capacity: usize,
    vectors: &'a [Tensor<T>],
    /// Rows gathered so far, and whether a sample's rows are being written.
    rows: usize,
    open: bool,
    gathered: Vec<Vec<T>>,
    /// BatchNorm's share of the gathered rows' dots `[rows, q]`, and its rows `[rows, 2C]`.
    gathered_dots: Vec<f64>,
    gathered_norms: Vec<Vec<f64>>,
    layers: &'a mut [Vec<f64>],
    pending: Vec<Vec<T>>,
    pending_products: usize,
    norms: &'a mut [Vec<f64>],
    dots: &'a mut [Vec<f64>],
}

impl<'a, T: Float> ProductSums<'a, T> {
    fn new(
        (q, k): (usize, usize),
        capacity: usize,
        vectors: &'a [Tensor<T>],
        layers: &'a mut [Vec<f64>],
        norms: &'a mut [Vec<f64>],
        dots: &'a mut [Vec<f64>],
    ) -> Self {
        let pending = layers.iter().map(|l| vec![T::ZERO; l.len()]).collect();
        let gathered = layers.iter().map(|_| Vec::new()).collect();
        let gathered_norms = norms.iter().map(|_| Vec::new()).collect();
        ProductSums {
            q,
            k,
            capacity,
            vectors,
            rows: 0,
            open: false,
            gathered,
            gathered_dots: Vec::new(),
            gathered_norms,
            layers,
            pending,
            pending_products: 0,
            norms,
            dots,
        }
    }

    /// The gathered rows' dots (layers' `G V` added to BatchNorm's share, in
    /// f64), then `Gᵀ D` into the compute-dtype sums and BatchNorm's sums.
    fn multiply(&mut self) {
        if self.rows == 0 {
            return;
        }
        let (q, rows) = (self.q, self.rows);
        let dots = &mut self.gathered_dots[..rows * q];
        let layers: Vec<(&[T], &[T])> = self
            .gathered
            .iter()
            .map(|g| &g[..])
            .zip(self.vectors.iter().map(|v| v.data()))
            .collect();
        add_dots_by_rows(dots, &layers, rows, q);
        for i in 0..rows {
            for (k, o) in self.dots.iter_mut().enumerate() {
                o.push(dots[i * q + k]);
            }
        }
        self.rows = 0;
        // The dots of the vectors that get products, `[rows, k]`.
        let k = self.k;
        if k == 0 {
            return;
        }
        let dk: Vec<f64> = dots.chunks_exact(q.max(1)).flat_map(|row| &row[..k]).copied().collect();
        for (sums, gathered) in self.norms.iter_mut().zip(&self.gathered_norms) {
            // `[k, 2C] += Dᵀ [k, rows] × [rows, 2C]`.
            let width = sums.len() / k.max(1);
            let g = &gathered[..rows * width];
            gemm_into(sums, &dk, true, g, false, k, width, rows, true, Par::Serial);
        }
        let d: Vec<T> = dk.iter().map(|&v| T::from_f64(v)).collect();
        let accumulate = self.pending_products > 0;
        for (pending, gathered) in self.pending.iter_mut().zip(&self.gathered) {
            let width = pending.len() / k.max(1);
            let g = &gathered[..rows * width];
            gemm_into(pending, g, true, &d, false, width, k, rows, accumulate, Par::Pool);
        }
        self.pending_products += 1;
        if self.pending_products == PRODUCTS_PER_FLUSH {
            self.flush();
        }
    }

    /// Adds the compute-dtype partial sums to the f64 totals.
    fn flush(&mut self) {
        if self.pending_products == 0 {
            return;
        }
        for (total, pending) in self.layers.iter_mut().zip(&self.pending) {
            total.iter_mut().zip(pending).for_each(|(a, v)| *a += v.to_f64());
        }
        self.pending_products = 0;
    }

    fn finish(&mut self) {
        self.multiply();
        self.flush();
    }
}

impl<T: Float> GradientSink<T> for ProductSums<'_, T> {
    fn rows(&mut self, li: usize, b: usize, width: usize) -> &mut [T] {
        if !self.open {
            // Every gathered row is complete between samples.
            if self.rows + b > self.capacity {
                self.multiply();
            }
            self.open = true;
        }
        let gathered = &mut self.gathered[li];
        let end = (self.rows + b) * width;
        if gathered.len() < end {
            gathered.resize(end, T::ZERO);
        }
        &mut gathered[self.rows * width..end]
    }

    fn sample_done(&mut self, b: usize, dots: &[f64], norms: Vec<NormGradients>) {
        let q = self.q;
        if !self.open && self.rows + b > self.capacity {
            self.multiply();
        }
        self.open = false;
        self.gathered_dots.truncate(self.rows * q);
        self.gathered_dots.extend_from_slice(&dots[..b * q]);
        for (ni, rows) in norms {
            let gathered = &mut self.gathered_norms[ni];
            let width = rows.len() / b.max(1);
            gathered.truncate(self.rows * width);
            gathered.extend_from_slice(&rows);
        }
        self.rows += b;
    }

    fn wants_norms(&self) -> bool {
        self.k > 0
    }

    fn layer_dots_in_pass(&self) -> bool {
        false
    }
}

/// Runs [`contract_pass`] gathering every sample's gradients, summing `Gᵀ D`
/// into `layers` and BatchNorm's into `norms` and collecting the dots.
#[allow(clippy::too_many_arguments)]
fn product_pass<T: Float>(
    problem: &Problem,
    fisher: FisherKind,
    (stacked, vectors, k): (&Stacked, &[ParamVector], usize),
    capacity: usize,
    progress: &dyn Fn(usize),
    layers: &mut [Vec<f64>],
    norms: &mut [Vec<f64>],
    dots: &mut [Vec<f64>],
) -> Result<(), SolverError> {
    let vectors = stacked.layer_vectors::<T>(vectors);
    let mut sums = ProductSums::<T>::new((stacked.q, k), capacity, &vectors, layers, norms, dots);
    contract_pass::<T>(problem, fisher, stacked, &vectors, progress, &mut sums)?;
    sums.finish();
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
    let empirical = FisherKind::Empirical;
    let out = match problem.dtype() {
        DType::F32 => {
            let mut sink = DotsOnly::<f32> {
                scratch: Vec::new(),
                dots: vec![Vec::new(); vectors.len()],
            };
            let stacked_vectors = stacked.layer_vectors::<f32>(vectors);
            contract_pass::<f32>(problem, empirical, &stacked, &stacked_vectors, progress, &mut sink)?;
            sink.dots
        }
        DType::F64 => {
            let mut sink = DotsOnly::<f64> {
                scratch: Vec::new(),
                dots: vec![Vec::new(); vectors.len()],
            };
            let stacked_vectors = stacked.layer_vectors::<f64>(vectors);
            contract_pass::<f64>(problem, empirical, &stacked, &stacked_vectors, progress, &mut sink)?;
            sink.dots
        }
    };
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
    Ok(block_product_pass(problem, fisher, vectors, false, vectors.len(), progress)?.map(|(products, _)| products))
}

/// The empirical Fisher products of [`block_product`] of the first
/// `products` vectors and the per-example dots of [`example_gradient_dots`]
/// (`[q][i]`) of all, from one pass: for solutions `x_q` of
/// `(F + λI) x = g_q` the first give their exact residuals and the second
/// their influence scores (× N). Each product costs about as much as its
/// vector's dots. With none, the dots alone: [`example_gradient_dots`] a
/// batch at a time, or for many vectors `D = G V` over 256 gathered rows
/// where they fit in memory.
pub fn fisher_products_and_dots(
    problem: &Problem,
    vectors: &[ParamVector],
    products: usize,
    progress: &dyn Fn(usize),
) -> Result<Option<ProductsAndDots>, SolverError> {
    if products == 0 && (vectors.len() < DOTS_GATHERED_FROM || gathered_rows(problem).is_err()) {
        return Ok(example_gradient_dots(problem, vectors, progress)?.map(|dots| (Vec::new(), dots)));
    }
    block_product_pass(problem, FisherKind::Empirical, vectors, true, products, progress)
}

/// From this many vectors on, dots without products are formed over gathered
/// rows (each vector read once per 256 examples) rather than a batch at a
/// time as the rows are made (cache-warm, no gathering). Measured at
/// N = 2,000 on the seed ResNet: batch-wise 3.52, 3.63 and 4.81 s at Q = 4,
/// 16 and 100, gathered 3.75, 3.86 and 4.75 s.
const DOTS_GATHERED_FROM: usize = 128;

/// How many per-example gradient rows a block product gathers before its
/// GEMMs: 256 (at least a batch) where `rows × P` numbers in the compute
/// dtype fit in memory, else one batch's, else the error saying so.
fn gathered_rows(problem: &Problem) -> Result<usize, hvp_io::IoError> {
    let batch = problem.batch_size.min(problem.data.len().max(1));
    let element = match problem.dtype() {
        DType::F32 => 4,
        DType::F64 => 8,
    };
    let bytes = |rows: usize| {
        (rows as u64)
            .saturating_mul(problem.model.num_params() as u64)
            .saturating_mul(element)
    };
    let what = "the per-example gradients gathered for a block product";
    let fix = "lower `batch_size`";
    let rows = ROWS_PER_PRODUCT.max(batch);
    if hvp_io::memory::check_fits(bytes(rows), what, fix).is_ok() {
        return Ok(rows);
    }
    hvp_io::memory::check_fits(bytes(batch), what, fix).map(|()| batch)
}

fn block_product_pass(
    problem: &Problem,
    fisher: FisherKind,
    vectors: &[ParamVector],
    want_dots: bool,
    products: usize,
    progress: &dyn Fn(usize),
) -> Result<Option<ProductsAndDots>, SolverError> {
    let model = problem.model;
    if !covers_all_parameters(model) || vectors.is_empty() || fisher == FisherKind::Mc {
        return Ok(None);
    }
    let k = products.min(vectors.len());
    let stacked = Stacked::new(model, vectors);
    let q = vectors.len();
    // Per-example gradients of every layer are gathered for `D` and `Gᵀ D`.
    let capacity = gathered_rows(problem).map_err(|e| SolverError::BadOption(e.to_string()))?;
    let mut layer_sums: Vec<Vec<f64>> = stacked
        .layers
        .iter()
        .map(|lv| vec![0.0; lv.layer.s_dim * lv.layer.a_dim * k])
        .collect();
    // `[k, 2C]` sums of each BatchNorm's γ and β products.
    let mut norm_sums: Vec<Vec<f64>> = stacked.norms.iter().map(|n| vec![0.0; k * 2 * n.channels]).collect();
    let mut all_dots: Vec<Vec<f64>> = vec![Vec::new(); if want_dots { q } else { 0 }];
    let (layers, norms, dots) = (&mut layer_sums, &mut norm_sums, &mut all_dots);
    let pass = match problem.dtype() {
        DType::F32 => product_pass::<f32>,
        DType::F64 => product_pass::<f64>,
    };
    pass(
        problem,
        fisher,
        (&stacked, vectors, k),
        capacity,
        progress,
        layers,
        norms,
        dots,
    )?;
    allreduce_nested(&mut layer_sums);
    allreduce_nested(&mut norm_sums);
    let n = problem.data.len() as f64;
    let mut out: Vec<ParamVector> = vectors[..k].iter().map(ParamVector::zeros_like).collect();
    for (lv, sums) in stacked.layers.iter().zip(&layer_sums) {
        let l = &lv.layer;
        let width = l.a_dim - l.bias.is_some() as usize;
        // Read in order, each entry scattered to every vector.
        let mut weights: Vec<&mut [f64]> = out.iter_mut().map(|o| o.tensors[l.weight].data_mut()).collect();
        for r in 0..l.s_dim {
            let row = l.row0() + r;
            for a in 0..width {
                let entry = &sums[(r * l.a_dim + a) * k..][..k];
                for (w, v) in weights.iter_mut().zip(entry) {
                    w[row * width + a] = v / n;
                }
            }
        }
        if let Some(b) = l.bias {
            let mut biases: Vec<&mut [f64]> = out.iter_mut().map(|o| o.tensors[b].data_mut()).collect();
            for r in 0..l.s_dim {
                let entry = &sums[(r * l.a_dim + width) * k..][..k];
                for (bias, v) in biases.iter_mut().zip(entry) {
                    bias[l.row0() + r] = v / n;
                }
            }
        }
    }
    let mut norm_params = model.graph.nodes().iter().filter_map(|op| match op {
        Op::BatchNorm(bn) => Some((bn.weight, bn.bias)),
        _ => None,
    });
    for sums in norm_sums.iter().filter(|_| k > 0) {
        let Some((gamma, beta)) = norm_params.next() else { break };
        let width = sums.len() / k;
        let c = width / 2;
        for (k, o) in out.iter_mut().enumerate() {
            let row = &sums[k * width..(k + 1) * width];
            for (v, s) in o.tensors[gamma].data_mut().iter_mut().zip(&row[..c]) {
                *v = s / n;
            }
            for (v, s) in o.tensors[beta].data_mut().iter_mut().zip(&row[c..]) {
                *v = s / n;
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
