//! The lowering of convolutions to GEMMs: im2col (patch matrices; contiguous
//! row copies for same-size stride-1 layers, the four phase planes of
//! stride-2 layers whose output is half the input, even/odd column phases for
//! other stride-2 ones) and its adjoint col2im.

use super::*;

/// Range of output columns `ox` whose input column `ox·s − p + j` lies inside `[0, w)`.
pub(super) fn valid_range(d: &Dims, g: ConvGeometry, j: usize) -> (usize, usize) {
    let (s, p) = (g.stride, g.padding);
    // ox·s + j ≥ p  ⇔  ox ≥ ceil((p − j) / s)
    let lo = if j >= p { 0 } else { (p - j).div_ceil(s) };
    // ox·s + j − p ≤ w − 1  ⇔  ox ≤ (w − 1 + p − j) / s
    let hi = if d.w + p > j {
        ((d.w - 1 + p - j) / s + 1).min(d.wo)
    } else {
        0
    };
    (lo.min(hi), hi)
}

/// `cols[(c·kh + i)·kw + j, oy·wo + ox] = x[c, oy·s − p + i, ox·s − p + j]` (0 outside).
pub(super) fn im2col<T: Float>(x: &[T], d: &Dims, g: ConvGeometry, cols: &mut [T]) {
    if g.stride == 1 && d.ho == d.h && d.wo == d.w {
        im2col_same(x, d, g.padding, cols)
    } else if halves(d, g) {
        im2col_halving(x, d, g.padding, cols)
    } else {
        im2col_rows(x, d, g, cols)
    }
}

/// Whether a convolution has stride 2 and an output of exactly half the input
/// (rounded up): the ResNet's downsampling 3×3 (padding 1) and 1×1 (padding 0).
/// Then every patch row is one of the input's four phase planes shifted by at
/// most a plane's size, which [`im2col_halving`] copies whole.
pub(super) fn halves(d: &Dims, g: ConvGeometry) -> bool {
    g.stride == 2 && d.ho == d.h.div_ceil(2) && d.wo == d.w.div_ceil(2)
}

/// The four phase planes of a plane `[h, w]`:
/// `phases[2·qy + qx][y, u] = x[2y + qy, 2u + qx]`, each `[⌈h/2⌉, ⌈w/2⌉]`, 0 past
/// the plane's last row or column.
pub(super) fn phase_planes<T: Float>(xc: &[T], h: usize, w: usize, phases: &mut [T]) {
    let (hp, wp) = (h.div_ceil(2), w.div_ceil(2));
    let n = hp * wp;
    for y in 0..2 * hp {
        let (qy, yp) = (y % 2, y / 2);
        let (even, rest) = phases[2 * qy * n..].split_at_mut(n);
        let (e, o) = (&mut even[yp * wp..][..wp], &mut rest[yp * wp..][..wp]);
        if y >= h {
            e.fill(T::ZERO);
            o.fill(T::ZERO);
            continue;
        }
        split_even_odd(&xc[y * w..(y + 1) * w], e, o);
    }
}

/// The adjoint of [`phase_planes`] into a fresh (uninitialised) plane:
/// `x[2y + qy, 2u + qx] = phases[2·qy + qx][y, u]`.
pub(super) fn interleave_phase_planes<T: Float>(phases: &[T], h: usize, w: usize, xc: &mut [MaybeUninit<T>]) {
    let (hp, wp) = (h.div_ceil(2), w.div_ceil(2));
    let n = hp * wp;
    for (y, dst) in xc.chunks_exact_mut(w).enumerate().take(h) {
        let at = 2 * (y % 2) * n + (y / 2) * wp;
        let (e, o) = (&phases[at..at + wp], &phases[at + n..at + n + wp]);
        let half = w / 2;
        let (e_pairs, o_pairs, out) = (&e[..half], &o[..half], &mut dst[..2 * half]);
        // Indexed over slices of exact lengths: no bounds checks, so it vectorises.
        for u in 0..half {
            out[2 * u].write(e_pairs[u]);
            out[2 * u + 1].write(o_pairs[u]);
        }
        if w % 2 == 1 {
            dst[w - 1].write(e[wp - 1]);
        }
    }
}

