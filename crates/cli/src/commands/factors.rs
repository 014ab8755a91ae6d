//! `hvp factors`: K-FAC / EK-FAC factors of the curvature, computed once and
//! saved for `hvp solve --solver kfac|ekfac|pcg --factors F`.

use super::setup;
use super::solve::FisherArg;
use crate::args::{DataArgs, ModelArgs, RunArgs};
use crate::report::{summary, Progress};
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use hvp_curvature::Problem;
use hvp_data::Dataset;
use hvp_solvers::kfac::{FactorKind, Factors};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum KindArg {
    Kfac,
    Ekfac,
}

#[derive(Args)]
pub struct FactorsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub run: RunArgs,
    /// Factors to compute: kfac, or ekfac (K-FAC with corrected eigenvalues).
    #[arg(long, value_enum, default_value = "ekfac")]
    pub kind: KindArg,
    /// How the output-gradient factor S is estimated.
    #[arg(long, value_enum, default_value = "mc")]
    pub fisher: FisherArg,
    /// Seed of every random choice (sampled labels, subsets, start vectors).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output safetensors file (written atomically).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(a: FactorsArgs) -> Result<()> {
    let (model, weights, data) = setup(&a.model, &a.data, &a.run)?;
    let view = data.view();
    let problem = Problem::new(&model, &weights, &view, a.run.batch_size)?.with_dtype(a.run.dtype.into());
    let kind = match a.kind {
        KindArg::Kfac => FactorKind::Kfac,
        KindArg::Ekfac => FactorKind::Ekfac,
    };
    let passes = if kind == FactorKind::Ekfac { 2 } else { 1 };
    let progress = Progress::new(passes * view.len(), "factors", a.run.quiet);
    let start = Instant::now();
    let f = Factors::compute(&problem, kind, a.fisher.into(), a.seed, &|n| progress.advance(n))?;
    progress.finish();
    f.save(&model, &a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    summary("hvp factors", view.len(), start.elapsed(), a.run.quiet);
    if !a.run.quiet {
        println!(
            "{:?} factors for {} layers and {} BatchNorm parameters (diagonal) written to {}",
            kind,
            f.layers.len(),
            f.diagonal.len(),
            a.out.display()
        );
        if let Some(warning) = super::solve::uncovered_warning(&f.uncovered(&model)) {
            eprintln!("warning: {warning}");
        }
    }
    Ok(())
}
