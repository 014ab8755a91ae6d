//! Influence functions (Koh & Liang 2017) end to end: training, influence scores
//! of every training example on a test prediction without per-example gradients,
//! self-influence, and leave-one-out validation by retraining.
//!
//! **Convention.** `score(i, t) = ∇ℓ(z_t)ᵀ (M + λI)⁻¹ ∇ℓ(z_i) / N`: the predicted
//! *increase* of test example t's loss when training example i is removed (and
//! the model retrained). Positive = i helped t (removing it hurts); negative = i
//! harmed t. M is the Hessian (or GGN/Fisher) of the mean training loss plus the
//! weight decay `w·I` when the objective has one.

pub mod loo;
pub mod scores;
pub mod self_influence;
pub mod stats;
pub mod train;

#[derive(Debug, thiserror::Error)]
pub enum InfluenceError {
    #[error(transparent)]
    Curvature(#[from] hvp_curvature::CurvatureError),
    #[error(transparent)]
    Solver(#[from] hvp_solvers::SolverError),
    #[error(transparent)]
    Data(#[from] hvp_data::DataError),
    #[error("{0}")]
    Training(String),
    #[error(
        "{} solve for test example {test_index} failed: {} (relative residual ‖(M+λI)x − g‖/‖g‖ = {:.3e}); it was \
         not scored",
        report.solver,
        report.failure.as_deref().unwrap_or("tolerance not reached"),
        report.relative_residual
    )]
    SolveFailed {
        test_index: usize,
        report: Box<hvp_solvers::SolveReport>,
    },
}
