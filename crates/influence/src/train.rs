//! Training with BatchNorm in train mode (batch statistics, running statistics
//! updated as PyTorch does, momentum 0.1), SGD (momentum, weight decay as
//! PyTorch's `SGD`) or Adam (PyTorch's `Adam`, L2 weight decay), deterministic for
//! a seed and thread count; and Newton refinement to the exact optimum of convex
//! objectives (for leave-one-out retraining).

use crate::InfluenceError;
use hvp_autodiff::loss;
use hvp_curvature::{Curvature, Problem};
use hvp_data::{Batch, Dataset};
use hvp_model::{Model, ParamVector, Weights};
use hvp_solvers::cg::{self, CgOptions};
use hvp_solvers::{CurvatureOperator, Damped};
use hvp_tensor::{DType, Float, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// BatchNorm running-statistics momentum (PyTorch's default).
const BN_MOMENTUM: f64 = 0.1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Optimizer {
    Sgd,
    Adam,
}

#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub optimizer: Optimizer,
    pub seed: u64,
}

/// Mean loss and accuracy of one epoch (as seen during training, train-mode BN).
#[derive(Clone, Debug)]
pub struct EpochReport {
    pub epoch: usize,
    pub loss: f64,
    pub accuracy: f64,
}

struct OptState {
    m: Vec<Vec<f64>>,
    v: Vec<Vec<f64>>,
    step: i32,
}

fn step<T: Float>(
    model: &Model,
    weights: &mut Weights,
    batch: &Batch,
    shape: &[usize],
    opts: &TrainOptions,
    state: &mut OptState,
) -> (f64, usize) {
    let params: Vec<Tensor<T>> = weights.params_as();
    let buffers: Vec<Tensor<T>> = weights.buffers_as();
    let mut full_shape = vec![batch.len()];
    full_shape.extend_from_slice(shape);
    let x = Tensor::new(full_shape, batch.x.iter().map(|&v| T::from_f64(v)).collect()).expect("batch shape");
    let (tape, bn) = model.graph.forward_train(&params, &buffers, x);
    let logits = tape.output().clone();
    let out = loss::apply(&logits, hvp_curvature::batch_targets(batch), 1.0 / batch.len() as f64);
    let c = logits.rows_cols().1;
    let correct = logits
        .data()
        .chunks(c)
        .zip(&batch.labels)
        .filter(|(row, &y)| {
            row.iter()
                .enumerate()
                .max_by(|a, b| a.1.partial_cmp(b.1).unwrap_or(std::cmp::Ordering::Equal))
                .map(|m| m.0)
                == Some(y)
        })
        .count();
    let grads = model.graph.backward(&params, &buffers, tape, out.cotangent);
    state.step += 1;
    for (k, (p, g)) in weights.params.iter_mut().zip(grads).enumerate() {
        let Some(g) = g else { continue };
        let (m, v) = (&mut state.m[k], &mut state.v[k]);
        for (j, (w, gv)) in p.data_mut().iter_mut().zip(g.data()).enumerate() {
            let d = gv.to_f64() + opts.weight_decay * *w;
            match opts.optimizer {
                Optimizer::Sgd => {
                    m[j] = if state.step == 1 { d } else { opts.momentum * m[j] + d };
                    *w -= opts.lr * if opts.momentum > 0.0 { m[j] } else { d };
                }
                Optimizer::Adam => {
                    let (b1, b2, eps) = (0.9, 0.999, 1e-8);
                    m[j] = b1 * m[j] + (1.0 - b1) * d;
                    v[j] = b2 * v[j] + (1.0 - b2) * d * d;
                    let mh = m[j] / (1.0 - b1.powi(state.step));
                    let vh = v[j] / (1.0 - b2.powi(state.step));
                    *w -= opts.lr * mh / (vh.sqrt() + eps);
                }
            }
        }
    }
    for u in bn {
        for (r, m) in weights.buffers[u.mean_buffer].data_mut().iter_mut().zip(&u.mean) {
            *r = (1.0 - BN_MOMENTUM) * *r + BN_MOMENTUM * m;
        }
        for (r, v) in weights.buffers[u.var_buffer].data_mut().iter_mut().zip(&u.var) {
            *r = (1.0 - BN_MOMENTUM) * *r + BN_MOMENTUM * v;
        }
    }
    (out.losses.iter().sum(), correct)
}

