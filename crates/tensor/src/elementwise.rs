//! Elementwise maps and reductions over whole tensors.

use crate::{Float, Tensor};
use rayon::prelude::*;

/// Below this many elements a map runs on one thread (rayon overhead dominates).
const PAR_MIN: usize = 1 << 15;

// Outputs are collected, not zero-filled and then overwritten: rayon's indexed
// collect writes straight into the new vector.
fn zip_map<T: Float>(a: &Tensor<T>, b: &Tensor<T>, f: impl Fn(T, T) -> T + Sync) -> Tensor<T> {
    assert_eq!(a.shape(), b.shape(), "elementwise: shapes differ");
    let data: Vec<T> = if a.numel() >= PAR_MIN {
        a.data()
            .par_iter()
            .zip(b.data().par_iter())
            .map(|(&x, &y)| f(x, y))
            .collect()
    } else {
        a.data().iter().zip(b.data()).map(|(&x, &y)| f(x, y)).collect()
    };
    Tensor::new(a.shape().to_vec(), data).expect("same length as the input")
}

/// Applies `f` to every element.
pub fn map<T: Float>(a: &Tensor<T>, f: impl Fn(T) -> T + Sync) -> Tensor<T> {
    let data: Vec<T> = if a.numel() >= PAR_MIN {
        a.data().par_iter().map(|&x| f(x)).collect()
    } else {
        a.data().iter().map(|&x| f(x)).collect()
    };
    Tensor::new(a.shape().to_vec(), data).expect("same length as the input")
}

pub fn add<T: Float>(a: &Tensor<T>, b: &Tensor<T>) -> Tensor<T> {
    zip_map(a, b, |x, y| x + y)
}

pub fn sub<T: Float>(a: &Tensor<T>, b: &Tensor<T>) -> Tensor<T> {
    zip_map(a, b, |x, y| x - y)
}

pub fn mul<T: Float>(a: &Tensor<T>, b: &Tensor<T>) -> Tensor<T> {
    zip_map(a, b, |x, y| x * y)
}

pub fn scale<T: Float>(a: &Tensor<T>, s: T) -> Tensor<T> {
    map(a, |x| x * s)
}

/// `max(a + b, 0)` in one pass (a residual sum followed by its ReLU).
pub fn add_relu<T: Float>(a: &Tensor<T>, b: &Tensor<T>) -> Tensor<T> {
    zip_map(a, b, |x, y| {
        let s = x + y;
        if s > T::ZERO {
            s
        } else {
            T::ZERO
        }
    })
}

/// The JVP of [`add_relu`] in one pass, `1[y > 0]·(ȧ + ḃ)` with `y` its output.
pub fn add_relu_tangent<T: Float>(y: &Tensor<T>, da: &Tensor<T>, db: &Tensor<T>) -> Tensor<T> {
    assert_eq!(y.shape(), da.shape(), "add_relu_tangent: shapes differ");
    assert_eq!(y.shape(), db.shape(), "add_relu_tangent: shapes differ");
    let f = |((&m, &p), &q): ((&T, &T), &T)| if m > T::ZERO { p + q } else { T::ZERO };
    let data: Vec<T> = if y.numel() >= PAR_MIN {
        y.data()
            .par_iter()
            .zip(da.data().par_iter())
            .zip(db.data().par_iter())
            .map(f)
            .collect()
    } else {
        y.data().iter().zip(da.data()).zip(db.data()).map(f).collect()
    };
    Tensor::new(y.shape().to_vec(), data).expect("same length as the input")
}

/// `a += b`, in place.
pub fn add_assign<T: Float>(a: &mut Tensor<T>, b: &Tensor<T>) {
    assert_eq!(a.shape(), b.shape(), "add_assign: shapes differ");
    if a.numel() >= PAR_MIN {
        a.data_mut()
            .par_iter_mut()
            .zip(b.data().par_iter())
            .for_each(|(x, &y)| *x += y);
    } else {
        a.data_mut().iter_mut().zip(b.data()).for_each(|(x, &y)| *x += y);
    }
}