/// `e[u] = row[2u]`, `o[u] = row[2u + 1]` for one row of length `w`, into
/// slices of `⌈w/2⌉` (`o`'s last entry 0 when `w` is odd).
fn split_even_odd<T: Float>(row: &[T], e: &mut [T], o: &mut [T]) {
    let w = row.len();
    if w % 2 == 1 {
        e[w / 2] = row[w - 1];
        o[w / 2] = T::ZERO;
    }
    let half = w / 2;
    let (e, o, pairs) = (&mut e[..half], &mut o[..half], &row[..2 * half]);
    // Indexed over slices of exact lengths: no bounds checks, so the loop
    // vectorises (the even and odd lanes separated by shuffles).
    for u in 0..half {
        e[u] = pairs[2 * u];
        o[u] = pairs[2 * u + 1];
    }
}

/// Patch row `(i, j)` of a [`halves`] convolution with padding `p`, as a phase
/// plane and a shift within it: input row `2·oy + i − p` is row
/// `oy + ⌊(i − p)/2⌋` of the phase `(i − p) mod 2`, and likewise along columns.
fn halving_shifts(d: &Dims, p: usize) -> Vec<(usize, ShiftedRow)> {
    let (hp, wp) = (d.ho, d.wo);
    (0..d.kh)
        .flat_map(|i| (0..d.kw).map(move |j| (i as isize - p as isize, j as isize - p as isize)))
        .map(|(di, dj)| {
            let phase = (2 * di.rem_euclid(2) + dj.rem_euclid(2)) as usize;
            (
                phase,
                ShiftedRow::with_offset(hp, wp, di.div_euclid(2), dj.div_euclid(2)),
            )
        })
        .collect()
}

/// [`im2col`] of a [`halves`] convolution: each patch row is one contiguous copy
/// of a shifted phase plane (instead of one short gather per output row).
pub(super) fn im2col_halving<T: Float>(x: &[T], d: &Dims, p: usize, cols: &mut [T]) {
    let (plane, n) = (d.h * d.w, d.out_plane());
    let shifts = halving_shifts(d, p);
    let mut phases = vec![T::ZERO; 4 * n];
    for c in 0..d.c {
        phase_planes(&x[c * plane..(c + 1) * plane], d.h, d.w, &mut phases);
        for (ij, (q, r)) in shifts.iter().enumerate() {
            r.fill(
                &mut cols[(c * d.kh * d.kw + ij) * n..][..n],
                &phases[q * n..][..n],
                d.wo,
            );
        }
    }
}

/// [`col2im_into`] of a [`halves`] convolution: each patch row is added to its
/// shifted phase plane in one contiguous loop, then the phases are interleaved
/// into the image (`cols` is scratch: its wrapped entries are zeroed).
fn col2im_halving_into<T: Float>(cols: &mut [T], d: &Dims, p: usize, x: &mut [MaybeUninit<T>]) {
    let (plane, n) = (d.h * d.w, d.out_plane());
    let shifts = halving_shifts(d, p);
    let mut phases = vec![T::ZERO; 4 * n];
    for (c, xc) in x.chunks_mut(plane.max(1)).enumerate().take(d.c) {
        phases.fill(T::ZERO);
        for (ij, (q, r)) in shifts.iter().enumerate() {
            if r.b <= r.a {
                continue;
            }
            let row = &mut cols[(c * d.kh * d.kw + ij) * n..][..n];
            r.zero_wrapped(row, d.wo);
            let dst = q * n + r.source();
            for (acc, &v) in phases[dst..dst + (r.b - r.a)].iter_mut().zip(&row[r.a..r.b]) {
                *acc += v;
            }
        }
        interleave_phase_planes(&phases, d.h, d.w, xc);
    }
}

