//! `Model`: an imported ONNX graph or a built-in architecture, with its weights.

use crate::errors::bad_input;
use hvp_model::{Architecture, Weights};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::path::Path;
use std::sync::Arc;

/// A network and its weights; its trainable tensors are the parameters.
#[pyclass(module = "hvp._native", frozen)]
pub struct Model {
    pub model: Arc<hvp_model::Model>,
    pub weights: Arc<Weights>,
    warnings: Vec<String>,
}

#[pymethods]
impl Model {
    /// Imports an ONNX file; `params` (a glob) restricts the parameters.
    #[staticmethod]
    #[pyo3(signature = (path, params=None))]
    fn from_onnx(py: Python<'_>, path: &str, params: Option<String>) -> PyResult<Self> {
        let options = hvp_onnx::ImportOptions { params_glob: params };
        let imported = py.detach(|| hvp_onnx::load(Path::new(path), &options).map_err(bad_input))?;
        Ok(Model {
            model: Arc::new(imported.model),
            weights: Arc::new(imported.weights),
            warnings: imported.warnings,
        })
    }

    /// A built-in architecture with weights from a safetensors file.
    #[staticmethod]
    fn builtin_from_file(spec: &str, path: &str) -> PyResult<Self> {
        let arch: Architecture = spec.parse().map_err(bad_input)?;
        let (model, weights) = Weights::load_for(&arch, Path::new(path)).map_err(bad_input)?;
        Ok(Self::built(model, weights))
    }

    /// A built-in architecture with weights given as (name, shape, f64 bytes).
    #[staticmethod]
    fn builtin_from_tensors(spec: &str, tensors: Vec<(String, Vec<usize>, Bound<'_, PyBytes>)>) -> PyResult<Self> {
        let arch: Architecture = spec.parse().map_err(bad_input)?;
        let mut named = Vec::with_capacity(tensors.len());
        for (name, shape, bytes) in tensors {
            let data = crate::problem::f64s(bytes.as_bytes())?;
            if data.len() != shape.iter().product::<usize>() {
                return Err(PyValueError::new_err(format!(
                    "weight '{name}': {} values for shape {shape:?}",
                    data.len()
                )));
            }
            named.push((name, shape, data));
        }
        let (model, weights) = Weights::from_named_for(&arch, "the weights dict", named).map_err(bad_input)?;
        Ok(Self::built(model, weights))
    }

    /// Parameter names in state_dict order.
    fn param_names(&self) -> Vec<String> {
        self.model.param_names().into_iter().map(|s| s.to_string()).collect()
    }

    /// Parameter shapes in state_dict order.
    fn param_shapes(&self) -> Vec<Vec<usize>> {
        self.model.params.iter().map(|p| p.shape.clone()).collect()
    }

    /// Current parameter values, flat f64 bytes in state_dict order.
    fn param_values(&self) -> Vec<u8> {
        crate::problem::bytes(self.weights.params.iter().flat_map(|t| t.data().iter().copied()))
    }

    fn num_params(&self) -> usize {
        self.model.num_params()
    }

    fn num_classes(&self) -> usize {
        self.model.num_classes
    }

    /// Notes from the import (e.g. BatchNorm folded by the exporter).
    #[getter]
    fn warnings(&self) -> Vec<String> {
        self.warnings.clone()
    }

    fn __repr__(&self) -> String {
        format!(
            "Model({}, {} parameter tensors, {} parameters)",
            self.model.arch,
            self.model.params.len(),
            self.model.num_params()
        )
    }
}

impl Model {
    fn built(model: hvp_model::Model, weights: Weights) -> Self {
        Model {
            model: Arc::new(model),
            weights: Arc::new(weights),
            warnings: Vec::new(),
        }
    }
}
