//! The differentiable primitives. Each module holds one primitive's forward rule
//! and VJP rule, both generic over [`Value`](crate::Value) so that they also run
//! on dual numbers (their JVP rule) — which is what makes forward-over-reverse
//! work without a graph of the backward pass.
//!
//! Conventions: activations are `[B, ...]` with the batch first; images are NCHW;
//! weights use PyTorch's layouts (`Linear`: `[out, in]`, `Conv2d`: `[O, C, kh, kw]`).

pub mod activation;
pub mod batchnorm;
pub mod conv2d;
pub mod dense;
pub mod nd;
pub mod normalize;
pub mod structural;
