//! A batch's K-FAC statistics in the compute dtype, summed in f64: per
//! example, the layer's input patches and output cotangents as they lie in
//! memory (`[a, T]` and `[s, T]`, no transposition), their Gram matrices by one
//! GEMM each, and EK-FAC's corrections from the example's gradient, formed by
//! the convolution's own weight-gradient kernel and then rotated. The input
//! factor of a 3×3 stride-1 "same" convolution skips the patches: shifted
//! correlations of the input give the same Gram matrix with 2.5–4.6× fewer
//! multiplications (`hvp_tensor::conv::patch_gram_3x3`).

use super::*;
use hvp_tensor::conv::ImageGradientScratch;
use hvp_tensor::linalg::{gemm_into, gemm_strided_into, RowStrides};

/// Example i's layer input as `[a_dim, T]` (im2col patches of a convolution,
/// the input row of a dense layer), with a row of ones for the bias.
fn example_inputs_as<T: Float>(l: &Layer, x: &Tensor<T>, w_shape: &[usize], i: usize) -> Tensor<T> {
    let b = x.shape()[0];
    let size = x.numel() / b;
    let one = &x.data()[i * size..(i + 1) * size];
    let mut cols = match l.conv {
        Some(g) => conv::patches(one, &x.shape()[1..], w_shape, g),
        None => one.to_vec(),
    };
    let t = cols.len() / (l.a_dim - l.bias.is_some() as usize);
    if l.bias.is_some() {
        cols.extend(std::iter::repeat_n(T::ONE, t));
    }
    Tensor::new(vec![l.a_dim, t], cols).expect("a_dim*T")
}

/// Example i's output cotangent as `[s_dim, T]` (a slice of `gy`, as it lies).
fn example_grads_as<T: Float>(l: &Layer, gy: &Tensor<T>, i: usize) -> Tensor<T> {
    let per = gy.numel() / gy.shape()[0];
    Tensor::new(vec![l.s_dim, per / l.s_dim], gy.data()[i * per..(i + 1) * per].to_vec()).expect("s_dim*T")
}

/// Adds `Σ_i g_i g_iᵀ` to `s` and, given `a`, `Σ_i (1/T) a_i a_iᵀ` to it.
pub(super) fn add_covariances<T: Float>(
    l: &Layer,
    x: &Tensor<T>,
    gy: &Tensor<T>,
    w_shape: &[usize],
    s: &mut [f64],
    a: Option<&mut [f64]>,
) {
    let b = x.shape()[0];
    let gram = |m: &Tensor<T>, out: &mut [f64], scale: f64| {
        let p = matmul_with(m, false, m, true, Par::Serial);
        out.iter_mut().zip(p.data()).for_each(|(o, v)| *o += scale * v.to_f64());
    };
    let part = sum_over_examples(b, l.s_dim * l.s_dim, |i, out| {
        gram(&example_grads_as(l, gy, i), out, 1.0)
    });
    s.iter_mut().zip(part).for_each(|(o, v)| *o += v);
    if let Some(a) = a {
        let part = match l.conv {
            Some(g) if is_3x3_same(w_shape, g) => shifted_input_gram(l, x),
            _ => sum_over_examples(b, l.a_dim * l.a_dim, |i, out| {
                let cols = example_inputs_as(l, x, w_shape, i);
                let positions = cols.shape()[1] as f64;
                gram(&cols, out, 1.0 / positions)
            }),
        };
        a.iter_mut().zip(part).for_each(|(o, v)| *o += v);
    }
}

/// A 3×3 convolution with stride 1 and padding 1 (output plane = input plane).
fn is_3x3_same(w_shape: &[usize], g: ConvGeometry) -> bool {
    w_shape.len() == 4 && w_shape[2] == 3 && w_shape[3] == 3 && g.stride == 1 && g.padding == 1
}

