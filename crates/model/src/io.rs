//! Reading and writing safetensors files; atomic writes.

use crate::ModelError;
use hvp_tensor::{DType, Tensor};
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::Path;

/// Writes `bytes` to `path` through a temporary file in the same directory,
/// created exclusively (never through a planted symlink), and a rename, so a
/// reader never sees a partly written file. In a multi-process (MPI) job only
/// rank 0 writes; the others hold the same bytes.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), ModelError> {
    if !hvp_dist::is_root() {
        return Ok(());
    }
    Ok(hvp_io::write::atomic_write(path, bytes)?)
}

/// One tensor read from a safetensors file, converted to f64.
pub struct StoredTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

/// All tensors of a safetensors file by name. F32 and F64 are converted to f64;
/// tensors of other dtypes are listed under their name with `Err(dtype)`, so the
/// caller decides whether they matter (PyTorch's `num_batches_tracked` is I64).
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, Result<StoredTensor, String>>, ModelError> {
    let (_, size) = hvp_io::read::open_regular(path)?;
    hvp_io::memory::check_fits(
        size,
        &format!("reading {}", path.display()),
        "use a machine with more memory",
    )?;
    let bytes = hvp_io::read::read_bounded(path, size.max(1 << 20), "a safetensors file")?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| ModelError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let raw = view.data();
        let data = match view.dtype() {
            Dtype::F32 => Ok(raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                .collect()),
            Dtype::F64 => Ok(raw
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect()),
            other => Err(format!("{other:?}")),
        };
        out.insert(name, data.map(|data| StoredTensor { shape, data }));
    }
    Ok(out)
}

/// Serialises named f64 tensors as `dtype` (f32 rounds) into safetensors bytes,
/// plus `zero_counters`: int64 scalars holding 0 (PyTorch's `num_batches_tracked`).
pub fn safetensors_bytes(tensors: &[(String, Tensor<f64>)], dtype: DType, zero_counters: &[String]) -> Vec<u8> {
    let mut encoded: Vec<(String, Vec<usize>, Vec<u8>, Dtype)> = tensors
        .iter()
        .map(|(name, t)| {
            let bytes = match dtype {
                DType::F32 => t.data().iter().flat_map(|&v| (v as f32).to_le_bytes()).collect(),
                DType::F64 => t.data().iter().flat_map(|&v| v.to_le_bytes()).collect(),
            };
            let st_dtype = match dtype {
                DType::F32 => Dtype::F32,
                DType::F64 => Dtype::F64,
            };
            (name.clone(), t.shape().to_vec(), bytes, st_dtype)
        })
        .collect();
    for name in zero_counters {
        encoded.push((name.clone(), vec![], 0i64.to_le_bytes().to_vec(), Dtype::I64));
    }
    let views = encoded.iter().map(|(name, shape, bytes, st_dtype)| {
        let view = safetensors::tensor::TensorView::new(*st_dtype, shape.clone(), bytes)
            .expect("shape and byte length agree by construction");
        (name.clone(), view)
    });
    safetensors::serialize(views, None).expect("in-memory serialisation of valid views")
}

/// Writes named tensors atomically as a safetensors file in `dtype`.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor<f64>)], dtype: DType) -> Result<(), ModelError> {
    atomic_write(path, &safetensors_bytes(tensors, dtype, &[]))
}
