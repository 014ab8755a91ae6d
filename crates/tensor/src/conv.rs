//! 2-D convolution (cross-correlation, as PyTorch's `Conv2d`) over NCHW tensors
//! by im2col + GEMM, with its two backward forms: with respect to the input
//! (GEMM + col2im) and with respect to the weights (GEMM against the im2col
//! patches). One image per rayon task, GEMMs single-threaded inside.

use crate::linalg::{gemm_into, Par};
use crate::pool::out_size;
use crate::{Float, Tensor};
use rayon::prelude::*;

/// Images per partial weight gradient. Fixed (not tied to the thread count) so
/// the summation order, and hence the result, is the same for any `--threads`.
const WEIGHT_GRAD_GROUP: usize = 8;

/// Stride and zero padding of a convolution (equal along both axes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    pub stride: usize,
    pub padding: usize,
}

struct Dims {
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    ho: usize,
    wo: usize,
}

impl Dims {
    fn new(input: &[usize], weight: &[usize], g: ConvGeometry) -> Self {
        assert_eq!(input.len(), 4, "conv input must be NCHW, got {input:?}");
        assert_eq!(weight.len(), 4, "conv weight must be OIHW, got {weight:?}");
        assert_eq!(
            input[1], weight[1],
            "conv: input has {} channels, weight expects {}",
            input[1], weight[1]
        );
        let (h, w, kh, kw) = (input[2], input[3], weight[2], weight[3]);
        Dims {
            c: input[1],
            h,
            w,
            o: weight[0],
            kh,
            kw,
            ho: out_size(h, kh, g.stride, g.padding),
            wo: out_size(w, kw, g.stride, g.padding),
        }
    }
    fn patch(&self) -> usize {
        self.c * self.kh * self.kw
    }
    fn out_plane(&self) -> usize {
        self.ho * self.wo
    }
}

/// `cols[(c·kh + i)·kw + j, oy·wo + ox] = x[c, oy·s − p + i, ox·s − p + j]` (0 outside).
fn im2col<T: Float>(x: &[T], d: &Dims, g: ConvGeometry, cols: &mut [T]) {
    let plane = d.out_plane();
    for c in 0..d.c {
        let xc = &x[c * d.h * d.w..(c + 1) * d.h * d.w];
        for i in 0..d.kh {
            for j in 0..d.kw {
                let row = &mut cols[((c * d.kh + i) * d.kw + j) * plane..][..plane];
                for oy in 0..d.ho {
                    let iy = (oy * g.stride + i) as isize - g.padding as isize;
                    let dst = &mut row[oy * d.wo..(oy + 1) * d.wo];
                    if iy < 0 || iy >= d.h as isize {
                        dst.fill(T::ZERO);
                        continue;
                    }
                    let src = &xc[iy as usize * d.w..(iy as usize + 1) * d.w];
                    for (ox, v) in dst.iter_mut().enumerate() {
                        let ix = (ox * g.stride + j) as isize - g.padding as isize;
                        *v = if ix < 0 || ix >= d.w as isize {
                            T::ZERO
                        } else {
                            src[ix as usize]
                        };
                    }
                }
            }
        }
    }
}

/// Adjoint of [`im2col`]: adds each column entry back to the pixel it came from.
fn col2im_add<T: Float>(cols: &[T], d: &Dims, g: ConvGeometry, x: &mut [T]) {
    let plane = d.out_plane();
    for c in 0..d.c {
        let xc = &mut x[c * d.h * d.w..(c + 1) * d.h * d.w];
        for i in 0..d.kh {
            for j in 0..d.kw {
                let row = &cols[((c * d.kh + i) * d.kw + j) * plane..][..plane];
                for oy in 0..d.ho {
                    let iy = (oy * g.stride + i) as isize - g.padding as isize;
                    if iy < 0 || iy >= d.h as isize {
                        continue;
                    }
                    let dst = &mut xc[iy as usize * d.w..(iy as usize + 1) * d.w];
                    for (ox, &v) in row[oy * d.wo..(oy + 1) * d.wo].iter().enumerate() {
                        let ix = (ox * g.stride + j) as isize - g.padding as isize;
                        if ix >= 0 && ix < d.w as isize {
                            dst[ix as usize] += v;
                        }
                    }
                }
            }
        }
    }
}

/// `y = conv2d(x, w)`: x `[B, C, H, W]`, w `[O, C, kh, kw]` → `[B, O, Ho, Wo]`.
pub fn forward<T: Float>(x: &Tensor<T>, w: &Tensor<T>, g: ConvGeometry) -> Tensor<T> {
    let d = Dims::new(x.shape(), w.shape(), g);
    let b = x.shape()[0];
    let mut y = Tensor::zeros(&[b, d.o, d.ho, d.wo]);
    let (patch, plane) = (d.patch(), d.out_plane());
    y.data_mut()
        .par_chunks_mut(d.o * plane)
        .zip(x.data().par_chunks(d.c * d.h * d.w))
        .for_each_init(
            || vec![T::ZERO; patch * plane],
            |cols, (yb, xb)| {
                im2col(xb, &d, g, cols);
                gemm_into(yb, w.data(), false, cols, false, d.o, plane, patch, false, Par::Serial);
            },
        );
    y
}

