//! `hvp validate`: predicted against actual leave-one-out changes of a test loss.
//! For each of K training examples: the influence score (predicted change of the
//! test loss when it is removed), then the model really retrained without it —
//! warm-started from the full-data optimum, by Newton's method to convergence
//! (`--retrain newton`, convex models) or by SGD epochs (`--retrain sgd`) — and the
//! actual change; Pearson and Spearman correlations of the two.

use super::influence::{explain, top_k};
use super::solve::SolverOptions;
use crate::args::{load_model, open_data_spec, set_threads, ModelArgs, RunArgs};
use crate::output::Outputs;
use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use hvp_curvature::Problem;
use hvp_data::{Dataset, Subset};
use hvp_influence::loo::{self, Removal, Retrain};
use hvp_influence::train::{newton, train, Optimizer, TrainOptions};
use hvp_model::{Architecture, Model, Weights};
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum RemoveArg {
    /// The K largest |score|.
    Top,
    /// K random examples.
    Random,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum RetrainArg {
    /// Newton's method to a gradient norm of 1e-10 (convex objectives).
    Newton,
    /// `--retrain-epochs` of SGD at `--lr` (non-convex models).
    Sgd,
    /// `--retrain-epochs` full-batch gradient-descent steps (momentum 0.9) at `--lr`
    /// (non-convex models): the full-data weights are first refined the same way,
    /// and the baseline loss is that of the same number of steps on all the data,
    /// so the optimiser's own drift cancels.
    Gd,
}

#[derive(Args)]
pub struct ValidateArgs {
    /// Architecture (see `hvp grad --help`).
    #[arg(long, required_unless_present = "model", conflicts_with = "model")]
    pub arch: Option<String>,
    /// An ONNX model instead of --arch (its initializers are the weights unless
    /// --weights overrides them by name).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Trained weights; when absent (and without --model) the model is trained
    /// here from a seeded initialisation by the --retrain method (Newton to the
    /// optimum, or --retrain-epochs of gradient descent / SGD).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Training data: mnist:DIR[:train|test], cifar10:DIR[:train|test] or npy:X.npy,Y.npy.
    #[arg(long)]
    pub train: String,
    /// Test data, same forms.
    #[arg(long)]
    pub test: String,
    /// The test example whose loss changes are predicted and measured (alias --test-indices).
    #[arg(long, visible_alias = "test-indices", default_value_t = 0)]
    pub test_index: usize,
    /// Number of training examples removed one at a time.
    #[arg(value_parser = crate::checks::iterations, long, default_value_t = 20)]
    pub k: usize,
    /// Which examples to remove: the top-k by |predicted change|, or a random sample.
    #[arg(long, value_enum, default_value = "top")]
    pub remove: RemoveArg,
    /// How each leave-one-out model is retrained.
    #[arg(long, value_enum, default_value = "newton")]
    pub retrain: RetrainArg,
    /// Epochs of each retraining (gd, sgd).
    #[arg(value_parser = crate::checks::iterations, long, default_value_t = 5)]
    pub retrain_epochs: usize,
    /// Learning rate.
    #[arg(value_parser = crate::checks::positive, long, default_value_t = 0.01)]
    pub lr: f64,
    /// Use only the first N training examples (alias --limit).
    #[arg(value_parser = crate::checks::limit, long, visible_alias = "limit")]
    pub limit_train: Option<usize>,
    /// Zero-pad images of both sets by P pixels.
    #[arg(value_parser = crate::checks::pad, long, default_value_t = 0)]
    pub pad: usize,
    /// Keep only these classes of both sets, relabelled 0, 1, … (e.g. 1,7).
    #[arg(long, value_delimiter = ',')]
    pub classes: Option<Vec<usize>>,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub solver: SolverOptions,
    /// L2 coefficient of the training objective (adds w·I to the curvature).
    #[arg(value_parser = crate::checks::non_negative, long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// JSON report: predicted and actual changes, correlations.
    #[arg(long)]
    pub report: PathBuf,
    /// Scatter plot (PNG) of predicted against actual changes.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// SGD settings of the retraining (`--retrain-epochs`, `--lr`, the objective's decay).
fn retrain_options(a: &ValidateArgs, batch_size: usize, momentum: f64) -> TrainOptions {
    TrainOptions {
        epochs: a.retrain_epochs,
        batch_size,
        lr: a.lr,
        momentum,
        weight_decay: a.weight_decay,
        optimizer: Optimizer::Sgd,
        seed: a.solver.seed,
    }
}

pub fn run(a: ValidateArgs) -> Result<()> {
    set_threads(a.run.threads)?;
    let mut outputs = Outputs::new();
    let report_slot = outputs.reserve(&a.report)?;
    let plot_slot = outputs.reserve_opt(a.plot.as_ref())?;
    let src = open_data_spec(&a.train, a.pad, a.classes.as_deref())?;
    crate::args::check_loss(crate::args::LossArg::Ce, src.as_ref())?;
    let train_view = Subset::first(src.as_ref(), a.limit_train.unwrap_or(usize::MAX));
    let (model, mut weights) = match (&a.arch, &a.model, &a.weights) {
        (_, Some(m), w) => load_model(&ModelArgs {
            model: Some(m.clone()),
            weights: w.clone(),
            ..Default::default()
        })?,
        (Some(arch), None, Some(w)) => load_model(&ModelArgs {
            arch: Some(arch.clone()),
            weights: Some(w.clone()),
            ..Default::default()
        })?,
        (None, None, _) => bail!("give --arch SPEC or --model FILE.onnx"),
        (Some(arch), None, None) => {
            let arch: Architecture = arch.parse()?;
            let shape = train_view.sample_shape();
            let model = Model::new(&arch, shape.first().copied().unwrap_or(1))?;
            let w = Weights::init(&model, a.solver.seed);
            if a.retrain == RetrainArg::Sgd {
                let mut w = w;
                train(
                    &model,
                    &mut w,
                    &train_view,
                    &retrain_options(&a, a.run.batch_size, 0.0),
                    a.run.dtype.into(),
                    &mut |_, _, _| {},
                )?;
                (model, w)
            } else {
                (model, w)
            }
        }
    };
    crate::args::check_weights_fit(&model, &weights, a.run.dtype.into())?;
    let test = open_data_spec(&a.test, a.pad, a.classes.as_deref())?;
    if a.test_index >= test.len() {
        bail!(
            "--test-index {} is out of range ({} test examples)",
            a.test_index,
            test.len()
        );
    }
    let n = train_view.len();
    if a.retrain == RetrainArg::Newton {
        let steps = newton(
            &model,
            &mut weights,
            &train_view,
            a.weight_decay,
            a.run.batch_size,
            1e-10,
            50,
        )?;
        println!("full-data optimum refined by {steps} Newton steps");
    }
    let retrain = match a.retrain {
        RetrainArg::Newton => Retrain::Newton,
        RetrainArg::Sgd => Retrain::Sgd(retrain_options(&a, a.run.batch_size, 0.0)),
        RetrainArg::Gd => Retrain::Gd(retrain_options(&a, n, 0.9)),
    };
    if let Retrain::Gd(opts) = &retrain {
        // The full-data weights refined the way each leave-one-out model will be.
        train(
            &model,
            &mut weights,
            &train_view,
            opts,
            a.run.dtype.into(),
            &mut |_, _, _| {},
        )?;
    }
    let problem = Problem::new(&model, &weights, &train_view, a.run.batch_size)?
        .with_weight_decay(a.weight_decay)
        .with_dtype(a.run.dtype.into());
    let solver = a.solver.config().prepare(&problem)?;
    let q = explain(&problem, test.as_ref(), a.test_index, &a.solver, &solver, &|_| {})?;
    let removal = match a.remove {
        RemoveArg::Top => Removal::Top(a.k),
        RemoveArg::Random => Removal::Random {
            k: a.k,
            seed: a.solver.seed,
        },
    };
    let k_total = a.k.min(n);
    let quiet = a.run.quiet;
    let result = loo::validate(
        &model,
        &weights,
        &train_view,
        test.as_ref(),
        a.test_index,
        &q.scores,
        removal,
        &retrain,
        a.weight_decay,
        a.run.batch_size,
        a.run.dtype.into(),
        &mut |k, i, predicted, actual| {
            if !quiet {
                eprintln!(
                    "[{}/{k_total}] removed {i}: predicted {predicted:+.4e}, actual {actual:+.4e}",
                    k + 1
                );
            }
        },
    )?;
    let (predicted, actual, chosen, base) = (&result.predicted, &result.actual, &result.removed, result.base_loss);
    let (p, s) = (result.pearson, result.spearman);
    let (helpful, harmful) = top_k(&q.scores, 1);
    println!(
        "test {}: Pearson {p:.4}, Spearman {s:.4} over {} removals",
        a.test_index,
        chosen.len()
    );
    if let Some(slot) = plot_slot {
        let title = format!("{}: test {}, Pearson {p:.3}, Spearman {s:.3}", model.arch, a.test_index);
        outputs.put(slot, &crate::picture::scatter(predicted, actual, &title)?)?;
    }
    let report = serde_json::json!({
            "convention": super::influence::CONVENTION,
            "model": model.arch.to_string(),
            "test_index": a.test_index,
            "test_loss": base,
            "train_examples": n,
            "removed": chosen,
            "predicted": predicted,
            "actual": actual,
            "pearson": p,
            "spearman": s,
            "most_helpful": helpful,
            "most_harmful": harmful,
            "retrain": format!("{:?}", a.retrain).to_lowercase(),
            "damping": a.solver.damping,
            "weight_decay": a.weight_decay,
    });
    outputs.put(report_slot, (serde_json::to_string_pretty(&report)? + "\n").as_bytes())?;
    outputs.commit()
}
