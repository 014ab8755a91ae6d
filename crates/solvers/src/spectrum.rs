//! The curvature's extreme eigenvalues (Lanczos) and trace (Hutchinson): what
//! a damping λ or LiSSA's scale should be chosen against.

use crate::{lanczos, CurvatureOperator, LinearOperator, SolverError};
use hvp_curvature::{Curvature, Problem};
use hvp_model::ParamVector;
use serde::Serialize;

#[derive(Clone, Debug)]
pub struct SpectrumConfig {
    pub curvature: Curvature,
    /// Number of largest eigenvalues reported.
    pub top: usize,
    /// Lanczos steps (`None`: max(3 × top, 30)), at most the parameter count.
    pub steps: Option<usize>,
    /// Rademacher probes of the trace estimate.
    pub trace_samples: usize,
    pub seed: u64,
}

impl SpectrumConfig {
    pub fn new(curvature: Curvature) -> Self {
        SpectrumConfig {
            curvature,
            top: 10,
            steps: None,
            trace_samples: 10,
            seed: 0,
        }
    }
}

/// Estimates from one run; Lanczos' extreme Ritz values converge first.
#[derive(Clone, Debug, Serialize)]
pub struct Spectrum {
    /// The `top` largest eigenvalue estimates, largest first.
    pub top_eigenvalues: Vec<f64>,
    pub smallest_eigenvalue: f64,
    pub trace: f64,
    pub trace_standard_error: f64,
    pub lanczos_steps: usize,
    /// Curvature-vector products used (each one pass over the data).
    pub products: usize,
}

pub fn spectrum(problem: &Problem, config: &SpectrumConfig) -> Result<Spectrum, SolverError> {
    let params = problem.model.num_params();
    if config.top == 0 || config.top > params {
        return Err(SolverError::BadOption(format!(
            "`top` must be between 1 and the {params} parameters, got {}",
            config.top
        )));
    }
    let op = CurvatureOperator::new(problem, config.curvature);
    let like = ParamVector::zeros(problem.model);
    let steps = config.steps.unwrap_or((3 * config.top).max(30)).min(params);
    let ritz = lanczos::lanczos(&op, steps, &lanczos::random_unit(&like, config.seed))?;
    let mut top: Vec<f64> = ritz.values.iter().rev().take(config.top).copied().collect();
    top.sort_by(|x, y| y.total_cmp(x));
    let (trace, trace_standard_error) = lanczos::hutchinson_trace(&op, &like, config.trace_samples, config.seed + 1)?;
    Ok(Spectrum {
        top_eigenvalues: top,
        smallest_eigenvalue: ritz.values.first().copied().unwrap_or(0.0),
        trace,
        trace_standard_error,
        lanczos_steps: ritz.values.len(),
        products: op.products(),
    })
}
