//! MNIST and Fashion-MNIST in their IDX files (`train-images-idx3-ubyte[.gz]`,
//! `t10k-…` for the test split). Pixels are kept as bytes and scaled to [0, 1]
//! per batch; examples are `[1, 28, 28]`.

use crate::{Batch, DataError, Dataset};
use flate2::read::GzDecoder;
use std::io::Read;
use std::path::{Path, PathBuf};

pub struct Idx {
    origin: String,
    rows: usize,
    cols: usize,
    pixels: Vec<u8>,
    labels: Vec<u8>,
}

/// Reads an IDX file (gzip-compressed or raw) and checks its magic number.
fn read_idx(dir: &Path, stem: &str, magic: u32) -> Result<(PathBuf, Vec<usize>, Vec<u8>), DataError> {
    let raw_path = dir.join(stem);
    let gz_path = dir.join(format!("{stem}.gz"));
    let path = if gz_path.exists() { gz_path } else { raw_path };
    let bytes = std::fs::read(&path).map_err(|e| DataError::io(&path, e))?;
    let bytes = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        GzDecoder::new(&bytes[..])
            .read_to_end(&mut out)
            .map_err(|e| DataError::Truncated {
                path: path.clone(),
                reason: format!("gzip stream is damaged ({e})"),
            })?;
        out
    } else {
        bytes
    };
    let fmt = |reason: String| DataError::Format {
        path: path.clone(),
        reason,
    };
    if bytes.len() < 4 {
        return Err(DataError::Truncated {
            path: path.clone(),
            reason: "no IDX header".into(),
        });
    }
    let found = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if found != magic {
        return Err(fmt(format!(
            "magic number {found:#010x}, expected {magic:#010x}: not an IDX file of that kind"
        )));
    }
    let ndims = (magic & 0xff) as usize;
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(DataError::Truncated {
            path: path.clone(),
            reason: "IDX header cut short".into(),
        });
    }
    let dims: Vec<usize> = (0..ndims)
        .map(|d| u32::from_be_bytes([bytes[4 + 4 * d], bytes[5 + 4 * d], bytes[6 + 4 * d], bytes[7 + 4 * d]]) as usize)
        .collect();
    let need = header + dims.iter().product::<usize>();
    if bytes.len() < need {
        return Err(DataError::Truncated {
            path: path.clone(),
            reason: format!("{} bytes, the header promises {need}", bytes.len()),
        });
    }
    Ok((path, dims, bytes[header..need].to_vec()))
}

impl Idx {
    /// Opens the train or test split in `dir`.
    pub fn open(dir: &Path, train: bool) -> Result<Self, DataError> {
        let prefix = if train { "train" } else { "t10k" };
        let (ipath, idims, pixels) = read_idx(dir, &format!("{prefix}-images-idx3-ubyte"), 0x0803)?;
        let (lpath, ldims, labels) = read_idx(dir, &format!("{prefix}-labels-idx1-ubyte"), 0x0801)?;
        if idims[0] != ldims[0] {
            return Err(DataError::Mismatch(format!(
                "{} has {} images but {} has {} labels",
                ipath.display(),
                idims[0],
                lpath.display(),
                ldims[0]
            )));
        }
        if let Some(i) = labels.iter().position(|&l| l > 9) {
            return Err(DataError::Format {
                path: lpath,
                reason: format!("label {} of example {i} is not a class 0-9", labels[i]),
            });
        }
        Ok(Idx {
            origin: format!("{} ({})", dir.display(), if train { "train" } else { "test" }),
            rows: idims[1],
            cols: idims[2],
            pixels,
            labels,
        })
    }
}

impl Dataset for Idx {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn sample_shape(&self) -> Vec<usize> {
        vec![1, self.rows, self.cols]
    }
    fn label(&self, i: usize) -> usize {
        self.labels[i] as usize
    }
    fn read(&self, indices: &[usize], batch: &mut Batch) -> Result<(), DataError> {
        let size = self.rows * self.cols;
        batch.x.clear();
        batch.labels.clear();
        for &i in indices {
            batch
                .x
                .extend(self.pixels[i * size..(i + 1) * size].iter().map(|&p| p as f64 / 255.0));
            batch.labels.push(self.labels[i] as usize);
        }
        Ok(())
    }
    fn describe(&self) -> String {
        format!("IDX {} ({} examples)", self.origin, self.len())
    }
}
