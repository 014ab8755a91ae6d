//! Matrix products through the `gemm` crate (runtime-dispatched SIMD kernels),
//! or oneDNN's sgemm for f32 when it is installed (see [`crate::onednn`]).

use crate::onednn::{self, GemmBackend};
use crate::{DType, Float, Tensor};
use gemm::Parallelism;
use std::mem::MaybeUninit;

/// Whether a GEMM may use the rayon pool itself. Kernels that already run one
/// GEMM per rayon task pass `Serial` to avoid oversubscription.
#[derive(Clone, Copy, Debug)]
pub enum Par {
    Serial,
    Pool,
}

impl Par {
    fn to_gemm(self) -> Parallelism {
        match self {
            Par::Serial => Parallelism::None,
            Par::Pool if rayon::current_num_threads() > 1 => Parallelism::Rayon(rayon::current_num_threads()),
            Par::Pool => Parallelism::None,
        }
    }
}

/// `c = beta_c * c + op(a) · op(b)` on raw row-major slices, where `op(a)` is
/// `m×k` (stored `m×k`, or `k×m` when `trans_a`) and `op(b)` is `k×n` (stored `k×n`,
/// or `n×k` when `trans_b`); `c` is `m×n`. With `accumulate` the product is added
/// to `c`, otherwise `c` is overwritten.
#[allow(clippy::too_many_arguments)]
pub fn gemm_into<T: Float>(
    c: &mut [T],
    a: &[T],
    trans_a: bool,
    b: &[T],
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
    par: Par,
) {
    check_extents(c.len(), a.len(), b.len(), m, n, k);
    let ld = RowStrides::packed(trans_a, trans_b, m, n, k);
    gemm_strided_into(c, a, trans_a, b, trans_b, m, n, k, ld, accumulate, par);
}

/// Row strides (elements from one stored row to the next) of a GEMM's operands,
/// for views into larger buffers (a window of columns of a wider matrix).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowStrides {
    pub a: usize,
    pub b: usize,
    pub c: usize,
}

impl RowStrides {
    /// The strides of contiguous operands (what [`gemm_into`] assumes).
    pub fn packed(trans_a: bool, trans_b: bool, m: usize, n: usize, k: usize) -> Self {
        RowStrides {
            a: if trans_a { m } else { k },
            b: if trans_b { k } else { n },
            c: n,
        }
    }
}

/// [`gemm_into`] on strided operands: stored row `r` of `a` starts at `r · ld.a`
/// (likewise `b`, `c`), so each slice needs `(rows − 1)·ld + cols` elements.
#[allow(clippy::too_many_arguments)]
pub fn gemm_strided_into<T: Float>(
    c: &mut [T],
    a: &[T],
    trans_a: bool,
    b: &[T],
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    ld: RowStrides,
    accumulate: bool,
    par: Par,
) {
    check_views((c.len(), a.len(), b.len()), trans_a, trans_b, m, n, k, ld);
    dispatch(
        c.as_mut_ptr(),
        c.len(),
        a,
        trans_a,
        b,
        trans_b,
        m,
        n,
        k,
        ld,
        accumulate,
        par,
    );
}

/// [`gemm_strided_into`] without accumulating, into a destination that need
/// not be initialised: both backends write every entry of the `m × n` view
/// without reading it (BLAS semantics of β = 0), so a fresh output buffer
/// need not be zeroed first. Returns the view's rows as initialised values
/// when they cover `c` whole (row stride `n`, `m · n == c.len()`).
#[allow(clippy::too_many_arguments)]
pub fn gemm_strided_overwrite<'c, T: Float>(
    c: &'c mut [MaybeUninit<T>],
    a: &[T],
    trans_a: bool,
    b: &[T],
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    ld: RowStrides,
    par: Par,
) -> Option<&'c mut [T]> {
    check_views((c.len(), a.len(), b.len()), trans_a, trans_b, m, n, k, ld);
    // `MaybeUninit<T>` has `T`'s layout; the kernels only write through it.
    dispatch(
        c.as_mut_ptr() as *mut T,
        c.len(),
        a,
        trans_a,
        b,
        trans_b,
        m,
        n,
        k,
        ld,
        false,
        par,
    );
    let whole = (ld.c == n || m <= 1) && m * n == c.len();
    // SAFETY: the GEMM wrote all `m × n` entries of the view (k = 0 writes
    // zeros), which here is every element of `c`.
    whole.then(|| unsafe { std::slice::from_raw_parts_mut(c.as_mut_ptr() as *mut T, c.len()) })
}

