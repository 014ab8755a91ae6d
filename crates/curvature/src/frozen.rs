//! A frozen feature extractor evaluated once. When only some parameters are
//! trainable (e.g. the last layer of an imported network), the nodes before
//! the first trainable one compute the same values in every pass; the model is
//! cut there ([`hvp_autodiff::Graph::split_frozen`]), each example's features
//! are computed once and kept — in memory, or in a scratch file when they
//! would take more than half of the available memory — and every gradient,
//! product, factor and score runs through the trainable rest only, on those
//! features.

use crate::CurvatureError;
use hvp_autodiff::{Graph, Op, Tape};
use hvp_data::{Batch, DataError, Dataset};
use hvp_model::{Architecture, Model, Weights};
use hvp_tensor::{DType, Float, Tensor};
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Where the frozen prefix's features are kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FeatureStore {
    /// In memory when they take at most half of the available memory, else
    /// in a scratch file in the system's temporary directory (`TMPDIR`).
    Auto,
    /// In memory (refused when they do not fit).
    Memory,
    /// In a scratch file in this directory, removed when the features are dropped.
    Disk(PathBuf),
}

/// A model cut after its frozen prefix.
pub struct FrozenPrefix {
    /// The trainable rest, reading the prefix's features as its input: the same
    /// parameters and buffers, in the same order, as the whole model.
    pub tail: Model,
    prefix: Graph,
    feature_shape: Vec<usize>,
}

impl FrozenPrefix {
    /// The cut of `model` for examples of `sample_shape`, or `None` when there
    /// is nothing to cut (see [`Graph::split_frozen`]) or the prefix does no
    /// layer's work (only elementwise input normalisation, reshapes): keeping
    /// its features would cost memory and save nothing.
    pub fn of(model: &Model, weights: &Weights, sample_shape: &[usize]) -> Option<FrozenPrefix> {
        let split = model.graph.split_frozen()?;
        let does_work = split.prefix.nodes().iter().any(|op| {
            matches!(
                op,
                Op::Dense(_)
                    | Op::TokenDense(_)
                    | Op::GroupedConv(_)
                    | Op::Conv2d(_)
                    | Op::ConvNode(_)
                    | Op::MatMul(_)
                    | Op::BatchNorm(_)
                    | Op::BatchNormNode(_)
                    | Op::MaxPool(_)
                    | Op::AvgPool(_)
                    | Op::GlobalAvgPool(_)
            )
        });
        if !does_work {
            return None;
        }
        // One example through the prefix gives the features' shape.
        let mut shape = vec![1];
        shape.extend_from_slice(sample_shape);
        let x = Tensor::<f32>::zeros(&shape);
        let tape: Tape<Tensor<f32>> = split.prefix.forward(&[], &weights.buffers_as::<f32>(), x);
        let feature_shape = tape.output().shape().get(1..)?.to_vec();
        let name = match &model.arch {
            Architecture::Onnx { name, .. } => name.clone(),
            other => other.to_string(),
        };
        let tail = Model {
            arch: Architecture::Onnx {
                name: format!("{name} after its frozen prefix"),
                input_shape: feature_shape.clone(),
                token_vocab: None,
            },
            graph: split.tail,
            ..model.clone()
        };
        Some(FrozenPrefix {
            tail,
            prefix: split.prefix,
            feature_shape,
        })
    }

    /// Elements of one example's features.
    pub fn feature_size(&self) -> usize {
        self.feature_shape.iter().product()
    }

    /// The features of `data`'s examples at `indices` (`None`: all), computed in
    /// `dtype` in batches of `batch_size` (so the values equal those of a pass
    /// through the whole model), with `progress` told of each batch. Every
    /// process computes the examples it is given (the prefix runs once per
    /// example and process, never per pass).
    pub fn features(
        &self,
        weights: &Weights,
        data: &dyn Dataset,
        indices: Option<&[usize]>,
        batch_size: usize,
        dtype: DType,
        progress: &dyn Fn(usize),
    ) -> Result<Features, CurvatureError> {
        self.features_in(weights, data, indices, batch_size, dtype, &FeatureStore::Auto, progress)
    }

