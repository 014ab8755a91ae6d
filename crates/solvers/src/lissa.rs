//! LiSSA (Agarwal et al. 2017, as used by Koh & Liang 2017): the recursion
//! `h_j = g + h_{j−1} − (M_j + λI) h_{j−1} / scale` with `M_j` a fresh mini-batch
//! product at every step, so a step costs one batch whatever N is; after `depth`
//! steps `h/scale ≈ (M + λI)⁻¹ g`, averaged over `repeats`.

use crate::{finish, lanczos, LinearOperator, SolveReport, SolverError};
use hvp_model::ParamVector;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct LissaOptions {
    pub depth: usize,
    pub repeats: usize,
    /// `None`: 1.5 × a power-iteration estimate of λ_max(M + λI).
    pub scale: Option<f64>,
    pub power_iterations: usize,
}

impl Default for LissaOptions {
    fn default() -> Self {
        LissaOptions {
            depth: 200,
            repeats: 1,
            scale: None,
            power_iterations: 20,
        }
    }
}

/// A mini-batch curvature product on a freshly sampled batch (undamped).
pub type Sampler<'a> = &'a mut dyn FnMut(&ParamVector) -> Result<ParamVector, SolverError>;

/// `exact` (M + λI over the whole data) is used only for the reported residual.
pub fn solve(
    exact: &dyn LinearOperator,
    sample: Sampler,
    damping: f64,
    g: &ParamVector,
    opts: &LissaOptions,
) -> Result<(ParamVector, SolveReport), SolverError> {
    let start = Instant::now();
    let p0 = exact.products();
    let mut minibatch = 0usize;
    let mut report = SolveReport::approximate("lissa");
    let scale = match opts.scale {
        Some(s) if s > 0.0 => s,
        Some(s) => return Err(SolverError::BadOption(format!("`scale` must be positive, got {s}"))),
        None => {
            let lam = lanczos::power_iteration(
                &mut |v| {
                    minibatch += 1;
                    let mut out = sample(v)?;
                    out.axpy(damping, v);
                    Ok(out)
                },
                g,
                opts.power_iterations,
            )?;
            report.warnings.push(format!(
                "scale set to {:.4e} = 1.5 × the power-iteration estimate {lam:.4e} of λ_max(M + λI) on mini-batches",
                1.5 * lam.abs()
            ));
            1.5 * lam.abs()
        }
    };
    report.scale = Some(scale);
    // For a direction with eigenvalue μ of M the recursion keeps (1 − (μ+λ)/scale)^depth
    // of the error; for μ ≈ 0 (the flat directions) that is the truncation below.
    let truncation = (1.0 - damping / scale).clamp(0.0, 1.0).powi(opts.depth as i32);
    if truncation > 0.1 {
        report.warnings.push(format!(
            "depth {} leaves up to {:.0}% of the solution's component along flat directions (eigenvalue ≈ 0): (1 − λ/scale)^depth = {truncation:.2}; raise `depth` to about {:.0} or `damping`",
            opts.depth,
            100.0 * truncation,
            (scale / damping.max(f64::MIN_POSITIVE) * 2.3).ceil()
        ));
    }
    let gnorm = g.norm();
    let mut total = g.zeros_like();
    for rep in 0..opts.repeats.max(1) {
        let mut h = g.clone();
        for step in 0..opts.depth {
            let mut mh = sample(&h)?;
            minibatch += 1;
            mh.axpy(damping, &h);
            // h ← g + h − (M_j + λI) h / scale
            h.axpy(-1.0 / scale, &mh);
            h.axpy(1.0, g);
            let hn = h.norm();
            if !hn.is_finite() || hn > 10.0 * (step as f64 + 2.0) * gnorm {
                return Err(SolverError::Diverged(format!(
                    "LiSSA diverged at step {} of repeat {} (‖h‖ = {hn:.3e}, ‖g‖ = {gnorm:.3e}): (M + λI)/scale has \
                     eigenvalues outside (0, 2). Increase `scale` (now {scale:.3e}) or `damping` (now {damping:.3e}), \
                     or use `curvature` ggn",
                    step + 1,
                    rep + 1
                )));
            }
        }
        total.axpy(1.0 / scale, &h);
    }
    total.scale(1.0 / opts.repeats.max(1) as f64);
    report.iterations = opts.depth * opts.repeats.max(1);
    report.minibatch_products = Some(minibatch);
    let report = finish(exact, g, &total, report, p0, start)?;
    Ok((total, report))
}
