use super::{run_pass, PassKind};
use crate::args::{DataArgs, ModelArgs, RunArgs};
use anyhow::Result;
use clap::{Args, ValueEnum};
use hvp_curvature::Curvature;
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum CurvatureArg {
    /// Exact Hessian, by forward-over-reverse.
    Hessian,
    /// Generalised Gauss-Newton Jᵀ H_out J (positive semi-definite).
    Ggn,
}

#[derive(Args)]
pub struct ProductArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub run: RunArgs,
    /// Direction v: one tensor per trainable parameter, same names and shapes as the weights.
    #[arg(long)]
    pub vector: PathBuf,
    #[arg(long, value_enum, default_value = "hessian")]
    pub curvature: CurvatureArg,
    /// Output safetensors file M·v, one tensor per parameter, in the compute dtype.
    #[arg(long)]
    pub out: PathBuf,
}

/// M·v over the whole dataset, M the Hessian or GGN of the mean training loss.
pub fn run(a: ProductArgs) -> Result<()> {
    let c = match a.curvature {
        CurvatureArg::Hessian => Curvature::Hessian,
        CurvatureArg::Ggn => Curvature::Ggn,
    };
    run_pass(&a.model, &a.data, &a.run, PassKind::Product(c, &a.vector), &a.out)
}
