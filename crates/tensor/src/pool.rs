//! Average pooling over NCHW tensors and its adjoint.

use crate::{Float, Tensor};

/// `[B, C, H, W] → [B, C]`: mean over each spatial plane.
pub fn global_avg<T: Float>(x: &Tensor<T>) -> Tensor<T> {
    let (b, c, h, w) = x.dims4();
    let hw = h * w;
    let inv = T::from_f64(1.0 / hw as f64);
    let data = x
        .data()
        .chunks(hw)
        .map(|plane| plane.iter().copied().sum::<T>() * inv)
        .collect();
    Tensor::new(vec![b, c], data).expect("b*c planes")
}

/// Adjoint of [`global_avg`]: `[B, C] → [B, C, H, W]`, each plane filled with `g/(H·W)`.
pub fn global_avg_backward<T: Float>(g: &Tensor<T>, h: usize, w: usize) -> Tensor<T> {
    let (b, c) = (g.shape()[0], g.shape()[1]);
    let inv = T::from_f64(1.0 / (h * w) as f64);
    let mut out = Tensor::zeros(&[b, c, h, w]);
    for (plane, &gv) in out.data_mut().chunks_mut(h * w).zip(g.data()) {
        plane.fill(gv * inv);
    }
    out
}

/// Output size of a pooling or convolution window along one axis.
pub fn out_size(input: usize, kernel: usize, stride: usize, padding: usize) -> usize {
    (input + 2 * padding).saturating_sub(kernel) / stride + 1
}

/// Average pooling with a `k×k` window and stride `s`, no padding (PyTorch's
/// `AvgPool2d(k, s)`).
pub fn avg2d<T: Float>(x: &Tensor<T>, k: usize, s: usize) -> Tensor<T> {
    let (b, c, h, w) = x.dims4();
    let (ho, wo) = (out_size(h, k, s, 0), out_size(w, k, s, 0));
    let inv = T::from_f64(1.0 / (k * k) as f64);
    let mut out = Tensor::zeros(&[b, c, ho, wo]);
    for (po, pi) in out.data_mut().chunks_mut(ho * wo).zip(x.data().chunks(h * w)) {
        for i in 0..ho {
            for j in 0..wo {
                let mut acc = T::ZERO;
                for di in 0..k {
                    let row = (i * s + di) * w + j * s;
                    acc += pi[row..row + k].iter().copied().sum::<T>();
                }
                po[i * wo + j] = acc * inv;
            }
        }
    }
    out
}

/// Adjoint of [`avg2d`] for an input of spatial size `h×w`.
pub fn avg2d_backward<T: Float>(g: &Tensor<T>, k: usize, s: usize, h: usize, w: usize) -> Tensor<T> {
    let (b, c, ho, wo) = g.dims4();
    let inv = T::from_f64(1.0 / (k * k) as f64);
    let mut out = Tensor::zeros(&[b, c, h, w]);
    for (pi, po) in out.data_mut().chunks_mut(h * w).zip(g.data().chunks(ho * wo)) {
        for i in 0..ho {
            for j in 0..wo {
                let v = po[i * wo + j] * inv;
                for di in 0..k {
                    let row = (i * s + di) * w + j * s;
                    pi[row..row + k].iter_mut().for_each(|x| *x += v);
                }
            }
        }
    }
    out
}