/// [`check_view`] of a GEMM's three operands (lengths of `c`, `a`, `b`).
#[allow(clippy::too_many_arguments)]
fn check_views(
    (c, a, b): (usize, usize, usize),
    trans_a: bool,
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    ld: RowStrides,
) {
    let stored = |trans: bool, rows: usize, cols: usize| if trans { (cols, rows) } else { (rows, cols) };
    check_view("lhs", a, stored(trans_a, m, k), ld.a);
    check_view("rhs", b, stored(trans_b, k, n), ld.b);
    check_view("dst", c, (m, n), ld.c);
}

/// Panics (a caller bug) when a `rows × cols` view at row stride `ld` does not fit.
fn check_view(what: &str, len: usize, (rows, cols): (usize, usize), ld: usize) {
    assert!(cols <= ld || rows <= 1, "gemm: {what} row stride {ld} < {cols} columns");
    let need = if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * ld + cols
    };
    assert!(
        len >= need,
        "gemm: {what} has {len} elements, a {rows}x{cols} view at stride {ld} needs {need}"
    );
}

/// The GEMM on `c_len` elements at `c` (valid for writes; read only when
/// `accumulate`), with the views already checked.
#[allow(clippy::too_many_arguments)]
fn dispatch<T: Float>(
    c: *mut T,
    c_len: usize,
    a: &[T],
    trans_a: bool,
    b: &[T],
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    ld: RowStrides,
    accumulate: bool,
    par: Par,
) {
    if T::DTYPE == DType::F32 && m > 0 && n > 0 && k > 0 {
        if let Some(lib) = onednn::library() {
            onednn_f32(lib, c, a, trans_a, b, trans_b, m, n, k, ld, accumulate, par);
            return;
        }
    }
    rust_gemm(c, c_len, a, trans_a, b, trans_b, m, n, k, ld, accumulate, par);
}

/// Panics (a caller bug, not bad input) when the slices do not hold m×k, k×n, m×n.
fn check_extents(c: usize, a: usize, b: usize, m: usize, n: usize, k: usize) {
    assert_eq!(a, m * k, "gemm: lhs has {a} elements, expected {m}x{k}");
    assert_eq!(b, k * n, "gemm: rhs has {b} elements, expected {k}x{n}");
    assert_eq!(c, m * n, "gemm: dst has {c} elements, expected {m}x{n}");
}

/// [`gemm_into`] on an explicitly chosen backend (to compare the two); `None`
/// when oneDNN is asked for but not installed, or `T` is not `f32`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_into_backend<T: Float>(
    backend: GemmBackend,
    c: &mut [T],
    a: &[T],
    trans_a: bool,
    b: &[T],
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
    par: Par,
) -> Option<()> {
    check_extents(c.len(), a.len(), b.len(), m, n, k);
    let ld = RowStrides::packed(trans_a, trans_b, m, n, k);
    match backend {
        GemmBackend::Rust => rust_gemm(
            c.as_mut_ptr(),
            c.len(),
            a,
            trans_a,
            b,
            trans_b,
            m,
            n,
            k,
            ld,
            accumulate,
            par,
        ),
        GemmBackend::OneDnn => {
            let lib = onednn::loaded()?;
            if T::DTYPE != DType::F32 || m == 0 || n == 0 || k == 0 {
                return None;
            }
            onednn_f32(
                lib,
                c.as_mut_ptr(),
                a,
                trans_a,
                b,
                trans_b,
                m,
                n,
                k,
                ld,
                accumulate,
                par,
            );
        }
    }
    Some(())
}

#[allow(clippy::too_many_arguments)]
fn onednn_f32<T: Float>(
    lib: &onednn::OneDnn,
    c: *mut T,
    a: &[T],
    trans_a: bool,
    b: &[T],
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    ld: RowStrides,
    accumulate: bool,
    par: Par,
) {
    assert_eq!(T::DTYPE, DType::F32, "oneDNN path is f32 only");
    let threads = match par {
        Par::Serial => 1,
        Par::Pool => rayon::current_num_threads(),
    };
    // SAFETY: `T` is `f32` (asserted through its DTYPE), so the slices are
    // reinterpreted as themselves.
    let (c, a, b) = unsafe {
        (
            c as *mut f32,
            std::slice::from_raw_parts(a.as_ptr() as *const f32, a.len()),
            std::slice::from_raw_parts(b.as_ptr() as *const f32, b.len()),
        )
    };
    lib.sgemm(
        c, ld.c, a, ld.a, trans_a, b, ld.b, trans_b, m, n, k, accumulate, threads,
    );
}

