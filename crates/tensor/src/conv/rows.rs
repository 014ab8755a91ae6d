//! Same-size stride-1 convolutions (the ResNet's 3×3, padding 1) on *row
//! patches*: each input channel is expanded only along the kernel's width — `kw`
//! horizontally shifted copies of its plane, with `p` zero rows above and below —
//! and the kernel's `kh` rows become `kh` accumulating GEMMs over windows of those
//! copies, each window one image row further down. The patches are `kw`× the
//! input instead of im2col's `kh·kw`×, and there is no col2im: the input gradient
//! is the same convolution of the output gradient with the weights flipped and
//! transposed (`W'[c, o, i, j] = W[o, c, kh−1−i, kw−1−j]`).
//!
//! `HVP_CONV=im2col` turns this path off (to compare the two).

use super::{assume_init_mut, copy_uninit, image_slots, ConvGeometry, Dims, ShiftedRow};
use crate::linalg::{gemm_strided_into, gemm_strided_overwrite, Par, RowStrides};
use crate::{Float, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

/// Whether this convolution runs on row patches: stride 1, an output as large
/// as the input (so `kh = kw = 2p + 1`), and not switched off by `HVP_CONV=im2col`.
pub(super) fn applies(d: &Dims, g: ConvGeometry) -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    let enabled = *ENABLED.get_or_init(|| !matches!(std::env::var("HVP_CONV").as_deref(), Ok("im2col")));
    enabled && g.stride == 1 && d.kh == 2 * g.padding + 1 && d.kw == d.kh && d.ho == d.h && d.wo == d.w
}

/// Length of one row-patch line: the plane with `p` zero rows above and below.
fn line_len(d: &Dims) -> usize {
    (d.h + d.kh - 1) * d.w
}

/// `rows[(c·kw + j)·L + t] = x[c, t / w − p, t % w + j − p]` (0 outside the
/// image) for one image `x` `[C, H, W]`, `L` = [`line_len`].
fn row_patches<T: Float>(x: &[T], d: &Dims, rows: &mut [T]) {
    let (n, p) = (d.h * d.w, (d.kh - 1) / 2);
    let (len, pad) = (line_len(d), p * d.w);
    let shifts: Vec<ShiftedRow> = (0..d.kw).map(|j| ShiftedRow::new(d, p, p, j)).collect();
    for (c, xc) in x.chunks_exact(n.max(1)).enumerate().take(d.c) {
        for (j, r) in shifts.iter().enumerate() {
            let line = &mut rows[(c * d.kw + j) * len..][..len];
            line[..pad].fill(T::ZERO);
            line[pad + n..].fill(T::ZERO);
            r.fill(&mut line[pad..pad + n], xc, d.w);
        }
    }
}

/// `out [m × H·W] (+)= Σ_i wrows[i] [m × k] · rows[:, i·w ..]` (row `i` of the
/// kernel reads the window starting `i` image rows down; `k` = input channels · kw),
/// added to `out` when `accumulate`, else overwriting it.
#[allow(clippy::too_many_arguments)]
fn row_gemms<T: Float>(out: &mut [T], wrows: &[T], m: usize, k: usize, rows: &[T], d: &Dims, accumulate: bool) {
    let n = d.h * d.w;
    let ld = RowStrides {
        a: k,
        b: line_len(d),
        c: n,
    };
    for i in 0..d.kh {
        let a = &wrows[i * m * k..][..m * k];
        let add = accumulate || i > 0;
        gemm_strided_into(out, a, false, &rows[i * d.w..], false, m, n, k, ld, add, Par::Serial);
    }
}

/// [`row_gemms`] overwriting an uninitialised `out` (its first product writes
/// every entry, the others add to them); returns `out` initialised.
fn row_gemms_into_uninit<'o, T: Float>(
    out: &'o mut [MaybeUninit<T>],
    wrows: &[T],
    m: usize,
    k: usize,
    rows: &[T],
    d: &Dims,
) -> &'o mut [T] {
    let n = d.h * d.w;
    assert_eq!(out.len(), m * n, "row_gemms: output of {m}×{n}");
    let ld = RowStrides {
        a: k,
        b: line_len(d),
        c: n,
    };
    let first = gemm_strided_overwrite(out, &wrows[..m * k], false, rows, false, m, n, k, ld, Par::Serial)
        .expect("the m × n view covers the output");
    for i in 1..d.kh {
        let a = &wrows[i * m * k..][..m * k];
        gemm_strided_into(first, a, false, &rows[i * d.w..], false, m, n, k, ld, true, Par::Serial);
    }
    first
}

