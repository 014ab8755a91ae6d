//! Winograd F(2×2, 3×3) for the 3×3, stride-1, padding-1 convolutions (the
//! ResNet's): each 2×2 block of outputs comes from its 4×4 input tile, with 16
//! multiplications per channel pair instead of 36. The input tiles are
//! transformed (`Bᵀ d B`), the weights (`G g Gᵀ`), and the products become 16
//! GEMMs, one per tile position ξ, `U_ξ [O × C] · V_ξ [C × tiles]`, over a few
//! images at a time; their outputs are transformed back (`Aᵀ m A`). The
//! transforms' coefficients are 0, ±1 and ½, so the rounding stays that of a
//! direct product to a small factor.
//!
//! The input gradient is the same convolution of the output gradient with the
//! weights flipped and transposed, so it runs on the same kernel; the weight
//! gradient stays on row patches (its 16 products would have `O × C` outputs and
//! an inner dimension of all tiles, shapes the GEMM kernels run slowly).
//!
//! `HVP_CONV=rows` turns this path off (row patches instead), as does
//! `HVP_CONV=im2col` (im2col for every convolution).

use super::{image_slots, ConvGeometry, Dims};
use crate::linalg::{gemm_strided_into, Par, RowStrides};
use crate::{Float, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

/// Tile positions of a 4×4 input tile.
const POSITIONS: usize = 16;

/// Images per chunk are chosen so that `input channels × tiles` stays near this:
/// the chunk's transformed inputs and products then stay in a core's L2 cache,
/// and the GEMMs still get a few hundred columns.
const CHUNK_VALUES: usize = 4096;
fn chunk_values() -> usize {
    std::env::var("WINO_CHUNK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CHUNK_VALUES)
}

/// Whether this convolution runs on Winograd tiles: 3×3, stride 1, padding 1,
/// and not switched off by `HVP_CONV=rows` or `HVP_CONV=im2col`.
pub(super) fn applies(d: &Dims, g: ConvGeometry) -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    let enabled = *ENABLED.get_or_init(|| !matches!(std::env::var("HVP_CONV").as_deref(), Ok("rows" | "im2col")));
    enabled && g.stride == 1 && g.padding == 1 && d.kh == 3 && d.kw == 3 && d.ho == d.h && d.wo == d.w
}

/// `G g Gᵀ` of one 3×3 kernel `g` (row-major), as 16 values, position `4a + b`.
fn transform_kernel<T: Float>(g: &[T]) -> [T; POSITIONS] {
    let half = T::from_f64(0.5);
    // G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]] applied to a triple.
    let expand = |a: T, b: T, c: T| [a, (a + b + c) * half, (a - b + c) * half, c];
    let cols: [[T; 4]; 3] = std::array::from_fn(|j| expand(g[j], g[3 + j], g[6 + j]));
    let mut u = [T::ZERO; POSITIONS];
    for a in 0..4 {
        let row = expand(cols[0][a], cols[1][a], cols[2][a]);
        u[4 * a..4 * a + 4].copy_from_slice(&row);
    }
    u
}

/// Transformed weights `[16][O × parts·C]`: row `o` of position ξ holds, part
/// after part, `(G parts[q][o, c] Gᵀ)_ξ` for every input channel `c`.
fn transformed_weights<T: Float>(parts: &[&[T]], o: usize, c: usize) -> Vec<T> {
    let k = parts.len() * c;
    let mut out = vec![T::ZERO; POSITIONS * o * k];
    for oi in 0..o {
        for (q, part) in parts.iter().enumerate() {
            for ci in 0..c {
                let u = transform_kernel(&part[(oi * c + ci) * 9..][..9]);
                for (xi, &v) in u.iter().enumerate() {
                    out[(xi * o + oi) * k + q * c + ci] = v;
                }
            }
        }
    }
    out
}

/// The input gradient's kernel: `W'[c, o, i, j] = W[o, c, 2−i, 2−j]`.
fn flipped_transposed<T: Float>(w: &[T], o: usize, c: usize) -> Vec<T> {
    let mut out = vec![T::ZERO; w.len()];
    for oi in 0..o {
        for ci in 0..c {
            let (src, dst) = (&w[(oi * c + ci) * 9..][..9], &mut out[(ci * o + oi) * 9..][..9]);
            for (t, v) in dst.iter_mut().enumerate() {
                *v = src[8 - t];
            }
        }
    }
    out
}

/// Where one chunk's transformed tiles live: position ξ's block of `rows` rows of
/// `ld` values each.
#[derive(Clone, Copy)]
struct Layout {
    rows: usize,
    ld: usize,
}

impl Layout {
    fn block(&self) -> usize {
        self.rows * self.ld
    }
}

/// Tile grid of an `h × w` plane: `⌈h/2⌉ × ⌈w/2⌉` tiles of 2×2 outputs.
#[derive(Clone, Copy)]
struct Tiles {
    h: usize,
    w: usize,
    th: usize,
    tw: usize,
}

impl Tiles {
    fn new(h: usize, w: usize) -> Self {
        Tiles {
            h,
            w,
            th: h.div_ceil(2),
            tw: w.div_ceil(2),
        }
    }
    fn count(&self) -> usize {
        self.th * self.tw
    }
}

/// Scratch of one input transform: an input row split into its even and odd
/// padded columns, and the column transforms of a tile row's four input rows.
struct InputScratch<T> {
    even: Vec<T>,
    odd: Vec<T>,
    cols: Vec<T>,
}

impl<T: Float> InputScratch<T> {
    fn new(t: Tiles) -> Self {
        InputScratch {
            even: vec![T::ZERO; t.tw + 1],
            odd: vec![T::ZERO; t.tw + 1],
            cols: vec![T::ZERO; 16 * t.tw],
        }
    }
}

/// `Bᵀ d B` of every 4×4 input tile of one image `x` `[C, H, W]` (tile `(ty, tx)`
/// reads rows `2ty−1 ..= 2ty+2` and columns `2tx−1 ..= 2tx+2`, zero outside):
/// position ξ's row `row0 + c`, columns `col0 + ty·tw + tx`, of `v`. Every
/// loop runs along `tx` over contiguous slices, so it vectorises.
fn transform_input<T: Float>(
    x: &[T],
    t: Tiles,
    v: &mut [T],
    layout: Layout,
    row0: usize,
    col0: usize,
    s: &mut InputScratch<T>,
) {
    let plane = t.h * t.w;
    let tw = t.tw;
    for (c, xc) in x.chunks_exact(plane.max(1)).enumerate() {
        for ty in 0..t.th {
            // Column transforms of the tile row's four input rows:
            // cols[(r·4 + b)·tw + tx] = (d_r B)_b of tile tx.
            for r in 0..4 {
                let iy = (2 * ty + r) as isize - 1;
                let line = &mut s.cols[r * 4 * tw..][..4 * tw];
                if iy < 0 || iy as usize >= t.h {
                    line.fill(T::ZERO);
                    continue;
                }
                let row = &xc[iy as usize * t.w..][..t.w];
                let (b0, rest) = line.split_at_mut(tw);
                let (b1, rest) = rest.split_at_mut(tw);
                let (b2, b3) = rest.split_at_mut(tw);
                split_padded(row, &mut s.even, &mut s.odd);
                column_transform(&s.even, &s.odd, b0, b1, b2, b3);
            }
            // Row transforms, position by position.
            let base = (row0 + c) * layout.ld + col0 + ty * tw;
            for b in 0..4 {
                let col = |r: usize| &s.cols[(r * 4 + b) * tw..][..tw];
                let d = [col(0), col(1), col(2), col(3)];
                let block = layout.block();
                let (v0, rest) = v[b * block + base..].split_at_mut(4 * block);
                let (v1, rest) = rest.split_at_mut(4 * block);
                let (v2, v3) = rest.split_at_mut(4 * block);
                row_transform(d, &mut v0[..tw], &mut v1[..tw], &mut v2[..tw], &mut v3[..tw]);
            }
        }
    }
}

/// A zero-padded input row (padded column `j` = input column `j − 1`) split
/// into its even columns `even[k] = p[2k]` and odd ones `odd[k] = p[2k + 1]`,
/// `tw + 1` of each.
fn split_padded<T: Float>(row: &[T], even: &mut [T], odd: &mut [T]) {
    even.fill(T::ZERO);
    odd.fill(T::ZERO);
    let pairs = row.chunks_exact(2);
    if let [last] = pairs.remainder() {
        odd[row.len() / 2] = *last;
    }
    for ((p, o), e) in pairs.zip(odd.iter_mut()).zip(even[1..].iter_mut()) {
        *o = p[0];
        *e = p[1];
    }
}

/// `Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]]` along a row:
/// tile `tx` reads padded columns `2tx .. 2tx+3`, i.e. `(e[tx], o[tx], e[tx+1], o[tx+1])`.
#[inline(always)]
fn column_transform<T: Float>(even: &[T], odd: &[T], b0: &mut [T], b1: &mut [T], b2: &mut [T], b3: &mut [T]) {
    let tw = b0.len();
    let (e0, e1, o0, o1) = (&even[..tw], &even[1..=tw], &odd[..tw], &odd[1..=tw]);
    let (b1, b2, b3) = (&mut b1[..tw], &mut b2[..tw], &mut b3[..tw]);
    for tx in 0..tw {
        b0[tx] = e0[tx] - e1[tx];
        b1[tx] = o0[tx] + e1[tx];
        b2[tx] = e1[tx] - o0[tx];
        b3[tx] = o0[tx] - o1[tx];
    }
}

/// `Bᵀ` down the columns: the four column transforms `d` of a tile row into
/// positions `(a, b)` for `a = 0..4`.
#[inline(always)]
fn row_transform<T: Float>([d0, d1, d2, d3]: [&[T]; 4], v0: &mut [T], v1: &mut [T], v2: &mut [T], v3: &mut [T]) {
    let tw = v0.len();
    let (d0, d1, d2, d3) = (&d0[..tw], &d1[..tw], &d2[..tw], &d3[..tw]);
    let (v1, v2, v3) = (&mut v1[..tw], &mut v2[..tw], &mut v3[..tw]);
    for tx in 0..tw {
        v0[tx] = d0[tx] - d2[tx];
        v1[tx] = d1[tx] + d2[tx];
        v2[tx] = d2[tx] - d1[tx];
        v3[tx] = d1[tx] - d3[tx];
    }
}

/// `Aᵀ m A` of every tile of one image's products (position ξ's row `o`,
/// columns `col0 + ty·tw + tx`, of `m`) into its output `[O, H, W]`, every
/// element written once. `s` holds `12·tw` values of scratch.
fn transform_output<T: Float>(m: &[T], t: Tiles, layout: Layout, col0: usize, out: &mut [MaybeUninit<T>], s: &mut [T]) {
    let (plane, tw) = (t.h * t.w, t.tw);
    let (sums, rows) = s.split_at_mut(8 * tw);
    let (top, bottom) = rows.split_at_mut(2 * tw);
    for (o, yo) in out.chunks_exact_mut(plane.max(1)).enumerate() {
        for ty in 0..t.th {
            let base = o * layout.ld + col0 + ty * tw;
            let at = |a: usize, b: usize| &m[(4 * a + b) * layout.block() + base..][..tw];
            // Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]] down the rows: sums[(i·4 + b)·tw + tx].
            for b in 0..4 {
                let (s0, s1) = sums.split_at_mut(4 * tw);
                let m = [at(0, b), at(1, b), at(2, b), at(3, b)];
                output_rows(m, &mut s0[b * tw..][..tw], &mut s1[b * tw..][..tw]);
            }
            // ... then along the columns, interleaving each tile's two outputs.
            for (i, line) in [&mut *top, &mut *bottom].into_iter().enumerate() {
                let q = |b: usize| &sums[(i * 4 + b) * tw..][..tw];
                output_columns([q(0), q(1), q(2), q(3)], &mut line[..2 * tw]);
            }
            let y = 2 * ty;
            super::copy_uninit(&mut yo[y * t.w..][..t.w], &top[..t.w]);
            if y + 1 < t.h {
                super::copy_uninit(&mut yo[(y + 1) * t.w..][..t.w], &bottom[..t.w]);
            }
        }
    }
}

/// `Aᵀ` down the columns of four positions' products: the tile row's top
/// (`s0`) and bottom (`s1`) sums.
#[inline(always)]
fn output_rows<T: Float>([m0, m1, m2, m3]: [&[T]; 4], s0: &mut [T], s1: &mut [T]) {
    let tw = s0.len();
    let (m0, m1, m2, m3, s1) = (&m0[..tw], &m1[..tw], &m2[..tw], &m3[..tw], &mut s1[..tw]);
    for tx in 0..tw {
        s0[tx] = m0[tx] + m1[tx] + m2[tx];
        s1[tx] = m1[tx] - m2[tx] - m3[tx];
    }
}

/// `A` along a row of sums: tile `tx`'s two outputs at `line[2tx]`, `line[2tx + 1]`.
#[inline(always)]
fn output_columns<T: Float>([q0, q1, q2, q3]: [&[T]; 4], line: &mut [T]) {
    let tw = line.len() / 2;
    let (q0, q1, q2, q3) = (&q0[..tw], &q1[..tw], &q2[..tw], &q3[..tw]);
    for (tx, pair) in line.chunks_exact_mut(2).enumerate() {
        pair[0] = q0[tx] + q1[tx] + q2[tx];
        pair[1] = q1[tx] - q2[tx] - q3[tx];
    }
}

/// `(conv(x, w), conv(ẋ, w) + conv(x, ẇ))` of a 3×3, stride-1, padding-1
/// convolution on Winograd tiles: `x` `[B, C, H, W]`, `w` (and `ẇ`) the data of
/// `[O, C, 3, 3]` weights. The tangent `Ẇ·V(x) + W·V(ẋ)` is one product per
/// position with a doubled inner dimension, `[Ẇ_ξ | W_ξ]·[V(x)_ξ; V(ẋ)_ξ]`.
pub(super) fn conv_dual<T: Float>(
    x: &Tensor<T>,
    dx: Option<&Tensor<T>>,
    w: &[T],
    dw: Option<&[T]>,
    d: &Dims,
) -> (Tensor<T>, Option<Tensor<T>>) {
    let b = x.shape()[0];
    let (c, o) = (d.c, d.o);
    let t = Tiles::new(d.h, d.w);
    let tiles = t.count();
    let (img_in, img_out) = (c * d.h * d.w, o * d.h * d.w);
    let tangent = dx.is_some() || dw.is_some();
    let u = transformed_weights(&[w], o, c);
    // The tangent's weights: `[Ẇ | W]` against `[V(x); V(ẋ)]`, or `Ẇ` against `V(x)`;
    // with `ẋ` alone it is `W` against `V(ẋ)`.
    let du = dw.map(|dw| match dx {
        Some(_) => transformed_weights(&[dw, w], o, c),
        None => transformed_weights(&[dw], o, c),
    });
    let rows = if dx.is_some() { 2 * c } else { c };
    let per_chunk = (chunk_values() / (c * tiles).max(1)).clamp(1, b.max(1));
    let out_len = b * img_out;
    let (mut y, mut dy) = (
        Vec::with_capacity(out_len),
        Vec::with_capacity(if tangent { out_len } else { 0 }),
    );
    let mut y_slots = image_slots(&mut y, b, img_out, true, true);
    let mut dy_slots = image_slots(&mut dy, b, img_out, tangent, true);
    let columns = per_chunk * tiles;
    y_slots
        .par_chunks_mut(per_chunk)
        .zip(dy_slots.par_chunks_mut(per_chunk))
        .enumerate()
        .for_each_init(
            || {
                (
                    vec![T::ZERO; POSITIONS * rows * columns],
                    vec![T::ZERO; POSITIONS * o * columns],
                    vec![T::ZERO; if tangent { POSITIONS * o * columns } else { 0 }],
                    InputScratch::new(t),
                    vec![T::ZERO; 12 * t.tw],
                )
            },
            |(v, m, dm, scratch, out_rows), (chunk, (ys, dys))| {
                let first = chunk * per_chunk;
                let n = ys.len() * tiles;
                let vl = Layout { rows, ld: n };
                for j in 0..ys.len() {
                    let image = (first + j) * img_in..(first + j + 1) * img_in;
                    transform_input(&x.data()[image.clone()], t, v, vl, 0, j * tiles, scratch);
                    if let Some(dx) = dx {
                        transform_input(&dx.data()[image], t, v, vl, c, j * tiles, scratch);
                    }
                }
                let ml = Layout { rows: o, ld: n };
                for xi in 0..POSITIONS {
                    let vx = &v[xi * vl.block()..];
                    let product = |out: &mut [T], a: &[T], k: usize, b: &[T]| {
                        let ld = RowStrides { a: k, b: n, c: n };
                        let out = &mut out[xi * ml.block()..][..ml.block()];
                        gemm_strided_into(
                            out,
                            &a[xi * o * k..][..o * k],
                            false,
                            b,
                            false,
                            o,
                            n,
                            k,
                            ld,
                            false,
                            Par::Serial,
                        );
                    };
                    product(m, &u, c, vx);
                    match (&du, dx.is_some()) {
                        (Some(du), true) => product(dm, du, 2 * c, vx),
                        (Some(du), false) => product(dm, du, c, vx),
                        (None, true) => product(dm, &u, c, &vx[c * n..]),
                        (None, false) => {}
                    }
                }
                for (j, (yb, dyb)) in ys.iter_mut().zip(dys.iter_mut()).enumerate() {
                    transform_output(m, t, ml, j * tiles, yb, out_rows);
                    if tangent {
                        transform_output(dm, t, ml, j * tiles, dyb, out_rows);
                    }
                }
            },
        );
    drop((y_slots, dy_slots));
    // SAFETY: `transform_output` wrote every element of each image's slot of `y`,
    // and of `dy` when there is a tangent.
    unsafe {
        y.set_len(out_len);
        dy.set_len(if tangent { out_len } else { 0 });
    }
    let shape = vec![b, o, d.h, d.w];
    let dy = tangent.then(|| Tensor::new(shape.clone(), dy).expect("b·o·h·w elements"));
    (Tensor::new(shape, y).expect("b·o·h·w elements"), dy)
}

/// The input gradient and its tangent, `(W'⋆gy, W'⋆ġy + Ẇ'⋆gy)`, as
/// [`conv_dual`] of the output gradient with the flipped, transposed weights.
pub(super) fn backward_input_dual<T: Float>(
    gy: &Tensor<T>,
    dgy: Option<&Tensor<T>>,
    w: &Tensor<T>,
    dw: Option<&Tensor<T>>,
    d: &Dims,
) -> (Tensor<T>, Option<Tensor<T>>) {
    let transposed = Dims { c: d.o, o: d.c, ..*d };
    let wf = flipped_transposed(w.data(), d.o, d.c);
    let dwf = dw.map(|dw| flipped_transposed(dw.data(), d.o, d.c));
    conv_dual(gy, dgy, &wf, dwf.as_deref(), &transposed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_transform_reproduces_a_direct_tile() {
        // One channel, one 4×4 tile: Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A is the 2×2 valid correlation.
        let g: Vec<f64> = (0..9).map(|i| (i as f64 * 0.37).sin()).collect();
        let dtile: Vec<f64> = (0..16).map(|i| (i as f64 * 0.53 + 0.2).cos()).collect();
        let u = transform_kernel(&g);
        let bt = [
            [1.0, 0.0, -1.0, 0.0],
            [0.0, 1.0, 1.0, 0.0],
            [0.0, -1.0, 1.0, 0.0],
            [0.0, 1.0, 0.0, -1.0],
        ];
        let at = [[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, -1.0]];
        let mut v = [[0.0; 4]; 4];
        for a in 0..4 {
            for b in 0..4 {
                for r in 0..4 {
                    for s in 0..4 {
                        v[a][b] += bt[a][r] * dtile[r * 4 + s] * bt[b][s];
                    }
                }
            }
        }
        for i in 0..2 {
            for j in 0..2 {
                let mut got = 0.0;
                for a in 0..4 {
                    for b in 0..4 {
                        got += at[i][a] * u[4 * a + b] * v[a][b] * at[j][b];
                    }
                }
                let want: f64 = (0..9).map(|k| g[k] * dtile[(i + k / 3) * 4 + j + k % 3]).sum();
                assert!((got - want).abs() < 1e-14, "({i}, {j}): {got} vs {want}");
            }
        }
    }

    fn pseudo(shape: &[usize], seed: f64) -> Tensor<f64> {
        let n = shape.iter().product();
        let data = (0..n).map(|i| ((i as f64 + seed) * 0.7131).sin()).collect();
        Tensor::new(shape.to_vec(), data).unwrap()
    }

    #[test]
    fn dual_products_equal_the_row_patch_ones_at_every_size_and_chunking() {
        // (images, in, out, h, w): odd and even sizes down to 1×1, and a chunking
        // (16 channels of 8×8: 16 images per chunk) whose last chunk is partial.
        for (b, c, o, h, w) in [
            (37, 16, 5, 8, 8),
            (3, 2, 3, 1, 1),
            (2, 3, 4, 2, 5),
            (5, 4, 4, 7, 3),
            (2, 1, 2, 3, 4),
        ] {
            let g = ConvGeometry { stride: 1, padding: 1 };
            let (x, dx) = (pseudo(&[b, c, h, w], 0.1), pseudo(&[b, c, h, w], 0.2));
            let (wt, dwt) = (pseudo(&[o, c, 3, 3], 0.3), pseudo(&[o, c, 3, 3], 0.4));
            let (gy, dgy) = (pseudo(&[b, o, h, w], 0.5), pseudo(&[b, o, h, w], 0.6));
            let d = Dims::new(x.shape(), wt.shape(), g);
            assert!(applies(&d, g));
            let close = |p: &Tensor<f64>, q: &Tensor<f64>, what: &str| {
                assert_eq!(p.shape(), q.shape(), "{what}");
                let gap = p
                    .data()
                    .iter()
                    .zip(q.data())
                    .map(|(u, v)| (u - v).abs())
                    .fold(0.0, f64::max);
                assert!(gap < 1e-12, "{what} at {b}×{c}→{o}, {h}×{w}: {gap:e}");
            };
            for dxo in [None, Some(&dx)] {
                for dwo in [None, Some(&dwt)] {
                    let (y, dy) = conv_dual(&x, dxo, wt.data(), dwo.map(|t| t.data()), &d);
                    let (y_rows, dy_rows) = super::super::rows::forward_dual(&x, dxo, &wt, dwo, &d, false);
                    close(&y, &y_rows, "forward");
                    assert_eq!(dy.is_some(), dy_rows.is_some());
                    dy.iter()
                        .zip(&dy_rows)
                        .for_each(|(p, q)| close(p, q, "forward tangent"));
                }
            }
            for dgyo in [None, Some(&dgy)] {
                for dwo in [None, Some(&dwt)] {
                    let (gx, dgx) = backward_input_dual(&gy, dgyo, &wt, dwo, &d);
                    let (gx_rows, dgx_rows) = super::super::rows::backward_input_dual(&gy, dgyo, &wt, dwo, &d);
                    close(&gx, &gx_rows, "input gradient");
                    assert_eq!(dgx.is_some(), dgx_rows.is_some());
                    dgx.iter()
                        .zip(&dgx_rows)
                        .for_each(|(p, q)| close(p, q, "input gradient tangent"));
                }
            }
        }
    }

    #[test]
    fn f32_rounding_stays_near_the_direct_products() {
        // Winograd's transforms add a few roundings per output: against an f64
        // reference the f32 error stays within a small multiple of the row-patch one.
        let g = ConvGeometry { stride: 1, padding: 1 };
        let (x, wt) = (pseudo(&[4, 16, 8, 8], 0.7), pseudo(&[16, 16, 3, 3], 0.9));
        let d = Dims::new(x.shape(), wt.shape(), g);
        let exact = conv_dual(&x, None, wt.data(), None, &d).0;
        let to32 =
            |t: &Tensor<f64>| Tensor::new(t.shape().to_vec(), t.data().iter().map(|&v| v as f32).collect()).unwrap();
        let (x32, w32) = (to32(&x), to32(&wt));
        let wino = conv_dual(&x32, None, w32.data(), None, &d).0;
        let rows = super::super::rows::forward_dual(&x32, None, &w32, None, &d, false).0;
        let err = |t: &Tensor<f32>| {
            t.data()
                .iter()
                .zip(exact.data())
                .map(|(&p, q)| (p as f64 - q).abs())
                .fold(0.0, f64::max)
        };
        let scale = exact.data().iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let (e_wino, e_rows) = (err(&wino), err(&rows));
        assert!(
            e_wino < 8.0 * f32::EPSILON as f64 * scale * 12.0,
            "{e_wino:e} of {scale}"
        );
        assert!(
            e_wino < 4.0 * e_rows.max(f32::EPSILON as f64 * scale),
            "{e_wino:e} vs rows {e_rows:e}"
        );
    }

    #[test]
    fn flipped_transposed_is_an_involution_up_to_shape() {
        let w: Vec<f64> = (0..2 * 3 * 9).map(|i| i as f64).collect();
        let f = flipped_transposed(&w, 2, 3);
        assert_eq!(f[0], w[8], "W'[0, 0, 0, 0] = W[0, 0, 2, 2]");
        assert_eq!(flipped_transposed(&f, 3, 2), w);
    }
}
