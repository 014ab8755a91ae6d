//! `hvp solve`: `x = (M + λI)⁻¹ g` by a chosen solver, with a report of its accuracy.

use super::{load_vector, setup};
use crate::args::{CurvatureArg, DataArgs, ModelArgs, RunArgs};
use crate::output::Outputs;
use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use hvp_curvature::{Curvature, Problem};
use hvp_data::{Dataset, Subset};
use hvp_model::ParamVector;
use hvp_solvers::cg::CgOptions;
use hvp_solvers::kfac::{FactorKind, Factors, FisherKind};
use hvp_solvers::lissa::LissaOptions;
use hvp_solvers::{cg, direct, kfac, lanczos, lissa, CurvatureOperator, Damped, SolveReport, SolveStatus, SolverError};
use hvp_tensor::DType;
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::SeedableRng;
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum SolverArg {
    /// Dense matrix from n products, Cholesky (small models only).
    Direct,
    /// Conjugate gradients on M + λI.
    Cg,
    /// LiSSA recursion on mini-batch products.
    Lissa,
    /// Top-k eigenpairs by Lanczos/Arnoldi, inverse on that subspace.
    Arnoldi,
    /// Kronecker-factored approximate curvature (needs or computes --factors).
    Kfac,
    /// Eigenvalue-corrected K-FAC.
    Ekfac,
    /// CG on the exact operator, preconditioned by EK-FAC (or K-FAC) factors.
    Pcg,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum FisherArg {
    /// Labels sampled from the model's predictive distribution (true Fisher).
    Mc,
    /// True labels (empirical Fisher).
    Empirical,
    /// All output-Hessian directions (exact GGN factor S; C backward passes).
    Exact,
}

impl From<FisherArg> for FisherKind {
    fn from(f: FisherArg) -> Self {
        match f {
            FisherArg::Mc => FisherKind::Mc,
            FisherArg::Empirical => FisherKind::Empirical,
            FisherArg::Exact => FisherKind::Exact,
        }
    }
}

/// Options of every solver (each uses its own).
#[derive(Args, Clone, Debug)]
pub struct SolverOptions {
    #[arg(long, value_enum)]
    pub solver: SolverArg,
    #[arg(long, value_enum, default_value = "hessian")]
    pub curvature: CurvatureArg,
    /// λ in (M + λI).
    #[arg(value_parser = crate::checks::non_negative, long, default_value_t = 0.0)]
    pub damping: f64,
    /// cg: relative residual to stop at.
    #[arg(value_parser = crate::checks::tolerance, long, default_value_t = 1e-6)]
    pub tol: f64,
    /// cg: iteration cap.
    #[arg(value_parser = crate::checks::iterations, long, default_value_t = 100)]
    pub max_iter: usize,
    /// lissa: recursion depth.
    #[arg(value_parser = crate::checks::iterations, long, default_value_t = 200)]
    pub depth: usize,
    /// lissa: independent recursions averaged.
    #[arg(value_parser = crate::checks::iterations, long, default_value_t = 1)]
    pub repeats: usize,
    /// lissa: scale (default 1.5 × a power-iteration estimate of λ_max).
    #[arg(value_parser = crate::checks::positive, long)]
    pub scale: Option<f64>,
    /// lissa: examples per sampled mini-batch.
    #[arg(value_parser = crate::checks::iterations, long, default_value_t = 32)]
    pub lissa_batch: usize,
    /// arnoldi: number of eigenpairs kept (= Lanczos steps).
    #[arg(value_parser = crate::checks::iterations, long, default_value_t = 50)]
    pub rank: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// kfac, ekfac, pcg: factors from `hvp factors` (computed now when absent).
    #[arg(long)]
    pub factors: Option<PathBuf>,
    /// kfac, ekfac, pcg: how factors are computed when --factors is absent.
    #[arg(long, value_enum, default_value = "mc")]
    pub fisher: FisherArg,
    /// Write the solution (and, in influence, the scores) even when the solve
    /// failed (tolerance not reached, negative curvature); the report says so.
    /// Without it a failed solve writes no solution and exits with code 3.
    #[arg(long)]
    pub keep_unconverged: bool,
}

/// A solve that did not reach its tolerance (exit code 3).
#[derive(Debug)]
pub struct SolveFailed(pub String);

impl std::fmt::Display for SolveFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SolveFailed {}

/// The exit code of a failed solve.
pub const EXIT_SOLVE_FAILED: u8 = 3;

/// The error for a failed solve: residual, reason, the fix, and `consequence`
/// (what was not written).
pub fn failed(report: &SolveReport, consequence: &str) -> anyhow::Error {
    anyhow::Error::new(SolveFailed(format!(
        "{} solve failed: {} (relative residual ‖(M+λI)x − g‖/‖g‖ = {:.3e}); {consequence}; pass \
         --keep-unconverged to use the unconverged result anyway",
        report.solver,
        report.failure.as_deref().unwrap_or("tolerance not reached"),
        report.relative_residual
    )))
}

#[derive(Args)]
pub struct SolveArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub solver: SolverOptions,
    /// Right-hand side g: one tensor per trainable parameter (e.g. from `hvp grad`).
    #[arg(long)]
    pub rhs: PathBuf,
    /// Solution x, one tensor per parameter, in the compute dtype.
    #[arg(long)]
    pub out: PathBuf,
    /// Also write the solver report (iterations, products, residual, warnings) as JSON.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

/// Runs the chosen solver for `g` on the problem's curvature.
pub fn run_solver(
    problem: &Problem,
    opts: &SolverOptions,
    dtype: DType,
    g: &ParamVector,
) -> Result<(ParamVector, SolveReport), SolverError> {
    if !(opts.damping.is_finite() && opts.damping >= 0.0) {
        return Err(SolverError::BadOption(format!(
            "--damping must be finite and ≥ 0, got {}",
            opts.damping
        )));
    }
    let curvature: Curvature = opts.curvature.into();
    let op = CurvatureOperator::new(problem, curvature, dtype);
    let damped = Damped {
        inner: &op,
        damping: opts.damping,
    };
    match opts.solver {
        SolverArg::Direct => direct::solve_to(&op, opts.damping, g, opts.tol),
        SolverArg::Cg => cg::solve(
            &damped,
            g,
            &CgOptions {
                tol: opts.tol,
                max_iter: opts.max_iter,
            },
            None,
            "cg",
        ),
        SolverArg::Arnoldi => lanczos::solve(&op, opts.damping, g, opts.rank, opts.seed),
        SolverArg::Kfac | SolverArg::Ekfac | SolverArg::Pcg => {
            if opts.damping == 0.0 {
                return Err(SolverError::BadOption(
                    format!(
                        "--solver {:?} with --damping 0: the Kronecker factors are singular wherever a layer has \
                     fewer examples than inputs, so their inverse is undefined; give a damping > 0 (e.g. 1e-3, or \
                     a small fraction of the mean eigenvalue that `hvp spectrum` reports)",
                        opts.solver
                    )
                    .to_lowercase(),
                ));
            }
            let want = if opts.solver == SolverArg::Kfac {
                FactorKind::Kfac
            } else {
                FactorKind::Ekfac
            };
            let mut factors = match &opts.factors {
                Some(path) => Factors::load(problem.model, path).map_err(|e| SolverError::BadOption(e.to_string()))?,
                None => Factors::compute(problem, want, opts.fisher.into(), dtype, opts.seed, &|_| {})?,
            };
            match (opts.solver, factors.kind) {
                (SolverArg::Ekfac, FactorKind::Kfac) => {
                    return Err(SolverError::BadOption(
                        "--solver ekfac needs EK-FAC factors; these are K-FAC (compute with hvp factors --kind ekfac)"
                            .into(),
                    ))
                }
                (SolverArg::Kfac, FactorKind::Ekfac) => {
                    factors.kind = FactorKind::Kfac;
                    factors.layers.iter_mut().for_each(|l| l.corrected = None);
                }
                _ => {}
            }
            if opts.solver == SolverArg::Pcg {
                let precond = |r: &ParamVector| Ok(factors.inverse_product(r, opts.damping));
                let cg_opts = CgOptions {
                    tol: opts.tol,
                    max_iter: opts.max_iter,
                };
                cg::solve(&damped, g, &cg_opts, Some(&precond), "pcg")
            } else {
                kfac::solve(&factors, &damped, opts.damping, g)
            }
        }
        SolverArg::Lissa => {
            let n = problem.data.len();
            let b = opts.lissa_batch.clamp(1, n);
            let mut rng = StdRng::seed_from_u64(opts.seed);
            let mut sampler = |v: &ParamVector| -> Result<ParamVector, SolverError> {
                let idx = sample(&mut rng, n, b).into_vec();
                let subset = Subset::new(problem.data, idx).map_err(hvp_curvature::CurvatureError::from)?;
                let p = Problem::new(problem.model, problem.weights, &subset, problem.batch_size)?;
                let r = match dtype {
                    DType::F32 => p.product::<f32>(curvature, v, &|_| {})?,
                    DType::F64 => p.product::<f64>(curvature, v, &|_| {})?,
                };
                Ok(r.value)
            };
            let lo = LissaOptions {
                depth: opts.depth,
                repeats: opts.repeats,
                scale: opts.scale,
                ..Default::default()
            };
            lissa::solve(&damped, &mut sampler, opts.damping, g, &lo)
        }
    }
}

/// The report as JSON with the problem's context.
pub fn report_json(report: &SolveReport, opts: &SolverOptions, n: usize, dtype: DType) -> serde_json::Value {
    let mut v = serde_json::to_value(report).unwrap_or_default();
    if let Some(m) = v.as_object_mut() {
        m.insert(
            "curvature".into(),
            format!("{:?}", opts.curvature).to_lowercase().into(),
        );
        m.insert("damping".into(), opts.damping.into());
        m.insert("examples".into(), n.into());
        m.insert("dtype".into(), dtype.name().into());
        m.insert(
            "kept_unconverged".into(),
            (opts.keep_unconverged && !report.usable()).into(),
        );
    }
    v
}

pub fn print_report(r: &SolveReport) {
    eprintln!(
        "{}: {} iterations, {} products over the data{}, {:.2} s, relative residual ‖(M+λI)x − g‖/‖g‖ = {:.3e}{}",
        r.solver,
        r.iterations,
        r.products,
        r.minibatch_products
            .map(|m| format!(" + {m} mini-batch products"))
            .unwrap_or_default(),
        r.seconds,
        r.relative_residual,
        match r.status {
            SolveStatus::Converged => format!(" ≤ tolerance {:.1e}: converged", r.tolerance.unwrap_or(0.0)),
            SolveStatus::Approximate => ": APPROXIMATE (a structured approximation, not a converged solve)".into(),
            SolveStatus::Failed => ": FAILED".into(),
        }
    );
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
}

pub fn run(a: SolveArgs) -> Result<()> {
    let mut outputs = Outputs::new();
    let out_slot = outputs.reserve(&a.out)?;
    let report_slot = outputs.reserve_opt(a.report.as_ref())?;
    let (model, weights, data) = setup(&a.model, &a.data, &a.run)?;
    let view = data.view();
    let problem = Problem::new(&model, &weights, &view, a.run.batch_size)?;
    let g = load_vector(&model, &a.rhs)?;
    if g.norm() == 0.0 {
        bail!("the right-hand side {} is zero; the solution is 0", a.rhs.display());
    }
    let dtype: DType = a.run.dtype.into();
    let (x, report) = run_solver(&problem, &a.solver, dtype, &g)?;
    if let Some(slot) = report_slot {
        let text = serde_json::to_string_pretty(&report_json(&report, &a.solver, view.len(), dtype))? + "\n";
        outputs.put(slot, text.as_bytes())?;
    }
    // A failed solve keeps its report (the diagnosis) but not its solution.
    let keep = report.usable() || a.solver.keep_unconverged;
    if keep {
        outputs.put(out_slot, &x.safetensors_bytes(&model, dtype))?;
    } else {
        outputs.discard(out_slot);
    }
    outputs.commit()?;
    if !a.run.quiet || !report.usable() {
        print_report(&report);
    }
    if !report.usable() {
        if keep {
            eprintln!(
                "warning: the unconverged solution was written to {} (--keep-unconverged)",
                a.out.display()
            );
        }
        let consequence = if keep {
            format!("the solution was written to {} as asked", a.out.display())
        } else {
            format!("no solution was written to {}", a.out.display())
        };
        return Err(failed(&report, &consequence));
    }
    Ok(())
}
