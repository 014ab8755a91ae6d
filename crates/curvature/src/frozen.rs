//! A frozen feature extractor evaluated once. When only some parameters are
//! trainable (e.g. the last layer of an imported network), the nodes before
//! the first trainable one compute the same values in every pass; the model is
//! cut there ([`hvp_autodiff::Graph::split_frozen`]), each example's features
//! are computed once and kept in memory, and every gradient, product, factor
//! and score runs through the trainable rest only, on those features.

use crate::CurvatureError;
use hvp_autodiff::{Graph, Op, Tape};
use hvp_data::{Batch, DataError, Dataset};
use hvp_model::{Architecture, Model, Weights};
use hvp_tensor::{DType, Float, Tensor};

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
        let all: Vec<usize>;
        let indices = match indices {
            Some(i) => i,
            None => {
                all = (0..data.len()).collect();
                &all
            }
        };
        let size = self.feature_size();
        hvp_io::memory::check_fits(
            (indices.len() as u64).saturating_mul(size as u64).saturating_mul(8),
            &format!("the frozen prefix's features of {} examples", indices.len()),
            "select more parameters (`params`) so that the cut comes earlier, or use fewer examples",
        )?;
        let mut x = Vec::with_capacity(indices.len() * size);
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
                    batch: x.len() / size.max(1) / batch_size.max(1),
                });
            }
            x.extend(out);
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
            x,
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

/// The frozen prefix's output for the examples of a dataset, with their labels
/// (and targets), indexed as the dataset is. Values are stored in f64; the
/// f32 features of an f32 pass round-trip exactly.
pub struct Features {
    shape: Vec<usize>,
    x: Vec<f64>,
    labels: Vec<usize>,
    targets: Vec<f64>,
    target_width: Option<usize>,
    /// Row of each dataset index (`usize::MAX`: not computed).
    row_of: Vec<usize>,
    source: String,
}

impl Features {
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
        for &i in indices {
            let r = self.row(i)?;
            batch.x.extend_from_slice(&self.x[r * size..(r + 1) * size]);
            batch.labels.push(self.labels[r]);
            if width > 0 {
                batch
                    .targets
                    .extend_from_slice(&self.targets[r * width..(r + 1) * width]);
            }
        }
        Ok(())
    }
    fn describe(&self) -> String {
        format!("frozen-prefix features of {}", self.source)
    }
}
