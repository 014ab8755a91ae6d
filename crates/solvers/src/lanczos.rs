//! Krylov methods for symmetric curvature: power iteration, Lanczos with full
//! reorthogonalisation (Arnoldi for symmetric matrices), the low-rank inverse of
//! Schioppa et al. 2022, and spectrum estimates.

use crate::dense::sym_eigen;
use crate::{finish, Damped, LinearOperator, SolveReport, SolverError};
use hvp_model::ParamVector;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::time::Instant;

/// Estimate of the eigenvalue of largest magnitude of `apply`, from `iters`
/// power iterations started at `start`.
pub fn power_iteration(
    apply: &mut dyn FnMut(&ParamVector) -> Result<ParamVector, SolverError>,
    start: &ParamVector,
    iters: usize,
) -> Result<f64, SolverError> {
    let mut v = start.clone();
    let n = v.norm();
    if n == 0.0 {
        return Ok(0.0);
    }
    v.scale(1.0 / n);
    let mut lam = 0.0;
    for _ in 0..iters.max(1) {
        let w = apply(&v)?;
        lam = v.dot(&w);
        let wn = w.norm();
        if !wn.is_finite() {
            return Err(SolverError::Diverged(
                "power iteration produced non-finite values".into(),
            ));
        }
        if wn == 0.0 {
            return Ok(0.0);
        }
        v = w;
        v.scale(1.0 / wn);
    }
    Ok(lam)
}

/// A random unit vector shaped like `like`.
pub fn random_unit(like: &ParamVector, seed: u64) -> ParamVector {
    let mut rng = StdRng::seed_from_u64(seed);
    let flat: Vec<f64> = (0..like.len()).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut v = like.with_flat(&flat);
    v.scale(1.0 / v.norm());
    v
}

/// Ritz values (ascending) and vectors of `op` from `k` Lanczos steps started at `start`.
pub struct Ritz {
    pub values: Vec<f64>,
    pub vectors: Vec<ParamVector>,
}

/// `k` steps of Lanczos with full reorthogonalisation. When the Krylov space of
/// `start` is exhausted (an invariant subspace, e.g. a repeated eigenvalue such as
/// the null space of softmax's shift invariance), it restarts with a random vector
/// orthogonal to the basis, so k = dim always spans the whole space.
pub fn lanczos(op: &dyn LinearOperator, k: usize, start: &ParamVector) -> Result<Ritz, SolverError> {
    let k = k.min(op.dim()).max(1);
    hvp_io::memory::check_fits(
        (k as u64).saturating_mul(op.dim() as u64).saturating_mul(8),
        &format!("a Lanczos basis of {k} vectors"),
        "use fewer steps (`rank`, `steps`)",
    )
    .map_err(|e| SolverError::BadOption(e.to_string()))?;
    let mut q = start.clone();
    q.scale(1.0 / q.norm());
    let mut basis: Vec<ParamVector> = Vec::with_capacity(k);
    let (mut alphas, mut betas) = (Vec::with_capacity(k), Vec::with_capacity(k));
    let orthogonalise = |w: &mut ParamVector, basis: &[ParamVector]| {
        for _ in 0..2 {
            for b in basis {
                let c = b.dot(w);
                w.axpy(-c, b);
            }
        }
    };
    let mut scale = 0.0f64;
    for j in 0..k {
        let mut w = op.apply(&q)?;
        let a = q.dot(&w);
        scale = scale.max(a.abs());
        alphas.push(a);
        basis.push(q.clone());
        orthogonalise(&mut w, &basis);
        let beta = w.norm();
        if !beta.is_finite() {
            return Err(SolverError::Diverged("Lanczos produced non-finite values".into()));
        }
        if j + 1 == k {
            break;
        }
        if beta > 1e-10 * scale.max(f64::MIN_POSITIVE) {
            betas.push(beta);
            w.scale(1.0 / beta);
            q = w;
        } else {
            // Invariant subspace: continue from a fresh direction (T gets a zero coupling).
            let mut fresh = random_unit(start, 0x5EED ^ j as u64);
            orthogonalise(&mut fresh, &basis);
            let fnorm = fresh.norm();
            if fnorm < 1e-8 {
                break;
            }
            fresh.scale(1.0 / fnorm);
            betas.push(0.0);
            q = fresh;
        }
    }
    let m = alphas.len();
    let mut t = vec![0.0; m * m];
    for i in 0..m {
        t[i * m + i] = alphas[i];
        if i + 1 < m {
            t[i * m + i + 1] = betas[i];
            t[(i + 1) * m + i] = betas[i];
        }
    }
    let (values, s) = sym_eigen(m, &t)?;
    let vectors = (0..m)
        .map(|c| {
            let mut v = start.zeros_like();
            for (i, b) in basis.iter().enumerate() {
                v.axpy(s[i * m + c], b);
            }
            v
        })
        .collect();
    Ok(Ritz { values, vectors })
}

/// Schioppa et al.'s inverse: top-k eigenpairs of M (by magnitude) from Lanczos on
/// a random start, then `x = Σ u_i (u_iᵀ g) / (θ_i + λ)`. Exact when k = dim.
pub fn solve(
    m: &dyn LinearOperator,
    damping: f64,
    g: &ParamVector,
    k: usize,
    seed: u64,
) -> Result<(ParamVector, SolveReport), SolverError> {
    let start = Instant::now();
    let p0 = m.products();
    let mut ritz = lanczos(m, k, &random_unit(g, seed))?;
    let mut order: Vec<usize> = (0..ritz.values.len()).collect();
    order.sort_by(|&a, &b| ritz.values[b].abs().total_cmp(&ritz.values[a].abs()));
    let mut report = SolveReport {
        iterations: ritz.values.len(),
        ..SolveReport::approximate("arnoldi")
    };
    let mut x = g.zeros_like();
    let mut kept = Vec::new();
    for &i in order.iter().take(k) {
        let denom = ritz.values[i] + damping;
        if denom.abs() < 1e-300 {
            return Err(SolverError::Dense(format!(
                "eigenvalue {:.3e} + λ is zero: increase `damping`",
                ritz.values[i]
            )));
        }
        if denom < 0.0 {
            report.warnings.push(format!(
                "eigenvalue {:.3e} + λ < 0: M + λI is indefinite; use `curvature` ggn or a larger `damping`",
                ritz.values[i]
            ));
        }
        let u = std::mem::replace(&mut ritz.vectors[i], g.zeros_like());
        x.axpy(u.dot(g) / denom, &u);
        kept.push(ritz.values[i]);
    }
    report.eigenvalues = Some(kept);
    let damped = Damped { inner: m, damping };
    let report = finish(&damped, g, &x, report, p0, start)?;
    Ok((x, report))
}

/// Hutchinson's trace estimate `E[zᵀ M z]` with Rademacher z: (mean, standard error).
pub fn hutchinson_trace(
    m: &dyn LinearOperator,
    like: &ParamVector,
    samples: usize,
    seed: u64,
) -> Result<(f64, f64), SolverError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut values = Vec::with_capacity(samples);
    for _ in 0..samples.max(2) {
        let flat: Vec<f64> = (0..like.len())
            .map(|_| if rng.random_bool(0.5) { 1.0 } else { -1.0 })
            .collect();
        let z = like.with_flat(&flat);
        values.push(z.dot(&m.apply(&z)?));
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    Ok((mean, (var / n).sqrt()))
}
