//! Influence scores of every training example on one test point: `s_test` from
//! any solver, then one forward-mode pass (a JVP of the per-example losses along
//! `s_test`), never per-example gradients.

use crate::InfluenceError;
use hvp_curvature::Problem;
use hvp_data::{Dataset, Subset};
use hvp_model::ParamVector;
use hvp_solvers::{PreparedSolver, SolveReport};
use rayon::prelude::*;

/// The sign and scale of the scores, stated wherever they are written.
pub const CONVENTION: &str = "score(i, t) = grad loss(z_t)^T (M + lambda I)^-1 grad loss(z_i) / N: the predicted increase of \
test loss t if training example i is removed (positive = helpful, negative = harmful); M = Hessian (or GGN/Fisher) of the \
mean training loss, plus weight_decay * I";

/// One explained test point.
#[derive(Clone, Debug)]
pub struct Explanation {
    pub test_index: usize,
    pub label: usize,
    pub test_loss: f64,
    /// `score(i, t)` for every training example i, in dataset order.
    pub scores: Vec<f64>,
    pub s_test_norm: f64,
    /// The solve behind `s_test`: status, exact residual, warnings.
    pub report: SolveReport,
}

/// `∇ℓ(z_t)` of test example `t` and its loss, in f64 whatever the problem's
/// dtype (one example costs little; the right-hand side sets the solve's accuracy).
pub fn test_gradient(train: &Problem, test: &dyn Dataset, t: usize) -> Result<(ParamVector, f64), InfluenceError> {
    let one = Subset::new(test, vec![t])?;
    let g = Problem::new(train.model, train.weights, &one, 1)?.gradient_as::<f64>(&|_| {})?;
    Ok((g.value, g.loss))
}

/// `score(i, t)` of every training example for a given `s_test`.
pub fn scores(train: &Problem, s_test: &ParamVector, progress: &dyn Fn(usize)) -> Result<Vec<f64>, InfluenceError> {
    let n = train.data.len() as f64;
    let directional = train.loss_directional(s_test, progress)?;
    Ok(directional.into_iter().map(|d| d / n).collect())
}

/// `score(i, t)` of every training example for each of several `s_tests`
/// (`[q][i]`), choosing the cheaper computation: one forward-mode pass per
/// vector for a single one; for several, one pass that forms each layer's
/// per-example gradients a batch at a time and contracts them with all vectors
/// at once ([`hvp_solvers::kfac::example_gradient_dots`]), where every parameter
/// lies in a Linear, Conv2d or BatchNorm layer (else one pass per vector).
pub fn scores_many(
    train: &Problem,
    s_tests: &[ParamVector],
    progress: &dyn Fn(usize),
) -> Result<Vec<Vec<f64>>, InfluenceError> {
    if s_tests.len() > 1 {
        if let Some(dots) = hvp_solvers::kfac::example_gradient_dots(train, s_tests, progress)? {
            let n = train.data.len() as f64;
            return Ok(dots
                .into_iter()
                .map(|d| d.into_iter().map(|v| v / n).collect())
                .collect());
        }
    }
    s_tests.iter().map(|s| scores(train, s, progress)).collect()
}

/// `s_test = (M + λI)⁻¹ ∇ℓ(z_t)` and the scores of every training example for
/// test example `t`, by a solver prepared once for all test points
/// ([`hvp_solvers::SolverConfig::prepare`]). A failed solve is an error
/// ([`InfluenceError::SolveFailed`]) unless `allow_failed`.
pub fn explain(
    train: &Problem,
    test: &dyn Dataset,
    t: usize,
    solver: &PreparedSolver,
    allow_failed: bool,
    progress: &dyn Fn(usize),
) -> Result<Explanation, InfluenceError> {
    let mut one = explain_all(train, test, &[t], solver, allow_failed, progress)?;
    Ok(one.remove(0))
}

