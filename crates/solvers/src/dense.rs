//! Small dense symmetric linear algebra through faer.

use crate::SolverError;
use faer::linalg::solvers::Solve;
use faer::{Mat, Side};

/// Eigen-decomposition of the symmetric `n×n` row-major `a`: eigenvalues in
/// ascending order and eigenvectors as columns of a row-major `n×n` matrix.
pub fn sym_eigen(n: usize, a: &[f64]) -> Result<(Vec<f64>, Vec<f64>), SolverError> {
    let m = Mat::<f64>::from_fn(n, n, |i, j| 0.5 * (a[i * n + j] + a[j * n + i]));
    let evd = m
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| SolverError::Dense(format!("eigen-decomposition did not converge ({e:?})")))?;
    let s = evd.S().column_vector();
    let u = evd.U();
    let values = (0..n).map(|i| s[i]).collect();
    let mut vectors = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            vectors[i * n + j] = u[(i, j)];
        }
    }
    Ok((values, vectors))
}

/// The Cholesky factorisation of a symmetric positive definite matrix, made
/// once for any number of right-hand sides.
pub struct Cholesky {
    n: usize,
    llt: faer::linalg::solvers::Llt<f64>,
}

/// Factors the symmetric `n×n` row-major `a`; `None` when it is not positive definite.
pub fn cholesky(n: usize, a: &[f64]) -> Option<Cholesky> {
    let m = Mat::<f64>::from_fn(n, n, |i, j| 0.5 * (a[i * n + j] + a[j * n + i]));
    let llt = m.llt(Side::Lower).ok()?;
    Some(Cholesky { n, llt })
}

impl Cholesky {
    /// `a⁻¹ b`.
    pub fn solve(&self, b: &[f64]) -> Vec<f64> {
        let rhs = Mat::<f64>::from_fn(self.n, 1, |i, _| b[i]);
        let x = self.llt.solve(&rhs);
        (0..self.n).map(|i| x[(i, 0)]).collect()
    }
}

/// Solves `a x = b` for symmetric positive definite `a` by Cholesky; `None` when
/// `a` is not positive definite.
pub fn cholesky_solve(n: usize, a: &[f64], b: &[f64]) -> Option<Vec<f64>> {
    Some(cholesky(n, a)?.solve(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eigen_and_cholesky_on_a_known_matrix() {
        // [[2, 1], [1, 2]] has eigenvalues 1 and 3.
        let a = [2.0, 1.0, 1.0, 2.0];
        let (vals, vecs) = sym_eigen(2, &a).unwrap();
        assert!((vals[0] - 1.0).abs() < 1e-14 && (vals[1] - 3.0).abs() < 1e-14);
        // A v = λ v for the second column.
        let v = [vecs[1], vecs[3]];
        assert!((2.0 * v[0] + v[1] - 3.0 * v[0]).abs() < 1e-14);
        let x = cholesky_solve(2, &a, &[3.0, 3.0]).unwrap();
        assert!((x[0] - 1.0).abs() < 1e-14 && (x[1] - 1.0).abs() < 1e-14);
        assert!(cholesky_solve(2, &[1.0, 2.0, 2.0, 1.0], &[1.0, 1.0]).is_none());
    }
}
