//! NumPy `.npy` arrays (format versions 1–3, C order, little-endian): f32/f64
//! inputs read per batch from disk, integer labels read whole.

use crate::{Batch, DataError, Dataset};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Element types hvp accepts in NPY files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NpyDtype {
    F32,
    F64,
    U8,
    I32,
    I64,
}

impl NpyDtype {
    fn parse(descr: &str) -> Option<Self> {
        match descr {
            "<f4" => Some(NpyDtype::F32),
            "<f8" => Some(NpyDtype::F64),
            "|u1" | "<u1" => Some(NpyDtype::U8),
            "<i4" => Some(NpyDtype::I32),
            "<i8" => Some(NpyDtype::I64),
            _ => None,
        }
    }
    fn size(self) -> usize {
        match self {
            NpyDtype::U8 => 1,
            NpyDtype::F32 | NpyDtype::I32 => 4,
            NpyDtype::F64 | NpyDtype::I64 => 8,
        }
    }
}

/// An NPY v1 file holding `data` (raw little-endian bytes) of dtype `descr`
/// (e.g. `<f4`, `<i8`) and C-order `shape`, as `numpy.save` writes it.
pub fn npy_bytes(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let tuple = match dims.as_slice() {
        [one] => format!("({one},)"),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {tuple}, }}");
    // numpy pads the header with spaces so that the data starts at a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(data);
    out
}

/// An open NPY file: its header, with the data left on disk.
pub struct NpyArray {
    path: PathBuf,
    file: File,
    pub dtype: NpyDtype,
    pub shape: Vec<usize>,
    data_offset: u64,
}

fn header_field<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header.find(&format!("'{key}'"))?;
    let rest = header[at + key.len() + 2..]
        .trim_start()
        .strip_prefix(':')?
        .trim_start();
    Some(rest)
}

impl NpyArray {
    /// Opens `path` and parses its header; checks the file holds all the data.
    pub fn open(path: &Path) -> Result<Self, DataError> {
        let (file, file_size) = hvp_io::read::open_regular(path)?;
        let fmt = |reason: String| DataError::Format {
            path: path.to_path_buf(),
            reason,
        };
        let truncated = |reason: &str| DataError::Truncated {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        let mut pre = [0u8; 12];
        file.read_exact_at(&mut pre[..10], 0)
            .map_err(|_| truncated("shorter than an NPY preamble"))?;
        if &pre[..6] != b"\x93NUMPY" {
            return Err(fmt("not an NPY file (bad magic); save it with numpy.save".into()));
        }
        let (header_len, header_start) = match pre[6] {
            1 => (u16::from_le_bytes([pre[8], pre[9]]) as usize, 10u64),
            2 | 3 => {
                file.read_exact_at(&mut pre[10..12], 10)
                    .map_err(|_| truncated("shorter than an NPY preamble"))?;
                (u32::from_le_bytes([pre[8], pre[9], pre[10], pre[11]]) as usize, 12u64)
            }
            v => return Err(fmt(format!("unsupported NPY format version {v}"))),
        };
        // numpy writes headers of a few hundred bytes (and refuses to read
        // more than 10,000 by default); a larger length is a corrupt preamble.
        if header_len > 1 << 20 || header_start + header_len as u64 > file_size {
            return Err(truncated(&format!(
                "the preamble declares a {header_len}-byte header in a {file_size}-byte file"
            )));
        }
        let mut header = vec![0u8; header_len];
        file.read_exact_at(&mut header, header_start)
            .map_err(|_| truncated("header cut short"))?;
        let header = String::from_utf8_lossy(&header).into_owned();
        let descr = header_field(&header, "descr")
            .and_then(|r| r.strip_prefix('\''))
            .and_then(|r| r.split('\'').next())
            .ok_or_else(|| fmt("header has no 'descr'".into()))?;
        let dtype = NpyDtype::parse(descr).ok_or_else(|| {
            fmt(format!(
                "dtype '{descr}' is not supported (use float32/float64 inputs, uint8/int32/int64 labels, little-endian)"
            ))
        })?;
        if header_field(&header, "fortran_order").is_some_and(|r| r.starts_with("True")) {
            return Err(fmt(
                "Fortran-ordered arrays are not supported; save with np.ascontiguousarray".into(),
            ));
        }
        let shape_txt = header_field(&header, "shape")
            .and_then(|r| r.strip_prefix('('))
            .and_then(|r| r.split(')').next())
            .ok_or_else(|| fmt("header has no 'shape'".into()))?;
        let shape = shape_txt
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.trim_end_matches('L').parse::<usize>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| fmt(format!("bad shape ({shape_txt})")))?;
        let data_offset = header_start + header_len as u64;
        let numel = hvp_io::memory::checked_product(&shape, &format!("NPY file {}", path.display()))?;
        let need = numel
            .checked_mul(dtype.size())
            .and_then(|b| (b as u64).checked_add(data_offset))
            .ok_or_else(|| fmt(format!("shape {shape:?} overflows; the header is corrupt")))?;
        let have = file_size;
        if have < need {
            return Err(truncated(&format!("{have} bytes, the header promises {need}")));
        }
        Ok(NpyArray {
            path: path.to_path_buf(),
            file,
            dtype,
            shape,
            data_offset,
        })
    }

    fn row_len(&self) -> usize {
        self.shape.iter().skip(1).product()
    }