/// The two column phases of a plane `[h, w]`: `phases[q][y, u] = x[y, 2u + q]`
/// (`[2][h, ⌈w/2⌉]`, the odd phase's last column 0 when `w` is odd), so that a
/// stride-2 gather along a row becomes a contiguous copy.
pub(super) fn column_phases<T: Float>(xc: &[T], h: usize, w: usize, phases: &mut [T]) {
    let wp = w.div_ceil(2);
    let (even, odd) = phases.split_at_mut(h * wp);
    for ((src, e), o) in xc
        .chunks_exact(w)
        .zip(even.chunks_exact_mut(wp))
        .zip(odd.chunks_exact_mut(wp))
    {
        split_even_odd(src, e, o);
    }
}

/// [`im2col`] one output row at a time (any stride and padding; stride 2 reads
/// the input's column phases, so each output row is one contiguous copy).
pub(super) fn im2col_rows<T: Float>(x: &[T], d: &Dims, g: ConvGeometry, cols: &mut [T]) {
    let plane = d.out_plane();
    let (s, p) = (g.stride, g.padding);
    let wp = d.w.div_ceil(2);
    let mut phases = vec![T::ZERO; if s == 2 { 2 * d.h * wp } else { 0 }];
    for c in 0..d.c {
        let xc = &x[c * d.h * d.w..(c + 1) * d.h * d.w];
        if s == 2 {
            column_phases(xc, d.h, d.w, &mut phases);
        }
        for i in 0..d.kh {
            for j in 0..d.kw {
                let row = &mut cols[((c * d.kh + i) * d.kw + j) * plane..][..plane];
                let (lo, hi) = valid_range(d, g, j);
                for oy in 0..d.ho {
                    let iy = (oy * s + i) as isize - p as isize;
                    let dst = &mut row[oy * d.wo..(oy + 1) * d.wo];
                    if iy < 0 || iy >= d.h as isize || lo >= hi {
                        dst.fill(T::ZERO);
                        continue;
                    }
                    let src = &xc[iy as usize * d.w..(iy as usize + 1) * d.w];
                    // At most `p` entries each side: plain stores (a `fill` here is a
                    // memset call per output row, which dominated stride-2 layers).
                    let (left, rest) = dst.split_at_mut(lo);
                    for v in left.iter_mut().chain(rest[hi - lo..].iter_mut()) {
                        *v = T::ZERO;
                    }
                    let first = lo * s + j - p;
                    if s == 1 {
                        dst[lo..hi].copy_from_slice(&src[first..first + (hi - lo)]);
                    } else if s == 2 {
                        // Column `first + 2t` is column `first / 2 + t` of phase `first % 2`.
                        let phase = &phases[(first % 2) * d.h * wp + iy as usize * wp..][..wp];
                        dst[lo..hi].copy_from_slice(&phase[first / 2..first / 2 + (hi - lo)]);
                    } else {
                        // Strided iterator: no bounds check per element.
                        for (v, &x) in dst[lo..hi].iter_mut().zip(src[first..].iter().step_by(s)) {
                            *v = x;
                        }
                    }
                }
            }
        }
    }
}

/// Where patch row `(i, j)` of a stride-1 same-size convolution reads its input:
/// output position `t = oy·w + ox` reads the flat input position `t + off`. Only
/// `t` in `[a, b)` (within the valid rows `[t0, t1)`) is read, and within it the
/// columns outside `[lo, hi)` wrapped around a row edge and read nothing.
pub(super) struct ShiftedRow {
    t0: usize,
    t1: usize,
    a: usize,
    b: usize,
    off: isize,
    lo: usize,
    hi: usize,
}

impl ShiftedRow {
    pub(super) fn new(d: &Dims, p: usize, i: usize, j: usize) -> Self {
        Self::with_offset(d.h, d.w, i as isize - p as isize, j as isize - p as isize)
    }

