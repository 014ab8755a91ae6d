//! `Data`: examples from numpy arrays (read in place) or from a dataset spec.

use crate::errors::bad_input;
use hvp_data::{Batch, DataError, Dataset, Limited};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::sync::Arc;

/// A dataset: inputs with class labels or regression targets.
#[pyclass(module = "hvp._native", frozen)]
pub struct Data {
    pub data: Arc<dyn Dataset>,
}

/// Inputs in a C-contiguous float32 or float64 numpy array, read in place (one
/// batch at a time, as every dataset is read) while `owner` keeps it alive.
struct ArrayData {
    address: usize,
    n: usize,
    sample_shape: Vec<usize>,
    row: usize,
    float64: bool,
    labels: Vec<usize>,
    targets: Option<(Vec<f64>, usize)>,
    _owner: Py<PyAny>,
}

impl ArrayData {
    fn row_values(&self, i: usize, out: &mut Vec<f64>) {
        let start = i * self.row;
        // SAFETY: `address` is the start of `owner`'s buffer of n × row values of
        // the recorded float type, C-contiguous (checked by the Python half);
        // `owner` holds a reference to the array, so the buffer lives as long as
        // `self` and numpy does not reallocate an array that is referenced. i < n.
        if self.float64 {
            let all = unsafe { std::slice::from_raw_parts(self.address as *const f64, self.n * self.row) };
            out.extend_from_slice(&all[start..start + self.row]);
        } else {
            let all = unsafe { std::slice::from_raw_parts(self.address as *const f32, self.n * self.row) };
            out.extend(all[start..start + self.row].iter().map(|&v| v as f64));
        }
    }
}

impl Dataset for ArrayData {
    fn len(&self) -> usize {
        self.n
    }
    fn sample_shape(&self) -> Vec<usize> {
        self.sample_shape.clone()
    }
    fn label(&self, i: usize) -> usize {
        self.labels[i]
    }
    fn target_width(&self) -> Option<usize> {
        self.targets.as_ref().map(|t| t.1)
    }
    fn read(&self, indices: &[usize], batch: &mut Batch) -> Result<(), DataError> {
        batch.x.clear();
        batch.labels.clear();
        batch.targets.clear();
        for &i in indices {
            if i >= self.n {
                return Err(DataError::Mismatch(format!(
                    "index {i} is out of range ({} examples)",
                    self.n
                )));
            }
            let first = batch.x.len();
            self.row_values(i, &mut batch.x);
            if batch.x[first..].iter().any(|v| !v.is_finite()) {
                return Err(DataError::NonFinite { index: i });
            }
            batch.labels.push(self.labels[i]);
            if let Some((t, w)) = &self.targets {
                batch.targets.extend_from_slice(&t[i * w..(i + 1) * w]);
            }
        }
        Ok(())
    }
    fn describe(&self) -> String {
        format!("numpy inputs of shape {:?} ({} examples)", self.sample_shape, self.n)
    }
}

