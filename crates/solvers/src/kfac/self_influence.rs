//! Self-influence with the factors, per-example gradients one layer at a time.

use super::*;

impl Factors {
    /// Self-influence `∇ℓ_iᵀ (F̂ + λI)⁻¹ ∇ℓ_i` of every example of `problem`, in
    /// order, with the per-example gradients (true labels) formed one layer at a
    /// time in the factors' eigenbases and never stored.
    pub fn self_influence(
        &self,
        problem: &Problem,
        damping: f64,
        progress: &dyn Fn(usize),
    ) -> Result<Vec<f64>, SolverError> {
        let model = problem.model;
        let layers = layers_of(model);
        let bases: Vec<(Tensor<f64>, Tensor<f64>)> = self
            .layers
            .iter()
            .map(|f| {
                (
                    mat(f.s_dim(), f.s_dim(), f.s_vecs.clone()),
                    mat(f.a_dim(), f.a_dim(), f.a_vecs.clone()),
                )
            })
            .collect();
        let buffers = &problem.weights.buffers;
        let mut out = Vec::with_capacity(problem.data.len());
        // Contributions of the current batch's examples, shared by the two callbacks.
        let current = std::cell::RefCell::new(Vec::<f64>::new());
        let mut visit = |node: NodeId, op: &Op, x: &Tensor<f64>, gy: &Tensor<f64>, _: bool| {
            let mut current = current.borrow_mut();
            let b = x.shape()[0];
            if current.len() < b {
                current.resize(b, 0.0);
            }
            for (li, l) in layers.iter().enumerate().filter(|(_, l)| l.node == node) {
                let (f, (qs, qa)) = (&self.layers[li], &bases[li]);
                let w_shape = l.w_shape(model);
                let (x, gy) = l.view(x, gy);
                let values: Vec<f64> = (0..b)
                    .into_par_iter()
                    .map(|i| {
                        let proj = projected_gradient(l, &x, &gy, &w_shape, i, qs, qa);
                        proj.data()
                            .iter()
                            .enumerate()
                            .map(|(k, p)| {
                                let eig = match &f.corrected {
                                    Some(c) => c[k],
                                    None => f.s_vals[k / f.a_dim()] * f.a_vals[k % f.a_dim()],
                                };
                                p * p / (eig.max(0.0) + damping)
                            })
                            .sum::<f64>()
                    })
                    .collect();
                current.iter_mut().zip(values).for_each(|(c, v)| *c += v);
            }
            if let Op::BatchNorm(op::BatchNorm {
                weight,
                bias,
                stats: op::BatchNormStats { mean, var, eps },
                ..
            }) = *op
            {
                let per_example = bn_example_grads(x, gy, &buffers[mean], &buffers[var], eps);
                let dg = self.diagonal.iter().find(|(p, _)| *p == weight).map(|d| &d.1);
                let db = self.diagonal.iter().find(|(p, _)| *p == bias).map(|d| &d.1);
                for (i, (gg, gb)) in per_example.iter().enumerate() {
                    for (ch, (a, bv)) in gg.iter().zip(gb).enumerate() {
                        let dgc = dg.map_or(0.0, |d| d[ch].max(0.0));
                        let dbc = db.map_or(0.0, |d| d[ch].max(0.0));
                        current[i] += a * a / (dgc + damping) + bv * bv / (dbc + damping);
                    }
                }
            }
        };
        let mut end = |b: usize| {
            out.extend(current.borrow_mut().drain(..).take(b));
        };
        stream_observed(problem, FisherKind::Empirical, 0, progress, &mut visit, &mut end)?;
        Ok(hvp_dist::gather_shards(problem.data.len(), &out))
    }
}