/// Trains `weights` in place; `on_batch(examples, batch mean loss, correct
/// predictions in the batch)` after each step.
pub fn train(
    model: &Model,
    weights: &mut Weights,
    data: &dyn Dataset,
    opts: &TrainOptions,
    dtype: DType,
    on_batch: &mut dyn FnMut(usize, f64, usize),
) -> Result<Vec<EpochReport>, InfluenceError> {
    if !(opts.lr > 0.0 && opts.lr.is_finite()) || opts.batch_size == 0 {
        return Err(InfluenceError::Training(
            "`lr` must be positive and `batch_size` at least 1".into(),
        ));
    }
    let n = data.len();
    let shape = data.sample_shape();
    let mut state = OptState {
        m: weights.params.iter().map(|p| vec![0.0; p.numel()]).collect(),
        v: weights.params.iter().map(|p| vec![0.0; p.numel()]).collect(),
        step: 0,
    };
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut reports = Vec::new();
    let mut batch = Batch::default();
    for epoch in 0..opts.epochs {
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut rng);
        let (mut loss_sum, mut correct) = (0.0, 0usize);
        for idx in order.chunks(opts.batch_size) {
            data.read(idx, &mut batch)?;
            let (l, c) = match dtype {
                DType::F32 => step::<f32>(model, weights, &batch, &shape, opts, &mut state),
                DType::F64 => step::<f64>(model, weights, &batch, &shape, opts, &mut state),
            };
            if !l.is_finite() || weights.params.iter().any(|p| !p.all_finite()) {
                return Err(InfluenceError::Training(format!(
                    "training diverged in epoch {} (loss {l}); lower `lr` (now {})",
                    epoch + 1,
                    opts.lr
                )));
            }
            loss_sum += l;
            correct += c;
            on_batch(idx.len(), l / idx.len() as f64, c);
        }
        reports.push(EpochReport {
            epoch: epoch + 1,
            loss: loss_sum / n as f64,
            accuracy: correct as f64 / n as f64,
        });
    }
    Ok(reports)
}

/// Newton's method on `L(θ) + (w/2)‖θ‖²` (Hessian solves by CG on exact products)
/// until the gradient norm is below `tol`: the exact optimum of a convex
/// objective, warm-started from `weights`. Returns the steps taken; an error
/// when the gradient norm is still above `tol` after `max_steps` (a retrained
/// model that is not at its optimum would make leave-one-out checks meaningless).
pub fn newton(
    model: &Model,
    weights: &mut Weights,
    data: &dyn Dataset,
    weight_decay: f64,
    batch_size: usize,
    tol: f64,
    max_steps: usize,
) -> Result<usize, InfluenceError> {
    for k in 0..max_steps {
        let w = weights.clone();
        let problem = Problem::new(model, &w, data, batch_size)?
            .with_weight_decay(weight_decay)
            .with_dtype(DType::F64);
        let g = problem.gradient(&|_| {})?.value;
        if g.norm() < tol {
            return Ok(k);
        }
        let op = CurvatureOperator::new(&problem, Curvature::Hessian);
        let damped = Damped {
            inner: &op,
            damping: 0.0,
        };
        let (d, _) = cg::solve(
            &damped,
            &g,
            &CgOptions {
                tol: 1e-12,
                max_iter: 500,
            },
            None,
            "newton-cg",
        )?;
        let theta = ParamVector {
            tensors: weights.params.clone(),
        };
        let mut next = theta.clone();
        next.axpy(-1.0, &d);
        weights.params = next.tensors;
    }
    let problem = Problem::new(model, weights, data, batch_size)?.with_weight_decay(weight_decay);
    let gnorm = problem.gradient_as::<f64>(&|_| {})?.value.norm();
    if gnorm < tol {
        return Ok(max_steps);
    }
    Err(InfluenceError::Training(format!(
        "Newton's method did not reach the optimum in {max_steps} steps (gradient norm {gnorm:.3e} > {tol:.1e}); \
         the objective may be non-convex here: use `retrain` gd, or a larger `weight_decay`"
    )))
}
