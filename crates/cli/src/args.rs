//! Arguments shared by the commands, and turning them into a model, weights and data.

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use hvp_data::{ClassFilter, Dataset, NpyDataset, Padded, Subset};
use hvp_model::{Architecture, Model, Weights};
use hvp_tensor::DType;
use std::path::PathBuf;

#[derive(Args, Clone, Debug, Default)]
pub struct ModelArgs {
    /// Architecture: resnet-cifar:A,B,C (CIFAR ResNet, A/B/C blocks of 16/32/64
    /// channels), mlp:D,H1,...,C (Linear-ReLU stack) or logreg:D,C.
    #[arg(long, required_unless_present = "model", conflicts_with = "model")]
    pub arch: Option<String>,
    /// PyTorch state_dict saved with safetensors.torch.save_file (F32 or F64);
    /// with --model, overrides the ONNX initializers by name.
    #[arg(long, required_unless_present = "model")]
    pub weights: Option<PathBuf>,
    /// An ONNX model (torch.onnx.export): graph and weights, replacing --arch/--weights.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// With --model: only parameters whose names match this glob are trainable
    /// (e.g. 'fc.*'); the Hessian is taken with respect to them alone. Several
    /// globs are separated by commas ('layer3.*,fc.*'); '!glob' excludes
    /// ('!*bn*': all but the BatchNorm parameters).
    #[arg(long, requires = "model")]
    pub params: Option<String>,
    /// Loss applied to the model's outputs: softmax cross-entropy on integer class
    /// labels, or mean squared error on float targets ([N] or [N, K] float NPY
    /// labels; the mean over examples equals torch.nn.MSELoss()).
    #[arg(long, value_enum, default_value = "ce")]
    pub loss: LossArg,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LossArg {
    /// Softmax cross-entropy (classification).
    #[default]
    Ce,
    /// Mean squared error (regression).
    Mse,
}

/// Checks that `--loss` fits the labels: class labels for ce, float targets for mse.
pub fn check_loss(loss: LossArg, data: &dyn Dataset) -> Result<()> {
    match (loss, data.target_width()) {
        (LossArg::Ce, Some(_)) => bail!(
            "{} has float labels (regression targets): pass --loss mse, or save the class labels as integers",
            data.describe()
        ),
        (LossArg::Mse, None) => bail!(
            "--loss mse needs float regression targets, but {} has integer class labels (save the targets as a \
             float32/float64 NPY array [N] or [N, K] and give it as --labels)",
            data.describe()
        ),
        _ => Ok(()),
    }
}

#[derive(Args, Clone, Debug)]
pub struct DataArgs {
    /// Inputs as an NPY array [N, ...] (float32 or float64).
    #[arg(long, requires = "labels", conflicts_with = "dataset")]
    pub inputs: Option<PathBuf>,
    /// Labels as an NPY array [N] (uint8, int32 or int64).
    #[arg(long, requires = "inputs")]
    pub labels: Option<PathBuf>,
    /// mnist:DIR[:train|test] (MNIST or Fashion-MNIST IDX files, gz or raw),
    /// cifar10:DIR[:train|test] (CIFAR-10 binary batches; pixels scaled to [0, 1])
    /// or npy:X.npy,Y.npy (as --inputs/--labels).
    #[arg(long)]
    pub dataset: Option<String>,
    /// Use only the first N examples.
    #[arg(value_parser = crate::checks::limit, long)]
    pub limit: Option<usize>,
    /// Zero-pad images by P pixels on each side (e.g. 2 for 28x28 → 32x32).
    #[arg(value_parser = crate::checks::pad, long, default_value_t = 0)]
    pub pad: usize,
    /// Keep only these classes, relabelled 0, 1, … in this order (e.g. 1,7).
    #[arg(long, value_delimiter = ',')]
    pub classes: Option<Vec<usize>>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum CurvatureArg {
    /// Exact Hessian, by forward-over-reverse.
    Hessian,
    /// Generalised Gauss-Newton Jᵀ H_out J (positive semi-definite).
    Ggn,
    /// Empirical Fisher (1/N) Σ ∇ℓ_i ∇ℓ_iᵀ (positive semi-definite).
    Fisher,
}

impl From<CurvatureArg> for hvp_curvature::Curvature {
    fn from(c: CurvatureArg) -> Self {
        match c {
            CurvatureArg::Hessian => hvp_curvature::Curvature::Hessian,
            CurvatureArg::Ggn => hvp_curvature::Curvature::Ggn,
            CurvatureArg::Fisher => hvp_curvature::Curvature::Fisher,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DTypeArg {
    F32,
    F64,
}

impl From<DTypeArg> for DType {
    fn from(d: DTypeArg) -> DType {
        match d {
            DTypeArg::F32 => DType::F32,
            DTypeArg::F64 => DType::F64,
        }
    }
}

#[derive(Args, Clone, Debug)]
pub struct RunArgs {
    /// Examples per batch (memory is one batch of activations and tangents).
    #[arg(value_parser = crate::checks::batch_size, long, default_value_t = 256)]
    pub batch_size: usize,
    /// Compute dtype; sums over batches are accumulated in f64 either way.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
    /// Worker threads (default: all cores).
    #[arg(value_parser = crate::checks::threads, long)]
    pub threads: Option<usize>,
    /// No progress bar and no summary line.
    #[arg(long)]
    pub quiet: bool,
}

/// Sizes the global rayon pool.
pub fn set_threads(threads: Option<usize>) -> Result<()> {
    if let Some(t) = threads {
        if t == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
            .context("cannot set up the thread pool")?;
    }
    Ok(())
}

/// Refuses weights that the compute dtype cannot hold: in f32 a value beyond
/// ±3.4e38 would become infinite and every product silently wrong.
pub fn check_weights_fit(model: &Model, weights: &Weights, dtype: DType) -> Result<()> {
    if dtype == DType::F64 {
        return Ok(());
    }
    match weights.first_beyond_f32(model) {
        Some((name, v)) => bail!(
            "tensor '{name}' holds {v:e}, beyond the f32 range (±3.4e38): computing in f32 would overflow to \
             infinity; pass --dtype f64"
        ),
        None => Ok(()),
    }
}

/// Parses `--arch` and reads the weights, or imports `--model` (ONNX), and builds the model.
pub fn load_model(m: &ModelArgs) -> Result<(Model, Weights)> {
    if m.params.is_some() && m.model.is_none() {
        bail!(
            "--params selects parameters of ONNX models (--model); the built-in architecture {} always uses all \
             its parameters. Export the model to ONNX to restrict the Hessian to a subset (README: Your own model)",
            m.arch.as_deref().unwrap_or("")
        );
    }
    if let Some(path) = &m.model {
        let options = hvp_onnx::ImportOptions {
            params_glob: m.params.clone(),
        };
        let imported = hvp_onnx::load(path, &options)?;
        for w in &imported.warnings {
            eprintln!("warning: {}: {}", path.display(), crate::output::as_flags(w));
        }
        let (model, mut weights) = (imported.model, imported.weights);
        if let Some(file) = &m.weights {
            weights
                .override_from(&model, file)
                .with_context(|| format!("overriding the weights of {} from {}", path.display(), file.display()))?;
        }
        return Ok((model, weights));
    }
    match (&m.arch, &m.weights) {
        (Some(arch), Some(weights)) => {
            let arch: Architecture = arch.parse()?;
            Ok(Weights::load_for(&arch, weights)?)
        }
        _ => bail!("give the model as --arch SPEC --weights FILE.safetensors or as --model FILE.onnx"),
    }
}

/// A dataset that owns its source and applies `--pad`.
pub struct LoadedData {
    source: Box<dyn Dataset>,
    limit: Option<usize>,
}

impl LoadedData {
    /// The dataset after `--limit`.
    pub fn view(&self) -> Subset<'_> {
        Subset::first(self.source.as_ref(), self.limit.unwrap_or(usize::MAX))
    }
}

/// A dataset given as one string (see [`hvp_data::open_dataset`]).
pub fn open_data_spec(spec: &str, pad: usize, classes: Option<&[usize]>) -> Result<Box<dyn Dataset>> {
    Ok(hvp_data::open_dataset(spec, pad, classes)?)
}

pub fn load_data(d: &DataArgs) -> Result<LoadedData> {
    let source: Box<dyn Dataset> = match (&d.inputs, &d.labels, &d.dataset) {
        (Some(x), Some(y), None) => {
            let source: Box<dyn Dataset> = Box::new(NpyDataset::open(x, y)?);
            let source: Box<dyn Dataset> = if d.pad > 0 {
                Box::new(Padded::new(source, d.pad)?)
            } else {
                source
            };
            match &d.classes {
                Some(c) => Box::new(ClassFilter::new(source, c.clone())?),
                None => source,
            }
        }
        (None, None, Some(spec)) => open_data_spec(spec, d.pad, d.classes.as_deref())?,
        _ => bail!("give the data as --inputs X.npy --labels Y.npy or as --dataset SPEC"),
    };
    if d.limit == Some(0) {
        bail!("--limit must be at least 1");
    }
    Ok(LoadedData { source, limit: d.limit })
}