/// Weights `[O, C, kh, kw]` regrouped by kernel row, `[kh][O × C·kw]`.
fn weight_rows<T: Float>(w: &[T], o: usize, d: &Dims) -> Vec<T> {
    let mut out = Vec::with_capacity(w.len());
    for i in 0..d.kh {
        for oi in 0..o {
            for c in 0..d.c {
                let base = ((oi * d.c + c) * d.kh + i) * d.kw;
                out.extend_from_slice(&w[base..base + d.kw]);
            }
        }
    }
    out
}

/// The flipped, transposed weights of the input gradient, `[kh][C × (parts·O)·kw]`:
/// column `(q·O + o)·kw + j` of kernel row `i` holds `parts[q][o, c, kh−1−i, kw−1−j]`.
fn flipped_weight_rows<T: Float>(parts: &[&[T]], d: &Dims) -> Vec<T> {
    let (kh, kw) = (d.kh, d.kw);
    let mut out = Vec::with_capacity(parts.len() * d.o * d.c * kh * kw);
    for i in 0..kh {
        for c in 0..d.c {
            for w in parts {
                for o in 0..d.o {
                    let base = ((o * d.c + c) * kh + (kh - 1 - i)) * kw;
                    out.extend((0..kw).map(|j| w[base + kw - 1 - j]));
                }
            }
        }
    }
    out
}

/// [`super::forward_dual`] on row patches; `stack` computes `[W; Ẇ]·rows(x)` as
/// one product (few output channels).
pub(super) fn forward_dual<T: Float>(
    x: &Tensor<T>,
    dx: Option<&Tensor<T>>,
    w: &Tensor<T>,
    dw: Option<&Tensor<T>>,
    d: &Dims,
    stack: bool,
) -> (Tensor<T>, Option<Tensor<T>>) {
    let b = x.shape()[0];
    let n = d.h * d.w;
    let (img_in, img_out) = (d.c * n, d.o * n);
    let k = d.c * d.kw;
    let tangent = dx.is_some() || dw.is_some();
    let w_rows = weight_rows(w.data(), d.o, d);
    let dw_rows = dw.filter(|_| !stack).map(|dw| weight_rows(dw.data(), d.o, d));
    let stacked: Option<Vec<T>> = dw.filter(|_| stack).map(|dw| {
        let both: Vec<T> = w.data().iter().chain(dw.data()).copied().collect();
        weight_rows(&both, 2 * d.o, d)
    });
    // Written whole below (each image by its first product or a copy), so
    // not zeroed first.
    let out_len = b * img_out;
    let (mut y, mut dy) = (
        Vec::with_capacity(out_len),
        Vec::with_capacity(if tangent { out_len } else { 0 }),
    );
    let (y_slots, dy_slots) = (
        image_slots(&mut y, b, img_out, true, true),
        image_slots(&mut dy, b, img_out, tangent, true),
    );
    y_slots.into_par_iter().zip(dy_slots).enumerate().for_each_init(
        || {
            (
                vec![T::ZERO; k * line_len(d)],
                vec![T::ZERO; if stacked.is_some() { 2 * img_out } else { 0 }],
            )
        },
        |(rows, both), (im, (yb, dyb))| {
            let image = im * img_in..(im + 1) * img_in;
            row_patches(&x.data()[image.clone()], d, rows);
            // `Ẇ·rows(x)` when it was computed (the tangent's first term).
            let mut dy_started = None;
            if let Some(ws) = &stacked {
                row_gemms(both, ws, 2 * d.o, k, rows, d, false);
                copy_uninit(yb, &both[..img_out]);
                copy_uninit(dyb, &both[img_out..]);
                // SAFETY: every element of `dyb` was just written.
                dy_started = Some(unsafe { assume_init_mut(dyb) });
            } else {
                row_gemms_into_uninit(yb, &w_rows, d.o, k, rows, d);
                if let Some(dwr) = &dw_rows {
                    dy_started = Some(row_gemms_into_uninit(dyb, dwr, d.o, k, rows, d));
                }
            }
            if let Some(dx) = dx {
                row_patches(&dx.data()[image], d, rows);
                match dy_started {
                    // Added onto Ẇ·rows(x).
                    Some(dyb) => row_gemms(dyb, &w_rows, d.o, k, rows, d, true),
                    None => {
                        row_gemms_into_uninit(dyb, &w_rows, d.o, k, rows, d);
                    }
                }
            }
        },
    );
    // SAFETY: each image's slot of `y` was written by its first product or
    // copy, and of `dy` (when there is a tangent, from `dx` or `dw`) likewise.
    unsafe {
        y.set_len(out_len);
        dy.set_len(if tangent { out_len } else { 0 });
    }
    let shape = vec![b, d.o, d.h, d.w];
    let dy = tangent.then(|| Tensor::new(shape.clone(), dy).expect("b·o·h·w elements"));
    (Tensor::new(shape, y).expect("b·o·h·w elements"), dy)
}

