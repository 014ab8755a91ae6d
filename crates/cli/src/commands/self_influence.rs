//! `hvp self-influence`: `∇ℓ(z_i)ᵀ (F̂ + λI)⁻¹ ∇ℓ(z_i)` for every training example,
//! with K-FAC/EK-FAC factors (affordable for every example: the per-example
//! gradient of one layer at a time, in the factors' eigenbasis), ranked. High
//! self-influence flags atypical or mislabelled examples.

use super::setup;
use super::solve::FisherArg;
use crate::args::{DataArgs, ModelArgs, RunArgs};
use crate::report::{summary, Progress};
use anyhow::{Context, Result};
use clap::Args;
use hvp_curvature::Problem;
use hvp_data::Dataset;
use hvp_solvers::kfac::{FactorKind, Factors};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct SelfInfluenceArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub run: RunArgs,
    /// Factors from `hvp factors` (EK-FAC computed now when absent).
    #[arg(long)]
    pub factors: Option<PathBuf>,
    /// How factors are computed: mc (labels sampled from the model), empirical (true labels) or exact.
    #[arg(long, value_enum, default_value = "mc")]
    pub fisher: FisherArg,
    /// λ in (M + λI); the same default in every command (0 = undamped, exact solvers only).
    #[arg(value_parser = crate::checks::non_negative, long, default_value_t = hvp_solvers::DEFAULT_DAMPING)]
    pub damping: f64,
    /// L2 coefficient of the training objective (added to the damping).
    #[arg(value_parser = crate::checks::non_negative, long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Seed of every random choice (sampled labels, subsets, start vectors).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// CSV rank,train_index,self_influence,label, highest first (written atomically).
    #[arg(long)]
    pub out: PathBuf,
}

/// Self-influence of every example (in dataset order).
pub fn compute(a: &SelfInfluenceArgs, problem: &Problem, progress: &dyn Fn(usize)) -> Result<Vec<f64>> {
    let damping = a.damping + a.weight_decay;
    hvp_influence::self_influence::check_damping(damping)?;
    let factors = match &a.factors {
        Some(p) => Factors::load(problem.model, p).with_context(|| format!("reading {}", p.display()))?,
        None => Factors::compute(problem, FactorKind::Ekfac, a.fisher.into(), a.seed, progress)?,
    };
    Ok(hvp_influence::self_influence::self_influence(
        problem, &factors, damping, progress,
    )?)
}

pub fn run(a: SelfInfluenceArgs) -> Result<()> {
    let (model, weights, data) = setup(&a.model, &a.data, &a.run)?;
    let view = data.view();
    let problem = Problem::new(&model, &weights, &view, a.run.batch_size)?.with_dtype(a.run.dtype.into());
    let passes = if a.factors.is_some() { 1 } else { 3 };
    let progress = Progress::new(passes * view.len(), "self-influence", a.run.quiet);
    let start = Instant::now();
    let values = compute(&a, &problem, &|n| progress.advance(n))?;
    progress.finish();
    let order = hvp_influence::self_influence::ranking(&values);
    let mut text = String::from("rank,train_index,self_influence,label\n");
    for (r, &i) in order.iter().enumerate() {
        text.push_str(&format!("{},{i},{:.9e},{}\n", r + 1, values[i], view.label(i)));
    }
    hvp_model::io::atomic_write(&a.out, text.as_bytes()).with_context(|| format!("writing {}", a.out.display()))?;
    summary("hvp self-influence", view.len(), start.elapsed(), a.run.quiet);
    Ok(())
}
