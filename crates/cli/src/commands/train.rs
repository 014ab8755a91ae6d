//! `hvp train`: train a built-in architecture or an ONNX model (BatchNorm in
//! train mode while training, eval mode after), deterministic for a seed and
//! thread count.

use crate::args::{load_data, set_threads, DataArgs, RunArgs};
use crate::report::{summary, Progress};
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use hvp_data::Dataset;
use hvp_influence::train::{train, Optimizer, TrainOptions};
use hvp_model::{Architecture, Model, Weights};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OptimizerArg {
    Sgd,
    Adam,
}

#[derive(Args)]
pub struct TrainArgs {
    /// Architecture (see `hvp grad --help`).
    #[arg(long, required_unless_present = "model", conflicts_with = "model")]
    pub arch: Option<String>,
    /// An ONNX model to train instead, starting from its initializers (or from
    /// --init, by name); the output state_dict overrides them with `--weights`.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub run: RunArgs,
    /// Passes over the training data.
    #[arg(value_parser = crate::checks::iterations, long, default_value_t = 1)]
    pub epochs: usize,
    /// Learning rate.
    #[arg(value_parser = crate::checks::positive, long, default_value_t = 0.01)]
    pub lr: f64,
    /// SGD momentum in [0, 1).
    #[arg(value_parser = crate::checks::momentum, long, default_value_t = 0.0)]
    pub momentum: f64,
    /// L2 coefficient w: the objective is L + (w/2)‖θ‖² (pass the same value to
    /// the curvature commands, which then add w·I).
    #[arg(value_parser = crate::checks::non_negative, long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// sgd (with momentum) or adam.
    #[arg(long, value_enum, default_value = "sgd")]
    pub optimizer: OptimizerArg,
    /// Seed of every random choice (sampled labels, subsets, start vectors).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Start from these weights instead of a fresh initialisation (or, with
    /// --model, of the ONNX initializers).
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Output state_dict (safetensors, compute dtype, written atomically).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(a: TrainArgs) -> Result<()> {
    set_threads(a.run.threads)?;
    let data = load_data(&a.data)?;
    crate::args::check_loss(crate::args::LossArg::Ce, &data.view())?;
    let view = data.view();
    let shape = view.sample_shape();
    let (model, mut weights) = match (&a.arch, &a.model) {
        (_, Some(path)) => {
            let (model, mut weights) = crate::args::load_model(&crate::args::ModelArgs {
                model: Some(path.clone()),
                ..Default::default()
            })?;
            if let Some(p) = &a.init {
                weights
                    .override_from(&model, p)
                    .with_context(|| format!("reading {}", p.display()))?;
            }
            (model, weights)
        }
        (Some(arch), None) => {
            let arch: Architecture = arch.parse()?;
            let model = Model::new(&arch, shape.first().copied().unwrap_or(1))?;
            let weights = match &a.init {
                Some(p) => Weights::load(&model, p).with_context(|| format!("reading {}", p.display()))?,
                None => Weights::init(&model, a.seed),
            };
            (model, weights)
        }
        (None, None) => anyhow::bail!("give --arch SPEC or --model FILE.onnx"),
    };
    model.check_input(&shape).map_err(anyhow::Error::msg)?;
    crate::args::check_weights_fit(&model, &weights, a.run.dtype.into())?;
    hvp_data::check_labels(&view, model.num_classes)?;
    let opts = TrainOptions {
        epochs: a.epochs,
        batch_size: a.run.batch_size,
        lr: a.lr,
        momentum: a.momentum,
        weight_decay: a.weight_decay,
        optimizer: match a.optimizer {
            OptimizerArg::Sgd => Optimizer::Sgd,
            OptimizerArg::Adam => Optimizer::Adam,
        },
        seed: a.seed,
    };
    let progress = Progress::new(a.epochs * view.len(), "training", a.run.quiet);
    let start = Instant::now();
    let per_epoch = view.len();
    let (mut seen, mut correct) = (0usize, 0usize);
    let reports = train(
        &model,
        &mut weights,
        &view,
        &opts,
        a.run.dtype.into(),
        &mut |n, loss, c| {
            // Batches never straddle epochs: reset the running accuracy at each start.
            if seen % per_epoch == 0 {
                correct = 0;
            }
            seen += n;
            correct += c;
            let in_epoch = (seen - 1) % per_epoch + 1;
            progress.advance(n);
            progress.message(&format!(
                "epoch {}, batch loss {loss:.4}, accuracy {:.3}",
                (seen - 1) / per_epoch + 1,
                correct as f64 / in_epoch as f64
            ));
        },
    )?;
    progress.finish();
    weights
        .save(&model, &a.out, a.run.dtype.into())
        .with_context(|| format!("writing {}", a.out.display()))?;
    if !a.run.quiet {
        for r in &reports {
            println!(
                "epoch {}: loss {:.4}, accuracy {:.3} (train mode)",
                r.epoch, r.loss, r.accuracy
            );
        }
        summary("hvp train", a.epochs * view.len(), start.elapsed(), false);
        println!(
            "weights (BatchNorm running statistics for eval mode) written to {}",
            a.out.display()
        );
    }
    Ok(())
}