    /// [`FrozenPrefix::features`] kept where `store` says.
    #[allow(clippy::too_many_arguments)]
    pub fn features_in(
        &self,
        weights: &Weights,
        data: &dyn Dataset,
        indices: Option<&[usize]>,
        batch_size: usize,
        dtype: DType,
        store: &FeatureStore,
        progress: &dyn Fn(usize),
    ) -> Result<Features, CurvatureError> {
        let all: Vec<usize>;
        let indices = match indices {
            Some(i) => i,
            None => {
                all = (0..data.len()).collect();
                &all
            }
        };
        let size = self.feature_size();
        let in_memory = (indices.len() as u64).saturating_mul(size as u64).saturating_mul(8);
        let dir = match store {
            FeatureStore::Memory => None,
            FeatureStore::Disk(dir) => Some(dir.clone()),
            FeatureStore::Auto => hvp_io::memory::available_bytes()
                .is_some_and(|avail| in_memory > avail / 2)
                .then(std::env::temp_dir),
        };
        let mut rows = match &dir {
            Some(dir) => RowWriter::Disk(ScratchFile::create(dir, dtype)?),
            None => {
                hvp_io::memory::check_fits(
                    in_memory,
                    &format!("the frozen prefix's features of {} examples", indices.len()),
                    "select more parameters (`params`) so that the cut comes earlier, or use fewer examples",
                )?;
                RowWriter::Memory(Vec::with_capacity(indices.len() * size))
            }
        };
        let mut batch = Batch::default();
        let mut labels = Vec::with_capacity(indices.len());
        let mut targets = Vec::new();
        let mut sample_shape = vec![0];
        sample_shape.extend(data.sample_shape());
        for chunk in indices.chunks(batch_size.max(1)) {
            data.read(chunk, &mut batch)?;
            sample_shape[0] = chunk.len();
            let out = match dtype {
                DType::F32 => self.prefix_batch::<f32>(weights, &sample_shape, &batch.x),
                DType::F64 => self.prefix_batch::<f64>(weights, &sample_shape, &batch.x),
            };
            if out.iter().any(|v| !v.is_finite()) {
                return Err(CurvatureError::NonFinite {
                    what: "frozen-prefix features",
                    batch: labels.len() / batch_size.max(1),
                });
            }
            rows.push(&out)?;
            labels.extend_from_slice(&batch.labels);
            targets.extend_from_slice(&batch.targets);
            progress(chunk.len());
        }
        let mut row_of = vec![usize::MAX; data.len()];
        for (row, &i) in indices.iter().enumerate() {
            row_of[i] = row;
        }
        Ok(Features {
            shape: self.feature_shape.clone(),
            rows: rows.finish()?,
            labels,
            targets,
            target_width: data.target_width(),
            row_of,
            source: data.describe(),
        })
    }

    fn prefix_batch<T: Float>(&self, weights: &Weights, shape: &[usize], x: &[f64]) -> Vec<f64> {
        let input = Tensor::new(shape.to_vec(), x.iter().map(|&v| T::from_f64(v)).collect()).expect("batch shape");
        let tape: Tape<Tensor<T>> = self.prefix.forward(&[], &weights.buffers_as::<T>(), input);
        tape.output().data().iter().map(|v| v.to_f64()).collect()
    }
}

/// Features being written, a batch at a time.
enum RowWriter {
    Memory(Vec<f64>),
    Disk(ScratchFile),
}

impl RowWriter {
    fn push(&mut self, values: &[f64]) -> Result<(), CurvatureError> {
        match self {
            RowWriter::Memory(x) => {
                x.extend_from_slice(values);
                Ok(())
            }
            RowWriter::Disk(file) => file.write(values),
        }
    }

    fn finish(self) -> Result<Rows, CurvatureError> {
        Ok(match self {
            RowWriter::Memory(x) => Rows::Memory(x),
            RowWriter::Disk(file) => Rows::Disk(file.finish()?),
        })
    }
}

/// The features' values: in memory (f64), or on disk in the pass's dtype.
enum Rows {
    Memory(Vec<f64>),
    Disk(ScratchReader),
}

/// A scratch file's path, the file removed when this is dropped (on Unix it
/// is unlinked as soon as it is opened).
struct ScratchPath(PathBuf);

impl Drop for ScratchPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A scratch file of feature rows under construction.
struct ScratchFile {
    path: ScratchPath,
    writer: BufWriter<File>,
    dtype: DType,
}

/// A finished scratch file, read a run of rows at a time.
struct ScratchReader {
    path: ScratchPath,
    file: Mutex<File>,
    dtype: DType,
}

fn width(dtype: DType) -> usize {
    match dtype {
        DType::F32 => 4,
        DType::F64 => 8,
    }
}

impl ScratchFile {
    fn create(dir: &Path, dtype: DType) -> Result<Self, CurvatureError> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("hvp-features-{}-{n}.bin", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| scratch_error(&path, &e))?;
        // Unlinked at once where the open handle keeps it readable, so not
        // even a killed process leaves it behind.
        #[cfg(unix)]
        let _ = std::fs::remove_file(&path);
        Ok(ScratchFile {
            path: ScratchPath(path),
            writer: BufWriter::with_capacity(1 << 20, file),
            dtype,
        })
    }

    /// Appends values in the file's dtype (an f32 pass's features are f32
    /// values, so they round-trip exactly).
    fn write(&mut self, values: &[f64]) -> Result<(), CurvatureError> {
        let bytes: Vec<u8> = match self.dtype {
            DType::F32 => values.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect(),
            DType::F64 => values.iter().flat_map(|&v| v.to_le_bytes()).collect(),
        };
        let path = &self.path.0;
        self.writer.write_all(&bytes).map_err(|e| scratch_error(path, &e))
    }

    fn finish(self) -> Result<ScratchReader, CurvatureError> {
        let ScratchFile { path, writer, dtype } = self;
        let file = writer.into_inner().map_err(|e| scratch_error(&path.0, e.error()))?;
        Ok(ScratchReader {
            path,
            file: Mutex::new(file),
            dtype,
        })
    }
}

