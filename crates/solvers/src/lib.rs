//! Inverse curvature products `x = (M + λI)⁻¹ g` for any curvature operator M
//! (Hessian, GGN or empirical Fisher over a dataset or a sample of it), each
//! solver returning its solution and a [`SolveReport`] with the relative residual
//! `‖(M+λI)x − g‖ / ‖g‖` measured with the exact operator.
//!
//! * [`direct`]: dense M from n products, Cholesky (eigen-decomposition when
//!   indefinite), for small models;
//! * [`cg`]: conjugate gradients, with negative-curvature detection;
//! * [`lissa`]: Koh & Liang's stochastic recursion on mini-batch products, scale
//!   from a power-iteration estimate of λ_max, divergence detection;
//! * [`lanczos`]: top-k eigenpairs (Lanczos with full reorthogonalisation; the
//!   symmetric case of Arnoldi, Schioppa et al. 2022) and the inverse on that
//!   subspace; also spectrum estimates (extreme eigenvalues, Hutchinson trace);
//! * [`kfac`]: K-FAC and EK-FAC factors and their inverse products;
//!
//! and [`solve`], which runs the solver a [`SolverConfig`] names.

pub mod cg;
mod config;
pub mod dense;
pub mod direct;
pub mod kfac;
pub mod lanczos;
pub mod lissa;
mod operator;
mod report;
pub mod spectrum;
pub mod subset;

pub use config::{solve, PreparedSolver, Residuals, SolverConfig, SolverKind};

/// λ in (M + λI) when the user gives none, in every command and binding: small
/// against the curvature of typical networks (mean eigenvalues 1e-2–1e1 on
/// the fixtures), nonzero so that the factored solvers and self-influence are
/// defined. Damping 0 (the undamped problem) must be asked for.
pub const DEFAULT_DAMPING: f64 = 1e-3;
pub use operator::{CurvatureOperator, Damped, LinearOperator};
pub use report::{finish, finish_many, finish_with_products, with_unmeasured, SolveReport, SolveStatus};

use hvp_curvature::CurvatureError;

#[derive(Debug, thiserror::Error)]
pub enum SolverError {
    #[error(transparent)]
    Curvature(#[from] CurvatureError),
    #[error(
        "the direct solver builds the dense {params}x{params} matrix from {params} products; it refuses more than \
         {limit} parameters (memory {limit}² x 8 bytes and {limit} passes over the data): use `solver` cg or pcg"
    )]
    TooLarge { params: usize, limit: usize },
    #[error("{0}")]
    Diverged(String),
    #[error("dense linear algebra failed: {0}")]
    Dense(String),
    #[error("{0}")]
    BadOption(String),
    /// The full-data solve a study compares against did not converge.
    #[error("the full-data inverse product did not converge ({}), so no subset error was computed", .0.failure.as_deref().unwrap_or("tolerance not reached"))]
    FullSolveFailed(Box<SolveReport>),
}