/// [`super::backward_input_dual`] on row patches of the output gradient: the
/// value `W'⋆gy`, the tangent `[W' | Ẇ']⋆[ġy; gy]` as one product when both
/// tangent terms are present (the rows of `gy` computed once for both).
pub(super) fn backward_input_dual<T: Float>(
    gy: &Tensor<T>,
    dgy: Option<&Tensor<T>>,
    w: &Tensor<T>,
    dw: Option<&Tensor<T>>,
    d: &Dims,
) -> (Tensor<T>, Option<Tensor<T>>) {
    let b = gy.shape()[0];
    let n = d.h * d.w;
    let (img_in, img_out) = (d.c * n, d.o * n);
    let (k, len) = (d.o * d.kw, line_len(d));
    let tangent = dgy.is_some() || dw.is_some();
    let flips = FlippedWeights::new(w, dw, dgy.is_some(), d);
    // Written whole below by each image's first product, so not zeroed first.
    let out_len = b * img_in;
    let (mut gx, mut dgx) = (
        Vec::with_capacity(out_len),
        Vec::with_capacity(if tangent { out_len } else { 0 }),
    );
    let (gx_slots, dgx_slots) = (
        image_slots(&mut gx, b, img_in, true, true),
        image_slots(&mut dgx, b, img_in, tangent, true),
    );
    gx_slots.into_par_iter().zip(dgx_slots).enumerate().for_each_init(
        || vec![T::ZERO; 2 * k * len],
        |rows, (im, (gxb, dgxb))| {
            let image = im * img_out..(im + 1) * img_out;
            image_input_gradient(
                &gy.data()[image.clone()],
                dgy.map(|g| &g.data()[image]),
                &flips,
                d,
                rows,
                gxb,
                dgxb,
            );
        },
    );
    // SAFETY: each image's slot of `gx` was written by its first product, and
    // of `dgx` (when there is a tangent: `dgy` or `dw`) by `image_input_gradient`.
    unsafe {
        gx.set_len(out_len);
        dgx.set_len(if tangent { out_len } else { 0 });
    }
    let shape = vec![b, d.c, d.h, d.w];
    let dgx = tangent.then(|| Tensor::new(shape.clone(), dgx).expect("b·c·h·w elements"));
    (Tensor::new(shape, gx).expect("b·c·h·w elements"), dgx)
}

/// The flipped weights of an input gradient (see [`flipped_weight_rows`]): of
/// `W`, of `Ẇ`, and of both side by side (for `[W' | Ẇ']⋆[ġy; gy]`).
struct FlippedWeights<T> {
    w: Vec<T>,
    dw: Option<Vec<T>>,
    stacked: Option<Vec<T>>,
}

