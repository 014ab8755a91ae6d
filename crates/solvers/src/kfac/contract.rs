//! Per-example gradients contracted with many vectors in one pass over the
//! data: `∇ℓ_iᵀ v_q` for every example i and vector q. Each Linear/Conv2d
//! layer's per-example gradient `G_i = Σ_t g_t ā_tᵀ` is formed from the layer's
//! input and output cotangent (as K-FAC observes them), a batch at a time, and
//! multiplied with all vectors at once as one `[B, O·A] × [O·A, Q]` product;
//! BatchNorm's γ and β gradients are per-channel sums. Nothing of size `N × P`
//! is ever held. With Q influence queries this is the cost of one gradient-like
//! pass plus the contraction, instead of Q forward-mode passes.

use super::*;

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

/// Example i's gradient of layer `l` as `[O, A]` rows (bias last): for a
/// convolution the convolution's own weight-gradient kernel on the one image
/// (as fast as the gradient pass's), for a dense layer `g āᵀ`.
fn example_gradient(l: &Layer, x: &Tensor<f64>, gy: &Tensor<f64>, w_shape: &[usize], i: usize) -> Vec<f64> {
    let Some(geometry) = l.conv else {
        let a = example_inputs(l, x, w_shape, i);
        let g = example_grads(l, gy, i);
        return matmul_with(&g, false, &a, true, Par::Serial).into_data();
    };
    let one = |t: &Tensor<f64>| {
        let s = t.shape();
        let size: usize = s[1..].iter().product();
        let mut shape = s.to_vec();
        shape[0] = 1;
        Tensor::new(shape, t.data()[i * size..(i + 1) * size].to_vec()).expect("one image")
    };
    let (xi, gi) = (one(x), one(gy));
    let gw = conv::backward_weight(&xi, &gi, w_shape, geometry);
    if l.bias.is_none() {
        return gw.into_data();
    }
    let width = l.a_dim - 1;
    let plane = gi.numel() / l.s_dim;
    let mut out = Vec::with_capacity(l.s_dim * l.a_dim);
    for o in 0..l.s_dim {
        out.extend_from_slice(&gw.data()[o * width..(o + 1) * width]);
        out.push(gi.data()[o * plane..(o + 1) * plane].iter().sum());
    }
    out
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

/// `dots[q][i] = ∇ℓ_iᵀ v_q` (true labels, no regulariser) for every example of
/// `problem` in order — or `None` when a parameter lies outside the layers whose
/// per-example gradients this forms (Linear, Conv2d, BatchNorm), in which case
/// [`Problem::loss_directional`] per vector gives the same numbers.
pub fn example_gradient_dots(
    problem: &Problem,
    vectors: &[ParamVector],
    progress: &dyn Fn(usize),
) -> Result<Option<Vec<Vec<f64>>>, SolverError> {
    let model = problem.model;
    if !covers_all_parameters(model) {
        return Ok(None);
    }
    let q = vectors.len();
    let layers = layers_of(model);
    let mut layer_vectors = Vec::with_capacity(layers.len());
    for l in &layers {
        let width = l.a_dim - l.bias.is_some() as usize;
        let mut stacked = vec![0.0; l.s_dim * l.a_dim * q];
        for (k, v) in vectors.iter().enumerate() {
            let w = v.tensors[l.weight].data();
            let b = l.bias.map(|b| v.tensors[b].data());
            for o in 0..l.s_dim {
                for a in 0..width {
                    stacked[(o * l.a_dim + a) * q + k] = w[o * width + a];
                }
                if let Some(b) = b {
                    stacked[(o * l.a_dim + width) * q + k] = b[o];
                }
            }
        }
        layer_vectors.push(LayerVectors {
            layer: *l,
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
    let buffers = &problem.weights.buffers;
    let mut out: Vec<Vec<f64>> = vec![Vec::new(); q];
    // The current batch's dots, `[example][q]`, shared by the two callbacks.
    let current = std::cell::RefCell::new(Vec::<f64>::new());
    let mut visit = |node: NodeId, op: &Op, x: &Tensor<f64>, gy: &Tensor<f64>, _: bool| {
        let mut current = current.borrow_mut();
        let b = x.shape()[0];
        if current.len() < b * q {
            current.resize(b * q, 0.0);
        }
        if let Some(lv) = layer_vectors.iter().find(|lv| lv.layer.node == node) {
            let l = &lv.layer;
            let w_shape = &model.params[l.weight].shape;
            let per_example: Vec<f64> = (0..b)
                .into_par_iter()
                .flat_map_iter(|i| example_gradient(l, x, gy, w_shape, i))
                .collect();
            let dots = matmul_with(
                &mat(b, l.s_dim * l.a_dim, per_example),
                false,
                &lv.stacked,
                false,
                Par::Pool,
            );
            current.iter_mut().zip(dots.data()).for_each(|(c, d)| *c += d);
        } else if let (Op::BatchNorm(bn), Some(v)) = (op, norms.iter().find(|n| n.node == node)) {
            let st = &bn.stats;
            let per_example = bn_example_grads(x, gy, &buffers[st.mean], &buffers[st.var], st.eps);
            for (i, (gg, gb)) in per_example.iter().enumerate() {
                for k in 0..q {
                    let dot = |grad: &[f64], vec: &[f64]| grad.iter().zip(vec).map(|(a, b)| a * b).sum::<f64>();
                    current[i * q + k] += dot(gg, &v.gamma[k]) + dot(gb, &v.beta[k]);
                }
            }
        }
    };
    let mut end = |b: usize| {
        let mut current = current.borrow_mut();
        for i in 0..b {
            for (k, o) in out.iter_mut().enumerate() {
                o.push(current.get(i * q + k).copied().unwrap_or(0.0));
            }
        }
        current.clear();
    };
    stream_observed(problem, FisherKind::Empirical, 0, progress, &mut visit, &mut end)?;
    let n = problem.data.len();
    Ok(Some(out.iter().map(|o| hvp_dist::gather_shards(n, o)).collect()))
}
