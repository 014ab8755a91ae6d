use crate::{LinearOperator, SolverError};
use hvp_model::ParamVector;
use serde::Serialize;

/// The outcome of a solve, judged on the exact residual.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SolveStatus {
    /// An exact method (direct, CG, PCG) whose residual is within the tolerance.
    Converged,
    /// A structured or truncated approximation (K-FAC, EK-FAC, Arnoldi, LiSSA):
    /// its residual is reported, it is never called converged.
    #[default]
    Approximate,
    /// Tolerance not reached, negative curvature, divergence or a non-finite
    /// result: the solution must not be used as if it were `(M + λI)⁻¹ g`.
    Failed,
}

impl SolveStatus {
    pub fn name(self) -> &'static str {
        match self {
            SolveStatus::Converged => "converged",
            SolveStatus::Approximate => "approximate",
            SolveStatus::Failed => "failed",
        }
    }
}

/// What a solver did and how accurate its answer is.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SolveReport {
    pub solver: String,
    /// converged / approximate / failed, from the exact residual.
    pub status: SolveStatus,
    /// The relative residual an exact method must reach (`None` for approximations).
    pub tolerance: Option<f64>,
    pub iterations: usize,
    /// Curvature-vector products over the data used by the solve, including the
    /// final residual check (mini-batch products of LiSSA counted separately).
    pub products: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minibatch_products: Option<usize>,
    pub seconds: f64,
    /// `‖(M+λI)x − g‖ / ‖g‖` with the exact operator.
    pub relative_residual: f64,
    /// `status == converged` (kept for readers of earlier reports).
    pub converged: bool,
    /// Why the solve failed and what to change (set when `status` is failed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    pub warnings: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eigenvalues: Option<Vec<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale: Option<f64>,
    /// Right-hand sides solved together with this one, sharing passes over the
    /// data (`seconds` is then the whole block's time).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_size: Option<usize>,
}

impl SolveReport {
    /// A report for an exact method that must reach `tolerance`.
    pub fn exact(solver: &str, tolerance: f64) -> Self {
        SolveReport {
            solver: solver.into(),
            tolerance: Some(tolerance),
            ..Default::default()
        }
    }

    /// A report for a structured or truncated approximation.
    pub fn approximate(solver: &str) -> Self {
        SolveReport {
            solver: solver.into(),
            ..Default::default()
        }
    }

    /// Marks the solve failed (the first reason is kept).
    pub fn fail(&mut self, reason: String) {
        self.status = SolveStatus::Failed;
        self.converged = false;
        self.failure.get_or_insert(reason);
    }

    /// True unless the solve failed.
    pub fn usable(&self) -> bool {
        self.status != SolveStatus::Failed
    }
}

/// Fills in the exact relative residual of `x` (one more product), the totals,
/// and the status: a non-finite solution or residual fails every method; an
/// exact method converges only when the exact residual is within its tolerance;
/// an approximation stays approximate and is flagged when its residual is ≥ 1
/// (worse than returning x = 0).
pub fn finish(
    op: &dyn LinearOperator,
    g: &ParamVector,
    x: &ParamVector,
    mut report: SolveReport,
    start_products: usize,
    start: std::time::Instant,
) -> Result<SolveReport, SolverError> {
    let residual = residuals(op, std::slice::from_ref(g), std::slice::from_ref(x))?[0];
    report.products = op.products() - start_products;
    report.seconds = start.elapsed().as_secs_f64();
    Ok(judge(report, residual))
}

/// [`finish`] for a block of right-hand sides solved together: the exact
/// residuals of all solutions from one block product; each report's `products`
/// (counted by its solver) gains the one of its residual, `seconds` is the
/// block's time.
pub fn finish_many(
    op: &dyn LinearOperator,
    gs: &[ParamVector],
    xs: &[ParamVector],
    reports: Vec<SolveReport>,
    start: std::time::Instant,
) -> Result<Vec<SolveReport>, SolverError> {
    let residuals = residuals(op, gs, xs)?;
    Ok(judge_many(residuals, reports, start))
}

/// [`finish_many`] with the products `A x` already computed (by a pass that
/// also computed something else from the same solutions).
pub fn finish_with_products(
    gs: &[ParamVector],
    xs: &[ParamVector],
    products: Vec<ParamVector>,
    reports: Vec<SolveReport>,
    start: std::time::Instant,
) -> Vec<SolveReport> {
    let residuals = gs
        .iter()
        .zip(xs)
        .zip(products)
        .map(|((g, x), mut r)| {
            if !x.norm().is_finite() {
                return f64::NAN;
            }
            r.axpy(-1.0, g);
            r.norm() / g.norm().max(f64::MIN_POSITIVE)
        })
        .collect();
    judge_many(residuals, reports, start)
}