/// [`explain`] for each of `test_indices`, in order, with the solver's factors
/// (if any) made once, the s_tests solved together
/// ([`PreparedSolver::solve_many`]) and the scores of all test points from one
/// pass over the training data ([`scores_many`]). Duplicate indices are refused (a test point
/// scored twice is a caller's mistake).
pub fn explain_all(
    train: &Problem,
    test: &dyn Dataset,
    test_indices: &[usize],
    solver: &PreparedSolver,
    allow_failed: bool,
    progress: &dyn Fn(usize),
) -> Result<Vec<Explanation>, InfluenceError> {
    let mut seen = std::collections::HashSet::new();
    for &t in test_indices {
        if t >= test.len() {
            return Err(InfluenceError::Training(format!(
                "test index {t} is out of range ({} test examples)",
                test.len()
            )));
        }
        if !seen.insert(t) {
            return Err(InfluenceError::Training(format!("test index {t} is given twice")));
        }
    }
    // One small pass per test point, as many at once as there are workers;
    // one after another across processes, whose passes meet in collectives.
    let one = |&t: &usize| test_gradient(train, test, t);
    let computed: Vec<(ParamVector, f64)> = if hvp_dist::is_distributed() {
        test_indices.iter().map(one).collect::<Result<_, _>>()?
    } else {
        test_indices.par_iter().map(one).collect::<Result<_, _>>()?
    };
    let (gradients, losses): (Vec<ParamVector>, Vec<f64>) = computed.into_iter().unzip();
    let (solutions, dots) = solver.solve_many_with_dots(train, &gradients)?;
    let mut solved = Vec::with_capacity(test_indices.len());
    for ((&t, test_loss), (s_test, report)) in test_indices.iter().zip(losses).zip(solutions) {
        if !report.usable() && !allow_failed {
            return Err(InfluenceError::SolveFailed {
                test_index: t,
                report: Box::new(report),
            });
        }
        solved.push((t, test_loss, s_test, report));
    }
    let all_scores = match dots {
        // The solve's own pass formed every ∇ℓ_iᵀ s_test.
        Some(dots) => {
            progress(train.data.len());
            let n = train.data.len() as f64;
            dots.into_iter()
                .map(|d| d.into_iter().map(|v| v / n).collect())
                .collect()
        }
        None => {
            let s_tests: Vec<ParamVector> = solved.iter().map(|s| s.2.clone()).collect();
            scores_many(train, &s_tests, progress)?
        }
    };
    Ok(solved
        .into_iter()
        .zip(all_scores)
        .map(|((t, test_loss, s_test, report), scores)| Explanation {
            test_index: t,
            label: test.label(t),
            test_loss,
            scores,
            s_test_norm: s_test.norm(),
            report,
        })
        .collect())
}

/// Top-k helpful (largest score) and harmful (smallest score) training indices,
/// ties broken by index: the first and last k of the order by descending score,
/// then index. Each end is selected in linear time and only its k sorted (a
/// full sort per test point took longer than formatting its CSV rows).
pub fn top_k(scores: &[f64], k: usize) -> (Vec<usize>, Vec<usize>) {
    let n = scores.len();
    let k = k.min(n);
    let order = |a: &usize, b: &usize| scores[*b].total_cmp(&scores[*a]).then(a.cmp(b));
    let mut indices: Vec<usize> = (0..n).collect();
    if k == 0 {
        return (Vec::new(), Vec::new());
    }
    indices.select_nth_unstable_by(k - 1, order);
    let mut helpful = indices[..k].to_vec();
    helpful.sort_unstable_by(order);
    indices.select_nth_unstable_by(n - k, order);
    let mut harmful = indices[n - k..].to_vec();
    harmful.sort_unstable_by(|a, b| order(b, a));
    (helpful, harmful)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_by_score_then_index() {
        let s = [0.5, -1.0, 2.0, 0.5, -3.0];
        let (help, harm) = top_k(&s, 2);
        assert_eq!(help, vec![2, 0]);
        assert_eq!(harm, vec![4, 1]);
        assert_eq!(top_k(&s, 10).0.len(), 5);
        assert_eq!(top_k(&s, 0), (vec![], vec![]));
        assert_eq!(top_k(&[], 3), (vec![], vec![]));
    }

    #[test]
    fn top_k_equals_the_ends_of_a_full_sort() {
        // Few distinct values, so most scores tie and the index decides.
        let scores: Vec<f64> = (0..200u64).map(|i| ((i * 7919) % 13) as f64 - 6.0).collect();
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        for k in [1, 2, 13, 100, 199, 200, 250] {
            let (help, harm) = top_k(&scores, k);
            let k = k.min(scores.len());
            assert_eq!(help, order[..k].to_vec(), "k = {k}");
            assert_eq!(harm, order.iter().rev().take(k).copied().collect::<Vec<_>>(), "k = {k}");
        }
    }
}
