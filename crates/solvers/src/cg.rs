//! Conjugate gradients on `A = M + λI`, optionally preconditioned.

use crate::{finish, LinearOperator, SolveReport, SolverError};
use hvp_model::ParamVector;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct CgOptions {
    /// Stop when the recursive residual `‖r‖/‖g‖` falls below this.
    pub tol: f64,
    pub max_iter: usize,
}

impl Default for CgOptions {
    fn default() -> Self {
        CgOptions {
            tol: 1e-6,
            max_iter: 100,
        }
    }
}

/// A preconditioner `r ↦ P⁻¹ r` (P ≈ A, symmetric positive definite).
pub type Preconditioner<'a> = &'a dyn Fn(&ParamVector) -> Result<ParamVector, SolverError>;

/// Solves `A x = g`. On negative curvature (`pᵀAp ≤ 0`, A not positive definite)
/// it stops with the current iterate and a warning saying what to change.
pub fn solve(
    a: &dyn LinearOperator,
    g: &ParamVector,
    opts: &CgOptions,
    precond: Option<Preconditioner>,
    name: &str,
) -> Result<(ParamVector, SolveReport), SolverError> {
    let start = Instant::now();
    let p0 = a.products();
    let gnorm = g.norm().max(f64::MIN_POSITIVE);
    let mut report = SolveReport::exact(name, opts.tol);
    let mut x = g.zeros_like();
    let mut r = g.clone();
    let apply_p = |r: &ParamVector| match precond {
        Some(p) => p(r),
        None => Ok(r.clone()),
    };
    let mut z = apply_p(&r)?;
    let mut p = z.clone();
    let mut rz = r.dot(&z);
    for k in 0..opts.max_iter {
        if r.norm() / gnorm <= opts.tol {
            // The recursive residual drifts from the true one (rounding, above all
            // in f32): confirm with the exact residual, and restart from it when
            // it is still above the tolerance.
            let mut exact = g.clone();
            exact.axpy(-1.0, &a.apply(&x)?);
            if exact.norm() / gnorm <= opts.tol {
                break;
            }
            r = exact;
            z = apply_p(&r)?;
            p = z.clone();
            rz = r.dot(&z);
        }
        let ap = a.apply(&p)?;
        let pap = p.dot(&ap);
        report.iterations = k + 1;
        if !pap.is_finite() {
            return Err(SolverError::Diverged(format!(
                "CG produced a non-finite curvature pᵀAp at iteration {}; check the weights and data, or use `dtype` f64",
                k + 1
            )));
        }
        if pap <= 0.0 {
            report.fail(format!(
                "negative curvature: pᵀ(M+λI)p = {pap:.3e} ≤ 0 at iteration {}, so M + λI is not positive definite \
                 and CG stopped early; use `curvature` ggn (positive semi-definite) or a larger `damping`",
                k + 1
            ));
            break;
        }
        let alpha = rz / pap;
        x.axpy(alpha, &p);
        r.axpy(-alpha, &ap);
        z = apply_p(&r)?;
        let rz_new = r.dot(&z);
        let beta = rz_new / rz;
        rz = rz_new;
        let mut next = z.clone();
        next.axpy(beta, &p);
        p = next;
    }
    if report.usable() && r.norm() / gnorm > opts.tol {
        report.fail(format!(
            "CG did not reach the tolerance {:.1e} in {} iterations (residual {:.2e}); raise `max_iter` or use `solver` pcg",
            opts.tol,
            opts.max_iter,
            r.norm() / gnorm
        ));
    }
    let report = finish(a, g, &x, report, p0, start)?;
    Ok((x, report))
}
