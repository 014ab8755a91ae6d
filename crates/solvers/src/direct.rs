//! Direct solve: the dense matrix M from n products (column j = M e_j), then
//! Cholesky of M + λI, or its eigen-decomposition when it is not positive definite.

use crate::dense::sym_eigen;
use crate::{Damped, LinearOperator, SolveReport, SolverError};
use hvp_model::ParamVector;
use std::time::Instant;

/// Largest parameter count the direct solver accepts: the dense matrix takes n
/// passes over the data and n² · 8 bytes (800 MB at this limit).
pub const MAX_PARAMS: usize = 10_000;

/// The dense `n×n` row-major matrix of `op`, symmetrised.
pub fn dense_matrix(op: &dyn LinearOperator, like: &ParamVector) -> Result<Vec<f64>, SolverError> {
    let n = op.dim();
    let mut m = vec![0.0; n * n];
    // Columns a block at a time, so operators that share passes over the data
    // between vectors build the matrix in n / COLUMNS_PER_BLOCK passes.
    const COLUMNS_PER_BLOCK: usize = 256;
    for first in (0..n).step_by(COLUMNS_PER_BLOCK) {
        let cols: Vec<usize> = (first..(first + COLUMNS_PER_BLOCK).min(n)).collect();
        let units: Vec<ParamVector> = cols
            .iter()
            .map(|&j| {
                let mut e = vec![0.0; n];
                e[j] = 1.0;
                like.with_flat(&e)
            })
            .collect();
        for (&j, col) in cols.iter().zip(op.apply_many(&units)?) {
            for (i, c) in col.to_flat().into_iter().enumerate() {
                m[i * n + j] = c;
            }
        }
    }
    for i in 0..n {
        for j in 0..i {
            let s = 0.5 * (m[i * n + j] + m[j * n + i]);
            m[i * n + j] = s;
            m[j * n + i] = s;
        }
    }
    Ok(m)
}

/// Relative residual a direct solve must reach unless told otherwise.
pub const DEFAULT_TOL: f64 = 1e-6;

/// `(M + λI)⁻¹ g` for the operator `m` (undamped), to [`DEFAULT_TOL`].
pub fn solve(m: &dyn LinearOperator, damping: f64, g: &ParamVector) -> Result<(ParamVector, SolveReport), SolverError> {
    solve_to(m, damping, g, DEFAULT_TOL)
}

/// `(M + λI)⁻¹ g`, failed unless the exact relative residual is ≤ `tol`.
pub fn solve_to(
    m: &dyn LinearOperator,
    damping: f64,
    g: &ParamVector,
    tol: f64,
) -> Result<(ParamVector, SolveReport), SolverError> {
    let mut one = solve_many(m, damping, std::slice::from_ref(g), tol)?;
    Ok(one.remove(0))
}

/// [`solve_to`] for several right-hand sides: the matrix built and factored
/// once, each solved against the factorisation, the exact residuals checked
/// by one block product.
pub fn solve_many(
    m: &dyn LinearOperator,
    damping: f64,
    gs: &[ParamVector],
    tol: f64,
) -> Result<Vec<(ParamVector, SolveReport)>, SolverError> {
    let n = m.dim();
    if n > MAX_PARAMS {
        return Err(SolverError::TooLarge {
            params: n,
            limit: MAX_PARAMS,
        });
    }
    let Some(like) = gs.first() else {
        return Ok(Vec::new());
    };
    let start = Instant::now();
    let p0 = m.products();
    let mut a = dense_matrix(m, like)?;
    for i in 0..n {
        a[i * n + i] += damping;
    }
    let matrix_products = m.products() - p0;
    let mut report = SolveReport {
        iterations: 1,
        products: matrix_products,
        ..SolveReport::exact("direct", tol)
    };
    let solutions: Vec<Vec<f64>> = match cholesky_solve_many(n, &a, gs) {
        Some(xs) => xs,
        None => {
            let (vals, vecs) = sym_eigen(n, &a)?;
            let (lo, hi) = (vals[0], vals[n - 1]);
            if vals.iter().any(|v| v.abs() <= 1e-12 * hi.abs().max(lo.abs())) {
                return Err(SolverError::Dense(format!(
                    "M + λI is singular (eigenvalues from {lo:.3e} to {hi:.3e}): increase `damping`"
                )));
            }
            report.warnings.push(format!(
                "M + λI is indefinite (smallest eigenvalue {lo:.3e}, largest {hi:.3e}); solved through its \
                 eigen-decomposition. For influence functions use `curvature` ggn or `damping` above {:.3e}",
                -lo + damping
            ));
            // x = U diag(1/λ) Uᵀ b
            gs.iter()
                .map(|g| {
                    let b = g.to_flat();
                    let coef: Vec<f64> = (0..n)
                        .map(|k| (0..n).map(|i| vecs[i * n + k] * b[i]).sum::<f64>() / vals[k])
                        .collect();
                    (0..n)
                        .map(|i| (0..n).map(|k| vecs[i * n + k] * coef[k]).sum())
                        .collect()
                })
                .collect()
        }
    };
    let xs: Vec<ParamVector> = gs.iter().zip(&solutions).map(|(g, x)| g.with_flat(x)).collect();
    let damped = Damped { inner: m, damping };
    let reports = crate::finish_many(&damped, gs, &xs, vec![report; gs.len()], start)?;
    Ok(xs.into_iter().zip(reports).collect())
}

/// Cholesky of `a` once, then each right-hand side; `None` when `a` is not
/// positive definite.
fn cholesky_solve_many(n: usize, a: &[f64], gs: &[ParamVector]) -> Option<Vec<Vec<f64>>> {
    let factor = crate::dense::cholesky(n, a)?;
    Some(gs.iter().map(|g| factor.solve(&g.to_flat())).collect())
}
