//! The graph's operations, one [`Rule`](super::rule::Rule) type each: its
//! operands, forward rule and VJP rule together. A new operation is a rule type
//! in one of these files and its name in the list below.

mod arithmetic;
mod indexing;
mod layers;
mod pointwise;
mod structure;

pub use arithmetic::{Add, Arith, MatMul};
pub use indexing::{Embedding, Expand, Select, Where};
pub use layers::{
    BatchNorm, BatchNormNode, BatchNormStats, Conv2d, ConvNode, Dense, GroupedConv, Normalize, TokenDense,
};
pub use pointwise::{Pointwise, Relu, Softmax, Tanh};
pub use structure::{
    AvgPool, Concat, Constant, Flatten, GlobalAvgPool, Input, MaxPool, Param, ReduceMean, Reshape, Transpose,
};

use super::rule::{operations, Backward, Cotangents, Forward, ParamRefs, Rule};
use super::NodeId;
use crate::Value;
use hvp_tensor::Float;

operations! {
    Input,
    Dense,
    Conv2d,
    BatchNorm,
    Relu,
    Tanh,
    Add,
    GlobalAvgPool,
    AvgPool,
    Flatten,
    Param,
    Constant,
    ConvNode,
    BatchNormNode,
    Pointwise,
    Arith,
    MatMul,
    Softmax,
    MaxPool,
    ReduceMean,
    Reshape,
    Transpose,
    Concat,
    Select,
    Embedding,
    Where,
    Expand,
    GroupedConv,
    TokenDense,
    Normalize,
}
