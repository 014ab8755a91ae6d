//! Per-channel operations on `[B, C, ...]` tensors (channel = dimension 1; a
//! `[B, F]` matrix has F channels of one element each): bias broadcast, BatchNorm's
//! scale, and their reductions over batch and space.

use crate::{Float, Tensor};
use rayon::prelude::*;

/// (batch, channels, elements per channel per example).
fn layout<T: Float>(x: &Tensor<T>) -> (usize, usize, usize) {
    let s = x.shape();
    assert!(s.len() >= 2, "channel op needs [B, C, ...], got {s:?}");
    (s[0], s[1], s[2..].iter().product())
}

/// `y[b, c, ...] = x[b, c, ...] · s[c]`.
pub fn scale<T: Float>(x: &Tensor<T>, s: &Tensor<T>) -> Tensor<T> {
    let (_, c, inner) = layout(x);
    assert_eq!(s.numel(), c, "channel scale: {} factors for {c} channels", s.numel());
    let mut out = x.clone();
    let s = s.data();
    out.data_mut().par_chunks_mut(c * inner).for_each(|ex| {
        for (ch, plane) in ex.chunks_mut(inner.max(1)).enumerate().take(c) {
            let f = s[ch];
            plane.iter_mut().for_each(|v| *v *= f);
        }
    });
    out
}

/// A `shape`-shaped tensor whose channel `c` holds `t[c]` everywhere.
pub fn broadcast<T: Float>(t: &Tensor<T>, shape: &[usize]) -> Tensor<T> {
    let mut out = Tensor::zeros(shape);
    let (_, c, inner) = layout(&out);
    assert_eq!(t.numel(), c, "channel broadcast: {} values for {c} channels", t.numel());
    let t = t.data();
    out.data_mut().par_chunks_mut(c * inner).for_each(|ex| {
        for (ch, plane) in ex.chunks_mut(inner.max(1)).enumerate().take(c) {
            plane.fill(t[ch]);
        }
    });
    out
}

/// `out[c] = Σ_{b, ...} x[b, c, ...]`.
pub fn sum<T: Float>(x: &Tensor<T>) -> Tensor<T> {
    let (b, c, inner) = layout(x);
    let mut out = vec![T::ZERO; c];
    let d = x.data();
    for bi in 0..b {
        for (ch, o) in out.iter_mut().enumerate() {
            let start = (bi * c + ch) * inner;
            *o += d[start..start + inner].iter().copied().sum::<T>();
        }
    }
    Tensor::new(vec![c], out).expect("length c")
}

/// `out[c] = Σ_{b, ...} x[b, c, ...] · y[b, c, ...]`.
pub fn dot<T: Float>(x: &Tensor<T>, y: &Tensor<T>) -> Tensor<T> {
    assert_eq!(x.shape(), y.shape(), "channel dot: shapes differ");
    let (b, c, inner) = layout(x);
    let mut out = vec![T::ZERO; c];
    let (xd, yd) = (x.data(), y.data());
    for bi in 0..b {
        for (ch, o) in out.iter_mut().enumerate() {
            let start = (bi * c + ch) * inner;
            *o += xd[start..start + inner]
                .iter()
                .zip(&yd[start..start + inner])
                .map(|(&p, &q)| p * q)
                .sum::<T>();
        }
    }
    Tensor::new(vec![c], out).expect("length c")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reductions_are_adjoint_to_broadcast_and_scale() {
        let x = Tensor::<f64>::new(vec![2, 3, 2], (0..12).map(|i| i as f64 - 4.5).collect()).unwrap();
        let y = Tensor::<f64>::new(vec![2, 3, 2], (0..12).map(|i| (i as f64).sin()).collect()).unwrap();
        let t = Tensor::<f64>::new(vec![3], vec![0.5, -1.0, 2.0]).unwrap();
        // ⟨broadcast(t), y⟩ = ⟨t, sum(y)⟩
        let lhs = crate::elementwise::dot_f64(&broadcast(&t, &[2, 3, 2]), &y);
        let rhs = crate::elementwise::dot_f64(&t, &sum(&y));
        assert!((lhs - rhs).abs() < 1e-12);
        // ⟨scale(x, t), y⟩ = ⟨t, dot(x, y)⟩
        let lhs = crate::elementwise::dot_f64(&scale(&x, &t), &y);
        let rhs = crate::elementwise::dot_f64(&t, &dot(&x, &y));
        assert!((lhs - rhs).abs() < 1e-12);
    }
}
