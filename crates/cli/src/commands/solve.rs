//! `hvp solve`: `x = (M + λI)⁻¹ g` by a chosen solver, with a report of its accuracy.

use super::{load_vector, setup};
use crate::args::{CurvatureArg, DataArgs, ModelArgs, RunArgs};
use crate::output::Outputs;
use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use hvp_curvature::Problem;
use hvp_data::Dataset;
use hvp_model::ParamVector;
use hvp_solvers::kfac::FisherKind;
use hvp_solvers::{Residuals, SolveReport, SolveStatus, SolverConfig, SolverError, SolverKind};
use hvp_tensor::DType;
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
    /// Solver: direct, cg, lissa, arnoldi, kfac, ekfac or pcg (see the README table).
    #[arg(long, value_enum)]
    pub solver: SolverArg,
    /// Curvature M: hessian (exact), ggn (Jᵀ H_out J) or fisher (empirical Fisher).
    #[arg(long, value_enum, default_value = "hessian")]
    pub curvature: CurvatureArg,
    /// λ in (M + λI); the same default in every command (0 = undamped, exact solvers only).
    #[arg(value_parser = crate::checks::non_negative, long, default_value_t = hvp_solvers::DEFAULT_DAMPING)]
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
    /// Seed of every random choice (sampled labels, subsets, start vectors).
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
    /// kfac, ekfac, pcg: compute the factors even when the factor cache holds
    /// them, and do not store them (the cache: $HVP_CACHE_DIR, else
    /// $XDG_CACHE_HOME/hvp/factors or ~/.cache/hvp/factors).
    #[arg(long)]
    pub no_factor_cache: bool,
    /// kfac, ekfac: which solutions' exact residuals ‖(M+λI)x − g‖/‖g‖ to
    /// measure: all, none, or the first K right-hand sides solved together
    /// (in `influence`, of each --query-group). On the empirical Fisher a
    /// residual costs about as much as its test point's scores; unmeasured
    /// ones are reported as NaN with a warning.
    #[arg(long, default_value = "all", value_parser = parse_residuals)]
    pub residuals: Residuals,
}

fn parse_residuals(s: &str) -> Result<Residuals, String> {
    s.parse()
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

impl From<SolverArg> for SolverKind {
    fn from(s: SolverArg) -> Self {
        match s {
            SolverArg::Direct => SolverKind::Direct,
            SolverArg::Cg => SolverKind::Cg,
            SolverArg::Lissa => SolverKind::Lissa,
            SolverArg::Arnoldi => SolverKind::Arnoldi,
            SolverArg::Kfac => SolverKind::Kfac,
            SolverArg::Ekfac => SolverKind::Ekfac,
            SolverArg::Pcg => SolverKind::Pcg,
        }
    }
}

impl SolverOptions {
    /// The library's configuration for these options.
    pub fn config(&self) -> SolverConfig {
        SolverConfig {
            kind: self.solver.into(),
            curvature: self.curvature.into(),
            damping: self.damping,
            tol: self.tol,
            max_iter: self.max_iter,
            depth: self.depth,
            repeats: self.repeats,
            scale: self.scale,
            lissa_batch: self.lissa_batch,
            rank: self.rank,
            seed: self.seed,
            factors: self.factors.clone(),
            fisher: self.fisher.into(),
            factor_cache: if self.no_factor_cache { None } else { factor_cache_dir() },
            residuals: self.residuals,
        }
    }
}

/// The factor cache's folder: `$HVP_CACHE_DIR`, else `$XDG_CACHE_HOME/hvp/factors`,
/// else `~/.cache/hvp/factors`.
pub fn factor_cache_dir() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("HVP_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("hvp").join("factors")))
        .or_else(|| var("HOME").map(|d| d.join(".cache").join("hvp").join("factors")))
}

/// Says where a prepared solver's factors came from, and which parameters
/// they leave without a curvature estimate (stderr).
pub fn state_factor_source(solver: &hvp_solvers::PreparedSolver, model: &hvp_model::Model, quiet: bool) {
    use hvp_solvers::kfac::FactorSource;
    if quiet {
        return;
    }
    match solver.factor_source() {
        Some(FactorSource::Cached(p)) => eprintln!("factors: reused from the cache, {}", p.display()),
        Some(FactorSource::Computed(Some(p))) => eprintln!("factors: computed and cached at {}", p.display()),
        _ => {}
    }
    if let Some(f) = solver.factors() {
        if let Some(warning) = uncovered_warning(&f.uncovered(model)) {
            eprintln!("warning: {warning}");
        }
    }
}

/// The warning for parameters K-FAC has no curvature estimate for.
pub fn uncovered_warning(names: &[String]) -> Option<String> {
    const SHOWN: usize = 4;
    if names.is_empty() {
        return None;
    }
    let more = names.len().saturating_sub(SHOWN);
    let tail = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    Some(format!(
        "{} parameter tensor(s) lie outside K-FAC's Linear/Conv2d layers and BatchNorm ({}{tail}); the \
         approximation has no curvature for them and applies 1/damping there. Use solver cg or pcg for the exact \
         operator, or `params` to leave them out",
        names.len(),
        names[..names.len().min(SHOWN)].join(", ")
    ))
}

/// Runs the chosen solver for `g` on the problem's curvature.
pub fn run_solver(
    problem: &Problem,
    opts: &SolverOptions,
    g: &ParamVector,
) -> Result<(ParamVector, SolveReport), SolverError> {
    hvp_solvers::solve(problem, &opts.config(), g)
}

/// The report as JSON with the problem's context.
pub fn report_json(report: &SolveReport, opts: &SolverOptions, n: usize, dtype: DType) -> serde_json::Value {
    let mut report = report.clone();
    report.failure = report.failure.as_deref().map(crate::output::as_flags);
    report.warnings = report.warnings.iter().map(|w| crate::output::as_flags(w)).collect();
    let mut v = serde_json::to_value(&report).unwrap_or_default();
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
    println!(
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
        eprintln!("warning: {}", crate::output::as_flags(w));
    }
}

pub fn run(a: SolveArgs) -> Result<()> {
    let mut outputs = Outputs::new();
    let out_slot = outputs.reserve(&a.out)?;
    let report_slot = outputs.reserve_opt(a.report.as_ref())?;
    let (model, weights, data) = setup(&a.model, &a.data, &a.run)?;
    let view = data.view();
    let dtype: DType = a.run.dtype.into();
    let progress = std::sync::Arc::new(crate::report::Progress::unbounded(
        SolverKind::from(a.solver.solver).name(),
        a.run.quiet,
    ));
    let frozen = super::frozen_prefix(&model, &weights, &view.sample_shape(), a.run.quiet);
    let features = frozen
        .as_ref()
        .map(|f| super::frozen_features(f, &weights, &view, None, &a.run))
        .transpose()?;
    let (pass_model, pass_data): (&hvp_model::Model, &dyn hvp_data::Dataset) = match (&frozen, &features) {
        (Some(f), Some(x)) => (&f.tail, x),
        _ => (&model, &view),
    };
    let problem = Problem::new(pass_model, &weights, pass_data, a.run.batch_size)?
        .with_dtype(dtype)
        .with_watch(progress.watch());
    let g = load_vector(&model, &a.rhs)?;
    if g.norm() == 0.0 {
        bail!("the right-hand side {} is zero; the solution is 0", a.rhs.display());
    }
    let solved = a.solver.config().prepare(&problem).and_then(|s| {
        state_factor_source(&s, problem.model, a.run.quiet);
        s.solve(&problem, &g)
    });
    progress.finish();
    let (x, report) = solved?;
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
