use super::{run_pass, PassKind};
use crate::args::{DataArgs, ModelArgs, RunArgs};
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct GradArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub run: RunArgs,
    /// L2 coefficient w of the training objective L + (w/2)‖θ‖² (adds w·θ to the
    /// gradient and w·I to the curvature).
    #[arg(value_parser = crate::checks::non_negative, long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Output safetensors file: one tensor per trainable parameter, in the compute dtype.
    #[arg(long)]
    pub out: PathBuf,
}

/// ∇L(θ) with L the mean softmax cross-entropy over the N examples.
pub fn run(a: GradArgs) -> Result<()> {
    run_pass(&a.model, &a.data, &a.run, a.weight_decay, PassKind::Gradient, &a.out)
}
