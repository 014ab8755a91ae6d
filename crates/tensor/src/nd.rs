//! N-dimensional kernels for imported graphs: numpy-style broadcasting, axis
//! reductions, permutations, concatenation, softmax, batched matrix products and
//! max pooling with recorded argmax positions. Shapes are validated by the caller
//! (the ONNX importer infers every shape at load time), so mismatches here are bugs.

use crate::linalg::{gemm_into, Par};
use crate::{Float, Tensor};

/// Row-major strides of `shape`.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// The numpy broadcast of two shapes, or `None` when they are incompatible.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for (i, o) in out.iter_mut().enumerate() {
        let da = if i + a.len() >= n { a[i + a.len() - n] } else { 1 };
        let db = if i + b.len() >= n { b[i + b.len() - n] } else { 1 };
        *o = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        };
    }
    Some(out)
}

/// Strides with which `shape` (right-aligned) is read when broadcast to `out`:
/// 0 along broadcast dimensions.
fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let own = strides(shape);
    let offset = out.len() - shape.len();
    (0..out.len())
        .map(|i| {
            if i < offset || shape[i - offset] == 1 {
                0
            } else {
                own[i - offset]
            }
        })
        .collect()
}

/// `shape` and its stride vectors with size-1 dimensions dropped and
/// neighbouring dimensions merged wherever every operand steps through them
/// as through one (so the innermost run is as long as the layouts allow).
fn coalesce<const K: usize>(shape: &[usize], st: [&[usize]; K]) -> (Vec<usize>, [Vec<usize>; K]) {
    let mut dims: Vec<usize> = Vec::with_capacity(shape.len());
    let mut strides: [Vec<usize>; K] = std::array::from_fn(|_| Vec::with_capacity(shape.len()));
    for d in 0..shape.len() {
        if shape[d] == 1 {
            continue;
        }
        let merges = !dims.is_empty() && (0..K).all(|k| strides[k][dims.len() - 1] == st[k][d] * shape[d]);
        if merges {
            let last = dims.len() - 1;
            dims[last] *= shape[d];
            for k in 0..K {
                strides[k][last] = st[k][d];
            }
        } else {
            dims.push(shape[d]);
            for k in 0..K {
                strides[k].push(st[k][d]);
            }
        }
    }
    (dims, strides)
}

/// Visits `shape` in row-major order one innermost run at a time:
/// `f(offsets, run length, the operands' strides along the run)`.
fn for_each_run<const K: usize>(shape: &[usize], st: [&[usize]; K], mut f: impl FnMut([usize; K], usize, [usize; K])) {
    if shape.contains(&0) {
        return;
    }
    let (dims, strides) = coalesce(shape, st);
    let Some((&len, outer)) = dims.split_last() else {
        f([0; K], 1, [0; K]);
        return;
    };
    let inner: [usize; K] = std::array::from_fn(|k| strides[k][dims.len() - 1]);
    let runs: usize = outer.iter().product();
    let mut index = vec![0usize; outer.len()];
    let mut offs = [0usize; K];
    for _ in 0..runs {
        f(offs, len, inner);
        for d in (0..outer.len()).rev() {
            index[d] += 1;
            for k in 0..K {
                offs[k] += strides[k][d];
            }
            if index[d] < outer[d] {
                break;
            }
            for k in 0..K {
                offs[k] -= strides[k][d] * outer[d];
            }
            index[d] = 0;
        }
    }
}

/// `x` broadcast to `shape`.
pub fn expand<T: Float>(x: &Tensor<T>, shape: &[usize]) -> Tensor<T> {
    if x.shape() == shape {
        return x.clone();
    }
    let st = broadcast_strides(x.shape(), shape);
    let src = x.data();
    let mut data = Vec::with_capacity(shape.iter().product());
    for_each_run(shape, [&st], |[o], len, [s]| match s {
        0 => data.extend(std::iter::repeat_n(src[o], len)),
        1 => data.extend_from_slice(&src[o..o + len]),
        _ => data.extend((0..len).map(|i| src[o + i * s])),
    });
    Tensor::new(shape.to_vec(), data).expect("broadcast length")
}

