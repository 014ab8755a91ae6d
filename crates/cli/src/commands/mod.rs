pub mod bench;
pub mod compare_solvers;
pub mod demo;
pub mod factors;
pub mod grad;
pub mod influence;
pub mod init;
pub mod params;
pub mod product;
pub mod self_influence;
pub mod solve;
pub mod spectrum;
pub mod subsample_error;
pub mod train;
pub mod validate;

use crate::args::{load_data, load_model, set_threads, DataArgs, LoadedData, ModelArgs, RunArgs};
use crate::report::{summary, Progress};
use anyhow::{Context, Result};
use hvp_curvature::frozen::{Features, FrozenPrefix};
use hvp_curvature::{Curvature, PassResult, Problem};
use hvp_data::Dataset;
use hvp_model::{Model, ParamVector, Weights};
use hvp_tensor::DType;
use std::path::Path;
use std::time::Instant;

/// The frozen prefix of a model whose first layers read no trainable
/// parameter (`--params` on an imported network), if there is one worth
/// cutting: then every pass runs through `prefix.tail` on features computed once.
pub fn frozen_prefix(model: &Model, weights: &Weights, sample_shape: &[usize], quiet: bool) -> Option<FrozenPrefix> {
    let frozen = FrozenPrefix::of(model, weights, sample_shape)?;
    if !quiet {
        eprintln!(
            "frozen prefix: the layers before the first trainable parameter run once per example ({} features \
             each, kept in memory); every pass runs through the trainable rest",
            frozen.feature_size()
        );
    }
    Some(frozen)
}

/// The features of `data` (at `indices`, or all) under `frozen`, with a progress bar.
pub fn frozen_features(
    frozen: &FrozenPrefix,
    weights: &Weights,
    data: &dyn Dataset,
    indices: Option<&[usize]>,
    run: &RunArgs,
) -> Result<Features> {
    let total = indices.map_or(data.len(), <[usize]>::len);
    let progress = Progress::new(total, "frozen-prefix features", run.quiet);
    let features = frozen.features(weights, data, indices, run.batch_size, run.dtype.into(), &|n| {
        progress.advance(n)
    });
    progress.finish();
    let features = features.context("computing the frozen prefix's features")?;
    if let (Some(path), false) = (features.on_disk(), run.quiet) {
        eprintln!(
            "note: the frozen prefix's features of {total} examples exceed half of the free memory; kept in a \
             scratch file in {} (removed at exit; TMPDIR chooses the directory)",
            path.parent().unwrap_or(path).display()
        );
    }
    Ok(features)
}

/// What one pass over the data computes.
pub enum PassKind<'a> {
    Gradient,
    Product(Curvature, &'a Path),
}

/// Model, weights and data of a command, after `--threads` took effect.
pub fn setup(model_args: &ModelArgs, data_args: &DataArgs, run: &RunArgs) -> Result<(Model, Weights, LoadedData)> {
    set_threads(run.threads)?;
    let (model, weights) = load_model(model_args)?;
    crate::args::check_weights_fit(&model, &weights, run.dtype.into())?;
    let data = load_data(data_args)?;
    crate::args::check_loss(model_args.loss, &data.view())?;
    injected_failure()?;
    Ok((model, weights, data))
}

/// Test hook for multi-process jobs: `HVP_TEST_FAIL_RANK=r` makes rank r fail
/// here, after loading, while the other ranks go on into the first data pass.
pub fn injected_failure() -> Result<()> {
    match std::env::var("HVP_TEST_FAIL_RANK")
        .ok()
        .and_then(|r| r.parse::<usize>().ok())
    {
        Some(r) if r == hvp_dist::rank() => anyhow::bail!("failure injected on rank {r} (HVP_TEST_FAIL_RANK)"),
        _ => Ok(()),
    }
}

/// Reads a parameter-space vector (`--vector`, `--rhs`) with context.
pub fn load_vector(model: &Model, path: &Path) -> Result<ParamVector> {
    ParamVector::load(model, path).with_context(|| format!("reading the vector {}", path.display()))
}

/// Says, once, that the objective has an L2 term (and so the curvature w·I).
pub fn state_weight_decay(w: f64, quiet: bool) {
    if w != 0.0 && !quiet {
        eprintln!("objective: mean loss + ({w}/2)‖θ‖² — gradient includes {w}·θ, curvature includes {w}·I");
    }
}

/// Writes a JSON report atomically.
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)? + "\n";
    hvp_model::io::atomic_write(path, text.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

/// Loads everything, runs one pass with a progress bar, writes `out` atomically.
pub fn run_pass(
    model_args: &ModelArgs,
    data_args: &DataArgs,
    run: &RunArgs,
    weight_decay: f64,
    kind: PassKind,
    out: &Path,
) -> Result<()> {
    let (model, weights, data) = setup(model_args, data_args, run)?;
    let view = data.view();
    let dtype: DType = run.dtype.into();
    let frozen = frozen_prefix(&model, &weights, &view.sample_shape(), run.quiet);
    let features = frozen
        .as_ref()
        .map(|f| frozen_features(f, &weights, &view, None, run))
        .transpose()?;
    let (pass_model, pass_data): (&Model, &dyn Dataset) = match (&frozen, &features) {
        (Some(f), Some(x)) => (&f.tail, x),
        _ => (&model, &view),
    };
    let problem = Problem::new(pass_model, &weights, pass_data, run.batch_size)?
        .with_weight_decay(weight_decay)
        .with_dtype(dtype);
    state_weight_decay(weight_decay, run.quiet);
    let vector = match kind {
        PassKind::Product(_, path) => Some(load_vector(&model, path)?),
        PassKind::Gradient => None,
    };
    let (label, what) = match kind {
        PassKind::Gradient => ("gradient", "hvp grad"),
        PassKind::Product(Curvature::Hessian, _) => ("Hessian-vector product", "hvp product (hessian)"),
        PassKind::Product(Curvature::Ggn, _) => ("GGN-vector product", "hvp product (ggn)"),
        PassKind::Product(Curvature::Fisher, _) => ("Fisher-vector product", "hvp product (fisher)"),
    };
    let progress = Progress::new(problem.data.len(), label, run.quiet);
    let tick = |n: usize| progress.advance(n);
    let start = Instant::now();
    let result: PassResult = match (&kind, &vector) {
        (PassKind::Product(c, _), Some(v)) => problem.product(*c, v, &tick)?,
        _ => problem.gradient(&tick)?,
    };
    progress.finish();
    save_vector(&model, &result.value, out, dtype)?;
    summary(what, result.examples, start.elapsed(), run.quiet);
    if !run.quiet {
        println!(
            "mean loss {:.6}, output norm {:.6e}, written to {}",
            result.loss,
            result.value.norm(),
            out.display()
        );
    }
    Ok(())
}

pub fn save_vector(model: &Model, v: &ParamVector, out: &Path, dtype: DType) -> Result<()> {
    v.save(model, out, dtype)
        .with_context(|| format!("writing {}", out.display()))
}
