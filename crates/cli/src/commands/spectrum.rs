//! `hvp spectrum`: extreme eigenvalues (Lanczos) and trace (Hutchinson) of the
//! curvature, to choose the damping λ and LiSSA's scale knowingly.

use super::{setup, write_json};
use crate::args::{CurvatureArg, DataArgs, ModelArgs, RunArgs};
use anyhow::{bail, Result};
use clap::Args;
use hvp_curvature::Problem;
use hvp_data::Dataset;
use hvp_solvers::spectrum::{spectrum, SpectrumConfig};
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
    let progress = std::sync::Arc::new(crate::report::Progress::unbounded("spectrum", a.run.quiet));
    let problem = Problem::new(&model, &weights, &view, a.run.batch_size)?
        .with_dtype(a.run.dtype.into())
        .with_watch(progress.watch());
    if a.top > model.num_params() {
        bail!(
            "--top {} asks for more eigenvalues than the {} parameters have",
            a.top,
            model.num_params()
        );
    }
    let config = SpectrumConfig {
        curvature: a.curvature.into(),
        top: a.top,
        steps: a.steps,
        trace_samples: a.trace_samples,
        seed: a.seed,
    };
    let s = spectrum(&problem, &config);
    progress.finish();
    let s = s?;
    println!(
        "{:?} of the mean loss over {} examples ({} parameters), {} Lanczos steps:",
        a.curvature,
        view.len(),
        model.num_params(),
        s.lanczos_steps
    );
    println!("| rank | eigenvalue |");
    println!("|---|---|");
    for (i, v) in s.top_eigenvalues.iter().enumerate() {
        println!("| {} | {v:.6e} |", i + 1);
    }
    println!("smallest eigenvalue estimate: {:.6e}", s.smallest_eigenvalue);
    println!(
        "trace estimate (Hutchinson, {} probes): {:.6e} ± {:.2e}",
        a.trace_samples.max(2),
        s.trace,
        s.trace_standard_error
    );
    if s.smallest_eigenvalue < 0.0 {
        println!(
            "M is indefinite: use --damping above {:.3e} for CG, or --curvature ggn",
            -s.smallest_eigenvalue
        );
    }
    if let Some(l) = s.top_eigenvalues.first() {
        println!("LiSSA needs --scale above λ_max + λ ≈ {:.3e} + damping", l);
    }
    if let Some(path) = &a.report {
        let mut report = serde_json::to_value(&s)?;
        if let Some(m) = report.as_object_mut() {
            m.insert("curvature".into(), format!("{:?}", a.curvature).to_lowercase().into());
            m.insert("examples".into(), view.len().into());
        }
        write_json(path, &report)?;
    }
    Ok(())
}