/// `Σ_i (1/T) a_i a_iᵀ` of a 3×3 "same" convolution from shifted correlations
/// of its input ([`conv::patch_gram_3x3_of`], 2.5–4.6× fewer multiplications
/// than the patches' Gram matrices), groups of images in parallel; the bias
/// row from [`conv::patch_sums_3x3_of`].
fn shifted_input_gram<T: Float>(l: &Layer, x: &Tensor<T>) -> Vec<f64> {
    let s = x.shape();
    let (b, c, h, w) = (s[0], s[1], s[2], s[3]);
    // One group of images per worker: assembling the `[9C, 9C]` matrix from
    // the shifts costs the same for any group, so groups are made large.
    let workers = rayon::current_num_threads().max(1);
    let group = b.div_ceil(workers).max(1);
    let per = c * h * w;
    let positions = (h * w).max(1) as f64;
    let width = 9 * c;
    let starts: Vec<usize> = (0..b).step_by(group).collect();
    let parts: Vec<(Vec<T>, Vec<T>)> = starts
        .par_iter()
        .map(|&start| {
            let n = group.min(b - start);
            let images = &x.data()[start * per..(start + n) * per];
            let gram = conv::patch_gram_3x3_of(images, [n, c, h, w]);
            let sums = match l.bias {
                Some(_) => conv::patch_sums_3x3_of(images, [n, c, h, w]),
                None => Vec::new(),
            };
            (gram, sums)
        })
        .collect();
    let mut out = vec![0.0; l.a_dim * l.a_dim];
    for (gram, sums) in parts {
        for (i, row) in gram.chunks_exact(width).enumerate() {
            let dst = &mut out[i * l.a_dim..i * l.a_dim + width];
            dst.iter_mut().zip(row).for_each(|(o, v)| *o += v.to_f64() / positions);
        }
        if l.bias.is_some() {
            let last = l.a_dim - 1;
            for (i, v) in sums.iter().enumerate() {
                let v = v.to_f64() / positions;
                out[i * l.a_dim + last] += v;
                out[last * l.a_dim + i] += v;
            }
        }
    }
    if l.bias.is_some() {
        // The ones row: T·(1/T) per example.
        out[l.a_dim * l.a_dim - 1] += b as f64;
    }
    out
}

/// Adds `Σ_i (Q_Sᵀ G_i Q_A)²` to `acc` `[s, a]`: each example's gradient
/// `G_i` formed first ([`example_gradient`]) and then rotated — `2sa(s + a)`
/// per example beyond the gradient itself, where rotating the `T` input
/// patches first would cost `2a²T` (25× more for a 16-channel 3×3
/// convolution on 32×32 images).
pub(super) fn add_corrections<T: Float>(
    l: &Layer,
    x: &Tensor<T>,
    gy: &Tensor<T>,
    w_shape: &[usize],
    qa: &Tensor<T>,
    qs: &Tensor<T>,
    acc: &mut [f64],
) {
    let (s, a) = (l.s_dim, l.a_dim);
    // Per group of examples: the image scratch, the gradient, `Q_Sᵀ G` and `Q_Sᵀ G Q_A`.
    let buffers = || {
        (
            ImageGradientScratch::new(),
            vec![T::ZERO; s * a],
            vec![T::ZERO; s * a],
            vec![T::ZERO; s * a],
        )
    };
    let part = sum_over_examples_with(x.shape()[0], s * a, buffers, |(scratch, gradient, left, p), i, out| {
        example_gradient_into(l, x, gy, w_shape, i, scratch, gradient);
        gemm_into(left, qs.data(), true, gradient, false, s, a, s, false, Par::Serial);
        gemm_into(p, left, false, qa.data(), false, s, a, a, false, Par::Serial);
        out.iter_mut().zip(p.iter()).for_each(|(o, v)| {
            let v = v.to_f64();
            *o += v * v;
        });
    });
    acc.iter_mut().zip(part).for_each(|(o, v)| *o += v);
}