/// The adjoint of [`expand`]: sums `x` (of a broadcast shape) down to `shape`.
pub fn reduce_to<T: Float>(x: &Tensor<T>, shape: &[usize]) -> Tensor<T> {
    if x.shape() == shape {
        return x.clone();
    }
    let st = broadcast_strides(shape, x.shape());
    let own = strides(x.shape());
    let mut out = Tensor::zeros(shape);
    let (dst, src) = (out.data_mut(), x.data());
    for_each_run(x.shape(), [&st, &own], |[o, i], len, [s, _]| {
        let run = &src[i..i + len];
        match s {
            0 => dst[o] += run.iter().fold(T::ZERO, |acc, &v| acc + v),
            1 => dst[o..o + len].iter_mut().zip(run).for_each(|(d, &v)| *d += v),
            _ => run.iter().enumerate().for_each(|(k, &v)| dst[o + k * s] += v),
        }
    });
    out
}

/// `f(a, b)` elementwise with broadcasting to `out_shape`.
pub fn zip_broadcast<T: Float>(a: &Tensor<T>, b: &Tensor<T>, out_shape: &[usize], f: impl Fn(T, T) -> T) -> Tensor<T> {
    let (sa, sb) = (
        broadcast_strides(a.shape(), out_shape),
        broadcast_strides(b.shape(), out_shape),
    );
    let (da, db) = (a.data(), b.data());
    let mut data = Vec::with_capacity(out_shape.iter().product());
    for_each_run(out_shape, [&sa, &sb], |[i, j], len, [si, sj]| match (si, sj) {
        (1, 1) => data.extend(da[i..i + len].iter().zip(&db[j..j + len]).map(|(&x, &y)| f(x, y))),
        (1, 0) => data.extend(da[i..i + len].iter().map(|&x| f(x, db[j]))),
        (0, 1) => data.extend(db[j..j + len].iter().map(|&y| f(da[i], y))),
        _ => data.extend((0..len).map(|k| f(da[i + k * si], db[j + k * sj]))),
    });
    Tensor::new(out_shape.to_vec(), data).expect("broadcast length")
}

/// Sum over `axes` (sorted, distinct), keeping them as size-1 dimensions.
pub fn sum_axes_keep<T: Float>(x: &Tensor<T>, axes: &[usize]) -> Tensor<T> {
    let shape: Vec<usize> = x
        .shape()
        .iter()
        .enumerate()
        .map(|(i, &d)| if axes.contains(&i) { 1 } else { d })
        .collect();
    reduce_to(x, &shape)
}

/// `x` with its dimensions permuted: output dimension `i` is input dimension `perm[i]`.
pub fn permute<T: Float>(x: &Tensor<T>, perm: &[usize]) -> Tensor<T> {
    let own = strides(x.shape());
    let shape: Vec<usize> = perm.iter().map(|&p| x.shape()[p]).collect();
    let st: Vec<usize> = perm.iter().map(|&p| own[p]).collect();
    let src = x.data();
    let mut data = Vec::with_capacity(x.numel());
    for_each_run(&shape, [&st], |[o], len, [s]| match s {
        1 => data.extend_from_slice(&src[o..o + len]),
        _ => data.extend((0..len).map(|i| src[o + i * s])),
    });
    Tensor::new(shape, data).expect("permutation keeps the length")
}

/// The inverse permutation of `perm`.
pub fn inverse_permutation(perm: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inv[p] = i;
    }
    inv
}

/// `(outer, n, inner)` sizes around `axis`.
fn around(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (
        shape[..axis].iter().product(),
        shape[axis],
        shape[axis + 1..].iter().product(),
    )
}