    /// Output position `(oy, ox)` of an `[h, w]` plane reads input `(oy + di, ox + dj)`.
    fn with_offset(h: usize, w: usize, di: isize, dj: isize) -> Self {
        let (h, w) = (h as isize, w as isize);
        let n = h * w;
        // Output rows whose input row oy + di lies inside the image.
        let oy_lo = (-di).clamp(0, h);
        let oy_hi = (h - di).clamp(oy_lo, h);
        let (t0, t1) = (oy_lo * w, oy_hi * w);
        let off = di * w + dj;
        // Clipped to source positions inside the plane (the clipped ends wrapped).
        let a = t0.max(-off).min(t1);
        let b = t1.min(n - off).max(a);
        Self {
            t0: t0 as usize,
            t1: t1 as usize,
            a: a as usize,
            b: b as usize,
            off,
            lo: (-dj).clamp(0, w) as usize,
            hi: (w - dj).clamp(0, w) as usize,
        }
    }

    /// Zeroes the wrapped columns of `row[t0..t1]`: column by column (at most
    /// `p` on each side), one strided store per line, rather than splitting
    /// every line into its wrapped and kept parts.
    fn zero_wrapped<T: Float>(&self, row: &mut [T], w: usize) {
        if self.lo == 0 && self.hi == w {
            return;
        }
        let lines = &mut row[self.t0..self.t1];
        for col in (0..self.lo).chain(self.hi.max(self.lo)..w) {
            for v in lines.iter_mut().skip(col).step_by(w) {
                *v = T::ZERO;
            }
        }
    }

    /// The rows of every kernel offset `(i, j)`, in patch-row order (they do not
    /// depend on the channel, so they are computed once per image).
    fn all(d: &Dims, p: usize) -> Vec<Self> {
        (0..d.kh)
            .flat_map(|i| (0..d.kw).map(move |j| (i, j)))
            .map(|(i, j)| Self::new(d, p, i, j))
            .collect()
    }

    fn source(&self) -> usize {
        (self.a as isize + self.off) as usize
    }

    /// Writes this shifted copy of the plane `xc` into `row` (one output plane
    /// long): the valid span in one copy, everything else zero.
    pub(super) fn fill<T: Float>(&self, row: &mut [T], xc: &[T], w: usize) {
        row[..self.a].fill(T::ZERO);
        row[self.b..].fill(T::ZERO);
        if self.b > self.a {
            let src = self.source();
            row[self.a..self.b].copy_from_slice(&xc[src..src + (self.b - self.a)]);
        }
        self.zero_wrapped(row, w);
    }
}

/// [`im2col`] for stride 1 and an output as large as the input (3×3 with padding
/// 1, the ResNet's common case): each patch row is the whole input plane shifted
/// by `(i − p)·w + (j − p)`, so it is one contiguous copy, after which the few
/// entries that wrapped around a row edge, and the rows above or below the image,
/// are zeroed — instead of one short copy per output row.
pub(super) fn im2col_same<T: Float>(x: &[T], d: &Dims, p: usize, cols: &mut [T]) {
    let n = d.h * d.w;
    let shifts = ShiftedRow::all(d, p);
    for c in 0..d.c {
        let xc = &x[c * n..(c + 1) * n];
        for (ij, r) in shifts.iter().enumerate() {
            r.fill(&mut cols[(c * d.kh * d.kw + ij) * n..][..n], xc, d.w);
        }
    }
}

