//! `hvp spectrum`: extreme eigenvalues (Lanczos) and trace (Hutchinson) of the
//! curvature, to choose the damping λ and LiSSA's scale knowingly.

use super::{setup, write_json};
use crate::args::{CurvatureArg, DataArgs, ModelArgs, RunArgs};
use anyhow::{bail, Result};
use clap::Args;
use hvp_curvature::Problem;
use hvp_data::Dataset;
use hvp_model::ParamVector;
use hvp_solvers::{lanczos, CurvatureOperator};
use std::path::PathBuf;

#[derive(Args)]
pub struct SpectrumArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub run: RunArgs,
    /// Curvature M: hessian (exact), ggn (Jᵀ H_out J) or fisher (empirical Fisher).
    #[arg(long, value_enum, default_value = "hessian")]
    pub curvature: CurvatureArg,
    /// Number of largest eigenvalues to print.
    #[arg(value_parser = crate::checks::small_count, long, default_value_t = 10)]
    pub top: usize,
    /// Lanczos steps (default: max(3 × top, 30)); more steps, better extreme estimates.
    #[arg(value_parser = crate::checks::iterations, long)]
    pub steps: Option<usize>,
    /// Rademacher probes for the trace estimate.
    #[arg(value_parser = crate::checks::iterations, long, default_value_t = 10)]
    pub trace_samples: usize,
    /// Seed of every random choice (sampled labels, subsets, start vectors).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

pub fn run(a: SpectrumArgs) -> Result<()> {
    let (model, weights, data) = setup(&a.model, &a.data, &a.run)?;
    let view = data.view();
    let problem = Problem::new(&model, &weights, &view, a.run.batch_size)?.with_dtype(a.run.dtype.into());
    let op = CurvatureOperator::new(&problem, a.curvature.into());
    let like = ParamVector::zeros(&model);
    if a.top > model.num_params() {
        bail!(
            "--top {} asks for more eigenvalues than the {} parameters have",
            a.top,
            model.num_params()
        );
    }
    let steps = a.steps.unwrap_or((3 * a.top).max(30)).min(model.num_params());
    let ritz = lanczos::lanczos(&op, steps, &lanczos::random_unit(&like, a.seed))?;
    let mut top: Vec<f64> = ritz.values.iter().rev().take(a.top).copied().collect();
    top.sort_by(|x, y| y.total_cmp(x));
    let smallest = ritz.values.first().copied().unwrap_or(0.0);
    let (trace, trace_err) = lanczos::hutchinson_trace(&op, &like, a.trace_samples, a.seed + 1)?;
    println!(
        "{:?} of the mean loss over {} examples ({} parameters), {} Lanczos steps:",
        a.curvature,
        view.len(),
        model.num_params(),
        ritz.values.len()
    );
    println!("| rank | eigenvalue |");
    println!("|---|---|");
    for (i, v) in top.iter().enumerate() {
        println!("| {} | {v:.6e} |", i + 1);
    }
    println!("smallest eigenvalue estimate: {smallest:.6e}");
    println!(
        "trace estimate (Hutchinson, {} probes): {trace:.6e} ± {trace_err:.2e}",
        a.trace_samples.max(2)
    );
    if smallest < 0.0 {
        println!(
            "M is indefinite: use --damping above {:.3e} for CG, or --curvature ggn",
            -smallest
        );
    }
    if let Some(l) = top.first() {
        println!("LiSSA needs --scale above λ_max + λ ≈ {:.3e} + damping", l);
    }
    if let Some(path) = &a.report {
        write_json(
            path,
            &serde_json::json!({
                "curvature": format!("{:?}", a.curvature).to_lowercase(),
                "examples": view.len(),
                "lanczos_steps": ritz.values.len(),
                "top_eigenvalues": top,
                "smallest_eigenvalue": smallest,
                "trace": trace,
                "trace_standard_error": trace_err,
                "products": op_products(&op),
            }),
        )?;
    }
    Ok(())
}

fn op_products(op: &CurvatureOperator) -> usize {
    use hvp_solvers::LinearOperator;
    op.products()
}