/// Copies `x` into `out` at offset `start` along `axis` (`out`'s other dimensions
/// equal `x`'s).
pub fn place_along<T: Float>(x: &Tensor<T>, out_shape: &[usize], axis: usize, start: usize) -> Tensor<T> {
    let mut out = Tensor::zeros(out_shape);
    let (outer, n, inner) = around(x.shape(), axis);
    let big = out_shape[axis];
    let dst = out.data_mut();
    for o in 0..outer {
        let from = &x.data()[o * n * inner..(o + 1) * n * inner];
        dst[(o * big + start) * inner..(o * big + start + n) * inner].copy_from_slice(from);
    }
    out
}

/// The slice `[start, start + len)` of `x` along `axis`.
pub fn slice_along<T: Float>(x: &Tensor<T>, axis: usize, start: usize, len: usize) -> Tensor<T> {
    let (outer, big, inner) = around(x.shape(), axis);
    let mut shape = x.shape().to_vec();
    shape[axis] = len;
    let mut data = Vec::with_capacity(outer * len * inner);
    for o in 0..outer {
        data.extend_from_slice(&x.data()[(o * big + start) * inner..(o * big + start + len) * inner]);
    }
    Tensor::new(shape, data).expect("slice length")
}

/// The entries of `x` at positions `indices` along `axis` (any order, repeats
/// allowed): slices with steps, gathers with fixed indices, embedding lookups.
pub fn index_select<T: Float>(x: &Tensor<T>, axis: usize, indices: &[usize]) -> Tensor<T> {
    let (outer, big, inner) = around(x.shape(), axis);
    let mut shape = x.shape().to_vec();
    shape[axis] = indices.len();
    let mut data = Vec::with_capacity(outer * indices.len() * inner);
    for o in 0..outer {
        for &i in indices {
            data.extend_from_slice(&x.data()[(o * big + i) * inner..(o * big + i + 1) * inner]);
        }
    }
    Tensor::new(shape, data).expect("selection length")
}

/// The adjoint of [`index_select`]: `g` added into zeros of length `len` along
/// `axis` at `indices` (repeated indices accumulate).
pub fn index_add<T: Float>(g: &Tensor<T>, axis: usize, indices: &[usize], len: usize) -> Tensor<T> {
    let (outer, n, inner) = around(g.shape(), axis);
    let mut shape = g.shape().to_vec();
    shape[axis] = len;
    let mut out = Tensor::zeros(&shape);
    let dst = out.data_mut();
    for o in 0..outer {
        for (k, &i) in indices.iter().enumerate().take(n) {
            let from = &g.data()[(o * n + k) * inner..(o * n + k + 1) * inner];
            for (d, &v) in dst[(o * len + i) * inner..(o * len + i + 1) * inner]
                .iter_mut()
                .zip(from)
            {
                *d += v;
            }
        }
    }
    out
}

/// `x` broadcast to `shape`, kept where `mask` (0/1 values broadcast to
/// `shape`) equals `keep` and exactly zero elsewhere: one side of a `Where`.
pub fn masked<T: Float>(x: &Tensor<T>, mask: &Tensor<T>, keep: bool, shape: &[usize]) -> Tensor<T> {
    let mut out = expand(x, shape);
    let m = expand(mask, shape);
    for (o, &b) in out.data_mut().iter_mut().zip(m.data()) {
        if (b != T::ZERO) != keep {
            *o = T::ZERO;
        }
    }
    out
}

/// Softmax along `axis` (max-shifted).
pub fn softmax<T: Float>(x: &Tensor<T>, axis: usize) -> Tensor<T> {
    let (outer, n, inner) = around(x.shape(), axis);
    let mut out = x.clone();
    let d = out.data_mut();
    for o in 0..outer {
        for i in 0..inner {
            let at = |k: usize| (o * n + k) * inner + i;
            let m = (0..n).map(|k| d[at(k)]).fold(d[at(0)], |a, b| a.max(b));
            let mut sum = T::ZERO;
            for k in 0..n {
                let e = (d[at(k)] - m).exp();
                d[at(k)] = e;
                sum += e;
            }
            for k in 0..n {
                d[at(k)] = d[at(k)] / sum;
            }
        }
    }
    out
}