/// `x = col2im(cols)`, the adjoint of [`im2col`], into a fresh (uninitialised)
/// image (`cols` is scratch: entries that wrapped around a row edge are zeroed
/// in it). For the same-size convolutions each patch row is added to the
/// shifted plane in one contiguous loop, and the centre row, which covers every
/// pixel unshifted, is written first (no zero-fill); otherwise the image is
/// zeroed and [`col2im_rows_add`] adds into it.
pub(super) fn col2im_into<T: Float>(cols: &mut [T], d: &Dims, g: ConvGeometry, x: &mut [MaybeUninit<T>]) {
    if halves(d, g) {
        return col2im_halving_into(cols, d, g.padding, x);
    }
    if !(g.stride == 1 && d.ho == d.h && d.wo == d.w) {
        x.iter_mut().for_each(|v| {
            v.write(T::ZERO);
        });
        // SAFETY: every element was just written.
        return col2im_rows_add(cols, d, g, unsafe { assume_init_mut(x) });
    }
    let (n, p) = (d.h * d.w, g.padding);
    let centre = p * d.kw + p;
    let shifts = ShiftedRow::all(d, p);
    for (c, xc) in x.chunks_mut(n.max(1)).enumerate().take(d.c) {
        copy_uninit(xc, &cols[(c * d.kh * d.kw + centre) * n..][..n]);
        // SAFETY: the centre row (offset 0, no wrapped entries) wrote all n.
        let xc = unsafe { assume_init_mut(xc) };
        for (ij, r) in shifts.iter().enumerate() {
            let row = &mut cols[(c * d.kh * d.kw + ij) * n..][..n];
            if ij == centre || r.b <= r.a {
                continue;
            }
            r.zero_wrapped(row, d.w);
            let dst = r.source();
            for (acc, &v) in xc[dst..dst + (r.b - r.a)].iter_mut().zip(&row[r.a..r.b]) {
                *acc += v;
            }
        }
    }
}

/// Adjoint of [`im2col`] one output row at a time (any stride and padding): adds
/// each column entry back to the pixel it came from.
pub(super) fn col2im_rows_add<T: Float>(cols: &[T], d: &Dims, g: ConvGeometry, x: &mut [T]) {
    let plane = d.out_plane();
    let (s, p) = (g.stride, g.padding);
    // Stride 2 adds into the column phases (contiguous), interleaved once per channel.
    let wp = d.w.div_ceil(2);
    let mut phases = vec![T::ZERO; if s == 2 { 2 * d.h * wp } else { 0 }];
    for c in 0..d.c {
        let xc = &mut x[c * d.h * d.w..(c + 1) * d.h * d.w];
        phases.fill(T::ZERO);
        for i in 0..d.kh {
            for j in 0..d.kw {
                let row = &cols[((c * d.kh + i) * d.kw + j) * plane..][..plane];
                let (lo, hi) = valid_range(d, g, j);
                if lo >= hi {
                    continue;
                }
                for oy in 0..d.ho {
                    let iy = (oy * s + i) as isize - p as isize;
                    if iy < 0 || iy >= d.h as isize {
                        continue;
                    }
                    let dst = &mut xc[iy as usize * d.w..(iy as usize + 1) * d.w];
                    let src = &row[oy * d.wo + lo..oy * d.wo + hi];
                    let first = lo * s + j - p;
                    if s == 1 {
                        for (a, &b) in dst[first..first + (hi - lo)].iter_mut().zip(src) {
                            *a += b;
                        }
                    } else if s == 2 {
                        let at = (first % 2) * d.h * wp + iy as usize * wp + first / 2;
                        for (a, &b) in phases[at..at + (hi - lo)].iter_mut().zip(src) {
                            *a += b;
                        }
                    } else {
                        for (acc, &v) in dst[first..].iter_mut().step_by(s).zip(src) {
                            *acc += v;
                        }
                    }
                }
            }
        }
        if s == 2 {
            add_column_phases(&phases, d.h, d.w, xc);
        }
    }
}

/// The largest difference between [`col2im_into`] of `rows` and
/// [`col2im_rows_add`] onto zeros (the same sums, perhaps reordered).
#[cfg(test)]
pub(super) fn col2im_paths_differ_by(rows: &mut [f64], d: &Dims, g: ConvGeometry) -> f64 {
    let len = d.c * d.h * d.w;
    let mut zeroed = vec![0.0; len];
    col2im_rows_add(rows, d, g, &mut zeroed);
    let mut fresh = vec![MaybeUninit::<f64>::uninit(); len];
    col2im_into(rows, d, g, &mut fresh);
    // SAFETY: col2im_into writes the whole image.
    let fresh = unsafe { assume_init_mut(&mut fresh) };
    fresh
        .iter()
        .zip(&zeroed)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
}