fn scratch_error(path: &Path, e: &std::io::Error) -> CurvatureError {
    CurvatureError::Data(DataError::Mismatch(format!(
        "the frozen prefix's features do not fit in memory and could not be kept in {} ({e}); \
         set TMPDIR to a directory on a disk with room, or select more parameters (`params`) so that the cut comes earlier",
        path.display()
    )))
}

impl ScratchReader {
    /// Rows `first..first + count` of `size` values each, appended to `out`.
    fn read_rows(&self, first: usize, count: usize, size: usize, out: &mut Vec<f64>) -> Result<(), DataError> {
        let w = width(self.dtype);
        let mut bytes = vec![0u8; count * size * w];
        let failed = |e: std::io::Error| {
            DataError::Mismatch(format!(
                "reading the frozen prefix's features from {}: {e}",
                self.path.0.display()
            ))
        };
        {
            let mut file = self.file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            file.seek(SeekFrom::Start((first * size * w) as u64)).map_err(failed)?;
            file.read_exact(&mut bytes).map_err(failed)?;
        }
        match self.dtype {
            DType::F32 => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64),
            ),
            DType::F64 => out.extend(
                bytes
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])),
            ),
        }
        Ok(())
    }
}

/// The frozen prefix's output for the examples of a dataset, with their labels
/// (and targets), indexed as the dataset is. Values are kept in f64 in
/// memory, or in the pass's dtype on disk; the f32 features of an f32 pass
/// round-trip exactly either way.
pub struct Features {
    shape: Vec<usize>,
    rows: Rows,
    labels: Vec<usize>,
    targets: Vec<f64>,
    target_width: Option<usize>,
    /// Row of each dataset index (`usize::MAX`: not computed).
    row_of: Vec<usize>,
    source: String,
}

impl Features {
    /// The scratch file holding the values when they are kept on disk (on
    /// Unix already unlinked: only this process's handle reaches it).
    pub fn on_disk(&self) -> Option<&Path> {
        match &self.rows {
            Rows::Memory(_) => None,
            Rows::Disk(file) => Some(&file.path.0),
        }
    }

    fn row(&self, i: usize) -> Result<usize, DataError> {
        match self.row_of.get(i) {
            Some(&r) if r != usize::MAX => Ok(r),
            _ => Err(DataError::Mismatch(format!(
                "example {i}: its frozen-prefix features were not computed (only {} of {} were)",
                self.labels.len(),
                self.row_of.len()
            ))),
        }
    }
}

impl Dataset for Features {
    fn len(&self) -> usize {
        self.row_of.len()
    }
    fn sample_shape(&self) -> Vec<usize> {
        self.shape.clone()
    }
    fn label(&self, i: usize) -> usize {
        self.row(i).map_or(0, |r| self.labels[r])
    }
    fn target_width(&self) -> Option<usize> {
        self.target_width
    }
    fn read(&self, indices: &[usize], batch: &mut Batch) -> Result<(), DataError> {
        let size: usize = self.shape.iter().product();
        let width = self.target_width.unwrap_or(0);
        batch.x.clear();
        batch.labels.clear();
        batch.targets.clear();
        // Runs of consecutive rows are read from disk at once.
        let mut run: Option<(usize, usize)> = None;
        for &i in indices {
            let r = self.row(i)?;
            match &self.rows {
                Rows::Memory(x) => batch.x.extend_from_slice(&x[r * size..(r + 1) * size]),
                Rows::Disk(file) => match run {
                    Some((first, count)) if first + count == r => run = Some((first, count + 1)),
                    _ => {
                        if let Some((first, count)) = run {
                            file.read_rows(first, count, size, &mut batch.x)?;
                        }
                        run = Some((r, 1));
                    }
                },
            }
            batch.labels.push(self.labels[r]);
            if width > 0 {
                batch
                    .targets
                    .extend_from_slice(&self.targets[r * width..(r + 1) * width]);
            }
        }
        if let (Rows::Disk(file), Some((first, count))) = (&self.rows, run) {
            file.read_rows(first, count, size, &mut batch.x)?;
        }
        Ok(())
    }
    fn describe(&self) -> String {
        match &self.rows {
            Rows::Memory(_) => format!("frozen-prefix features of {}", self.source),
            Rows::Disk(file) => format!(
                "frozen-prefix features of {} (kept in the scratch file {})",
                self.source,
                file.path.0.display()
            ),
        }
    }
}
