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
