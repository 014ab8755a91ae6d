//! The Gram matrix of a 3×3 (stride 1, padding 1) convolution's input patches,
//! `Σ_b Σ_t p_{b,t} p_{b,t}ᵀ` (K-FAC's input factor before its `1/T`), without
//! forming the patches.
//!
//! Entry `((c, ky, kx), (c', ky', kx'))` is a correlation of channels c and c'
//! at the shift `δ = (ky' − ky, kx' − kx)`, summed over the window of output
//! positions that kernel tap `(ky, kx)` reads. The 81 tap pairs share 25 shifts,
//! and a shift's correlation over *all* interior positions is one GEMM on the
//! zero-padded input laid out channel-major (`[C, B·(H+2)·(W+2)]` between zero
//! margins, the partner operand the same buffer offset by `δy·(W+2) + δx`: a
//! shift that leaves an image's row or the image itself lands on padding or
//! margin, so the flat offset never mixes real pixels). A window misses at most one interior row and one
//! interior column, whose products are subtracted (and their corner added
//! back) from small GEMMs on gathered strips. With `C_{−δ} = C_δᵀ` this is 13
//! GEMMs of `2C²·B(H+2)(W+2)` instead of im2col's `2·(9C)²·B·HW`: 4.6× fewer
//! multiplications on 32×32 images, 2.5× on 8×8.

use crate::linalg::{gemm_strided_into, Par, RowStrides};
use crate::{Float, Tensor};

/// The patches' Gram matrix `[9C, 9C]` (rows and columns in the order of a
/// `[O, C, 3, 3]` weight's patch, `(c, ky, kx)`), summed over the batch of
/// `x` `[B, C, H, W]`, in `x`'s dtype.
pub fn patch_gram_3x3<T: Float>(x: &Tensor<T>) -> Vec<T> {
    let s = x.shape();
    assert_eq!(s.len(), 4, "patch_gram_3x3: x must be [B, C, H, W], got {s:?}");
    patch_gram_3x3_of(x.data(), [s[0], s[1], s[2], s[3]])
}

