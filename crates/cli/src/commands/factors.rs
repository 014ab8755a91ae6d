//! `hvp factors`: K-FAC / EK-FAC factors of the curvature, computed once and
//! saved for `hvp solve --solver kfac|ekfac|pcg --factors F`.

use super::setup;
use super::solve::FisherArg;
use crate::args::{DataArgs, ModelArgs, RunArgs};
use crate::report::{summary, Progress};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use hvp_curvature::Problem;
use hvp_data::Dataset;
use hvp_solvers::kfac::{Checkpoint, FactorKind, Factors};
use std::path::PathBuf;
use std::time::{Duration, Instant};

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
    /// Continue an interrupted computation from OUT.partial (its running sums
    /// and the batches they hold; the result is bit for bit the uninterrupted one).
    #[arg(long)]
    pub resume: bool,
    /// Seconds between saves of the running sums to OUT.partial (0: after every batch).
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    pub checkpoint_every: f64,
}

/// `OUT.partial`: where `hvp factors --out OUT` keeps its running sums.
fn checkpoint_path(out: &std::path::Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
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
    if !(a.checkpoint_every.is_finite() && a.checkpoint_every >= 0.0) {
        bail!(
            "--checkpoint-every must be a number of seconds ≥ 0, not {}",
            a.checkpoint_every
        );
    }
    let checkpoint = Checkpoint {
        path: checkpoint_path(&a.out),
        every: Duration::from_secs_f64(a.checkpoint_every),
        resume: a.resume,
    };
    if a.resume && !a.run.quiet {
        match checkpoint.path.is_file() {
            true => eprintln!("resuming from {}", checkpoint.path.display()),
            false => eprintln!(
                "--resume: no {} yet; starting from the beginning",
                checkpoint.path.display()
            ),
        }
    }
    let f = Factors::compute_checkpointed(
        &problem,
        kind,
        a.fisher.into(),
        a.seed,
        &|n| progress.advance(n),
        Some(&checkpoint),
    )?;
    progress.finish();
    f.save(&model, &a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    checkpoint.discard();
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