#[allow(clippy::too_many_arguments)]
fn rust_gemm<T: Float>(
    c: *mut T,
    c_len: usize,
    a: &[T],
    trans_a: bool,
    b: &[T],
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    ld: RowStrides,
    accumulate: bool,
    par: Par,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                let row = r * ld.c;
                assert!(row + n <= c_len, "gemm: dst view outside its {c_len} elements");
                // SAFETY: within the checked view; written, never read.
                (0..n).for_each(|j| unsafe { c.add(row + j).write(T::ZERO) });
            }
        }
        return;
    }
    // (row, column) strides of op(a), op(b): stored row r starts at r·ld.
    let (a_rs, a_cs) = if trans_a {
        (1, ld.a as isize)
    } else {
        (ld.a as isize, 1)
    };
    let (b_rs, b_cs) = if trans_b {
        (1, ld.b as isize)
    } else {
        (ld.b as isize, 1)
    };
    // SAFETY: the callers checked that the slices cover the m×k, k×n and m×n
    // views at these strides; `c` is valid for writes (read only when
    // `accumulate`) and does not alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            ld.c as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            par.to_gemm(),
        );
    }
}

/// `op(a) · op(b)` for 2-D tensors (tensors with more dimensions are viewed as
/// `dim0 × rest`).
pub fn matmul<T: Float>(a: &Tensor<T>, trans_a: bool, b: &Tensor<T>, trans_b: bool) -> Tensor<T> {
    matmul_with(a, trans_a, b, trans_b, Par::Pool)
}

