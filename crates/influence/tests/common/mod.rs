//! Shared by the influence crate's integration tests: the bundled MNIST subset
//! and `explain` with a solver prepared for one test point.

use hvp_curvature::Problem;
use hvp_data::{open_spec, Dataset};
use hvp_influence::scores::{explain, Explanation};
use hvp_influence::InfluenceError;
use hvp_solvers::SolverConfig;

/// The repository's MNIST subset, `train` or `test`.
pub fn mnist(split: &str) -> Box<dyn Dataset> {
    open_spec(&format!(
        "mnist:{}/../../data/mnist-subset:{split}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// [`explain`] with the solver prepared for this one test point.
pub fn explain_with(
    problem: &Problem,
    test: &dyn Dataset,
    t: usize,
    config: &SolverConfig,
    allow_failed: bool,
) -> Result<Explanation, InfluenceError> {
    explain(problem, test, t, &config.prepare(problem)?, allow_failed, &|_| {})
}