/// `max(x, 0)`.
pub fn relu<T: Float>(x: &Tensor<T>) -> Tensor<T> {
    map(x, |v| if v > T::ZERO { v } else { T::ZERO })
}

/// `g · 1[x > 0]`: the ReLU's derivative (0 at the kink, as PyTorch) applied to `g`.
pub fn relu_mask<T: Float>(x: &Tensor<T>, g: &Tensor<T>) -> Tensor<T> {
    zip_map(x, g, |xv, gv| if xv > T::ZERO { gv } else { T::ZERO })
}

/// [`relu_mask`] in place: `g ← g · 1[x > 0]`, for a cotangent no one else holds
/// (no new buffer to allocate and fault in).
pub fn relu_mask_in_place<T: Float>(x: &Tensor<T>, g: &mut Tensor<T>) {
    assert_eq!(x.shape(), g.shape(), "relu_mask_in_place: shapes differ");
    // As `relu_mask`: kept only where `m > 0` (a NaN `m` masks too).
    let f = |(v, &m): (&mut T, &T)| {
        *v = if m > T::ZERO { *v } else { T::ZERO };
    };
    if g.numel() >= PAR_MIN {
        g.data_mut().par_iter_mut().zip(x.data().par_iter()).for_each(f);
    } else {
        g.data_mut().iter_mut().zip(x.data()).for_each(f);
    }
}

/// Sum of all elements, accumulated in f64.
pub fn sum_f64<T: Float>(a: &Tensor<T>) -> f64 {
    a.data().iter().map(|v| v.to_f64()).sum()
}

/// `⟨a, b⟩` accumulated in f64.
pub fn dot_f64<T: Float>(a: &Tensor<T>, b: &Tensor<T>) -> f64 {
    assert_eq!(a.numel(), b.numel(), "dot: lengths differ");
    a.data()
        .iter()
        .zip(b.data())
        .map(|(x, y)| x.to_f64() * y.to_f64())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_add_relu_equals_add_then_relu_bit_for_bit() {
        let t = |seed: f32| Tensor::new(vec![3, 5], (0..15).map(|i| (i as f32 * 0.9 + seed).sin()).collect()).unwrap();
        let (a, b, da, db) = (t(0.1), t(2.0), t(4.0), t(6.0));
        let y = add_relu(&a, &b);
        assert_eq!(y, relu(&add(&a, &b)));
        assert!(y.data().contains(&0.0) && y.data().iter().any(|&v| v > 0.0));
        assert_eq!(add_relu_tangent(&y, &da, &db), relu_mask(&y, &add(&da, &db)));
    }

    #[test]
    fn relu_mask_in_place_equals_relu_mask() {
        let x = Tensor::new(vec![6], vec![1.0f32, 0.0, -0.0, -2.0, f32::NAN, 3.0]).unwrap();
        let g = Tensor::new(vec![6], vec![0.5f32, 2.0, 3.0, 4.0, 5.0, f32::NAN]).unwrap();
        let want = relu_mask(&x, &g);
        let mut got = g.clone();
        relu_mask_in_place(&x, &mut got);
        let bits = |t: &Tensor<f32>| t.data().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want));
        assert_eq!(got.data()[..5], [0.5, 0.0, 0.0, 0.0, 0.0]);
        // Past the parallel threshold too.
        let n = PAR_MIN + 3;
        let x = Tensor::new(vec![n], (0..n).map(|i| (i as f32 * 0.37).sin()).collect()).unwrap();
        let g = Tensor::new(vec![n], (0..n).map(|i| i as f32).collect()).unwrap();
        let mut got = g.clone();
        relu_mask_in_place(&x, &mut got);
        assert_eq!(got, relu_mask(&x, &g));
    }
}