/// The adjoint of [`column_phases`]: `x[y, 2u + q] += phases[q][y, u]`.
pub(super) fn add_column_phases<T: Float>(phases: &[T], h: usize, w: usize, xc: &mut [T]) {
    let wp = w.div_ceil(2);
    let (even, odd) = phases.split_at(h * wp);
    for ((dst, e), o) in xc
        .chunks_exact_mut(w)
        .zip(even.chunks_exact(wp))
        .zip(odd.chunks_exact(wp))
    {
        let mut pairs = dst.chunks_exact_mut(2);
        for ((pair, &pe), &po) in pairs.by_ref().zip(e).zip(o) {
            pair[0] += pe;
            pair[1] += po;
        }
        if let [last] = pairs.into_remainder() {
            *last += e[wp - 1];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halving_im2col_and_col2im_equal_the_row_by_row_ones() {
        // Odd and even sizes, single rows and columns, rows long enough for the
        // vectorised even/odd split; kernels 3 (padding 1), 1 (padding 0) and
        // 5 (padding 2) halve every size.
        let mut checked = 0;
        for (h, w) in [
            (8, 8),
            (7, 6),
            (6, 7),
            (1, 1),
            (1, 5),
            (5, 1),
            (2, 3),
            (9, 9),
            (32, 32),
            (5, 67),
        ] {
            for (k, p) in [(3, 1), (1, 0), (5, 2)] {
                let g = ConvGeometry { stride: 2, padding: p };
                let d = Dims::new(&[1, 2, h, w], &[1, 2, k, k], g);
                assert!(halves(&d, g), "{h}x{w}, kernel {k}, padding {p}");
                let x: Vec<f64> = (0..2 * h * w).map(|i| (i as f64 * 0.37).sin()).collect();
                let len = d.patch() * d.out_plane();
                let (mut want, mut got) = (vec![f64::NAN; len], vec![f64::NAN; len]);
                im2col_rows(&x, &d, g, &mut want);
                im2col_halving(&x, &d, p, &mut got);
                assert_eq!(got, want, "im2col {h}x{w}, kernel {k}, padding {p}");
                let mut rows: Vec<f64> = (0..len).map(|i| (i as f64 * 0.91).cos()).collect();
                let gap = col2im_paths_differ_by(&mut rows, &d, g);
                assert!(gap < 1e-12, "col2im {h}x{w}, kernel {k}, padding {p}: {gap:e}");
                checked += 1;
            }
        }
        assert_eq!(checked, 30);
        // A shrinking stride-2 output is not a halving one.
        let g = ConvGeometry { stride: 2, padding: 0 };
        assert!(!halves(&Dims::new(&[1, 1, 8, 8], &[1, 1, 3, 3], g), g));
    }

    #[test]
    fn column_phases_and_their_adjoint_at_every_width() {
        // Widths below, at and past the 8-pair blocks, odd and even.
        for w in 1..=37usize {
            let h = 3;
            let x: Vec<f64> = (0..h * w).map(|i| i as f64 * 0.5 + 1.0).collect();
            let wp = w.div_ceil(2);
            let mut phases = vec![f64::NAN; 2 * h * wp];
            column_phases(&x, h, w, &mut phases);
            for y in 0..h {
                for u in 0..wp {
                    for q in 0..2 {
                        let want = if 2 * u + q < w { x[y * w + 2 * u + q] } else { 0.0 };
                        assert_eq!(phases[q * h * wp + y * wp + u], want, "w={w} ({y}, {u}, {q})");
                    }
                }
            }
            // ⟨phases(x), p⟩ = ⟨x, add_phases(p)⟩ (adding onto ones adds).
            let p: Vec<f64> = (0..2 * h * wp).map(|i| (i as f64 * 0.7).sin()).collect();
            let mut back = vec![1.0; h * w];
            add_column_phases(&p, h, w, &mut back);
            let lhs: f64 = phases.iter().zip(&p).map(|(a, b)| a * b).sum();
            let rhs: f64 = x.iter().zip(&back).map(|(a, b)| a * (b - 1.0)).sum();
            assert!((lhs - rhs).abs() < 1e-9, "w={w}: {lhs} vs {rhs}");
        }
    }
}
