//! Factors cached on disk, under a key of everything they depend on: the
//! model's graph and parameter shapes, the weights, the data, the kind, the
//! label sampling, the seed and the compute dtype. A second run with the same
//! key loads them instead of computing them.

use super::*;
use hvp_io::hash::{fnv1a, FNV_OFFSET};
use std::path::PathBuf;
use std::time::Duration;

/// How often a cached computation saves its running sums (a few tens of
/// megabytes for a ResNet; a second to write at most).
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(30);

/// Where a configuration's factors came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FactorSource {
    /// A file the user named.
    Given(PathBuf),
    /// The cache, at this path.
    Cached(PathBuf),
    /// Computed now; stored in the cache at this path (None: no cache, or the
    /// cache could not be written).
    Computed(Option<PathBuf>),
}

/// The cache key of the factors of `problem` with these settings: two FNV-1a
/// hashes (128 bits) of the graph, parameter shapes, weights, data (length,
/// every label, the inputs of the first and last 64 examples), kind, label
/// sampling, seed and dtype.
pub fn cache_key(problem: &Problem, kind: FactorKind, fisher: FisherKind, seed: u64) -> Result<String, SolverError> {
    let model = problem.model;
    let mut parts: Vec<Vec<u8>> = vec![format!(
        "{:?}|{:?}|{:?}|{seed}|{}",
        model.graph.nodes(),
        kind,
        fisher,
        problem.dtype().name()
    )
    .into_bytes()];
    for (spec, t) in model.params.iter().zip(&problem.weights.params) {
        parts.push(format!("{}{:?}", spec.name, spec.shape).into_bytes());
        parts.push(t.data().iter().flat_map(|v| v.to_le_bytes()).collect());
    }
    for t in &problem.weights.buffers {
        parts.push(t.data().iter().flat_map(|v| v.to_le_bytes()).collect());
    }
    let data = problem.data;
    let n = data.len();
    parts.push((n as u64).to_le_bytes().to_vec());
    parts.push((0..n).flat_map(|i| (data.label(i) as u64).to_le_bytes()).collect());
    let ends: Vec<usize> = (0..n.min(64)).chain(n.saturating_sub(64).max(n.min(64))..n).collect();
    let mut batch = hvp_data::Batch::default();
    data.read(&ends, &mut batch)
        .map_err(hvp_curvature::CurvatureError::from)?;
    parts.push(
        batch
            .x
            .iter()
            .chain(&batch.targets)
            .flat_map(|v| v.to_le_bytes())
            .collect(),
    );
    let (mut a, mut b) = (FNV_OFFSET, FNV_OFFSET ^ 0x9e37_79b9_7f4a_7c15);
    for p in &parts {
        a = fnv1a(p, a);
        b = fnv1a(p, fnv1a(&(p.len() as u64).to_le_bytes(), b));
    }
    Ok(format!("{a:016x}{b:016x}"))
}

impl Factors {
    /// The factors from `dir`'s cache when it holds them for this key, else
    /// computed and stored there (a failed store only skips the cache).
    pub fn cached(
        problem: &Problem,
        kind: FactorKind,
        fisher: FisherKind,
        seed: u64,
        dir: &Path,
        progress: &dyn Fn(usize),
    ) -> Result<(Factors, FactorSource), SolverError> {
        let key = cache_key(problem, kind, fisher, seed)?;
        let path = dir.join(format!("{}-{key}.safetensors", kind_name(kind)));
        let found = path
            .is_file()
            .then(|| Factors::load(problem.model, &path).ok())
            .flatten()
            .filter(|f| f.kind == kind);
        // Every process of a job must take the same branch (computing is collective).
        let mut hits = vec![found.is_some() as u8 as f64];
        hvp_dist::allreduce_sum(&mut hits);
        if let (Some(f), true) = (found, hits[0] == hvp_dist::size() as f64) {
            return Ok((f, FactorSource::Cached(path)));
        }
        // An interrupted computation of the same key continues where it stopped.
        let checkpoint = Checkpoint {
            path: dir.join(format!("{}-{key}.partial", kind_name(kind))),
            every: CHECKPOINT_EVERY,
            resume: true,
        };
        let writable = hvp_dist::rank() == 0 && std::fs::create_dir_all(dir).is_ok();
        let f = Factors::compute_checkpointed(problem, kind, fisher, seed, progress, writable.then_some(&checkpoint))?;
        let stored = writable && f.save(problem.model, &path).is_ok();
        if stored {
            checkpoint.discard();
        }
        Ok((f, FactorSource::Computed(stored.then_some(path))))
    }
}

fn kind_name(kind: FactorKind) -> &'static str {
    match kind {
        FactorKind::Kfac => "kfac",
        FactorKind::Ekfac => "ekfac",
    }
}
