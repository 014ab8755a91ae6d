use crate::{LinearOperator, SolverError};
use hvp_model::ParamVector;
use serde::Serialize;

/// What a solver did and how accurate its answer is.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SolveReport {
    pub solver: String,
    pub iterations: usize,
    /// Curvature-vector products over the data used by the solve, including the
    /// final residual check (mini-batch products of LiSSA counted separately).
    pub products: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minibatch_products: Option<usize>,
    pub seconds: f64,
    /// `‖(M+λI)x − g‖ / ‖g‖` with the exact operator.
    pub relative_residual: f64,
    pub converged: bool,
    pub warnings: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eigenvalues: Option<Vec<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale: Option<f64>,
}

/// Fills in the exact relative residual of `x` (one more product) and the totals.
pub fn finish(
    op: &dyn LinearOperator,
    g: &ParamVector,
    x: &ParamVector,
    mut report: SolveReport,
    start_products: usize,
    start: std::time::Instant,
) -> Result<SolveReport, SolverError> {
    let mut r = op.apply(x)?;
    r.axpy(-1.0, g);
    report.relative_residual = r.norm() / g.norm().max(f64::MIN_POSITIVE);
    report.products = op.products() - start_products;
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}
