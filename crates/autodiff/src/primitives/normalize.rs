//! `y = (x − mean) / √(var + ε)` over each row of the trailing dimensions
//! (LayerNorm, InstanceNorm and GroupNorm before their scale and bias) as one
//! primitive: with `r = (var + ε)^(−1/2)` its JVP is `P(ẋ)` and its VJP `P(gy)`
//! for the self-adjoint `P(v) = r (v − mean(v) − y · mean(y v))`. The VJP is
//! written with [`Value`] operations on `y` and `r`, so that forward-over-reverse
//! differentiates it exactly, in a handful of passes instead of the twenty of
//! the decomposition.

use crate::Value;
use hvp_tensor::{Float, Tensor};

/// `(y, r)`: every row of `len` elements normalised, and each row's `r`.
fn rows<T: Float>(x: &Tensor<T>, len: usize, eps: f64) -> (Tensor<T>, Vec<T>) {
    let mut y = x.clone();
    let mut r = Vec::with_capacity(x.numel() / len.max(1));
    for row in y.data_mut().chunks_exact_mut(len) {
        let mean = row.iter().map(|v| v.to_f64()).sum::<f64>() / len as f64;
        let var = row.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>() / len as f64;
        let ri = 1.0 / (var + eps).sqrt();
        for v in row.iter_mut() {
            *v = T::from_f64((v.to_f64() - mean) * ri);
        }
        r.push(T::from_f64(ri));
    }
    (y, r)
}

/// The shape of one value per row: `shape` with its last `dims` dimensions 1.
fn row_shape(shape: &[usize], dims: usize) -> Vec<usize> {
    let mut s = shape.to_vec();
    let n = s.len();
    s[n - dims..].iter_mut().for_each(|d| *d = 1);
    s
}

/// `Σ_row a·b / len` per row (`b = None`: the mean of `a`).
fn row_means<T: Float>(a: &[T], b: Option<&[T]>, len: usize) -> Vec<f64> {
    a.chunks_exact(len)
        .enumerate()
        .map(|(k, ra)| {
            let s: f64 = match b {
                Some(b) => ra
                    .iter()
                    .zip(&b[k * len..(k + 1) * len])
                    .map(|(p, q)| p.to_f64() * q.to_f64())
                    .sum(),
                None => ra.iter().map(|p| p.to_f64()).sum(),
            };
            s / len as f64
        })
        .collect()
}

/// The normalisation over the last `dims` dimensions (rows of `len` elements).
pub fn forward<T: Float, V: Value<T>>(x: &V, dims: usize, eps: f64) -> V {
    let len = row_len(x.primal().shape(), dims);
    x.nonlinear(
        |x| rows(x, len, eps).0,
        |x, dx| {
            let (y, r) = rows(x, len, eps);
            project(&y, &r, dx, len)
        },
    )
}

fn row_len(shape: &[usize], dims: usize) -> usize {
    shape[shape.len() - dims..].iter().product()
}

/// `P(v) = r (v − mean(v) − y · mean(y v))` row by row.
fn project<T: Float>(y: &Tensor<T>, r: &[T], v: &Tensor<T>, len: usize) -> Tensor<T> {
    let (m1, m2) = (row_means(v.data(), None, len), row_means(y.data(), Some(v.data()), len));
    let mut out = v.clone();
    for (k, (row, yr)) in out
        .data_mut()
        .chunks_exact_mut(len)
        .zip(y.data().chunks_exact(len))
        .enumerate()
    {
        let (a, b, rk) = (m1[k], m2[k], r[k].to_f64());
        for (o, &yv) in row.iter_mut().zip(yr) {
            *o = T::from_f64(rk * (o.to_f64() - a - yv.to_f64() * b));
        }
    }
    out
}

/// The input cotangent `P(gy)`, given the forward output `y` (with its tangent).
pub fn vjp<T: Float, V: Value<T>>(x: &V, y: &V, gy: &V, dims: usize, eps: f64) -> V {
    let shape = x.primal().shape().to_vec();
    let len = row_len(&shape, dims);
    let per_row = row_shape(&shape, dims);
    let expand = |t: &Tensor<T>| hvp_tensor::nd::expand(t, &shape);
    let row_mean = |t: &Tensor<T>| {
        Tensor::new(
            per_row.clone(),
            row_means(t.data(), None, len).into_iter().map(T::from_f64).collect(),
        )
        .expect("one value per row")
    };
    // r and its JVP ṙ = −r² mean(y ẋ), one value per row, broadcast to x.
    let r = x.nonlinear(
        |x| expand(&Tensor::new(per_row.clone(), rows(x, len, eps).1).expect("per row")),
        |x, dx| {
            let (y, r) = rows(x, len, eps);
            let m = row_means(y.data(), Some(dx.data()), len);
            let dr: Vec<T> = r
                .iter()
                .zip(m)
                .map(|(rk, mk)| T::from_f64(-rk.to_f64() * rk.to_f64() * mk))
                .collect();
            expand(&Tensor::new(per_row.clone(), dr).expect("per row"))
        },
    );
    let mul = |a: &Tensor<T>, b: &Tensor<T>| hvp_tensor::elementwise::mul(a, b);
    let negate = |t: &Tensor<T>| hvp_tensor::elementwise::map(t, |v| -v);
    // gy − mean(gy), then − y · mean(y gy) (bilinear in y and gy, step by step).
    let centred = gy.linear(|t| hvp_tensor::elementwise::sub(t, &expand(&row_mean(t))));
    let mean_y_gy = V::bilinear(y, gy, |a, b| expand(&row_mean(&mul(a, b))));
    let inner = centred.add(&V::bilinear(y, &mean_y_gy, mul).linear(negate));
    V::bilinear(&r, &inner, mul)
}