impl<T: Float> FlippedWeights<T> {
    /// The stacked form only where both tangent terms are present (`ġy` and `Ẇ`).
    fn new(w: &Tensor<T>, dw: Option<&Tensor<T>>, with_dgy: bool, d: &Dims) -> Self {
        FlippedWeights {
            w: flipped_weight_rows(&[w.data()], d),
            dw: dw.map(|dw| flipped_weight_rows(&[dw.data()], d)),
            stacked: dw
                .filter(|_| with_dgy)
                .map(|dw| flipped_weight_rows(&[w.data(), dw.data()], d)),
        }
    }
}

/// One image's input gradient on row patches: `W'⋆gy` into `gxb` and its
/// tangent into `dgxb` (empty when there is none), leaving `[rows(ġy);
/// rows(gy)]` in `rows` (`rows(ġy)` only when `dgy` is given).
fn image_input_gradient<T: Float>(
    gy: &[T],
    dgy: Option<&[T]>,
    flips: &FlippedWeights<T>,
    d: &Dims,
    rows: &mut [T],
    gxb: &mut [MaybeUninit<T>],
    dgxb: &mut [MaybeUninit<T>],
) {
    // The transposed convolution maps O channels to C: its row patches have O·kw lines.
    let t = Dims { c: d.o, o: d.c, ..*d };
    let k = d.o * d.kw;
    let (rows_dgy, rows_gy) = rows.split_at_mut(k * line_len(d));
    row_patches(gy, &t, rows_gy);
    row_gemms_into_uninit(gxb, &flips.w, d.c, k, rows_gy, &t);
    match (flips.stacked.as_deref(), dgy, flips.dw.as_deref()) {
        (Some(ws), Some(dgy), _) => {
            row_patches(dgy, &t, rows_dgy);
            row_gemms_into_uninit(dgxb, ws, d.c, 2 * k, rows, &t);
        }
        (_, Some(dgy), _) => {
            row_patches(dgy, &t, rows_dgy);
            row_gemms_into_uninit(dgxb, &flips.w, d.c, k, rows_dgy, &t);
        }
        (_, None, Some(dwf)) => {
            row_gemms_into_uninit(dgxb, dwf, d.c, k, rows_gy, &t);
        }
        // No tangent: `dgxb` is empty.
        (_, None, None) => {}
    }
}