/// Log-softmax along `axis`.
pub fn log_softmax<T: Float>(x: &Tensor<T>, axis: usize) -> Tensor<T> {
    let (outer, n, inner) = around(x.shape(), axis);
    let mut out = x.clone();
    let d = out.data_mut();
    for o in 0..outer {
        for i in 0..inner {
            let at = |k: usize| (o * n + k) * inner + i;
            let m = (0..n).map(|k| d[at(k)]).fold(d[at(0)], |a, b| a.max(b));
            let lse = m + (0..n).map(|k| (d[at(k)] - m).exp()).sum::<T>().ln();
            for k in 0..n {
                d[at(k)] -= lse;
            }
        }
    }
    out
}

/// Batched matrix product `a · b` (optionally with `b` transposed in its last
/// two dimensions): `a [..., m, k]` with `b [k, n]` (shared by every leading
/// index) or `b [..., k, n]` with the same leading dimensions.
pub fn matmul<T: Float>(a: &Tensor<T>, b: &Tensor<T>, trans_b: bool) -> Tensor<T> {
    let (ar, br) = (a.shape().len(), b.shape().len());
    let (m, k) = (a.shape()[ar - 2], a.shape()[ar - 1]);
    let n = if trans_b { b.shape()[br - 2] } else { b.shape()[br - 1] };
    let lead: usize = a.shape()[..ar - 2].iter().product();
    let mut shape = a.shape()[..ar - 1].to_vec();
    shape.push(n);
    let mut out = Tensor::zeros(&shape);
    if br == 2 {
        gemm_into(
            out.data_mut(),
            a.data(),
            false,
            b.data(),
            trans_b,
            lead * m,
            n,
            k,
            false,
            Par::Pool,
        );
    } else {
        for l in 0..lead {
            gemm_into(
                &mut out.data_mut()[l * m * n..(l + 1) * m * n],
                &a.data()[l * m * k..(l + 1) * m * k],
                false,
                &b.data()[l * k * n..(l + 1) * k * n],
                trans_b,
                m,
                n,
                k,
                false,
                Par::Pool,
            );
        }
    }
    out
}

/// `aᵀ · g` for the weight side of [`matmul`]: with a 2-D `b` of shape `b_shape`
/// the leading dimensions are summed (`[k, n]`), otherwise per leading index.
pub fn matmul_weight_grad<T: Float>(a: &Tensor<T>, g: &Tensor<T>, b_shape: &[usize], trans_b: bool) -> Tensor<T> {
    let ar = a.shape().len();
    let (m, k) = (a.shape()[ar - 2], a.shape()[ar - 1]);
    let n = g.shape()[g.shape().len() - 1];
    let lead: usize = a.shape()[..ar - 2].iter().product();
    let mut out = Tensor::zeros(b_shape);
    let step = |c: &mut [T], a: &[T], g: &[T], rows: usize| {
        if trans_b {
            // b is [n, k]: gb = gᵀ a.
            gemm_into(c, g, true, a, false, n, k, rows, true, Par::Pool);
        } else {
            gemm_into(c, a, true, g, false, k, n, rows, true, Par::Pool);
        }
    };
    if b_shape.len() == 2 {
        step(out.data_mut(), a.data(), g.data(), lead * m);
    } else {
        for l in 0..lead {
            step(
                &mut out.data_mut()[l * k * n..(l + 1) * k * n],
                &a.data()[l * m * k..(l + 1) * m * k],
                &g.data()[l * m * n..(l + 1) * m * n],
                m,
            );
        }
    }
    out
}

/// 2-D max-pooling geometry (NCHW): kernel, stride, padding before and after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxPoolGeometry {
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub pad_begin: [usize; 2],
    pub pad_end: [usize; 2],
}

impl MaxPoolGeometry {
    /// Output height and width for an `h × w` input (floor mode).
    pub fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        let o = |x: usize, i: usize| (x + self.pad_begin[i] + self.pad_end[i] - self.kernel[i]) / self.stride[i] + 1;
        (o(h, 0), o(w, 1))
    }
}

