//! Datasets read from their native formats and streamed in batches: NPY arrays
//! (`--inputs X.npy --labels Y.npy`), MNIST/Fashion-MNIST IDX files (gz or raw)
//! and CIFAR-10 binary batches. Pixels stay bytes in memory and become floats
//! (scaled to [0, 1]) one batch at a time; NPY inputs are read from disk per batch.
//!
//! ```no_run
//! use hvp_data::{open_spec, Batch, Dataset};
//! let ds = open_spec("mnist:data/fashion-mnist-subset:train").unwrap();
//! let mut batch = Batch::default();
//! ds.read(&[0, 1, 2], &mut batch).unwrap();
//! assert_eq!(batch.x.len(), 3 * 28 * 28);
//! ```

mod cifar;
mod error;
mod idx;
mod npy;
mod transform;

pub use cifar::Cifar10;
pub use error::DataError;
pub use idx::Idx;
pub use npy::{npy_bytes, NpyArray, NpyDataset, NpyDtype};
pub use transform::{ClassFilter, InMemory, Limited, Padded, Relabelled, Subset};

use std::path::Path;

/// A batch of examples: inputs flattened row-major (`n × sample size`), class
/// labels, and for regression data the float targets (`n × target width`,
/// row-major; empty for classification data, whose labels are then used).
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub x: Vec<f64>,
    pub labels: Vec<usize>,
    pub targets: Vec<f64>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// A labelled dataset with random access by index.
pub trait Dataset: Send + Sync {
    /// Number of examples.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Shape of one example, e.g. `[1, 28, 28]`.
    fn sample_shape(&self) -> Vec<usize>;
    /// Label of example `i` (0 for regression data).
    fn label(&self, i: usize) -> usize;
    /// For regression data (float targets, `--loss mse`): the number of target
    /// values per example; `None` for class labels.
    fn target_width(&self) -> Option<usize> {
        None
    }
    /// Fills `batch` with the examples at `indices`, in that order. Errors on
    /// unreadable data and on NaN/Inf inputs (naming the example).
    fn read(&self, indices: &[usize], batch: &mut Batch) -> Result<(), DataError>;
    /// Human-readable origin, e.g. `mnist:DIR:train (2000 examples)`.
    fn describe(&self) -> String;
}

/// Opens a dataset given as one string — `mnist:DIR[:train|test]`,
/// `cifar10:DIR[:train|test]` or `npy:INPUTS.npy,LABELS.npy` — zero-padded by
/// `pad` pixels and restricted to `classes` when given: the command line's and
/// the Python package's dataset specs.
pub fn open_dataset(spec: &str, pad: usize, classes: Option<&[usize]>) -> Result<Box<dyn Dataset>, DataError> {
    let ds: Box<dyn Dataset> = match spec.strip_prefix("npy:") {
        Some(pair) => {
            let (x, y) = pair.split_once(',').ok_or_else(|| DataError::Spec {
                spec: spec.to_string(),
                reason: "give npy:INPUTS.npy,LABELS.npy".into(),
            })?;
            Box::new(NpyDataset::open(Path::new(x), Path::new(y))?)
        }
        None => open_spec(spec)?,
    };
    let ds: Box<dyn Dataset> = if pad > 0 { Box::new(Padded::new(ds, pad)?) } else { ds };
    Ok(match classes {
        Some(c) => Box::new(ClassFilter::new(ds, c.to_vec())?),
        None => ds,
    })
}

/// Opens `mnist:DIR[:train|test]` (MNIST or Fashion-MNIST IDX files) or
/// `cifar10:DIR[:train|test]` (CIFAR-10 binary batches).
pub fn open_spec(spec: &str) -> Result<Box<dyn Dataset>, DataError> {
    let bad = |reason: &str| DataError::Spec {
        spec: spec.to_string(),
        reason: reason.to_string(),
    };
    let (kind, rest) = spec
        .split_once(':')
        .ok_or_else(|| bad("expected KIND:DIR[:train|test] with KIND mnist or cifar10"))?;
    let (dir, split) = match rest.rsplit_once(':') {
        Some((d, s)) if s == "train" || s == "test" => (d, s),
        _ => (rest, "train"),
    };
    let train = split == "train";
    match kind {
        "mnist" | "fashion-mnist" => Ok(Box::new(Idx::open(Path::new(dir), train)?)),
        "cifar10" => Ok(Box::new(Cifar10::open(Path::new(dir), train)?)),
        _ => Err(bad("unknown dataset kind; use mnist:DIR or cifar10:DIR")),
    }
}

/// Errors when any label is `>= num_classes`, naming the first such example.
/// Checks that every input value is an integer token id below `vocab`,
/// reading the data once in chunks.
pub fn check_token_ids(ds: &dyn Dataset, vocab: usize) -> Result<(), DataError> {
    const CHUNK: usize = 4096;
    let mut batch = Batch::default();
    let per_example: usize = ds.sample_shape().iter().product();
    for start in (0..ds.len()).step_by(CHUNK) {
        let indices: Vec<usize> = (start..(start + CHUNK).min(ds.len())).collect();
        ds.read(&indices, &mut batch)?;
        let bad = batch
            .x
            .iter()
            .position(|&v| !(v >= 0.0 && v < vocab as f64 && v.fract() == 0.0));
        if let Some(k) = bad {
            return Err(DataError::TokenRange {
                index: start + k / per_example.max(1),
                value: batch.x[k],
                vocab,
            });
        }
    }
    Ok(())
}

pub fn check_labels(ds: &dyn Dataset, num_classes: usize) -> Result<(), DataError> {
    match (0..ds.len()).find(|&i| ds.label(i) >= num_classes) {
        Some(i) => Err(DataError::LabelRange {
            index: i,
            label: ds.label(i),
            classes: num_classes,
        }),
        None => Ok(()),
    }
}
