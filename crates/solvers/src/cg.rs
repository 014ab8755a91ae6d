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
        report.fail(not_reached(name, opts, r.norm() / gnorm));
    }
    let report = finish(a, g, &x, report, p0, start)?;
    Ok((x, report))
}

/// Why a recursion that ran out of iterations failed, and what to change.
fn not_reached(name: &str, opts: &CgOptions, residual: f64) -> String {
    let advice = if name == "pcg" {
        "raise `max_iter` or increase `damping` (the preconditioner is far from M + λI)"
    } else {
        "raise `max_iter` or use `solver` pcg"
    };
    format!(
        "{} did not reach the tolerance {:.1e} in {} iterations (residual {residual:.2e}); {advice}",
        name.to_uppercase(),
        opts.tol,
        opts.max_iter
    )
}

/// One right-hand side of [`solve_many`]: the state of its own CG recursion.
struct Lane {
    x: ParamVector,
    r: ParamVector,
    p: ParamVector,
    rz: f64,
    gnorm: f64,
    report: SolveReport,
    /// Iterations done; a lane stops at `max_iter` or when finished.
    iterations: usize,
    finished: bool,
}

/// [`solve`] for several right-hand sides at once: each runs its own CG
/// recursion (the same iterates as alone), and each round's products of all
/// running recursions are one [`LinearOperator::apply_many`] — one pass over
/// the data for operators that share it. The exact residual checks are block
/// products too.
pub fn solve_many(
    a: &dyn LinearOperator,
    gs: &[ParamVector],
    opts: &CgOptions,
    precond: Option<Preconditioner>,
    name: &str,
) -> Result<Vec<(ParamVector, SolveReport)>, SolverError> {
    let start = Instant::now();
    let apply_p = |r: &ParamVector| match precond {
        Some(p) => p(r),
        None => Ok(r.clone()),
    };
    let mut lanes = Vec::with_capacity(gs.len());
    for g in gs {
        let z = apply_p(g)?;
        lanes.push(Lane {
            x: g.zeros_like(),
            r: g.clone(),
            rz: g.dot(&z),
            p: z,
            gnorm: g.norm().max(f64::MIN_POSITIVE),
            report: SolveReport::exact(name, opts.tol),
            iterations: 0,
            finished: false,
        });
    }
    let running = |lanes: &[Lane]| -> Vec<usize> {
        (0..lanes.len())
            .filter(|&i| !lanes[i].finished && lanes[i].iterations < opts.max_iter)
            .collect()
    };
    loop {
        // Lanes whose recursive residual is within the tolerance confirm it
        // with the exact one, and restart from it when it is still above.
        let confirming: Vec<usize> = running(&lanes)
            .into_iter()
            .filter(|&i| lanes[i].r.norm() / lanes[i].gnorm <= opts.tol)
            .collect();
        let products = a.apply_many(&confirming.iter().map(|&i| lanes[i].x.clone()).collect::<Vec<_>>())?;
        for (&i, ax) in confirming.iter().zip(products) {
            let (lane, g) = (&mut lanes[i], &gs[i]);
            lane.report.products += 1;
            let mut exact = g.clone();
            exact.axpy(-1.0, &ax);
            if exact.norm() / lane.gnorm <= opts.tol {
                lane.finished = true;
                continue;
            }
            lane.r = exact;
            let z = apply_p(&lane.r)?;
            lane.rz = lane.r.dot(&z);
            lane.p = z;
        }
        let stepping = running(&lanes);
        if stepping.is_empty() {
            break;
        }
        let products = a.apply_many(&stepping.iter().map(|&i| lanes[i].p.clone()).collect::<Vec<_>>())?;
        for (&i, ap) in stepping.iter().zip(products) {
            let lane = &mut lanes[i];
            lane.report.products += 1;
            let pap = lane.p.dot(&ap);
            lane.iterations += 1;
            lane.report.iterations = lane.iterations;
            if !pap.is_finite() {
                return Err(SolverError::Diverged(format!(
                    "CG produced a non-finite curvature pᵀAp at iteration {} (right-hand side {}); check the \
                     weights and data, or use `dtype` f64",
                    lane.iterations,
                    i + 1
                )));
            }
            if pap <= 0.0 {
                lane.report.fail(format!(
                    "negative curvature: pᵀ(M+λI)p = {pap:.3e} ≤ 0 at iteration {}, so M + λI is not positive \
                     definite and CG stopped early; use `curvature` ggn (positive semi-definite) or a larger `damping`",
                    lane.iterations
                ));
                lane.finished = true;
                continue;
            }
            let alpha = lane.rz / pap;
            lane.x.axpy(alpha, &lane.p);
            lane.r.axpy(-alpha, &ap);
            let z = apply_p(&lane.r)?;
            let rz_new = lane.r.dot(&z);
            let beta = rz_new / lane.rz;
            lane.rz = rz_new;
            let mut next = z;
            next.axpy(beta, &lane.p);
            lane.p = next;
        }
    }
    let mut xs = Vec::with_capacity(lanes.len());
    let mut reports = Vec::with_capacity(lanes.len());
    for lane in lanes {
        let mut report = lane.report;
        if report.usable() && lane.r.norm() / lane.gnorm > opts.tol {
            report.fail(not_reached(name, opts, lane.r.norm() / lane.gnorm));
        }
        xs.push(lane.x);
        reports.push(report);
    }
    let reports = crate::finish_many(a, gs, &xs, reports, start)?;
    Ok(xs.into_iter().zip(reports).collect())
}
