//! `hvp compare-solvers`: every solver on one problem, against CG run to
//! convergence: time, products, residual and error — the README's solver table.

use super::solve::{run_solver, FisherArg, SolverArg, SolverOptions};
use super::{load_vector, setup};
use crate::args::{CurvatureArg, DataArgs, ModelArgs, RunArgs};
use anyhow::Result;
use clap::Args;
use hvp_curvature::Problem;
use hvp_data::Dataset;
use hvp_solvers::SolverError;
use hvp_tensor::DType;
use std::path::PathBuf;

#[derive(Args)]
pub struct CompareArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub run: RunArgs,
    /// Right-hand side g.
    #[arg(long)]
    pub rhs: PathBuf,
    /// Curvature M: hessian (exact), ggn (Jᵀ H_out J) or fisher (empirical Fisher).
    #[arg(long, value_enum, default_value = "ggn")]
    pub curvature: CurvatureArg,
    /// λ in (M + λI); the same default in every command (0 = undamped, exact solvers only).
    #[arg(value_parser = crate::checks::non_negative, long, default_value_t = hvp_solvers::DEFAULT_DAMPING)]
    pub damping: f64,
    /// LiSSA depth (its accuracy depends on it; see the truncation warning).
    #[arg(value_parser = crate::checks::iterations, long, default_value_t = 1000)]
    pub depth: usize,
    /// Arnoldi rank.
    #[arg(value_parser = crate::checks::iterations, long, default_value_t = 50)]
    pub rank: usize,
    /// Seed of every random choice (sampled labels, subsets, start vectors).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(a: CompareArgs) -> Result<()> {
    let (model, weights, data) = setup(&a.model, &a.data, &a.run)?;
    let view = data.view();
    let problem = Problem::new(&model, &weights, &view, a.run.batch_size)?.with_dtype(a.run.dtype.into());
    let g = load_vector(&model, &a.rhs)?;
    let dtype: DType = a.run.dtype.into();
    let opts = |solver: SolverArg, tol: f64, max_iter: usize| SolverOptions {
        solver,
        curvature: a.curvature,
        damping: a.damping,
        tol,
        max_iter,
        depth: a.depth,
        repeats: 1,
        scale: None,
        lissa_batch: 32,
        rank: a.rank,
        seed: a.seed,
        factors: None,
        fisher: FisherArg::Mc,
        keep_unconverged: false,
        no_factor_cache: false,
        residuals: hvp_solvers::Residuals::All,
    };
    // f32 products carry ~1e-7 relative rounding: the exact residual of any
    // solution stalls near there, so the reference asks what each dtype can give.
    let reference_tol = match dtype {
        DType::F64 => 1e-10,
        DType::F32 => 1e-5,
    };
    let (reference, rref) = run_solver(&problem, &opts(SolverArg::Cg, reference_tol, 2000), &g)?;
    if !rref.usable() {
        return Err(super::solve::failed(
            &rref,
            "the reference CG did not converge, so no comparison was made",
        ));
    }
    println!(
        "{:?} of {} over {} examples ({} parameters), λ = {}, {dtype}; reference: CG to {:.1e} residual ({} iterations)\n",
        a.curvature,
        model.arch,
        view.len(),
        model.num_params(),
        a.damping,
        rref.relative_residual,
        rref.iterations
    );
    println!("| solver | status | time (s) | products over the data | mini-batch products | residual ‖(M+λI)x−g‖/‖g‖ | error vs reference |");
    println!("|---|---|---|---|---|---|---|");
    for s in [
        SolverArg::Direct,
        SolverArg::Cg,
        SolverArg::Pcg,
        SolverArg::Arnoldi,
        SolverArg::Lissa,
        SolverArg::Kfac,
        SolverArg::Ekfac,
    ] {
        let name = format!("{s:?}").to_lowercase();
        match run_solver(&problem, &opts(s, 1e-6, 500), &g) {
            Ok((x, r)) => println!(
                "| {name} | {} | {:.2} | {} | {} | {:.2e} | {:.2e} |",
                r.status.name(),
                r.seconds,
                r.products,
                r.minibatch_products
                    .map(|m| m.to_string())
                    .unwrap_or_else(|| "–".into()),
                r.relative_residual,
                x.relative_error(&reference)
            ),
            Err(SolverError::TooLarge { params, limit }) => {
                println!("| {name} | refused: {params} parameters > {limit} | | | | | |")
            }
            Err(e) => println!("| {name} | failed: {e} | | | | | |"),
        }
    }
    Ok(())
}
