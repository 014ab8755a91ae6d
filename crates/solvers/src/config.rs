//! Solver choice: one configuration type for every solver and one entry point,
//! [`solve`], that a command line, a Python binding or another tool calls alike.

use crate::cg::CgOptions;
use crate::kfac::{FactorKind, FactorSource, Factors, FisherKind};
use crate::lissa::LissaOptions;
use crate::{cg, direct, kfac, lanczos, lissa, CurvatureOperator, Damped, SolveReport, SolverError};
use hvp_curvature::{Curvature, Problem};
use hvp_data::Subset;
use hvp_model::ParamVector;
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::SeedableRng;
use std::path::PathBuf;

/// Which solver computes `(M + λI)⁻¹ g`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SolverKind {
    /// Dense matrix from n products, Cholesky (small models only).
    Direct,
    /// Conjugate gradients on M + λI.
    Cg,
    /// LiSSA recursion on mini-batch products.
    Lissa,
    /// Top-k eigenpairs by Lanczos/Arnoldi, inverse on that subspace.
    Arnoldi,
    /// Kronecker-factored approximate curvature.
    Kfac,
    /// Eigenvalue-corrected K-FAC.
    Ekfac,
    /// CG on the exact operator, preconditioned by EK-FAC (or K-FAC) factors.
    Pcg,
}

impl SolverKind {
    pub fn name(self) -> &'static str {
        match self {
            SolverKind::Direct => "direct",
            SolverKind::Cg => "cg",
            SolverKind::Lissa => "lissa",
            SolverKind::Arnoldi => "arnoldi",
            SolverKind::Kfac => "kfac",
            SolverKind::Ekfac => "ekfac",
            SolverKind::Pcg => "pcg",
        }
    }

    /// Whether the solver needs K-FAC/EK-FAC factors.
    pub fn uses_factors(self) -> bool {
        matches!(self, SolverKind::Kfac | SolverKind::Ekfac | SolverKind::Pcg)
    }
}

/// Which solutions' exact residuals `‖(M + λI)x − g‖ / ‖g‖` an approximate
/// solver (kfac, ekfac) measures. Exact solvers always measure theirs (it is
/// how they stop). For K-FAC/EK-FAC on the empirical Fisher a residual costs as
/// much as its influence scores (`Gᵀ D` next to `D = G X` in the same pass).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Residuals {
    /// Every solution's.
    All,
    /// The first k right-hand sides' of each block solved together; the
    /// others' reports say their residual was not measured.
    First(usize),
}

impl Residuals {
    /// How many of `n` right-hand sides solved together get a residual.
    pub fn count(self, n: usize) -> usize {
        match self {
            Residuals::All => n,
            Residuals::First(k) => k.min(n),
        }
    }
}

impl std::str::FromStr for Residuals {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(Residuals::All),
            "none" => Ok(Residuals::First(0)),
            k => k.parse().map(Residuals::First).map_err(|_| {
                format!("`{s}` is not a residual choice: give all, none, or a count of test points per group")
            }),
        }
    }
}

/// Everything a solve depends on; each solver reads the options it uses.
#[derive(Clone, Debug)]
pub struct SolverConfig {
    pub kind: SolverKind,
    pub curvature: Curvature,
    /// λ in (M + λI).
    pub damping: f64,
    /// direct, cg, pcg: relative residual to reach.
    pub tol: f64,
    /// cg, pcg: iteration cap.
    pub max_iter: usize,
    /// lissa: recursion depth, independent recursions, scale (`None`: estimated),
    /// examples per sampled mini-batch.
    pub depth: usize,
    pub repeats: usize,
    pub scale: Option<f64>,
    pub lissa_batch: usize,
    /// arnoldi: eigenpairs kept.
    pub rank: usize,
    pub seed: u64,
    /// kfac, ekfac, pcg: factors saved by `Factors::save` (computed when absent).
    pub factors: Option<PathBuf>,
    /// kfac, ekfac, pcg: how factors are computed when none are given.
    pub fisher: FisherKind,
    /// kfac, ekfac, pcg: a folder where computed factors are kept and found
    /// again under a key of model, weights, data and settings
    /// ([`Factors::cached`]); `None` computes them every time.
    pub factor_cache: Option<PathBuf>,
    /// kfac, ekfac: which solutions' exact residuals are measured.
    pub residuals: Residuals,
}