    /// Reads rows `[start, start + count)` as f64.
    fn read_rows(&self, start: usize, count: usize, out: &mut Vec<f64>) -> Result<(), DataError> {
        let elem = self.dtype.size();
        let row_bytes = self.row_len() * elem;
        let mut buf = vec![0u8; count * row_bytes];
        self.file
            .read_exact_at(&mut buf, self.data_offset + (start * row_bytes) as u64)
            .map_err(|e| DataError::io(&self.path, e))?;
        match self.dtype {
            NpyDtype::F32 => out.extend(
                buf.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64),
            ),
            NpyDtype::F64 => out.extend(
                buf.chunks_exact(8)
                    .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])),
            ),
            NpyDtype::U8 => out.extend(buf.iter().map(|&b| b as f64)),
            NpyDtype::I32 => out.extend(
                buf.chunks_exact(4)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64),
            ),
            NpyDtype::I64 => out.extend(
                buf.chunks_exact(8)
                    .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f64),
            ),
        }
        Ok(())
    }
}

/// `--inputs X.npy --labels Y.npy`: inputs `[N, ...]` f32/f64, labels `[N]`
/// uint8/int32/int64.
///
/// Float labels (`[N]` or `[N, K]` float32/float64) are regression targets,
/// for `--loss mse`.
pub struct NpyDataset {
    inputs: NpyArray,
    labels: Vec<usize>,
    /// Regression targets, row-major `[N, width]`, when the labels are floats.
    targets: Option<(Vec<f64>, usize)>,
}

impl NpyDataset {
    pub fn open(inputs: &Path, labels: &Path) -> Result<Self, DataError> {
        let x = NpyArray::open(inputs)?;
        // Integer inputs are token ids (checked against the model's vocabulary
        // before any pass); they are exact in f64 and, below 2^24, in f32.
        if !matches!(x.dtype, NpyDtype::F32 | NpyDtype::F64 | NpyDtype::I32 | NpyDtype::I64) {
            return Err(DataError::Format {
                path: inputs.to_path_buf(),
                reason: format!(
                    "inputs must be float32 or float64 (or int32/int64 token ids), found {:?}",
                    x.dtype
                ),
            });
        }
        if x.shape.len() < 2 {
            return Err(DataError::Format {
                path: inputs.to_path_buf(),
                reason: format!(
                    "inputs must be [N, ...] with at least 2 dimensions (token ids [N, sequence]), found {:?}",
                    x.shape
                ),
            });
        }
        let y = NpyArray::open(labels)?;
        let float = matches!(y.dtype, NpyDtype::F32 | NpyDtype::F64);
        let integer = matches!(y.dtype, NpyDtype::U8 | NpyDtype::I32 | NpyDtype::I64);
        if !((integer && y.shape.len() == 1) || (float && (1..=2).contains(&y.shape.len()))) {
            return Err(DataError::Format {
                path: labels.to_path_buf(),
                reason: format!(
                    "labels must be a 1-D uint8/int32/int64 array (classes) or a float32/float64 array [N] or \
                     [N, K] (regression targets), found {:?} of shape {:?}",
                    y.dtype, y.shape
                ),
            });
        }
        if y.shape[0] != x.shape[0] {
            return Err(DataError::Mismatch(format!(
                "{} has {} examples but {} has {} labels",
                inputs.display(),
                x.shape[0],
                labels.display(),
                y.shape[0]
            )));
        }
        let mut raw = Vec::with_capacity(y.shape[0]);
        y.read_rows(0, y.shape[0], &mut raw)?;
        if float {
            if let Some(i) = raw.iter().position(|v| !v.is_finite()) {
                return Err(DataError::Format {
                    path: labels.to_path_buf(),
                    reason: format!("target value {i} is NaN or infinite"),
                });
            }
            let width = y.shape.get(1).copied().unwrap_or(1);
            return Ok(NpyDataset {
                inputs: x,
                labels: vec![0; y.shape[0]],
                targets: Some((raw, width)),
            });
        }
        let labels_vec = raw
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                if v < 0.0 {
                    Err(DataError::Format {
                        path: labels.to_path_buf(),
                        reason: format!("label of example {i} is negative ({v})"),
                    })
                } else {
                    Ok(v as usize)
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(NpyDataset {
            inputs: x,
            labels: labels_vec,
            targets: None,
        })
    }
}

impl Dataset for NpyDataset {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn sample_shape(&self) -> Vec<usize> {
        self.inputs.shape[1..].to_vec()
    }
    fn label(&self, i: usize) -> usize {
        self.labels[i]
    }
    fn target_width(&self) -> Option<usize> {
        self.targets.as_ref().map(|(_, w)| *w)
    }
    fn read(&self, indices: &[usize], batch: &mut Batch) -> Result<(), DataError> {
        batch.x.clear();
        batch.labels.clear();
        batch.targets.clear();
        if let Some((t, w)) = &self.targets {
            for &i in indices {
                batch.targets.extend_from_slice(&t[i * w..(i + 1) * w]);
            }
        }
        let row = self.inputs.row_len();
        // Coalesce runs of consecutive indices into one read each.
        let mut k = 0;
        while k < indices.len() {
            let start = indices[k];
            let mut end = k + 1;
            while end < indices.len() && indices[end] == indices[end - 1] + 1 {
                end += 1;
            }
            let first = batch.x.len();
            self.inputs.read_rows(start, end - k, &mut batch.x)?;
            if let Some(bad) = batch.x[first..].iter().position(|v| !v.is_finite()) {
                return Err(DataError::NonFinite {
                    index: start + bad / row,
                });
            }
            k = end;
        }
        batch.labels.extend(indices.iter().map(|&i| self.labels[i]));
        Ok(())
    }
    fn describe(&self) -> String {
        format!("{} ({} examples)", self.inputs.path.display(), self.len())
    }
}