/// Example i's gradient of layer `l` as `[O, A]` rows (bias last), in the
/// compute dtype, written to `out` (`O·A` entries): for a convolution the
/// convolution's own weight-gradient kernel on the one image (as fast as the
/// gradient pass's, reusing `scratch` across the layer's images), for a dense
/// layer the outer product `g āᵀ`.
pub(super) fn example_gradient_into<T: Float>(
    l: &Layer,
    x: &Tensor<T>,
    gy: &Tensor<T>,
    w_shape: &[usize],
    i: usize,
    scratch: &mut ImageGradientScratch<T>,
    out: &mut [T],
) {
    let b = x.shape()[0];
    let (width, outputs) = (x.numel() / b, gy.numel() / b);
    let xi = &x.data()[i * width..(i + 1) * width];
    let gi = &gy.data()[i * outputs..(i + 1) * outputs];
    let bias = l.bias.is_some();
    let tokens = outputs / l.s_dim.max(1);
    if let Some(geometry) = l.conv {
        let s = x.shape();
        conv::image_weight_gradient_into(xi, [s[1], s[2], s[3]], gi, w_shape, geometry, scratch, out, l.a_dim);
    } else if tokens > 1 {
        // `Σ_t g_t a_tᵀ` of `[s, T]` and `[in, T]`.
        let inputs = width / tokens;
        let strides = RowStrides {
            a: tokens,
            b: tokens,
            c: l.a_dim,
        };
        let rows = &mut out[..(l.s_dim - 1) * l.a_dim + inputs];
        gemm_strided_into(
            rows,
            gi,
            false,
            xi,
            true,
            l.s_dim,
            inputs,
            tokens,
            strides,
            false,
            Par::Serial,
        );
    } else {
        for (row, &g) in out.chunks_exact_mut(l.a_dim).zip(gi) {
            row.iter_mut().zip(xi).for_each(|(r, &a)| *r = a * g);
        }
    }
    // The bias column: `Σ_t g_t` per output.
    if bias {
        for (row, g) in out.chunks_exact_mut(l.a_dim).zip(gi.chunks_exact(tokens.max(1))) {
            row[l.a_dim - 1] = g.iter().fold(T::ZERO, |acc, &v| acc + v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-example definition: `Σ_i (1/T) a_i a_iᵀ` from im2col patches.
    fn by_patches(l: &Layer, x: &Tensor<f64>, w_shape: &[usize]) -> Vec<f64> {
        let b = x.shape()[0];
        let mut out = vec![0.0; l.a_dim * l.a_dim];
        for i in 0..b {
            let cols = example_inputs_as(l, x, w_shape, i);
            let t = cols.shape()[1];
            let p = matmul_with(&cols, false, &cols, true, Par::Serial);
            out.iter_mut().zip(p.data()).for_each(|(o, v)| *o += v / t as f64);
        }
        out
    }

    #[test]
    fn shifted_input_gram_equals_the_patch_definition_with_and_without_bias() {
        let (b, c, h, w) = (11, 3, 6, 5);
        let data: Vec<f64> = (0..b * c * h * w)
            .map(|i| ((i * 613 % 97) as f64 / 48.0 - 1.0) * 0.7)
            .collect();
        let x = Tensor::new(vec![b, c, h, w], data).unwrap();
        let w_shape = [4, c, 3, 3];
        for bias in [None, Some(1)] {
            let l = Layer {
                node: 0,
                weight: 0,
                bias,
                conv: Some(ConvGeometry { stride: 1, padding: 1 }),
                group: None,
                s_dim: 4,
                a_dim: 9 * c + bias.is_some() as usize,
            };
            assert!(is_3x3_same(&w_shape, l.conv.unwrap()));
            let (got, want) = (shifted_input_gram(&l, &x), by_patches(&l, &x, &w_shape));
            let err = got.iter().zip(&want).fold(0.0f64, |m, (g, e)| m.max((g - e).abs()));
            assert!(err < 1e-12, "bias {bias:?}: max error {err:e}");
        }
    }
}
