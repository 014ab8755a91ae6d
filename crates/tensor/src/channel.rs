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

/// `y[b, c, ...] = x[b, c, ...] · s[c] + t[c]` (no `t`: zero) in one pass.
pub fn affine<T: Float>(x: &Tensor<T>, s: &Tensor<T>, t: Option<&Tensor<T>>) -> Tensor<T> {
    affine_sum(x, Some(x), s, None, t)
}

/// The JVP of [`affine`] in one pass: `ẋ·s + x·ṡ + ṫ`, each term skipped when
/// its tangent is absent (`None` when all are).
pub fn affine_tangent<T: Float>(
    x: &Tensor<T>,
    dx: Option<&Tensor<T>>,
    s: &Tensor<T>,
    ds: Option<&Tensor<T>>,
    dt: Option<&Tensor<T>>,
) -> Option<Tensor<T>> {
    if dx.is_none() && ds.is_none() && dt.is_none() {
        return None;
    }
    Some(affine_sum(x, dx, s, ds.map(|ds| (x, ds)), dt))
}

/// `a·s + x·r + t` per channel, shaped like `like` (each term optional), one pass.
fn affine_sum<T: Float>(
    like: &Tensor<T>,
    a: Option<&Tensor<T>>,
    s: &Tensor<T>,
    xr: Option<(&Tensor<T>, &Tensor<T>)>,
    t: Option<&Tensor<T>>,
) -> Tensor<T> {
    let (_, c, inner) = layout(like);
    let mut out = Tensor::zeros(like.shape());
    let zero = vec![T::ZERO; c];
    let (sd, td) = (s.data(), t.map_or(&zero[..], |t| t.data()));
    let (rd, xd) = match xr {
        Some((x, r)) => (r.data(), Some(x.data())),
        None => (&zero[..], None),
    };
    let ad = a.map(|a| a.data());
    let inner = inner.max(1);
    out.data_mut()
        .par_chunks_mut(c * inner)
        .enumerate()
        .for_each(|(b, ex)| {
            for (ch, plane) in ex.chunks_mut(inner).enumerate().take(c) {
                let base = (b * c + ch) * inner;
                let (sc, rc, tc) = (sd[ch], rd[ch], td[ch]);
                match (ad, xd) {
                    (Some(a), Some(x)) => {
                        for (k, o) in plane.iter_mut().enumerate() {
                            *o = a[base + k] * sc + x[base + k] * rc + tc;
                        }
                    }
                    (Some(a), None) => {
                        for (k, o) in plane.iter_mut().enumerate() {
                            *o = a[base + k] * sc + tc;
                        }
                    }
                    (None, Some(x)) => {
                        for (k, o) in plane.iter_mut().enumerate() {
                            *o = x[base + k] * rc + tc;
                        }
                    }
                    (None, None) => plane.fill(tc),
                }
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
    fn affine_and_its_tangent_match_the_separate_ops() {
        let x = Tensor::new(vec![2, 3, 2], (0..12).map(|i| i as f64 * 0.5 - 2.0).collect()).unwrap();
        let dx = Tensor::new(vec![2, 3, 2], (0..12).map(|i| (i as f64).sin()).collect()).unwrap();
        let s = Tensor::new(vec![3], vec![1.5, -0.5, 2.0]).unwrap();
        let ds = Tensor::new(vec![3], vec![0.25, 0.5, -1.0]).unwrap();
        let t = Tensor::new(vec![3], vec![0.1, 0.2, 0.3]).unwrap();
        let want = crate::elementwise::add(&scale(&x, &s), &broadcast(&t, x.shape()));
        assert_eq!(affine(&x, &s, Some(&t)), want);
        assert_eq!(affine(&x, &s, None), scale(&x, &s));
        let tangent = affine_tangent(&x, Some(&dx), &s, Some(&ds), Some(&t)).unwrap();
        let parts = crate::elementwise::add(&scale(&dx, &s), &scale(&x, &ds));
        let want = crate::elementwise::add(&parts, &broadcast(&t, x.shape()));
        for (a, b) in tangent.data().iter().zip(want.data()) {
            assert!((a - b).abs() < 1e-15);
        }
        assert!(affine_tangent(&x, None, &s, None, None).is_none());
        assert_eq!(
            affine_tangent(&x, None, &s, None, Some(&t)),
            Some(broadcast(&t, x.shape()))
        );
    }

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
