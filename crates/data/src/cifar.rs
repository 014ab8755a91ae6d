//! CIFAR-10 binary batches (`data_batch_1.bin` … `data_batch_5.bin` for train,
//! `test_batch.bin` for test): records of one label byte and 3×32×32 pixel bytes
//! (channel-major), scaled to [0, 1] per batch.

use crate::{Batch, DataError, Dataset};
use std::path::{Path, PathBuf};

const RECORD: usize = 1 + 3 * 32 * 32;

pub struct Cifar10 {
    origin: String,
    records: Vec<u8>,
}

impl Cifar10 {
    /// Opens the split in `dir` (or in `dir/cifar-10-batches-bin`).
    pub fn open(dir: &Path, train: bool) -> Result<Self, DataError> {
        let dir: PathBuf = if dir.join("cifar-10-batches-bin").is_dir() {
            dir.join("cifar-10-batches-bin")
        } else {
            dir.to_path_buf()
        };
        let files: Vec<PathBuf> = if train {
            (1..=5).map(|i| dir.join(format!("data_batch_{i}.bin"))).collect()
        } else {
            vec![dir.join("test_batch.bin")]
        };
        let mut records = Vec::new();
        for f in &files {
            let bytes = hvp_io::read::read_bounded(f, 1 << 30, "a CIFAR-10 batch file")?;
            if bytes.len() % RECORD != 0 || bytes.is_empty() {
                return Err(DataError::Truncated {
                    path: f.clone(),
                    reason: format!(
                        "{} bytes is not a whole number of {RECORD}-byte CIFAR-10 records",
                        bytes.len()
                    ),
                });
            }
            if let Some(r) = bytes.chunks(RECORD).position(|r| r[0] > 9) {
                return Err(DataError::Format {
                    path: f.clone(),
                    reason: format!("record {r} has label {}, not a class 0-9", bytes[r * RECORD]),
                });
            }
            records.extend_from_slice(&bytes);
        }
        Ok(Cifar10 {
            origin: format!("{} ({})", dir.display(), if train { "train" } else { "test" }),
            records,
        })
    }
}

impl Dataset for Cifar10 {
    fn len(&self) -> usize {
        self.records.len() / RECORD
    }
    fn sample_shape(&self) -> Vec<usize> {
        vec![3, 32, 32]
    }
    fn label(&self, i: usize) -> usize {
        self.records[i * RECORD] as usize
    }
    fn read(&self, indices: &[usize], batch: &mut Batch) -> Result<(), DataError> {
        batch.x.clear();
        batch.labels.clear();
        for &i in indices {
            let r = &self.records[i * RECORD..(i + 1) * RECORD];
            batch.labels.push(r[0] as usize);
            batch.x.extend(r[1..].iter().map(|&p| p as f64 / 255.0));
        }
        Ok(())
    }
    fn describe(&self) -> String {
        format!("CIFAR-10 {} ({} examples)", self.origin, self.len())
    }
}