impl SolverConfig {
    /// The defaults of the command line for `kind`.
    pub fn new(kind: SolverKind) -> Self {
        SolverConfig {
            kind,
            curvature: Curvature::Hessian,
            damping: crate::DEFAULT_DAMPING,
            tol: 1e-6,
            max_iter: 100,
            depth: 200,
            repeats: 1,
            scale: None,
            lissa_batch: 32,
            rank: 50,
            seed: 0,
            factors: None,
            fisher: FisherKind::Mc,
            factor_cache: None,
            residuals: Residuals::All,
        }
    }

    /// The options of CG and PCG.
    fn cg_options(&self) -> CgOptions {
        CgOptions {
            tol: self.tol,
            max_iter: self.max_iter,
        }
    }

    /// Checks the options that hold for every solver.
    pub fn check(&self) -> Result<(), SolverError> {
        if !(self.damping.is_finite() && self.damping >= 0.0) {
            return Err(SolverError::BadOption(format!(
                "the damping must be finite and ≥ 0, got {}",
                self.damping
            )));
        }
        if self.kind.uses_factors() && self.damping == 0.0 {
            return Err(SolverError::BadOption(format!(
                "`solver` {} with `damping` 0: the Kronecker factors are singular wherever a layer has fewer \
                 examples than inputs, so their inverse is undefined; give a damping > 0 (e.g. 1e-3, or a small \
                 fraction of the mean eigenvalue that `hvp spectrum` reports)",
                self.kind.name()
            )));
        }
        if self.residuals != Residuals::All && !matches!(self.kind, SolverKind::Kfac | SolverKind::Ekfac) {
            return Err(SolverError::BadOption(format!(
                "`residuals` other than all applies to the kfac and ekfac solvers only: {} measures the exact \
                 residual of every solution, as it needs it to stop or to be judged",
                self.kind.name()
            )));
        }
        if !(self.tol.is_finite() && self.tol > 0.0) {
            return Err(SolverError::BadOption(format!(
                "the tolerance must be > 0, got {}",
                self.tol
            )));
        }
        Ok(())
    }

    /// The factors this configuration asks for: loaded from `factors`, or
    /// computed on `problem`; K-FAC views of EK-FAC factors are allowed, the
    /// reverse is refused.
    pub fn factors(&self, problem: &Problem) -> Result<Factors, SolverError> {
        Ok(self.factors_with_source(problem)?.0)
    }

    /// [`SolverConfig::factors`] and where they came from.
    pub fn factors_with_source(&self, problem: &Problem) -> Result<(Factors, FactorSource), SolverError> {
        let want = if self.kind == SolverKind::Kfac {
            FactorKind::Kfac
        } else {
            FactorKind::Ekfac
        };
        let (factors, source) = match (&self.factors, &self.factor_cache) {
            (Some(path), _) => (
                Factors::load(problem.model, path).map_err(|e| SolverError::BadOption(e.to_string()))?,
                FactorSource::Given(path.clone()),
            ),
            (None, Some(dir)) => Factors::cached(problem, want, self.fisher, self.seed, dir, &|_| {})?,
            (None, None) => (
                Factors::compute(problem, want, self.fisher, self.seed, &|_| {})?,
                FactorSource::Computed(None),
            ),
        };
        let factors = match (self.kind, factors.kind) {
            (SolverKind::Ekfac, FactorKind::Kfac) => Err(SolverError::BadOption(
                "`solver` ekfac needs EK-FAC factors; these are K-FAC (compute EK-FAC factors, e.g. `hvp factors --kind ekfac` on the command line)".into(),
            )),
            (SolverKind::Kfac, FactorKind::Ekfac) => Ok(factors.without_corrections()),
            _ => Ok(factors),
        }?;
        Ok((factors, source))
    }
}

