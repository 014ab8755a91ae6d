//! `hvp subsample-error`: is a subset of the data enough? For each subset size m,
//! the measured relative error of the m-example curvature product (and, with
//! `--solver`, of the inverse product) against the full-data one, over random
//! subsets; and the error predicted from the variance between a few mini-batch
//! products, which needs no full pass.

use super::solve::{SolverArg, SolverOptions};
use super::{load_vector, setup, write_json};
use crate::args::{CurvatureArg, DataArgs, ModelArgs, RunArgs};
use anyhow::Result;
use clap::Args;
use hvp_curvature::Problem;
use hvp_data::Dataset;
use hvp_solvers::subset::{mean_sd, subset_errors, SubsetRow, SubsetStudy};
use hvp_solvers::SolverError;
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

pub fn run(a: SubsampleArgs) -> Result<()> {
    let (model, weights, data) = setup(&a.model, &a.data, &a.run)?;
    let view = data.view();
    let n = view.len();
    let problem = Problem::new(&model, &weights, &view, a.run.batch_size)?.with_dtype(a.run.dtype.into());
    let v = load_vector(&model, &a.vector)?;
    let study = SubsetStudy {
        curvature: a.curvature.into(),
        sizes: a.sizes.clone(),
        repeats: a.repeats,
        predict_batches: a.predict_batches,
        predict_batch_size: a.predict_batch_size,
        seed: a.seed,
        solver: a.solver.map(|s| {
            SolverOptions {
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
                no_factor_cache: false,
                residuals: hvp_solvers::Residuals::All,
            }
            .config()
        }),
    };
    println!(
        "{:?}-vector product over subsets of m of the N = {n} examples ({} random subsets each):\n",
        a.curvature, a.repeats
    );
    println!("| m | measured error (mean ± sd) | predicted error | inverse-product error (mean ± sd) |");
    println!("|---|---|---|---|");
    let print_row = &mut |row: &SubsetRow| {
        let (mean, sd) = mean_sd(&row.measured);
        let inv = if row.inverse_errors.is_empty() {
            "–".to_string()
        } else {
            let (im, isd) = mean_sd(&row.inverse_errors);
            format!("{im:.4} ± {isd:.4}")
        };
        println!("| {} | {mean:.4} ± {sd:.4} | {:.4} | {inv} |", row.m, row.predicted);
    };
    let rows = match subset_errors(&problem, &v, None, &study, print_row) {
        Err(SolverError::FullSolveFailed(report)) => {
            return Err(super::solve::failed(
                &report,
                "the full-data inverse product is unknown, so no subset error was computed",
            ))
        }
        other => other?,
    };
    if let Some(path) = &a.report {
        let rows: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                let (mean, sd) = mean_sd(&r.measured);
                serde_json::json!({
                    "m": r.m, "measured_mean": mean, "measured_sd": sd, "measured": r.measured,
                    "predicted": r.predicted, "inverse_errors": r.inverse_errors,
                })
            })
            .collect();
        write_json(
            path,
            &serde_json::json!({
                "curvature": format!("{:?}", a.curvature).to_lowercase(),
                "examples": n,
                "predict_batches": a.predict_batches,
                "predict_batch_size": a.predict_batch_size.clamp(1, n),
                "solver": a.solver.map(|s| format!("{s:?}").to_lowercase()),
                "damping": a.damping,
                "rows": rows,
            }),
        )?;
    }
    Ok(())
}