/// [`matmul`] with explicit parallelism (`Par::Serial` inside rayon tasks).
pub fn matmul_with<T: Float>(a: &Tensor<T>, trans_a: bool, b: &Tensor<T>, trans_b: bool, par: Par) -> Tensor<T> {
    let (ar, ac) = a.rows_cols();
    let (br, bc) = b.rows_cols();
    let (m, k) = if trans_a { (ac, ar) } else { (ar, ac) };
    let (kb, n) = if trans_b { (bc, br) } else { (br, bc) };
    assert_eq!(
        k,
        kb,
        "matmul: inner dimensions differ ({:?} vs {:?})",
        a.shape(),
        b.shape()
    );
    let mut c = Tensor::zeros(&[m, n]);
    gemm_into(c.data_mut(), a.data(), trans_a, b.data(), trans_b, m, n, k, false, par);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f64], b: &[f64], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    fn transpose(a: &[f64], r: usize, c: usize) -> Vec<f64> {
        let mut t = vec![0.0; r * c];
        for i in 0..r {
            for j in 0..c {
                t[j * r + i] = a[i * c + j];
            }
        }
        t
    }

    /// oneDNN and the Rust kernels agree to f32 rounding on the shapes the
    /// convolutions produce, in every orientation, overwriting and accumulating.
    /// Skipped (with a message) where oneDNN is not installed, unless
    /// `HVP_REQUIRE_ONEDNN=1` (set by `.ci/run`, which installs it).
    #[test]
    fn onednn_matches_rust_gemm() {
        if onednn::loaded().is_none() {
            assert!(
                std::env::var("HVP_REQUIRE_ONEDNN").as_deref() != Ok("1"),
                "HVP_REQUIRE_ONEDNN=1 but oneDNN is not loadable: {}",
                onednn::gemm_backend().1
            );
            eprintln!("oneDNN not installed; skipping the comparison");
            return;
        }
        for &(m, n, k) in &[
            (16, 1024, 144),
            (144, 1024, 16),
            (64, 64, 576),
            (1, 10, 64),
            (7, 5, 9),
            (10, 1, 3),
        ] {
            let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.91).cos()).collect();
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                for accumulate in [false, true] {
                    for par in [Par::Serial, Par::Pool] {
                        let start: Vec<f32> = (0..m * n).map(|i| (i % 7) as f32).collect();
                        let (mut want, mut got) = (start.clone(), start);
                        gemm_into_backend(GemmBackend::Rust, &mut want, &a, ta, &b, tb, m, n, k, accumulate, par);
                        gemm_into_backend(GemmBackend::OneDnn, &mut got, &a, ta, &b, tb, m, n, k, accumulate, par)
                            .expect("oneDNN loaded");
                        for (x, y) in got.iter().zip(&want) {
                            // Sums of k products of magnitude <= 1: rounding grows like k·eps.
                            assert!(
                                (x - y).abs() <= 1e-6 * k as f32 + 1e-6 * y.abs(),
                                "{m}x{n}x{k} ta={ta} tb={tb} acc={accumulate}: {x} vs {y}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Windows into wider buffers (row stride = columns + 3) give the packed
    /// product, in every orientation, on the backend in use (oneDNN where
    /// installed), and leave the destination's gap columns untouched.
    #[test]
    fn strided_views_equal_packed_operands() {
        let (m, n, k, gap) = (6, 9, 5, 3);
        let widen = |v: &[f32], rows: usize, cols: usize| -> Vec<f32> {
            let mut out = vec![f32::NAN; rows * (cols + gap)];
            for r in 0..rows {
                out[r * (cols + gap)..][..cols].copy_from_slice(&v[r * cols..][..cols]);
            }
            out
        };
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.91).cos()).collect();
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let (ar, ac) = if ta { (k, m) } else { (m, k) };
            let (br, bc) = if tb { (n, k) } else { (k, n) };
            for accumulate in [false, true] {
                let mut want: Vec<f32> = (0..m * n).map(|i| (i % 5) as f32).collect();
                let mut got = widen(&want, m, n);
                gemm_into(&mut want, &a[..], ta, &b[..], tb, m, n, k, accumulate, Par::Serial);
                let ld = RowStrides {
                    a: ac + gap,
                    b: bc + gap,
                    c: n + gap,
                };
                let (wa, wb) = (widen(&a, ar, ac), widen(&b, br, bc));
                gemm_strided_into(&mut got, &wa, ta, &wb, tb, m, n, k, ld, accumulate, Par::Serial);
                for r in 0..m {
                    for j in 0..n + gap {
                        let x = got[r * (n + gap) + j];
                        if j < n {
                            let y = want[r * n + j];
                            assert!((x - y).abs() <= 1e-5, "ta={ta} tb={tb} acc={accumulate}: {x} vs {y}");
                        } else {
                            assert!(x.is_nan(), "gap column written");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn products_without_accumulating_never_read_the_destination() {
        // `gemm_strided_overwrite` writes into uninitialised buffers on the
        // strength of this: a destination full of NaN must not leak into C.
        let (m, n, k) = (13, 17, 9);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut want = vec![0.0f32; m * n];
        gemm_into_backend(
            GemmBackend::Rust,
            &mut want,
            &a,
            false,
            &b,
            false,
            m,
            n,
            k,
            false,
            Par::Serial,
        );
        for backend in [GemmBackend::Rust, GemmBackend::OneDnn] {
            for par in [Par::Serial, Par::Pool] {
                let mut got = vec![f32::NAN; m * n];
                if gemm_into_backend(backend, &mut got, &a, false, &b, false, m, n, k, false, par).is_none() {
                    continue; // oneDNN not installed here
                }
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{backend:?}: {g} vs {w}");
                }
            }
        }
        let mut out = vec![MaybeUninit::new(f32::NAN); m * n];
        let ld = RowStrides::packed(false, false, m, n, k);
        let got = gemm_strided_overwrite(&mut out, &a, false, &b, false, m, n, k, ld, Par::Serial).expect("whole");
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{g} vs {w}");
        }
        // A view that leaves elements of the buffer unwritten is not handed back.
        let mut wide = vec![MaybeUninit::new(0.0f32); m * (n + 1)];
        let ld = RowStrides { c: n + 1, ..ld };
        assert!(gemm_strided_overwrite(&mut wide, &a, false, &b, false, m, n, k, ld, Par::Serial).is_none());
    }

    #[test]
    fn all_transpose_combinations_match_naive_product() {
        let (m, n, k) = (7, 5, 9);
        let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..k * n).map(|i| (i as f64 * 0.91).cos()).collect();
        let want = naive(&a, &b, m, n, k);
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let aa = if ta { transpose(&a, m, k) } else { a.clone() };
            let bb = if tb { transpose(&b, k, n) } else { b.clone() };
            let mut c = vec![1.0; m * n];
            gemm_into(&mut c, &aa, ta, &bb, tb, m, n, k, true, Par::Pool);
            for (x, y) in c.iter().zip(&want) {
                assert!((x - 1.0 - y).abs() < 1e-12, "ta={ta} tb={tb}: {x} vs {y}");
            }
        }
    }
}
