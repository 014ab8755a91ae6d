//! Leave-one-out validation: the influence score of a training example (the
//! predicted change of a test loss when it is removed) against the actual
//! change after retraining without it, for K examples, and their correlation.

use crate::stats::{pearson, spearman};
use crate::train::{newton, train, TrainOptions};
use crate::InfluenceError;
use hvp_curvature::Problem;
use hvp_data::{Dataset, Subset};
use hvp_model::{Model, Weights};
use hvp_tensor::DType;
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::SeedableRng;

/// How each leave-one-out model is retrained, warm-started from the full-data weights.
#[derive(Clone, Debug)]
pub enum Retrain {
    /// Newton's method to a gradient norm of 1e-10 (convex objectives); the
    /// full-data weights must be the optimum (see [`crate::train::newton`]).
    Newton,
    /// SGD with these options (non-convex models).
    Sgd(TrainOptions),
    /// Full-batch gradient descent with these options (batch size = N): the
    /// baseline is the same number of steps on all the data, so the optimiser's
    /// own drift cancels.
    Gd(TrainOptions),
}

/// Which training examples are removed.
#[derive(Clone, Copy, Debug)]
pub enum Removal {
    /// The `k` largest |score|.
    Top(usize),
    /// `k` examples drawn at random with `seed`.
    Random { k: usize, seed: u64 },
}

/// Predicted and actual changes of the test loss, and their correlations.
#[derive(Clone, Debug)]
pub struct LooResult {
    /// The test loss the changes are measured from.
    pub base_loss: f64,
    pub removed: Vec<usize>,
    pub predicted: Vec<f64>,
    pub actual: Vec<f64>,
    pub pearson: f64,
    pub spearman: f64,
}

/// The loss of test example `t` under `weights`.
pub fn test_loss(model: &Model, weights: &Weights, test: &dyn Dataset, t: usize) -> Result<f64, InfluenceError> {
    let one = Subset::new(test, vec![t])?;
    Ok(Problem::new(model, weights, &one, 1)?.losses_as::<f64>()?[0])
}

/// The examples `removal` picks, given every example's score.
pub fn chosen(removal: Removal, scores: &[f64]) -> Vec<usize> {
    let n = scores.len();
    match removal {
        Removal::Top(k) => {
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&x, &y| scores[y].abs().total_cmp(&scores[x].abs()));
            order.truncate(k);
            order
        }
        Removal::Random { k, seed } => sample(&mut StdRng::seed_from_u64(seed), n, k.min(n)).into_vec(),
    }
}

/// Retrains without each chosen example and measures the change of test
/// example `t`'s loss. `scores` are the influence scores of every training
/// example on `t` (e.g. [`crate::scores::explain`]) at `weights`; with
/// [`Retrain::Gd`], `weights` are first refined the same way so both runs end
/// at the same point of the optimiser. `each(k, example, predicted, actual)`
/// reports progress.
#[allow(clippy::too_many_arguments)]
pub fn validate(
    model: &Model,
    weights: &Weights,
    train_data: &dyn Dataset,
    test: &dyn Dataset,
    t: usize,
    scores: &[f64],
    removal: Removal,
    retrain: &Retrain,
    weight_decay: f64,
    batch_size: usize,
    dtype: DType,
    each: &mut dyn FnMut(usize, usize, f64, f64),
) -> Result<LooResult, InfluenceError> {
    let n = train_data.len();
    if scores.len() != n {
        return Err(InfluenceError::Training(format!(
            "{} scores for {n} training examples",
            scores.len()
        )));
    }
    let run = |w: &mut Weights, data: &dyn Dataset| -> Result<(), InfluenceError> {
        match retrain {
            // Same objective with one example dropped: Σ_{j≠i} ℓ_j / N + (w/2)‖θ‖²,
            // a mean over N−1 with the decay scaled by N/(N−1).
            Retrain::Newton => {
                let decay = weight_decay * n as f64 / data.len().max(1) as f64;
                newton(model, w, data, decay, batch_size, 1e-10, 50)?;
            }
            Retrain::Sgd(opts) => {
                train(model, w, data, opts, dtype, &mut |_, _, _| {})?;
            }
            Retrain::Gd(opts) => {
                let full = TrainOptions {
                    batch_size: data.len(),
                    ..opts.clone()
                };
                train(model, w, data, &full, dtype, &mut |_, _, _| {})?;
            }
        }
        Ok(())
    };
    let base_loss = if let Retrain::Gd(_) = retrain {
        let mut reference = weights.clone();
        run(&mut reference, train_data)?;
        test_loss(model, &reference, test, t)?
    } else {
        test_loss(model, weights, test, t)?
    };
    let removed = chosen(removal, scores);
    let (mut predicted, mut actual) = (Vec::new(), Vec::new());
    for (k, &i) in removed.iter().enumerate() {
        let rest: Vec<usize> = (0..n).filter(|&j| j != i).collect();
        let without = Subset::new(train_data, rest)?;
        let mut w = weights.clone();
        run(&mut w, &without)?;
        let change = test_loss(model, &w, test, t)? - base_loss;
        predicted.push(scores[i]);
        actual.push(change);
        each(k, i, scores[i], change);
    }
    Ok(LooResult {
        base_loss,
        pearson: pearson(&predicted, &actual),
        spearman: spearman(&predicted, &actual),
        removed,
        predicted,
        actual,
    })
}
