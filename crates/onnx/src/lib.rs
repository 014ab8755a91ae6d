//! ONNX import: a graph exported from PyTorch (either exporter) becomes an hvp
//! [`Model`] built from hvp's differentiable primitives, so gradients, Hessian
//! and GGN products, solvers, influence and K-FAC work on it exactly as on the
//! built-in architectures.
//!
//! * `proto`: the ONNX protobuf messages (prost);
//! * `constant`: load-time tensors (initializers, `Constant` nodes, shape
//!   arithmetic with a symbolic batch size) and their folding;
//! * `import`: the translation of nodes into graph operations, with every
//!   shape inferred at load time so that evaluation cannot fail later.
//!
//! Trainable parameters are the float initializers that some operator
//! differentiates through (any input but shapes, axes, indices, exponents and
//! bounds), except BatchNorm running statistics (buffers); a glob may restrict
//! them. An operator that would need a derivative hvp cannot take with respect
//! to a parameter is refused by name.

mod constant;
mod import;
pub mod proto;

use hvp_model::{Model, Weights};
use std::path::{Path, PathBuf};

pub use import::{InitializerInfo, Role, SUPPORTED_OPS};

/// Why an ONNX file could not be imported.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "{path} is not a valid ONNX model ({reason}); is the file complete and was it written by torch.onnx.export?"
    )]
    Decode { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Model { path: PathBuf, reason: String },
    #[error("{path}: node '{node}' ({op}): {reason}")]
    Node {
        path: PathBuf,
        node: String,
        op: String,
        reason: String,
    },
    #[error(
        "{path}: {count} operator type(s) hvp does not support, listed with their nodes: {ops}. Supported: {supported}"
    )]
    UnsupportedOps {
        path: PathBuf,
        count: usize,
        /// `Op ×n (node names)`, one entry per operator type, in first-use order.
        ops: String,
        supported: String,
        /// Every initializer with the role it would have, for `hvp params`.
        initializers: Vec<InitializerInfo>,
    },
    #[error("{path}: node '{node}' uses operator '{op}'{domain}, which hvp does not support; supported: {supported}")]
    Unsupported {
        path: PathBuf,
        node: String,
        op: String,
        domain: String,
        supported: String,
    },
    #[error("{path}: node '{node}' ({op}): dynamic shape hvp cannot resolve: {reason}; export with a fixed example shape (only the batch dimension may vary)")]
    Dynamic {
        path: PathBuf,
        node: String,
        op: String,
        reason: String,
    },
    #[error("{path}: node '{node}' ({op}) reads '{name}', which is neither the graph input, an initializer nor an earlier node's output (missing initializer?)")]
    MissingValue {
        path: PathBuf,
        node: String,
        op: String,
        name: String,
    },
    #[error("`params` '{glob}' matches none of the model's trainable parameters: {available}")]
    NoParams { glob: String, available: String },
    #[error("`params` '{glob}' is not a valid glob: {reason}")]
    BadGlob { glob: String, reason: String },
    #[error(transparent)]
    Weights(#[from] hvp_model::ModelError),
    #[error(transparent)]
    File(#[from] hvp_io::IoError),
}

/// How to import.
#[derive(Clone, Debug, Default)]
pub struct ImportOptions {
    /// Only parameters whose names match this glob are trainable (e.g. `fc.*`);
    /// the others become constants. Several globs are separated by commas
    /// (`layer3.*,fc.*`); a glob written `!glob` excludes what it matches
    /// (`!*bn*`: every parameter but those).
    pub params_glob: Option<String>,
}

/// An imported model with its weights (from the initializers), and notes for
/// the user (e.g. BatchNorm folded into convolutions by the exporter).
pub struct Imported {
    pub model: Model,
    pub weights: Weights,
    pub warnings: Vec<String>,
    /// Every trainable candidate before `--params` (name, shape), for `hvp params`.
    pub candidates: Vec<(String, Vec<usize>)>,
    /// Every initializer with its role (parameter, frozen, buffer, constant) and why.
    pub initializers: Vec<InitializerInfo>,
}

/// Reads and imports the ONNX model at `path`.
pub fn load(path: &Path, options: &ImportOptions) -> Result<Imported, OnnxError> {
    // Protocol buffers cannot exceed 2 GiB; larger weights live in external data files.
    let bytes = hvp_io::read::read_bounded(path, 2 << 30, "an ONNX model")?;
    import::import(path, &bytes, options)
}