/// For each output of max pooling `x` (NCHW), the flat index in `x` of the
/// window's maximum (the first one on ties, as PyTorch). Padding never wins.
pub fn max_pool_argmax<T: Float>(x: &Tensor<T>, g: MaxPoolGeometry) -> (Vec<usize>, [usize; 4]) {
    let (b, c, h, w) = x.dims4();
    let (ho, wo) = g.out_hw(h, w);
    let xd = x.data();
    let mut idx = Vec::with_capacity(b * c * ho * wo);
    for plane in 0..b * c {
        let base = plane * h * w;
        for oy in 0..ho {
            for ox in 0..wo {
                let mut best: Option<(usize, T)> = None;
                for ky in 0..g.kernel[0] {
                    let y = (oy * g.stride[0] + ky) as isize - g.pad_begin[0] as isize;
                    if y < 0 || y >= h as isize {
                        continue;
                    }
                    for kx in 0..g.kernel[1] {
                        let xx = (ox * g.stride[1] + kx) as isize - g.pad_begin[1] as isize;
                        if xx < 0 || xx >= w as isize {
                            continue;
                        }
                        let at = base + y as usize * w + xx as usize;
                        let v = xd[at];
                        // NaN propagates as PyTorch does: a NaN always wins.
                        if best.is_none_or(|(_, bv)| v > bv || v.to_f64().is_nan()) {
                            best = Some((at, v));
                        }
                    }
                }
                idx.push(best.map_or(base, |(at, _)| at));
            }
        }
    }
    (idx, [b, c, ho, wo])
}

/// `x` gathered at flat `indices` into `shape`.
pub fn gather_flat<T: Float>(x: &Tensor<T>, indices: &[usize], shape: &[usize]) -> Tensor<T> {
    let d = x.data();
    Tensor::new(shape.to_vec(), indices.iter().map(|&i| d[i]).collect()).expect("gather length")
}

