//! `hvp subsample-error`: is a subset of the data enough? For each subset size m,
//! the measured relative error of the m-example curvature product (and, with
//! `--solver`, of the inverse product) against the full-data one, over random
//! subsets; and the error predicted from the variance between a few mini-batch
//! products, which needs no full pass.

use super::solve::{run_solver, SolverArg, SolverOptions};
use super::{load_vector, setup, write_json};
use crate::args::{CurvatureArg, DataArgs, ModelArgs, RunArgs};
use anyhow::{bail, Result};
use clap::Args;
use hvp_curvature::subsample::Prediction;
use hvp_curvature::{Curvature, Problem};
use hvp_data::{Dataset, Subset};
use hvp_model::ParamVector;
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::SeedableRng;
use std::path::PathBuf;

#[derive(Args)]
pub struct SubsampleArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub run: RunArgs,
    /// Direction v.
    #[arg(long)]
    pub vector: PathBuf,
    /// Curvature M: hessian (exact), ggn (Jᵀ H_out J) or fisher (empirical Fisher).
    #[arg(long, value_enum, default_value = "hessian")]
    pub curvature: CurvatureArg,
    /// Subset sizes m.
    #[arg(value_parser = crate::checks::iterations, long, value_delimiter = ',', default_value = "100,250,500")]
    pub sizes: Vec<usize>,
    /// Random subsets per size.
    #[arg(value_parser = crate::checks::iterations, long, default_value_t = 5)]
    pub repeats: usize,
    /// Mini-batches sampled for the predicted error.
    #[arg(value_parser = crate::checks::iterations, long, default_value_t = 10)]
    pub predict_batches: usize,
    /// Examples per mini-batch for the predicted error.
    #[arg(value_parser = crate::checks::iterations, long, default_value_t = 50)]
    pub predict_batch_size: usize,
    /// Also measure the inverse product's error with this solver.
    #[arg(long, value_enum)]
    pub solver: Option<SolverArg>,
    /// λ in (M + λI); the same default in every command (0 = undamped, exact solvers only).
    #[arg(value_parser = crate::checks::non_negative, long, default_value_t = hvp_solvers::DEFAULT_DAMPING)]
    pub damping: f64,
    /// Seed of every random choice (sampled labels, subsets, start vectors).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

fn product(p: &Problem, c: Curvature, v: &ParamVector) -> Result<ParamVector> {
    Ok(p.product(c, v, &|_| {})?.value)
}

fn stats(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let sd = if v.len() > 1 {
        (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (mean, sd)
}

pub fn run(a: SubsampleArgs) -> Result<()> {
    let (model, weights, data) = setup(&a.model, &a.data, &a.run)?;
    let view = data.view();
    let n = view.len();
    let problem = Problem::new(&model, &weights, &view, a.run.batch_size)?.with_dtype(a.run.dtype.into());
    let v = load_vector(&model, &a.vector)?;
    let c: Curvature = a.curvature.into();
    let sizes: Vec<usize> = a.sizes.iter().copied().filter(|&m| m >= 1 && m <= n).collect();
    if sizes.is_empty() {
        bail!("--sizes must include a size between 1 and N = {n}");
    }
    if a.predict_batches < 2 {
        bail!("--predict-batches must be at least 2 (a variance needs two batches)");
    }
    let mut rng = StdRng::seed_from_u64(a.seed);
    let subset_problem = |idx: Vec<usize>| -> Result<ParamVector> {
        let s = Subset::new(&view, idx)?;
        product(&problem.on(&s)?, c, &v)
    };
    // Prediction from a few mini-batches, before (and without) the full pass.
    let b = a.predict_batch_size.clamp(1, n);
    let batches = (0..a.predict_batches)
        .map(|_| subset_problem(sample(&mut rng, n, b).into_vec()))
        .collect::<Result<Vec<_>>>()?;
    let pred = Prediction::from_batches(&batches, b, n);

    let full = product(&problem, c, &v)?;
    let solver_opts = a.solver.map(|s| SolverOptions {
        solver: s,
        curvature: a.curvature,
        damping: a.damping,
        tol: 1e-8,
        max_iter: 500,
        depth: 200,
        repeats: 1,
        scale: None,
        lissa_batch: 32,
        rank: 50,
        seed: a.seed,
        factors: None,
        fisher: super::solve::FisherArg::Mc,
        keep_unconverged: false,
    });
    let full_solution = match &solver_opts {
        Some(o) => {
            let (x, report) = run_solver(&problem, o, &v)?;
            if !report.usable() {
                return Err(super::solve::failed(
                    &report,
                    "the full-data inverse product is unknown, so no subset error was computed",
                ));
            }
            Some(x)
        }
        None => None,
    };
    println!(
        "{:?}-vector product over subsets of m of the N = {n} examples ({} random subsets each):\n",
        a.curvature, a.repeats
    );
    println!("| m | measured error (mean ± sd) | predicted error | inverse-product error (mean ± sd) |");
    println!("|---|---|---|---|");
    let mut rows = Vec::new();
    for &m in &sizes {
        let mut errs = Vec::new();
        let mut inv_errs = Vec::new();
        for _ in 0..a.repeats.max(1) {
            let idx = sample(&mut rng, n, m).into_vec();
            let s = Subset::new(&view, idx)?;
            let p = problem.on(&s)?;
            errs.push(product(&p, c, &v)?.relative_error(&full));
            if let (Some(o), Some(xf)) = (&solver_opts, &full_solution) {
                inv_errs.push(run_solver(&p, o, &v)?.0.relative_error(xf));
            }
        }
        let (mean, sd) = stats(&errs);
        let predicted = pred.relative_error(m);
        let inv = if inv_errs.is_empty() {
            "–".to_string()
        } else {
            let (im, isd) = stats(&inv_errs);
            format!("{im:.4} ± {isd:.4}")
        };
        println!("| {m} | {mean:.4} ± {sd:.4} | {predicted:.4} | {inv} |");
        rows.push(serde_json::json!({
            "m": m, "measured_mean": mean, "measured_sd": sd, "measured": errs,
            "predicted": predicted, "inverse_errors": inv_errs,
        }));
    }
    if let Some(path) = &a.report {
        write_json(
            path,
            &serde_json::json!({
                "curvature": format!("{:?}", a.curvature).to_lowercase(),
                "examples": n,
                "predict_batches": a.predict_batches,
                "predict_batch_size": b,
                "solver": a.solver.map(|s| format!("{s:?}").to_lowercase()),
                "damping": a.damping,
                "rows": rows,
            }),
        )?;
    }
    Ok(())
}
