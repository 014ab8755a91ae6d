use std::path::PathBuf;

/// Errors reading datasets.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("bad dataset spec '{spec}': {reason}")]
    Spec { spec: String, reason: String },
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("{path} is truncated: {reason}")]
    Truncated { path: PathBuf, reason: String },
    #[error("input example {index} contains NaN or infinite values; clean the data before computing curvature")]
    NonFinite { index: usize },
    #[error("label {label} of example {index} is out of range: the model has {classes} classes (labels 0..{classes})")]
    LabelRange { index: usize, label: usize, classes: usize },
    #[error(
        "input value {value} of example {index} is not a token id of the model: its embedding has {vocab} rows \
         (ids 0..{vocab})"
    )]
    TokenRange { index: usize, value: f64, vocab: usize },
    #[error("{0}")]
    Mismatch(String),
    #[error(transparent)]
    File(#[from] hvp_io::IoError),
}

impl DataError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