fn judge_many(residuals: Vec<f64>, reports: Vec<SolveReport>, start: std::time::Instant) -> Vec<SolveReport> {
    let k = reports.len();
    let seconds = start.elapsed().as_secs_f64();
    reports
        .into_iter()
        .zip(residuals)
        .map(|(mut report, residual)| {
            report.products += 1;
            report.seconds = seconds;
            report.block_size = (k > 1).then_some(k);
            judge(report, residual)
        })
        .collect()
}

/// The reports of a block of approximate solutions `xs` solved together when
/// only the first `measured.len()` had their residuals measured
/// ([`crate::Residuals::First`]): the others get `template` saying theirs was
/// not (a non-finite solution still fails), and every report counts the
/// whole block.
pub fn with_unmeasured(
    mut measured: Vec<SolveReport>,
    template: &SolveReport,
    xs: &[ParamVector],
    start: std::time::Instant,
) -> Vec<SolveReport> {
    let (k, block) = (measured.len(), xs.len());
    measured.extend(xs[k..].iter().map(|x| unmeasured(template.clone(), x, k, block, start)));
    for r in &mut measured {
        r.block_size = (block > 1).then_some(block);
    }
    measured
}

fn unmeasured(
    mut report: SolveReport,
    x: &ParamVector,
    measured: usize,
    block: usize,
    start: std::time::Instant,
) -> SolveReport {
    report.seconds = start.elapsed().as_secs_f64();
    report.block_size = (block > 1).then_some(block);
    report.relative_residual = f64::NAN;
    if !x.norm().is_finite() {
        report.fail(
            "the solution is not finite: M + λI is singular or the products overflow; increase `damping` or use \
             `dtype` f64"
                .into(),
        );
    } else {
        report.status = SolveStatus::Approximate;
        report.warnings.push(format!(
            "residual not measured: `residuals` asked for the first {measured} of the {block} solutions solved \
             together, so this {} approximation's error is unknown here; use `residuals` all to measure it",
            report.solver
        ));
    }
    report
}

/// `‖A x − g‖ / ‖g‖` for each pair (NaN where x is not finite), the finite ones
/// from one block product.
fn residuals(op: &dyn LinearOperator, gs: &[ParamVector], xs: &[ParamVector]) -> Result<Vec<f64>, SolverError> {
    let finite: Vec<usize> = (0..xs.len()).filter(|&i| xs[i].norm().is_finite()).collect();
    let products = op.apply_many(&finite.iter().map(|&i| xs[i].clone()).collect::<Vec<_>>())?;
    let mut out = vec![f64::NAN; xs.len()];
    for (&i, mut r) in finite.iter().zip(products) {
        r.axpy(-1.0, &gs[i]);
        out[i] = r.norm() / gs[i].norm().max(f64::MIN_POSITIVE);
    }
    Ok(out)
}

/// The status an exact `residual` gives a report.
fn judge(mut report: SolveReport, residual: f64) -> SolveReport {
    report.relative_residual = residual;
    if !residual.is_finite() {
        report.fail(format!(
            "the solution (or its residual) is not finite: M + λI is singular or the products overflow; increase \
             `damping` or use `dtype` f64 (relative residual {residual})"
        ));
    }
    match (report.status, report.tolerance) {
        (SolveStatus::Failed, _) => {}
        (_, Some(tol)) if residual <= tol => {
            report.status = SolveStatus::Converged;
        }
        (_, Some(tol)) if report.solver == "direct" => report.fail(format!(
            "relative residual {residual:.3e} is above the tolerance {tol:.1e}: a direct solve is as accurate as the \
             products its matrix was built from, so use `dtype` f64, increase `damping`, or loosen `tol`"
        )),
        (_, Some(tol)) => report.fail(format!(
            "relative residual {residual:.3e} is above the tolerance {tol:.1e}: raise `max_iter`, use `solver` pcg, \
             increase `damping`, or loosen `tol`"
        )),
        (_, None) => {
            report.status = SolveStatus::Approximate;
            if residual >= 1.0 {
                report.warnings.push(format!(
                    "APPROXIMATION WORSE THAN ZERO: {} gives relative residual {residual:.3e} ≥ 1, so x = 0 would be \
                     closer to (M + λI)⁻¹ g; increase `damping`, use `curvature` ggn, or use an exact solver (cg, pcg)",
                    report.solver
                ));
            }
        }
    }
    report.converged = report.status == SolveStatus::Converged;
    report
}
