//! Dense, contiguous, row-major `f32`/`f64` CPU tensors and the kernels hvp's
//! autodiff layer is built on: GEMM (through the `gemm` crate), 2-D convolution by
//! im2col + GEMM with both backward forms, pooling, per-channel operations,
//! reductions and elementwise maps, parallel with rayon.
//!
//! ```
//! use hvp_tensor::{Tensor, linalg};
//! let a = Tensor::<f64>::new(vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
//! let b = Tensor::<f64>::new(vec![2, 1], vec![1.0, 1.0]).unwrap();
//! let c = linalg::matmul(&a, false, &b, false);
//! assert_eq!(c.data(), &[3.0, 7.0]);
//! ```
//!
//! Kernels assert their shape preconditions: shapes coming from users are checked
//! one layer up (the model loader), so a failed assertion here is a bug in hvp.

pub mod channel;
pub mod conv;
pub mod elementwise;
mod float;
pub mod linalg;
pub mod nd;
pub mod onednn;
pub mod pool;
mod tensor;

pub use float::{DType, Float};
pub use tensor::{Tensor, TensorError};

/// Number of rayon worker threads in the current pool (what `--threads` set).
pub fn threads() -> usize {
    rayon::current_num_threads()
}