/// [`patch_gram_3x3`] of images stored `[B, C, H, W]` in `x`.
pub fn patch_gram_3x3_of<T: Float>(x: &[T], [b, c, h, w]: [usize; 4]) -> Vec<T> {
    assert_eq!(
        x.len(),
        b * c * h * w,
        "patch_gram_3x3: data does not fill [{b}, {c}, {h}, {w}]"
    );
    let (hp, wp) = (h + 2, w + 2);
    let len = b * hp * wp;
    // Channel-major, zero-padded, with a zero margin of the largest shift at
    // both ends of each channel's line: channel k's images one after another,
    // image `bi`'s padded pixel `u` at `k·line + margin + bi·hp·wp + u`.
    let margin = 2 * wp + 2;
    let line = len + 2 * margin;
    let mut xp = vec![T::ZERO; c * line];
    for bi in 0..b {
        for k in 0..c {
            let plane = &x[(bi * c + k) * h * w..][..h * w];
            let base = k * line + margin + bi * hp * wp;
            for (r, row) in plane.chunks_exact(w).enumerate() {
                let at = base + (r + 1) * wp + 1;
                xp[at..at + w].copy_from_slice(row);
            }
        }
    }
    let offset = |dy: isize, dx: isize| dy * wp as isize + dx;
    // `Σ_u xp[k, u] · xp[k', u + off]` over every padded position u of the
    // batch (a partner beyond the images lies in the margin: zero).
    let shift = |dy: isize, dx: isize| -> Vec<T> {
        let start = (margin as isize + offset(dy, dx)) as usize;
        let mut out = vec![T::ZERO; c * c];
        if len > 0 {
            gemm_strided_into(
                &mut out,
                &xp[margin..],
                false,
                &xp[start..],
                true,
                c,
                c,
                len,
                RowStrides { a: line, b: line, c },
                false,
                Par::Serial,
            );
        }
        out
    };
    // The 13 shifts with δ ≥ 0 (lexicographically); the others are transposes.
    let mut full: Vec<Option<Vec<T>>> = vec![None; 25];
    let index = |dy: isize, dx: isize| ((dy + 2) * 5 + dx + 2) as usize;
    for dy in -2..=2isize {
        for dx in -2..=2isize {
            if dy > 0 || (dy == 0 && dx >= 0) {
                full[index(dy, dx)] = Some(shift(dy, dx));
            }
        }
    }
    // A strip of positions as runs `(first, count, step)` (line positions
    // past the margin), with its values gathered `[C, n]`.
    struct Strip<T> {
        runs: Vec<(usize, usize, usize)>,
        n: usize,
        own: Vec<T>,
    }
    // `[C, n]` values at the runs shifted by `off`.
    let gather_at = |runs: &[(usize, usize, usize)], n: usize, off: isize| -> Vec<T> {
        let mut out = vec![T::ZERO; c * n];
        for k in 0..c {
            let src = &xp[k * line..(k + 1) * line];
            let mut j = k * n;
            for &(first, count, step) in runs {
                let at = (margin as isize + first as isize + off) as usize;
                if step == 1 {
                    out[j..j + count].copy_from_slice(&src[at..at + count]);
                } else {
                    for (q, v) in out[j..j + count].iter_mut().enumerate() {
                        *v = src[at + q * step];
                    }
                }
                j += count;
            }
        }
        out
    };
    let strip = |runs: Vec<(usize, usize, usize)>| -> Strip<T> {
        let n = runs.iter().map(|r| r.1).sum();
        let own = gather_at(&runs, n, 0);
        Strip { runs, n, own }
    };
    // `Σ_{u ∈ strip} xp[k, u] · xp[k', u + off]`.
    let correlate = |strip: &Strip<T>, dy: isize, dx: isize| -> Vec<T> {
        let partner = gather_at(&strip.runs, strip.n, offset(dy, dx));
        let mut out = vec![T::ZERO; c * c];
        if strip.n > 0 {
            let ld = RowStrides::packed(false, true, c, c, strip.n);
            gemm_strided_into(
                &mut out,
                &strip.own,
                false,
                &partner,
                true,
                c,
                c,
                strip.n,
                ld,
                false,
                Par::Serial,
            );
        }
        out
    };
    // The interior row (padded index) a tap row misses: ky = 0 reads rows
    // 0..H (misses H), ky = 2 reads 2..H+2 (misses 1); likewise columns.
    let missed = |tap: usize, extent: usize| match tap {
        0 => Some(extent),
        2 => Some(1),
        _ => None,
    };
    let image = |bi: usize| bi * hp * wp;
    let rows: [Option<Strip<T>>; 3] = std::array::from_fn(|ky| {
        missed(ky, h).map(|r| strip((0..b).map(|bi| (image(bi) + r * wp + 1, w, 1)).collect()))
    });
    let cols: [Option<Strip<T>>; 3] = std::array::from_fn(|kx| {
        missed(kx, w).map(|col| strip((0..b).map(|bi| (image(bi) + wp + col, h, wp)).collect()))
    });
    let corners: [[Option<Strip<T>>; 3]; 3] = std::array::from_fn(|ky| {
        std::array::from_fn(|kx| {
            missed(ky, h)
                .zip(missed(kx, w))
                .map(|(r, col)| strip((0..b).map(|bi| (image(bi) + r * wp + col, 1, 1)).collect()))
        })
    });
    // Each strip's correlation at a shift, computed once: rows by (ky, δ),
    // columns by (kx, δ), corners by (ky, kx, δ).
    let mut row_parts: Vec<Option<Vec<T>>> = vec![None; 3 * 25];
    let mut col_parts: Vec<Option<Vec<T>>> = vec![None; 3 * 25];
    let a = 9 * c;
    let mut gram = vec![T::ZERO; a * a];
    let mut m = vec![T::ZERO; c * c];
    for ky in 0..3 {
        for kx in 0..3 {
            for ky2 in 0..3 {
                for kx2 in 0..3 {
                    let (dy, dx) = (ky2 as isize - ky as isize, kx2 as isize - kx as isize);
                    match &full[index(dy, dx)] {
                        Some(f) => m.copy_from_slice(f),
                        None => {
                            let t = full[index(-dy, -dx)].as_ref().expect("δ ≥ 0 computed");
                            for i in 0..c {
                                for j in 0..c {
                                    m[i * c + j] = t[j * c + i];
                                }
                            }
                        }
                    }
                    let subtract = |m: &mut [T], part: &[T]| m.iter_mut().zip(part).for_each(|(v, p)| *v -= *p);
                    if let Some(strip) = &rows[ky] {
                        let part = row_parts[ky * 25 + index(dy, dx)].get_or_insert_with(|| correlate(strip, dy, dx));
                        subtract(&mut m, part);
                    }
                    if let Some(strip) = &cols[kx] {
                        let part = col_parts[kx * 25 + index(dy, dx)].get_or_insert_with(|| correlate(strip, dy, dx));
                        subtract(&mut m, part);
                    }
                    if let Some(strip) = &corners[ky][kx] {
                        let part = correlate(strip, dy, dx);
                        m.iter_mut().zip(&part).for_each(|(v, p)| *v += *p);
                    }
                    for i in 0..c {
                        let row = &mut gram[(i * 9 + ky * 3 + kx) * a..][..a];
                        for j in 0..c {
                            row[j * 9 + ky2 * 3 + kx2] = m[i * c + j];
                        }
                    }
                }
            }
        }
    }
    gram
}

