//! MNIST and Fashion-MNIST in their IDX files (`train-images-idx3-ubyte[.gz]`,
//! `t10k-…` for the test split). Pixels are kept as bytes and scaled to [0, 1]
//! per batch; examples are `[1, 28, 28]`.

use crate::{Batch, DataError, Dataset};
use flate2::read::MultiGzDecoder;
use std::io::Read;
use std::path::{Path, PathBuf};

pub struct Idx {
    origin: String,
    rows: usize,
    cols: usize,
    pixels: Vec<u8>,
    labels: Vec<u8>,
}

/// Largest IDX payload accepted (MNIST's training images are 47 MB, EMNIST's
/// largest file about 0.7 GB).
const MAX_IDX_BYTES: u64 = 4 << 30;

/// Reads an IDX file (gzip-compressed or raw), checks its magic number, and
/// reads exactly the bytes its header declares: sizes are checked (overflow,
/// the file's real size, available memory) before anything is allocated, and a
/// gzip stream is never inflated beyond the declared size.
fn read_idx(dir: &Path, stem: &str, magic: u32) -> Result<(PathBuf, Vec<usize>, Vec<u8>), DataError> {
    let raw_path = dir.join(stem);
    let gz_path = dir.join(format!("{stem}.gz"));
    let path = if gz_path.exists() { gz_path } else { raw_path };
    let (file, file_size) = hvp_io::read::open_regular(&path)?;
    let mut reader = std::io::BufReader::new(file);
    let mut first = [0u8; 2];
    let gz =
        reader.fill_buf_peek(&mut first).map_err(|e| DataError::io(&path, e))? == 2 && hvp_io::read::is_gzip(&first);
    let mut source: Box<dyn Read> = if gz {
        Box::new(MultiGzDecoder::new(reader))
    } else {
        Box::new(reader)
    };
    let truncated = |reason: String| DataError::Truncated {
        path: path.clone(),
        reason,
    };
    let read_err = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            truncated("IDX header cut short".into())
        } else if gz {
            truncated(format!("gzip stream is damaged ({e})"))
        } else {
            DataError::io(&path, e)
        }
    };
    let mut head = [0u8; 4];
    source.read_exact(&mut head).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            truncated("no IDX header".into())
        } else {
            read_err(e)
        }
    })?;
    let found = u32::from_be_bytes(head);
    if found != magic {
        return Err(DataError::Format {
            path: path.clone(),
            reason: format!("magic number {found:#010x}, expected {magic:#010x}: not an IDX file of that kind"),
        });
    }
    let ndims = (magic & 0xff) as usize;
    let mut dims = Vec::with_capacity(ndims);
    for _ in 0..ndims {
        source.read_exact(&mut head).map_err(read_err)?;
        dims.push(u32::from_be_bytes(head) as usize);
    }
    let header = 4 + 4 * ndims as u64;
    let payload = hvp_io::memory::checked_product(&dims, &format!("IDX file {}", path.display()))? as u64;
    if payload > MAX_IDX_BYTES {
        return Err(DataError::Format {
            path: path.clone(),
            reason: format!("the header declares {dims:?} = {payload} bytes, beyond any IDX dataset (corrupt header?)"),
        });
    }
    if !gz && file_size < header + payload {
        return Err(truncated(format!(
            "{file_size} bytes, the header promises {}",
            header + payload
        )));
    }
    hvp_io::memory::check_fits(
        payload,
        &format!("reading {}", path.display()),
        "use a machine with more memory",
    )?;
    let mut bytes = Vec::with_capacity(payload as usize);
    source
        .take(payload)
        .read_to_end(&mut bytes)
        .map_err(|e| truncated(format!("gzip stream is damaged ({e})")))?;
    if (bytes.len() as u64) < payload {
        return Err(truncated(format!(
            "{} bytes of data, the header promises {payload}",
            bytes.len()
        )));
    }
    Ok((path, dims, bytes))
}

/// Peeks at the first bytes of a buffered reader without consuming them.
trait Peek {
    fn fill_buf_peek(&mut self, out: &mut [u8]) -> std::io::Result<usize>;
}

impl<R: Read> Peek for std::io::BufReader<R> {
    fn fill_buf_peek(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        use std::io::BufRead;
        let buf = self.fill_buf()?;
        let n = buf.len().min(out.len());
        out[..n].copy_from_slice(&buf[..n]);
        Ok(n)
    }
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
