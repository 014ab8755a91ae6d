//! Is a subset of the data enough? Relative errors of curvature products (and,
//! with a solver, inverse products) over random m-example subsets against the
//! full data, and the error predicted from a few mini-batch products before the
//! full pass ([`Prediction`]).

use crate::{solve, SolverConfig, SolverError};
use hvp_curvature::subsample::Prediction;
use hvp_curvature::{Curvature, Problem};
use hvp_data::Subset;
use hvp_model::ParamVector;
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::SeedableRng;

/// What to measure.
#[derive(Clone, Debug)]
pub struct SubsetStudy {
    pub curvature: Curvature,
    /// Subset sizes m (those outside 1..=N are skipped).
    pub sizes: Vec<usize>,
    /// Random subsets per size.
    pub repeats: usize,
    /// Mini-batch products the prediction is made from (at least 2).
    pub predict_batches: usize,
    pub predict_batch_size: usize,
    pub seed: u64,
    /// Also measure the inverse product `(M + λI)⁻¹ v` with this solver.
    pub solver: Option<SolverConfig>,
}

/// The measurements at one subset size.
#[derive(Clone, Debug)]
pub struct SubsetRow {
    pub m: usize,
    /// `‖M_S v − M v‖ / ‖M v‖` of each random subset S.
    pub measured: Vec<f64>,
    /// The predicted error of an m-example product.
    pub predicted: f64,
    /// The inverse products' relative errors (empty without a solver).
    pub inverse_errors: Vec<f64>,
}

/// Mean and sample standard deviation (0 for fewer than two values).
pub fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let sd = if v.len() > 1 {
        (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (mean, sd)
}

/// Runs the study on `problem` in the direction `v`; `on_row` sees each size's
/// row as soon as it is measured. `known_full` is the full-data product `M v`
/// when the caller has it (else it is computed). The sizes kept and the
/// mini-batch size used are in the rows and [`SubsetStudy::predict_batch_size`]
/// clamped to N.
pub fn subset_errors(
    problem: &Problem,
    v: &ParamVector,
    known_full: Option<&ParamVector>,
    study: &SubsetStudy,
    on_row: &mut dyn FnMut(&SubsetRow),
) -> Result<Vec<SubsetRow>, SolverError> {
    let n = problem.data.len();
    let sizes: Vec<usize> = study.sizes.iter().copied().filter(|&m| m >= 1 && m <= n).collect();
    if sizes.is_empty() {
        return Err(SolverError::BadOption(format!(
            "`sizes` must include a size between 1 and N = {n}"
        )));
    }
    if study.predict_batches < 2 {
        return Err(SolverError::BadOption(
            "`predict_batches` must be at least 2 (a variance needs two batches)".into(),
        ));
    }
    let mut rng = StdRng::seed_from_u64(study.seed);
    let product_on =
        |p: &Problem| -> Result<ParamVector, SolverError> { Ok(p.product(study.curvature, v, &|_| {})?.value) };
    let mut subset_of = |m: usize| Subset::new(problem.data, sample(&mut rng, n, m).into_vec());
    // The prediction comes from a few mini-batches, before (and without) the full pass.
    let b = study.predict_batch_size.clamp(1, n);
    let mut batches = Vec::with_capacity(study.predict_batches);
    for _ in 0..study.predict_batches {
        let s = subset_of(b).map_err(hvp_curvature::CurvatureError::from)?;
        batches.push(product_on(&problem.on(&s)?)?);
    }
    let prediction = Prediction::from_batches(&batches, b, n);
    let full = match known_full {
        Some(f) => f.clone(),
        None => product_on(problem)?,
    };
    let full_solution = match &study.solver {
        Some(config) => {
            let (x, report) = solve(problem, config, v)?;
            if !report.usable() {
                return Err(SolverError::FullSolveFailed(Box::new(report)));
            }
            Some(x)
        }
        None => None,
    };
    let mut rows = Vec::with_capacity(sizes.len());
    for &m in &sizes {
        let mut row = SubsetRow {
            m,
            measured: Vec::new(),
            predicted: prediction.relative_error(m),
            inverse_errors: Vec::new(),
        };
        for _ in 0..study.repeats.max(1) {
            let s = subset_of(m).map_err(hvp_curvature::CurvatureError::from)?;
            let p = problem.on(&s)?;
            row.measured.push(product_on(&p)?.relative_error(&full));
            if let (Some(config), Some(xf)) = (&study.solver, &full_solution) {
                row.inverse_errors.push(solve(&p, config, v)?.0.relative_error(xf));
            }
        }
        on_row(&row);
        rows.push(row);
    }
    Ok(rows)
}