#[pymethods]
impl Data {
    /// Inputs at `address` (a C-contiguous array of `shape`, float64 or float32,
    /// kept alive by `owner`) with int64 `labels` or float64 `targets`
    /// (`target_width` values per example) as little-endian bytes.
    #[staticmethod]
    #[pyo3(signature = (owner, address, shape, float64, labels=None, targets=None, target_width=0))]
    fn from_buffer(
        owner: Py<PyAny>,
        address: usize,
        shape: Vec<usize>,
        float64: bool,
        labels: Option<Bound<'_, PyBytes>>,
        targets: Option<Bound<'_, PyBytes>>,
        target_width: usize,
    ) -> PyResult<Self> {
        let Some((&n, sample_shape)) = shape.split_first() else {
            return Err(PyValueError::new_err("inputs must have a batch axis: shape [N, ...]"));
        };
        if n == 0 {
            return Err(PyValueError::new_err("the dataset is empty"));
        }
        if sample_shape.is_empty() {
            return Err(PyValueError::new_err(
                "inputs of shape [N] have no feature axis; give [N, features] (e.g. x[:, None])",
            ));
        }
        let row = sample_shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|&r| r > 0 && r.checked_mul(n).is_some())
            .ok_or_else(|| PyValueError::new_err(format!("inputs of shape {shape:?} are empty or too large")))?;
        if address == 0 {
            return Err(PyValueError::new_err("the inputs' buffer address is null"));
        }
        let (labels, targets) = match (labels, targets) {
            (Some(l), None) => {
                let raw = l.as_bytes();
                if raw.len() != 8 * n {
                    return Err(PyValueError::new_err(format!(
                        "{} labels for {n} examples",
                        raw.len() / 8
                    )));
                }
                let mut out = Vec::with_capacity(n);
                for (i, c) in raw.chunks_exact(8).enumerate() {
                    let v = i64::from_le_bytes(c.try_into().expect("8-byte chunk"));
                    let label = usize::try_from(v)
                        .map_err(|_| PyValueError::new_err(format!("label {v} of example {i} is negative")))?;
                    out.push(label);
                }
                (out, None)
            }
            (None, Some(t)) => {
                let values = crate::problem::f64s(t.as_bytes())?;
                if target_width == 0 || values.len() != n * target_width {
                    return Err(PyValueError::new_err(format!(
                        "{} target values for {n} examples of width {target_width}",
                        values.len()
                    )));
                }
                if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                    return Err(PyValueError::new_err(format!(
                        "the target of example {} contains NaN or infinite values",
                        i / target_width
                    )));
                }
                (vec![0; n], Some((values, target_width)))
            }
            _ => return Err(PyValueError::new_err("give either class labels or regression targets")),
        };
        Ok(Data {
            data: Arc::new(ArrayData {
                address,
                n,
                sample_shape: sample_shape.to_vec(),
                row,
                float64,
                labels,
                targets,
                _owner: owner,
            }),
        })
    }

    /// A dataset spec as on the command line (`mnist:DIR[:train|test]`,
    /// `cifar10:DIR[:train|test]`, `npy:X.npy,Y.npy`), the first `limit`
    /// examples, zero-padded by `pad`, restricted to `classes`.
    #[staticmethod]
    #[pyo3(signature = (spec, limit=None, pad=0, classes=None))]
    fn load(spec: &str, limit: Option<usize>, pad: usize, classes: Option<Vec<usize>>) -> PyResult<Self> {
        if limit == Some(0) {
            return Err(PyValueError::new_err("limit must be at least 1"));
        }
        let ds = hvp_data::open_dataset(spec, pad, classes.as_deref()).map_err(bad_input)?;
        let data: Arc<dyn Dataset> = match limit {
            Some(n) => Arc::new(Limited::new(ds, n)),
            None => Arc::from(ds),
        };
        if data.is_empty() {
            return Err(PyValueError::new_err(format!("{} has no examples", data.describe())));
        }
        Ok(Data { data })
    }

    fn __len__(&self) -> usize {
        self.data.len()
    }

    /// Shape of one example.
    #[getter]
    fn sample_shape(&self) -> Vec<usize> {
        self.data.sample_shape()
    }

    /// Class labels (0 for regression data).
    fn labels(&self) -> Vec<usize> {
        (0..self.data.len()).map(|i| self.data.label(i)).collect()
    }

    /// Inputs of the examples at `indices`, flat f64 bytes (row-major).
    fn inputs(&self, indices: Vec<usize>) -> PyResult<Vec<u8>> {
        let mut batch = Batch::default();
        self.data.read(&indices, &mut batch).map_err(bad_input)?;
        Ok(crate::problem::bytes(batch.x.iter().copied()))
    }

    fn __repr__(&self) -> String {
        format!("Data({})", self.data.describe())
    }
}