/// `Σ_b Σ_t p_{b,t}` `[9C]`: each patch entry summed over the output
/// positions and the batch (the Gram matrix's bias column), from each plane's
/// total less the interior row and column a tap misses, plus their corner.
pub fn patch_sums_3x3_of<T: Float>(x: &[T], [b, c, h, w]: [usize; 4]) -> Vec<T> {
    assert_eq!(
        x.len(),
        b * c * h * w,
        "patch_sums_3x3: data does not fill [{b}, {c}, {h}, {w}]"
    );
    let mut sums = vec![T::ZERO; 9 * c];
    if h == 0 || w == 0 {
        return sums;
    }
    // A tap's missed row (col) as an index into the plane: ky = 0 misses the last, ky = 2 the first.
    let missed = |tap: usize, extent: usize| match tap {
        0 => Some(extent - 1),
        2 => Some(0),
        _ => None,
    };
    for plane in x.chunks_exact(h * w).enumerate() {
        let (k, plane) = (plane.0 % c, plane.1);
        let total = plane.iter().fold(T::ZERO, |acc, &v| acc + v);
        let row_sum = |r: usize| plane[r * w..(r + 1) * w].iter().fold(T::ZERO, |acc, &v| acc + v);
        let col_sum = |col: usize| (0..h).fold(T::ZERO, |acc, r| acc + plane[r * w + col]);
        for ky in 0..3 {
            for kx in 0..3 {
                let (r, col) = (missed(ky, h), missed(kx, w));
                let mut v = total;
                if let Some(r) = r {
                    v -= row_sum(r);
                }
                if let Some(col) = col {
                    v -= col_sum(col);
                }
                if let (Some(r), Some(col)) = (r, col) {
                    v += plane[r * w + col];
                }
                sums[k * 9 + ky * 3 + kx] += v;
            }
        }
    }
    sums
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::{patches, ConvGeometry};

    /// `Σ_b colsᵀ cols` from im2col patches, the definition.
    fn by_patches(x: &Tensor<f64>) -> Vec<f64> {
        let s = x.shape();
        let (b, c, h, w) = (s[0], s[1], s[2], s[3]);
        let g = ConvGeometry { stride: 1, padding: 1 };
        let a = 9 * c;
        let mut out = vec![0.0; a * a];
        for bi in 0..b {
            let cols = patches(&x.data()[bi * c * h * w..][..c * h * w], &s[1..], &[1, c, 3, 3], g);
            let t = cols.len() / a;
            for i in 0..a {
                for j in 0..a {
                    out[i * a + j] += (0..t).map(|p| cols[i * t + p] * cols[j * t + p]).sum::<f64>();
                }
            }
        }
        out
    }

    #[test]
    fn patch_gram_equals_the_im2col_definition() {
        for (b, c, h, w) in [(1, 1, 1, 1), (2, 1, 3, 3), (3, 2, 5, 7), (2, 3, 8, 4), (1, 4, 2, 9)] {
            let n = b * c * h * w;
            let data: Vec<f64> = (0..n).map(|i| ((i * 7919 % 113) as f64 / 56.5 - 1.0) * 1.3).collect();
            let x = Tensor::new(vec![b, c, h, w], data).unwrap();
            let (got, want) = (patch_gram_3x3(&x), by_patches(&x));
            let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let err = got.iter().zip(&want).fold(0.0f64, |m, (g, e)| m.max((g - e).abs()));
            assert!(
                err <= 1e-13 * scale,
                "[{b}, {c}, {h}, {w}]: max error {err:e} (scale {scale:e})"
            );
            // The bias column: every patch entry summed over positions and images.
            let sums = patch_sums_3x3_of(x.data(), [b, c, h, w]);
            let g = ConvGeometry { stride: 1, padding: 1 };
            let mut want = vec![0.0; 9 * c];
            for bi in 0..b {
                let cols = patches(&x.data()[bi * c * h * w..][..c * h * w], &[c, h, w], &[1, c, 3, 3], g);
                let t = cols.len() / (9 * c);
                for (i, s) in want.iter_mut().enumerate() {
                    *s += cols[i * t..(i + 1) * t].iter().sum::<f64>();
                }
            }
            let err = sums.iter().zip(&want).fold(0.0f64, |m, (g, e)| m.max((g - e).abs()));
            assert!(err <= 1e-12, "[{b}, {c}, {h}, {w}]: patch sums off by {err:e}");
        }
    }
}