/// A checked configuration with its factors loaded or computed: solves many
/// right-hand sides (e.g. one per test point) with the factors made once.
pub struct PreparedSolver {
    config: SolverConfig,
    factors: Option<Factors>,
    source: Option<FactorSource>,
}

impl SolverConfig {
    /// Checks the options and loads or computes the factors the solver needs,
    /// once, on `problem`.
    pub fn prepare(&self, problem: &Problem) -> Result<PreparedSolver, SolverError> {
        self.check()?;
        let (factors, source) = if self.kind.uses_factors() {
            let (f, s) = self.factors_with_source(problem)?;
            (Some(f), Some(s))
        } else {
            (None, None)
        };
        Ok(PreparedSolver {
            config: self.clone(),
            factors,
            source,
        })
    }
}

impl PreparedSolver {
    pub fn config(&self) -> &SolverConfig {
        &self.config
    }

    /// Where the factors came from (solvers that use them).
    pub fn factor_source(&self) -> Option<&FactorSource> {
        self.source.as_ref()
    }

    /// The K-FAC / EK-FAC factors the solver uses, if any.
    pub fn factors(&self) -> Option<&Factors> {
        self.factors.as_ref()
    }

    /// `x = (M + λI)⁻¹ g` on the problem's curvature, with its report.
    pub fn solve(&self, problem: &Problem, g: &ParamVector) -> Result<(ParamVector, SolveReport), SolverError> {
        solve_prepared(problem, &self.config, self.factors.as_ref(), g)
    }

    /// [`PreparedSolver::solve_many`], and where it comes free the per-example
    /// dots `∇ℓ_iᵀ x_q` (`[q][i]`, the influence scores × N) of the solutions:
    /// K-FAC/EK-FAC on the empirical Fisher form each example's gradient once
    /// for both the exact residuals and the dots (one pass over the data in
    /// all). `None` for the dots elsewhere.
    #[allow(clippy::type_complexity)]
    pub fn solve_many_with_dots(
        &self,
        problem: &Problem,
        gs: &[ParamVector],
    ) -> Result<(Vec<(ParamVector, SolveReport)>, Option<Vec<Vec<f64>>>), SolverError> {
        let config = &self.config;
        let structured = matches!(config.kind, SolverKind::Kfac | SolverKind::Ekfac);
        if !(structured && config.curvature == Curvature::Fisher && !gs.is_empty()) {
            return Ok((self.solve_many(problem, gs)?, None));
        }
        let Some(factors) = self.factors.as_ref() else {
            return Err(SolverError::BadOption("the solver's factors were not prepared".into()));
        };
        let start = std::time::Instant::now();
        let xs: Vec<ParamVector> = factors.inverse_products_in(problem.dtype(), gs, config.damping);
        let measured = config.residuals.count(gs.len());
        let Some((mut products, dots)) = kfac::fisher_products_and_dots(problem, &xs, measured, &|_| {})? else {
            return Ok((self.solve_many(problem, gs)?, None));
        };
        for (p, x) in products.iter_mut().zip(&xs) {
            p.axpy(config.damping, x);
        }
        let report = SolveReport {
            iterations: 1,
            ..SolveReport::approximate(config.kind.name())
        };
        let measured = crate::finish_with_products(
            &gs[..measured],
            &xs[..measured],
            products,
            vec![report.clone(); measured],
            start,
        );
        let reports = crate::with_unmeasured(measured, &report, &xs, start);
        Ok((xs.into_iter().zip(reports).collect(), Some(dots)))
    }