/// The adjoint of [`gather_flat`]: `g` scattered (added) into zeros of `shape`.
pub fn scatter_add_flat<T: Float>(g: &Tensor<T>, indices: &[usize], shape: &[usize]) -> Tensor<T> {
    let mut out = Tensor::zeros(shape);
    let d = out.data_mut();
    for (&i, &v) in indices.iter().zip(g.data()) {
        d[i] += v;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], data: Vec<f64>) -> Tensor<f64> {
        Tensor::new(shape.to_vec(), data).unwrap()
    }

    #[test]
    fn index_add_is_the_adjoint_of_index_select() {
        let x = t(&[2, 4, 3], (0..24).map(|v| v as f64 * 0.5 - 3.0).collect());
        let idx = [3, 0, 3, 2];
        let y = index_select(&x, 1, &idx);
        assert_eq!(y.shape(), &[2, 4, 3]);
        assert_eq!(y.data()[..3], x.data()[9..12]);
        let g = t(&[2, 4, 3], (0..24).map(|v| ((v * 7) % 5) as f64 - 2.0).collect());
        let back = index_add(&g, 1, &idx, 4);
        let dot = |a: &Tensor<f64>, b: &Tensor<f64>| a.data().iter().zip(b.data()).map(|(p, q)| p * q).sum::<f64>();
        assert!((dot(&y, &g) - dot(&x, &back)).abs() < 1e-12);
    }

    #[test]
    fn masked_keeps_one_side_and_zeroes_the_other_exactly() {
        let x = t(&[1, 3], vec![f64::NEG_INFINITY, 2.0, 3.0]);
        let m = t(&[2, 1], vec![1.0, 0.0]);
        let keep = masked(&x, &m, true, &[2, 3]);
        assert_eq!(keep.data()[3..], [0.0, 0.0, 0.0]);
        assert_eq!(keep.data()[1..3], [2.0, 3.0]);
        let other = masked(&x, &m, false, &[2, 3]);
        assert_eq!(other.data()[..3], [0.0, 0.0, 0.0]);
        assert!(other.data()[3].is_infinite());
    }

    /// The run-wise kernels against element-by-element definitions, on shapes
    /// whose broadcast and permuted dimensions merge in different ways.
    #[test]
    fn run_wise_kernels_equal_their_elementwise_definitions() {
        let index_of = |shape: &[usize], mut flat: usize| {
            let mut idx = vec![0; shape.len()];
            for d in (0..shape.len()).rev() {
                idx[d] = flat % shape[d];
                flat /= shape[d];
            }
            idx
        };
        let at = |t: &Tensor<f64>, idx: &[usize]| {
            // Right-aligned broadcast read.
            let s = t.shape();
            let off = idx.len() - s.len();
            let st = strides(s);
            (0..s.len())
                .map(|d| if s[d] == 1 { 0 } else { idx[off + d] * st[d] })
                .sum::<usize>()
        };
        let cases: [(&[usize], &[usize], &[usize]); 5] = [
            (&[2, 3, 4], &[4], &[2, 3, 4]),
            (&[2, 1, 4], &[3, 1], &[2, 3, 4]),
            (&[1, 5, 1, 3], &[2, 5, 4, 1], &[2, 5, 4, 3]),
            (&[6], &[2, 1, 6], &[2, 1, 6]),
            (&[], &[3, 2], &[3, 2]),
        ];
        for (sa, sb, out) in cases {
            let a = t(
                sa,
                (0..sa.iter().product::<usize>())
                    .map(|v| v as f64 * 0.5 - 1.0)
                    .collect(),
            );
            let b = t(
                sb,
                (0..sb.iter().product::<usize>()).map(|v| (v * 7 % 5) as f64).collect(),
            );
            let z = zip_broadcast(&a, &b, out, |x, y| x * 10.0 + y);
            let e = expand(&a, out);
            let total: usize = out.iter().product();
            let mut reduced = vec![0.0; b.numel()];
            for k in 0..total {
                let idx = index_of(out, k);
                let (x, y) = (a.data()[at(&a, &idx)], b.data()[at(&b, &idx)]);
                assert_eq!(z.data()[k], x * 10.0 + y, "{sa:?} {sb:?} at {idx:?}");
                assert_eq!(e.data()[k], x);
                reduced[at(&b, &idx)] += z.data()[k];
            }
            assert_eq!(reduce_to(&z, sb).data(), reduced.as_slice(), "{sb:?}");
        }
        let x = t(&[2, 3, 1, 4], (0..24).map(|v| v as f64).collect());
        for perm in [[0, 2, 1, 3], [3, 1, 0, 2], [1, 0, 2, 3]] {
            let y = permute(&x, &perm);
            for k in 0..24 {
                let idx = index_of(y.shape(), k);
                let mut src = [0; 4];
                for (i, &p) in perm.iter().enumerate() {
                    src[p] = idx[i];
                }
                assert_eq!(y.data()[k], x.data()[at(&x, &src)], "{perm:?}");
            }
        }
    }

    #[test]
    fn broadcasting_follows_numpy() {
        assert_eq!(broadcast_shape(&[2, 1, 3], &[4, 1]), Some(vec![2, 4, 3]));
        assert_eq!(broadcast_shape(&[3], &[2, 3]), Some(vec![2, 3]));
        assert_eq!(broadcast_shape(&[2], &[3]), None);
        let a = t(&[2, 1], vec![1.0, 2.0]);
        let b = t(&[3], vec![10.0, 20.0, 30.0]);
        let c = zip_broadcast(&a, &b, &[2, 3], |x, y| x + y);
        assert_eq!(c.data(), &[11.0, 21.0, 31.0, 12.0, 22.0, 32.0]);
        assert_eq!(expand(&a, &[2, 3]).data(), &[1.0, 1.0, 1.0, 2.0, 2.0, 2.0]);
        assert_eq!(reduce_to(&c, &[3]).data(), &[23.0, 43.0, 63.0]);
        assert_eq!(reduce_to(&c, &[2, 1]).data(), &[63.0, 66.0]);
    }

    #[test]
    fn reduce_to_is_the_adjoint_of_expand() {
        let x = t(&[3, 1], vec![0.5, -1.0, 2.0]);
        let g = t(&[2, 3, 4], (0..24).map(|i| (i as f64 * 0.7).sin()).collect());
        let lhs: f64 = expand(&x, &[2, 3, 4])
            .data()
            .iter()
            .zip(g.data())
            .map(|(a, b)| a * b)
            .sum();
        let rhs: f64 = reduce_to(&g, &[3, 1])
            .data()
            .iter()
            .zip(x.data())
            .map(|(a, b)| a * b)
            .sum();
        assert!((lhs - rhs).abs() < 1e-12);
    }

    #[test]
    fn permute_and_inverse() {
        let x = t(&[2, 3, 4], (0..24).map(f64::from).collect());
        let y = permute(&x, &[2, 0, 1]);
        assert_eq!(y.shape(), &[4, 2, 3]);
        assert_eq!(y.data()[1], 4.0); // y[0,0,1] = x[0,1,0]
        assert_eq!(permute(&y, &inverse_permutation(&[2, 0, 1])), x);
    }

    #[test]
    fn place_and_slice_invert_each_other() {
        let x = t(&[2, 2, 3], (0..12).map(f64::from).collect());
        let big = place_along(&x, &[2, 5, 3], 1, 2);
        assert_eq!(slice_along(&big, 1, 2, 2), x);
        assert_eq!(slice_along(&big, 1, 0, 2).data().iter().sum::<f64>(), 0.0);
    }

    #[test]
    fn softmax_rows_sum_to_one_and_log_softmax_matches() {
        let x = t(&[2, 3], vec![1.0, 2.0, 3.0, -1.0, 0.0, 1000.0]);
        let s = softmax(&x, 1);
        assert!((s.data()[..3].iter().sum::<f64>() - 1.0).abs() < 1e-15);
        let l = log_softmax(&x, 1);
        for (a, b) in s.data().iter().zip(l.data()) {
            assert!((a.ln() - b).abs() < 1e-12 || *a == 0.0);
        }
        let s0 = softmax(&x, 0);
        assert!((s0.data()[0] + s0.data()[3] - 1.0).abs() < 1e-15);
    }

    #[test]
    fn matmul_shared_and_batched_and_weight_grad() {
        let a = t(&[2, 2, 3], (0..12).map(|i| i as f64 * 0.5).collect());
        let b = t(&[3, 2], vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
        let c = matmul(&a, &b, false);
        assert_eq!(c.shape(), &[2, 2, 2]);
        assert_eq!(&c.data()[..2], &[0.0 + 1.0, 0.5 + 1.0]);
        let bt = permute(&b, &[1, 0]);
        assert_eq!(matmul(&a, &bt, true), c);
        // <a·b, g> = <b, aᵀ g> summed over the batch.
        let g = t(&[2, 2, 2], (0..8).map(|i| (i as f64).cos()).collect());
        let gb = matmul_weight_grad(&a, &g, &[3, 2], false);
        let lhs: f64 = c.data().iter().zip(g.data()).map(|(x, y)| x * y).sum();
        let rhs: f64 = gb.data().iter().zip(b.data()).map(|(x, y)| x * y).sum();
        assert!((lhs - rhs).abs() < 1e-12);
        let gbt = matmul_weight_grad(&a, &g, &[2, 3], true);
        assert_eq!(gbt, permute(&gb, &[1, 0]));
    }

    #[test]
    fn max_pool_picks_window_maxima_with_padding() {
        let x = t(&[1, 1, 3, 3], vec![1.0, 5.0, 2.0, 0.0, 3.0, 4.0, 9.0, -1.0, 6.0]);
        let g = MaxPoolGeometry {
            kernel: [2, 2],
            stride: [2, 2],
            pad_begin: [1, 1],
            pad_end: [0, 0],
        };
        let (idx, shape) = max_pool_argmax(&x, g);
        assert_eq!(shape, [1, 1, 2, 2]);
        assert_eq!(gather_flat(&x, &idx, &shape).data(), &[1.0, 5.0, 9.0, 6.0]);
    }
}