/// [`super::backward_dual`] on row patches: the input gradient as
/// [`backward_input_dual`], and the weight gradient from the same rows of the
/// output gradient instead of rows of the input — `gW[o, c, kh−1−i, kw−1−j] =
/// Σ_t rows(gy)[(o, j), i·w + t] · x[c, t]`, per kernel row `i` one NT product
/// `[O·kw × H·W]·[C × H·W]ᵀ` (and `rows(ġy)·xᵀ + rows(gy)·ẋᵀ` for its tangent) —
/// so no rows of `x` or `ẋ` are built. Images run in fixed groups whose partial
/// sums are added in order, so the result does not depend on the thread count.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub(super) fn backward_dual<T: Float>(
    (x, dx): (&Tensor<T>, Option<&Tensor<T>>),
    (gy, dgy): (&Tensor<T>, Option<&Tensor<T>>),
    (w, dw): (&Tensor<T>, Option<&Tensor<T>>),
    d: &Dims,
    want_weight_value: bool,
) -> super::Gradients<T> {
    let b = gy.shape()[0];
    let n = d.h * d.w;
    let (img_in, img_out) = (d.c * n, d.o * n);
    let (k, len) = (d.o * d.kw, line_len(d));
    let in_tangent = dgy.is_some() || dw.is_some();
    let w_tangent = dx.is_some() || dgy.is_some();
    let flips = FlippedWeights::new(w, dw, dgy.is_some(), d);
    // Written whole below by each image's first product, so not zeroed first.
    let out_len = b * img_in;
    let (mut gx, mut dgx) = (
        Vec::with_capacity(out_len),
        Vec::with_capacity(if in_tangent { out_len } else { 0 }),
    );
    let mut gx_slots = image_slots(&mut gx, b, img_in, true, true);
    let mut dgx_slots = image_slots(&mut dgx, b, img_in, in_tangent, true);
    // Per kernel row i, `[O·kw × C]`.
    let wlen = d.kh * k * d.c;
    // Against the image transposed, `[H·W × C]`: an NN product (the NT one
    // against the image as stored ran at a third of the speed for 16 channels).
    let ld = RowStrides { a: len, b: d.c, c: d.c };
    let add_products = |acc: &mut [T], rows: &[T], image_t: &[T]| {
        for i in 0..d.kh {
            let out = &mut acc[i * k * d.c..][..k * d.c];
            gemm_strided_into(
                out,
                &rows[i * d.w..],
                false,
                image_t,
                false,
                k,
                d.c,
                n,
                ld,
                true,
                Par::Serial,
            );
        }
    };
    let partials: Vec<(Vec<T>, Vec<T>)> = gx_slots
        .par_chunks_mut(super::WEIGHT_GRAD_GROUP)
        .zip(dgx_slots.par_chunks_mut(super::WEIGHT_GRAD_GROUP))
        .enumerate()
        .map(|(group, (gx_group, dgx_group))| {
            let mut acc = vec![T::ZERO; if want_weight_value { wlen } else { 0 }];
            let mut dacc = vec![T::ZERO; if w_tangent { wlen } else { 0 }];
            let mut rows = vec![T::ZERO; 2 * k * len];
            let mut x_t = vec![T::ZERO; if want_weight_value || dgy.is_some() { img_in } else { 0 }];
            let mut dx_t = vec![T::ZERO; if dx.is_some() { img_in } else { 0 }];
            for (j, (gxb, dgxb)) in gx_group.iter_mut().zip(dgx_group.iter_mut()).enumerate() {
                let im = group * super::WEIGHT_GRAD_GROUP + j;
                let out = im * img_out..(im + 1) * img_out;
                let dgy_image = dgy.map(|g| &g.data()[out.clone()]);
                image_input_gradient(&gy.data()[out], dgy_image, &flips, d, &mut rows, gxb, dgxb);
                let (rows_dgy, rows_gy) = rows.split_at(k * len);
                let input = im * img_in..(im + 1) * img_in;
                if !x_t.is_empty() {
                    super::transpose_into(&x.data()[input.clone()], d.c, n, &mut x_t);
                }
                if want_weight_value {
                    add_products(&mut acc, rows_gy, &x_t);
                }
                if dgy.is_some() {
                    add_products(&mut dacc, rows_dgy, &x_t);
                }
                if let Some(dx) = dx {
                    super::transpose_into(&dx.data()[input], d.c, n, &mut dx_t);
                    add_products(&mut dacc, rows_gy, &dx_t);
                }
            }
            (acc, dacc)
        })
        .collect();
    drop((gx_slots, dgx_slots));
    // SAFETY: each image's slot of `gx` was written by its first product, and
    // of `dgx` (when there is a tangent: `dgy` or `dw`) by `image_input_gradient`.
    unsafe {
        gx.set_len(out_len);
        dgx.set_len(if in_tangent { out_len } else { 0 });
    }
    let mut gwf = vec![T::ZERO; if want_weight_value { wlen } else { 0 }];
    let mut dgwf = vec![T::ZERO; if w_tangent { wlen } else { 0 }];
    for (p, dp) in partials {
        gwf.iter_mut().zip(p).for_each(|(a, v)| *a += v);
        dgwf.iter_mut().zip(dp).for_each(|(a, v)| *a += v);
    }
    // [kh][(o, j) × C] of the flipped kernel → [O, C, kh, kw].
    let regroup = |f: &[T]| -> Tensor<T> {
        let mut out = vec![T::ZERO; d.o * d.c * d.kh * d.kw];
        for i in 0..d.kh {
            for o in 0..d.o {
                for j in 0..d.kw {
                    let row = &f[(i * k + o * d.kw + j) * d.c..][..d.c];
                    for (c, &v) in row.iter().enumerate() {
                        out[((o * d.c + c) * d.kh + (d.kh - 1 - i)) * d.kw + (d.kw - 1 - j)] = v;
                    }
                }
            }
        }
        Tensor::new(vec![d.o, d.c, d.kh, d.kw], out).expect("o·c·kh·kw elements")
    };
    let shape = vec![b, d.c, d.h, d.w];
    super::Gradients {
        dgx: in_tangent.then(|| Tensor::new(shape.clone(), dgx).expect("b·c·h·w elements")),
        gx: Tensor::new(shape, gx).expect("b·c·h·w elements"),
        gw: want_weight_value.then(|| regroup(&gwf)),
        dgw: w_tangent.then(|| regroup(&dgwf)),
    }
}

