//! Self-influence `∇ℓ(z_i)ᵀ (F̂ + λI)⁻¹ ∇ℓ(z_i)` of every training example with
//! K-FAC/EK-FAC factors (affordable for every example: one layer's per-example
//! gradient at a time, in the factors' eigenbasis). High values flag atypical
//! or mislabelled examples.

use crate::InfluenceError;
use hvp_curvature::Problem;
use hvp_solvers::kfac::Factors;

/// Self-influence of every example of `problem` (in dataset order) with the
/// damping `λ` (> 0: the factored curvature is singular wherever a layer has
/// fewer examples than inputs). A non-finite value is an error naming the example.
pub fn self_influence(
    problem: &Problem,
    factors: &Factors,
    damping: f64,
    progress: &dyn Fn(usize),
) -> Result<Vec<f64>, InfluenceError> {
    check_damping(damping)?;
    let values = factors.self_influence(problem, damping, progress)?;
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(InfluenceError::Training(format!(
            "the self-influence of example {i} is {} (singular or overflowing factors); increase `damping` or use \
             `dtype` f64",
            values[i]
        )));
    }
    Ok(values)
}

/// Refuses a damping with which `(F̂ + λI)⁻¹` may not exist (before any factor is computed).
pub fn check_damping(damping: f64) -> Result<(), InfluenceError> {
    if !(damping.is_finite() && damping > 0.0) {
        return Err(InfluenceError::Training(format!(
            "`damping` {damping} (and no `weight_decay`): the factored curvature is singular wherever a layer has \
             fewer examples than inputs, so (F̂ + λI)⁻¹ is undefined and every score would be NaN; give `damping` > 0 \
             (the default is {})",
            hvp_solvers::DEFAULT_DAMPING
        )));
    }
    Ok(())
}

/// Example indices ordered by self-influence, highest first (ties by index).
pub fn ranking(values: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&x, &y| values[y].total_cmp(&values[x]).then(x.cmp(&y)));
    order
}
