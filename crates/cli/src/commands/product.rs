use super::{run_pass, PassKind};
use crate::args::CurvatureArg;
use crate::args::{DataArgs, ModelArgs, RunArgs};
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct ProductArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub run: RunArgs,
    /// L2 coefficient w of the training objective L + (w/2)‖θ‖² (adds w·I to the curvature).
    #[arg(value_parser = crate::checks::non_negative, long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Direction v: one tensor per trainable parameter, same names and shapes as the weights.
    #[arg(long)]
    pub vector: PathBuf,
    /// Curvature M: hessian (exact), ggn (Jᵀ H_out J) or fisher (empirical Fisher).
    #[arg(long, value_enum, default_value = "hessian")]
    pub curvature: CurvatureArg,
    /// Output safetensors file M·v, one tensor per parameter, in the compute dtype.
    #[arg(long)]
    pub out: PathBuf,
}

/// M·v over the whole dataset, M the Hessian, GGN or empirical Fisher of the mean training loss.
pub fn run(a: ProductArgs) -> Result<()> {
    run_pass(
        &a.model,
        &a.data,
        &a.run,
        a.weight_decay,
        PassKind::Product(a.curvature.into(), &a.vector),
        &a.out,
    )
}