    /// [`PreparedSolver::solve`] for several right-hand sides together, each
    /// with its own report: CG and PCG run one recursion per right-hand side
    /// whose products are taken together, a direct solve builds and factors
    /// its matrix once, K-FAC/EK-FAC check all residuals with one block
    /// product. A block product is one pass over the data for the empirical
    /// Fisher (and the GGN, from as many vectors as outputs); otherwise one
    /// pass per vector, as alone. LiSSA and Arnoldi solve one after another.
    pub fn solve_many(
        &self,
        problem: &Problem,
        gs: &[ParamVector],
    ) -> Result<Vec<(ParamVector, SolveReport)>, SolverError> {
        let config = &self.config;
        let op = CurvatureOperator::new(problem, config.curvature);
        let damped = Damped {
            inner: &op,
            damping: config.damping,
        };
        let cg_opts = config.cg_options();
        let factors = || {
            self.factors
                .as_ref()
                .ok_or_else(|| SolverError::BadOption("the solver's factors were not prepared".into()))
        };
        match config.kind {
            SolverKind::Direct => direct::solve_many(&op, config.damping, gs, config.tol),
            SolverKind::Cg => cg::solve_many(&damped, gs, &cg_opts, None, "cg"),
            SolverKind::Pcg => {
                let factors = factors()?;
                let precond = |r: &ParamVector| Ok(factors.inverse_product(r, config.damping));
                cg::solve_many(&damped, gs, &cg_opts, Some(&precond), "pcg")
            }
            SolverKind::Kfac | SolverKind::Ekfac => kfac::solve_many(
                factors()?,
                &damped,
                (config.damping, problem.dtype()),
                gs,
                config.residuals.count(gs.len()),
            ),
            SolverKind::Lissa | SolverKind::Arnoldi => gs.iter().map(|g| self.solve(problem, g)).collect(),
        }
    }
}

/// `x = (M + λI)⁻¹ g` on the problem's curvature by the configured solver, with
/// its report (status, exact residual, warnings). For many right-hand sides,
/// [`SolverConfig::prepare`] once and [`PreparedSolver::solve`] each.
pub fn solve(
    problem: &Problem,
    config: &SolverConfig,
    g: &ParamVector,
) -> Result<(ParamVector, SolveReport), SolverError> {
    config.prepare(problem)?.solve(problem, g)
}

fn solve_prepared(
    problem: &Problem,
    config: &SolverConfig,
    factors: Option<&Factors>,
    g: &ParamVector,
) -> Result<(ParamVector, SolveReport), SolverError> {
    let factors = || factors.ok_or_else(|| SolverError::BadOption("the solver's factors were not prepared".into()));
    let op = CurvatureOperator::new(problem, config.curvature);
    let damped = Damped {
        inner: &op,
        damping: config.damping,
    };
    let cg_opts = config.cg_options();
    match config.kind {
        SolverKind::Direct => direct::solve_to(&op, config.damping, g, config.tol),
        SolverKind::Cg => cg::solve(&damped, g, &cg_opts, None, "cg"),
        SolverKind::Arnoldi => lanczos::solve(&op, config.damping, g, config.rank, config.seed),
        SolverKind::Kfac | SolverKind::Ekfac => kfac::solve(factors()?, &damped, (config.damping, problem.dtype()), g),
        SolverKind::Pcg => {
            let factors = factors()?;
            let precond = |r: &ParamVector| Ok(factors.inverse_product(r, config.damping));
            cg::solve(&damped, g, &cg_opts, Some(&precond), "pcg")
        }
        SolverKind::Lissa => {
            let n = problem.data.len();
            let b = config.lissa_batch.clamp(1, n);
            let mut rng = StdRng::seed_from_u64(config.seed);
            let mut sampler = |v: &ParamVector| -> Result<ParamVector, SolverError> {
                let idx = sample(&mut rng, n, b).into_vec();
                let subset = Subset::new(problem.data, idx).map_err(hvp_curvature::CurvatureError::from)?;
                // A sample of the whole objective's curvature, weight decay included.
                let p = problem.on(&subset)?;
                Ok(p.product(config.curvature, v, &|_| {})?.value)
            };
            let lo = LissaOptions {
                depth: config.depth,
                repeats: config.repeats,
                scale: config.scale,
                ..Default::default()
            };
            lissa::solve(&damped, &mut sampler, config.damping, g, &lo)
        }
    }
}