/// [`super::image_weight_gradient_into`] on row patches: per kernel row `i`,
/// `gW_iᵀ [C·kw × O] = rows(x)[:, i·w ..] · gyᵀ`, regrouped into the rows of `out`.
pub(super) fn image_weight_gradient_into<T: Float>(
    x: &[T],
    gy: &[T],
    d: &Dims,
    scratch: &mut super::ImageGradientScratch<T>,
    out: &mut [T],
    ld: usize,
) {
    let n = d.h * d.w;
    let (k, len) = (d.c * d.kw, line_len(d));
    let (rows, acc) = scratch.sized(k * len, d.kh * k * d.o);
    row_patches(x, d, rows);
    let strides = RowStrides { a: len, b: n, c: d.o };
    for i in 0..d.kh {
        let block = &mut acc[i * k * d.o..][..k * d.o];
        gemm_strided_into(
            block,
            &rows[i * d.w..],
            false,
            gy,
            true,
            k,
            d.o,
            n,
            strides,
            false,
            Par::Serial,
        );
    }
    // [kh][C·kw × O] → row o: [C, kh, kw].
    for i in 0..d.kh {
        for c in 0..d.c {
            for j in 0..d.kw {
                let from = &acc[(i * k + c * d.kw + j) * d.o..][..d.o];
                let at = (c * d.kh + i) * d.kw + j;
                for (o, &v) in from.iter().enumerate() {
                    out[o * ld + at] = v;
                }
            }
        }
    }
}

/// [`super::weight_gradient_parts`] on row patches: per kernel row `i`,
/// `gW_iᵀ [C·kw × O] += rows(x)[:, i·w ..] · gyᵀ` (summed by
/// [`super::weight_gradient_sums`]).
pub(super) fn weight_gradient_parts<T: Float>(
    x: &Tensor<T>,
    dx: Option<&Tensor<T>>,
    gy: &Tensor<T>,
    dgy: Option<&Tensor<T>>,
    d: &Dims,
    want_value: bool,
) -> (Option<Tensor<T>>, Option<Tensor<T>>) {
    let n = d.h * d.w;
    let (k, len) = (d.c * d.kw, line_len(d));
    let tangent = dx.is_some() || dgy.is_some();
    let wn = d.o * d.c * d.kh * d.kw;
    // `g` as stored, `[O × H·W]`: an NT product.
    let ld = RowStrides { a: len, b: n, c: d.o };
    let add_products = |acc: &mut [T], rows: &[T], g: &[T]| {
        for i in 0..d.kh {
            let out = &mut acc[i * k * d.o..][..k * d.o];
            gemm_strided_into(out, &rows[i * d.w..], false, g, true, k, d.o, n, ld, true, Par::Serial);
        }
    };
    let (gwt, dgwt) = super::weight_gradient_sums(
        (x, dx),
        (gy, dgy),
        want_value,
        wn,
        k * len,
        |image, rows| row_patches(image, d, rows),
        add_products,
    );
    // [kh][C·kw × O] → [O, C, kh, kw].
    let regroup = |t: &[T]| -> Tensor<T> {
        let mut out = vec![T::ZERO; wn];
        for i in 0..d.kh {
            for c in 0..d.c {
                for j in 0..d.kw {
                    let row = &t[(i * k + c * d.kw + j) * d.o..][..d.o];
                    for (o, &v) in row.iter().enumerate() {
                        out[((o * d.c + c) * d.kh + i) * d.kw + j] = v;
                    }
                }
            }
        }
        Tensor::new(vec![d.o, d.c, d.kh, d.kw], out).expect("o·c·kh·kw elements")
    };
    (want_value.then(|| regroup(&gwt)), tangent.then(|| regroup(&dgwt)))
}
