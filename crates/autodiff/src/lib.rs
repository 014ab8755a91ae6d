//! Differentiable primitives and the three ways hvp differentiates with them.
//!
//! Every primitive (in [`primitives`]) is written once, generically over a
//! [`Value`]: its forward rule and its VJP rule sit side by side and use only the
//! value operations `linear`, `bilinear` and `nonlinear`, whose implementation for
//! [`Dual`] numbers is where each JVP rule lives (product rule for bilinear maps,
//! the map itself for linear ones, an explicit derivative for the rest).
//!
//! * reverse mode: [`Graph::forward`] on plain tensors records the tape (the value
//!   of every node), [`Graph::backward`] replays it backwards → gradient;
//! * forward mode: [`Graph::forward`] on [`Dual`]s (parameters carrying a tangent
//!   `v`) → JVPs, e.g. of the logits;
//! * forward-over-reverse: the same taped forward pass on `Dual`s, then the
//!   *same* backward pass on `Dual`s; the gradient's tangent is `H v`
//!   (Pearlmutter 1994). No graph of the backward pass is ever built.
//!
//! ```
//! use hvp_autodiff::{op, Dual, Graph, Value, loss};
//! use hvp_tensor::Tensor;
//! // logits = x Wᵀ for one example with 2 features and 2 classes.
//! let mut g = Graph::new();
//! let x = g.input();
//! let _y = g.push(op::Dense { input: x, weight: 0, bias: None });
//! let w = Tensor::new(vec![2, 2], vec![0.5, -0.5, 0.25, 1.0]).unwrap();
//! let v = Tensor::new(vec![2, 2], vec![1.0, 0.0, 0.0, 0.0]).unwrap();
//! let input = Tensor::new(vec![1, 2], vec![1.0, 2.0]).unwrap();
//! let params = [Dual::new(w, Some(v))];
//! let tape = g.forward(&params, &[], Dual::constant(input));
//! let out = loss::softmax_cross_entropy(tape.output(), &[1], 1.0);
//! let grads = g.backward(&params, &[], tape, out.cotangent);
//! let hv = grads[0].as_ref().unwrap().tangent().unwrap(); // (H v) for the weight
//! assert_eq!(hv.shape(), &[2, 2]);
//! ```

mod graph;
pub mod loss;
pub mod primitives;
mod value;

pub use graph::{
    op, resolve_shape, BatchNormUpdate, Dim, FrozenSplit, Graph, LayerObserver, NodeId, Op, ParamRefs, Rule, Tape,
};
pub use value::{Dual, DualKernel, TangentKernel, Value};
