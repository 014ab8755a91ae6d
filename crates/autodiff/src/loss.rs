//! Losses applied to the graph's output (logits), with their cotangents.

use crate::{Dual, Value};
use hvp_tensor::{Float, Tensor};

/// Per-example losses and the cotangent of the logits.
pub struct LossOutput<V> {
    /// `ℓ_i` for each example of the batch (unweighted).
    pub losses: Vec<f64>,
    /// `weight · ∂ℓ_i/∂z_i`, `[B, C]`; for dual logits its tangent is
    /// `weight · H_out ż` (the output-space Hessian times the logits' tangent),
    /// which is what both the HVP and the GGN product need.
    pub cotangent: V,
}

fn softmax_rows<T: Float>(z: &Tensor<T>) -> (Tensor<T>, Vec<f64>) {
    let (b, c) = z.rows_cols();
    let mut p = z.clone();
    let mut log_norm = Vec::with_capacity(b);
    for row in p.data_mut().chunks_mut(c.max(1)).take(b) {
        let m = row.iter().fold(T::from_f64(f64::NEG_INFINITY), |a, &v| a.max(v));
        let mut s = T::ZERO;
        for v in row.iter_mut() {
            *v = (*v - m).exp();
            s += *v;
        }
        for v in row.iter_mut() {
            *v = *v / s;
        }
        log_norm.push(m.to_f64() + s.to_f64().ln());
    }
    (p, log_norm)
}

/// `Σ_c p_c ẋ_c` per row, then `p ⊙ ẋ − p (p·ẋ)`: the softmax Jacobian applied to ẋ.
fn softmax_jvp<T: Float>(p: &Tensor<T>, dz: &Tensor<T>, weight: T) -> Tensor<T> {
    let (_, c) = p.rows_cols();
    let mut out = Tensor::zeros(p.shape());
    for ((o, pr), dr) in out
        .data_mut()
        .chunks_mut(c)
        .zip(p.data().chunks(c))
        .zip(dz.data().chunks(c))
    {
        let pd: T = pr.iter().zip(dr).map(|(&a, &b)| a * b).sum();
        for ((ov, &pv), &dv) in o.iter_mut().zip(pr).zip(dr) {
            *ov = weight * pv * (dv - pd);
        }
    }
    out
}

/// Softmax cross-entropy `ℓ_i = logsumexp(z_i) − z_{i, y_i}` for logits `[B, C]`.
/// Labels must be `< C` (checked by the data layer).
pub fn softmax_cross_entropy<T: Float, V: Value<T>>(logits: &V, labels: &[usize], weight: f64) -> LossOutput<V> {
    let z = logits.primal();
    let (b, c) = z.rows_cols();
    assert_eq!(labels.len(), b, "one label per example");
    let (p, log_norm) = softmax_rows(z);
    let losses = labels
        .iter()
        .enumerate()
        .map(|(i, &y)| log_norm[i] - z.data()[i * c + y].to_f64())
        .collect();
    let w = T::from_f64(weight);
    let mut grad = p.clone();
    for (i, &y) in labels.iter().enumerate() {
        grad.data_mut()[i * c + y] -= T::ONE;
    }
    grad.data_mut().iter_mut().for_each(|v| *v *= w);
    let cotangent = logits.nonlinear(|_| grad.clone(), |_, dz| softmax_jvp(&p, dz, w));
    LossOutput { losses, cotangent }
}

/// Directional derivative of each example's loss along the logits' tangent:
/// `d ℓ_i = (p_i − e_{y_i}) · ż_i`, one number per example (no weighting).
pub fn softmax_cross_entropy_jvp<T: Float>(logits: &Dual<T>, labels: &[usize]) -> Vec<f64> {
    directional(logits, Targets::Classes(labels))
}

/// Mean squared error `ℓ_i = (1/K) Σ_k (z_ik − t_ik)²` for outputs and targets
/// `[B, K]`, so that the mean over examples is `torch.nn.MSELoss()` (mean over
/// all elements). Its output-space Hessian is `(2/K) I`.
pub fn mse<T: Float, V: Value<T>>(outputs: &V, targets: &[f64], weight: f64) -> LossOutput<V> {
    let z = outputs.primal();
    let (b, k) = z.rows_cols();
    assert_eq!(targets.len(), b * k, "one target row per example");
    let scale = 2.0 * weight / k as f64;
    let mut losses = Vec::with_capacity(b);
    let mut grad = z.clone();
    for (row, t) in grad.data_mut().chunks_mut(k.max(1)).zip(targets.chunks(k.max(1))) {
        let mut sum = 0.0;
        for (g, &y) in row.iter_mut().zip(t) {
            let r = g.to_f64() - y;
            sum += r * r;
            *g = T::from_f64(scale * r);
        }
        losses.push(sum / k as f64);
    }
    let s = T::from_f64(scale);
    let cotangent = outputs.nonlinear(|_| grad.clone(), |_, dz| hvp_tensor::elementwise::scale(dz, s));
    LossOutput { losses, cotangent }
}

/// What the outputs are compared with: class labels (softmax cross-entropy) or
/// float targets `[B, K]` row-major (mean squared error).
#[derive(Clone, Copy, Debug)]
pub enum Targets<'a> {
    Classes(&'a [usize]),
    Values(&'a [f64]),
}

/// The loss the targets call for: softmax cross-entropy for classes, MSE for values.
pub fn apply<T: Float, V: Value<T>>(outputs: &V, targets: Targets, weight: f64) -> LossOutput<V> {
    match targets {
        Targets::Classes(labels) => softmax_cross_entropy(outputs, labels, weight),
        Targets::Values(values) => mse(outputs, values, weight),
    }
}

/// `dℓ_i` along the outputs' tangent, per example (see [`softmax_cross_entropy_jvp`]).
pub fn directional<T: Float>(outputs: &Dual<T>, targets: Targets) -> Vec<f64> {
    let out = apply(&Tensor::constant(outputs.primal().clone()), targets, 1.0);
    let (b, c) = outputs.primal().rows_cols();
    match outputs.tangent() {
        None => vec![0.0; b],
        Some(dz) => out
            .cotangent
            .data()
            .chunks(c)
            .zip(dz.data().chunks(c))
            .map(|(g, d)| g.iter().zip(d).map(|(a, b)| a.to_f64() * b.to_f64()).sum())
            .collect(),
    }
}
