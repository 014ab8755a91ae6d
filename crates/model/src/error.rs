use std::path::PathBuf;

/// Errors from parsing architectures and reading or writing weights and vectors.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("unknown architecture '{0}': expected resnet-cifar:A,B,C, mlp:D,H1,...,C or logreg:D,C (or resnet-cifar-tanh / mlp-tanh)")]
    UnknownArch(String),
    #[error("bad architecture '{spec}': {reason}")]
    BadArch { spec: String, reason: String },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid safetensors file ({reason}); was it written with safetensors.torch.save_file?")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: tensor '{name}' is missing (the architecture {arch} needs it)")]
    Missing { path: PathBuf, name: String, arch: String },
    #[error("{path}: unexpected tensor '{name}' (not part of {arch}; check `arch`)")]
    Extra { path: PathBuf, name: String, arch: String },
    #[error("{path}: tensor '{name}' has shape {actual:?}, {arch} expects {expected:?}")]
    Shape {
        path: PathBuf,
        name: String,
        actual: Vec<usize>,
        expected: Vec<usize>,
        arch: String,
    },
    #[error("{path}: tensor '{name}' has dtype {dtype}; only F32 and F64 are supported")]
    DType { path: PathBuf, name: String, dtype: String },
    #[error("{path}: tensor '{name}' contains NaN or infinite values")]
    NonFinite { path: PathBuf, name: String },
    #[error(transparent)]
    File(#[from] hvp_io::IoError),
}
