//! Matrix products through the `gemm` crate (runtime-dispatched SIMD kernels).

use crate::{Float, Tensor};
use gemm::Parallelism;

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
    assert_eq!(a.len(), m * k, "gemm: lhs has {} elements, expected {m}x{k}", a.len());
    assert_eq!(b.len(), k * n, "gemm: rhs has {} elements, expected {k}x{n}", b.len());
    assert_eq!(c.len(), m * n, "gemm: dst has {} elements, expected {m}x{n}", c.len());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(T::ZERO);
        }
        return;
    }
    // Row-major strides: element (i, j) of an r×c matrix is at i*c + j.
    let (a_rs, a_cs) = if trans_a { (1, m as isize) } else { (k as isize, 1) };
    let (b_rs, b_cs) = if trans_b { (1, k as isize) } else { (n as isize, 1) };
    // SAFETY: the pointers cover exactly the asserted m×k, k×n and m×n extents with
    // the strides above, `c` is borrowed mutably and does not alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
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