/// Gradient with respect to the input: `gy [B, O, Ho, Wo]`, w `[O, C, kh, kw]` →
/// `[B, C, H, W]` for an input of spatial size `h × w`.
pub fn backward_input<T: Float>(gy: &Tensor<T>, w: &Tensor<T>, input_hw: (usize, usize), g: ConvGeometry) -> Tensor<T> {
    let b = gy.shape()[0];
    let ws = w.shape();
    let d = Dims::new(&[b, ws[1], input_hw.0, input_hw.1], ws, g);
    assert_eq!(gy.shape(), [b, d.o, d.ho, d.wo], "conv backward_input: gradient shape");
    let mut gx = Tensor::zeros(&[b, d.c, d.h, d.w]);
    let (patch, plane) = (d.patch(), d.out_plane());
    gx.data_mut()
        .par_chunks_mut(d.c * d.h * d.w)
        .zip(gy.data().par_chunks(d.o * plane))
        .for_each_init(
            || vec![T::ZERO; patch * plane],
            |cols, (gxb, gyb)| {
                gemm_into(cols, w.data(), true, gyb, false, patch, plane, d.o, false, Par::Serial);
                col2im_add(cols, &d, g, gxb);
            },
        );
    gx
}

/// Gradient with respect to the weights: `Σ_b gy_b · im2col(x_b)ᵀ`, shape of `w_shape`.
pub fn backward_weight<T: Float>(x: &Tensor<T>, gy: &Tensor<T>, w_shape: &[usize], g: ConvGeometry) -> Tensor<T> {
    let d = Dims::new(x.shape(), w_shape, g);
    let b = x.shape()[0];
    assert_eq!(gy.shape(), [b, d.o, d.ho, d.wo], "conv backward_weight: gradient shape");
    let (patch, plane) = (d.patch(), d.out_plane());
    let img_in = d.c * d.h * d.w;
    let img_out = d.o * plane;
    let partials: Vec<Vec<T>> = x
        .data()
        .par_chunks(img_in * WEIGHT_GRAD_GROUP)
        .zip(gy.data().par_chunks(img_out * WEIGHT_GRAD_GROUP))
        .map(|(xg, gg)| {
            let mut acc = vec![T::ZERO; d.o * patch];
            let mut cols = vec![T::ZERO; patch * plane];
            for (xb, gb) in xg.chunks(img_in).zip(gg.chunks(img_out)) {
                im2col(xb, &d, g, &mut cols);
                gemm_into(&mut acc, gb, false, &cols, true, d.o, patch, plane, true, Par::Serial);
            }
            acc
        })
        .collect();
    let mut gw = Tensor::zeros(w_shape);
    for p in partials {
        gw.data_mut().iter_mut().zip(p).for_each(|(a, v)| *a += v);
    }
    gw
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elementwise::dot_f64;

    fn pseudo(shape: &[usize], seed: f64) -> Tensor<f64> {
        let n = shape.iter().product();
        Tensor::new(
            shape.to_vec(),
            (0..n).map(|i| ((i as f64 + seed) * 0.7131).sin()).collect(),
        )
        .unwrap()
    }

    /// Direct definition of the convolution, for comparison.
    fn naive(x: &Tensor<f64>, w: &Tensor<f64>, g: ConvGeometry) -> Tensor<f64> {
        let (b, c, h, wd) = x.dims4();
        let (o, _, kh, kw) = w.dims4();
        let (ho, wo) = (
            out_size(h, kh, g.stride, g.padding),
            out_size(wd, kw, g.stride, g.padding),
        );
        let mut y = Tensor::zeros(&[b, o, ho, wo]);
        for bi in 0..b {
            for oi in 0..o {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut acc = 0.0;
                        for ci in 0..c {
                            for i in 0..kh {
                                for j in 0..kw {
                                    let iy = (oy * g.stride + i) as isize - g.padding as isize;
                                    let ix = (ox * g.stride + j) as isize - g.padding as isize;
                                    if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < wd {
                                        acc += x.data()[((bi * c + ci) * h + iy as usize) * wd + ix as usize]
                                            * w.data()[((oi * c + ci) * kh + i) * kw + j];
                                    }
                                }
                            }
                        }
                        y.data_mut()[((bi * o + oi) * ho + oy) * wo + ox] = acc;
                    }
                }
            }
        }
        y
    }

    #[test]
    fn forward_matches_definition_and_backwards_are_adjoint() {
        for g in [
            ConvGeometry { stride: 1, padding: 1 },
            ConvGeometry { stride: 2, padding: 1 },
            ConvGeometry { stride: 2, padding: 0 },
        ] {
            let x = pseudo(&[11, 3, 7, 6], 0.3);
            let w = pseudo(&[4, 3, 3, 3], 1.7);
            let y = forward(&x, &w, g);
            let want = naive(&x, &w, g);
            for (a, b) in y.data().iter().zip(want.data()) {
                assert!((a - b).abs() < 1e-12, "{g:?}: {a} vs {b}");
            }
            let gy = pseudo(y.shape(), 5.0);
            // ⟨conv(x, w), gy⟩ = ⟨x, backward_input(gy)⟩ = ⟨w, backward_weight(x, gy)⟩
            let base = dot_f64(&y, &gy);
            let via_x = dot_f64(&x, &backward_input(&gy, &w, (7, 6), g));
            let via_w = dot_f64(&w, &backward_weight(&x, &gy, w.shape(), g));
            assert!((base - via_x).abs() < 1e-10 * base.abs().max(1.0), "{g:?}");
            assert!((base - via_w).abs() < 1e-10 * base.abs().max(1.0), "{g:?}");
        }
    }
}
