use crate::args::DTypeArg;
use anyhow::{Context, Result};
use clap::Args;
use hvp_model::{Architecture, Model, ParamVector, Weights};
use std::path::PathBuf;

#[derive(Args)]
pub struct InitArgs {
    /// Architecture (see `hvp grad --help`).
    #[arg(long, required_unless_present = "model", conflicts_with = "model")]
    pub arch: Option<String>,
    /// An ONNX model instead of --arch: writes its initial weights (the
    /// initializers) as a state_dict, or with --random-vector a direction over
    /// its trainable parameters (--params restricts them).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// With --model: only parameters whose names match this glob are trainable.
    #[arg(long, requires = "model")]
    pub params: Option<String>,
    /// Seed of the random generator.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write a direction vector with N(0, 1) entries, one tensor per trainable
    /// parameter, instead of weights.
    #[arg(long)]
    pub random_vector: bool,
    /// Input channels of resnet-cifar (3 for CIFAR, 1 for MNIST).
    #[arg(value_parser = crate::checks::channels, long, default_value_t = 3)]
    pub in_channels: usize,
    /// Dtype of the file written.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
    /// Output safetensors file (written atomically).
    #[arg(long)]
    pub out: PathBuf,
}

/// PyTorch-like default initialisation (Linear/Conv U(±1/√fan_in), BatchNorm
/// γ=1, β=0, running mean 0, variance 1), or a random direction.
pub fn run(a: InitArgs) -> Result<()> {
    let (model, onnx_weights) = match (&a.arch, &a.model) {
        (_, Some(path)) => {
            let (model, weights) = crate::args::load_model(&crate::args::ModelArgs {
                model: Some(path.clone()),
                params: a.params.clone(),
                ..Default::default()
            })?;
            (model, Some(weights))
        }
        (Some(arch), None) => {
            let arch: Architecture = arch.parse()?;
            (Model::new(&arch, a.in_channels)?, None)
        }
        (None, None) => anyhow::bail!("give --arch SPEC or --model FILE.onnx"),
    };
    let arch = model.arch.clone();
    // The tensors in f64, their encoded copy and the file's bytes.
    hvp_io::memory::check_fits(
        (model.num_params() as u64).saturating_mul(8 * 3),
        &format!("{arch} ({} parameters)", model.num_params()),
        "choose a smaller architecture",
    )?;
    let mut outputs = crate::output::Outputs::new();
    let slot = outputs.reserve(&a.out)?;
    if a.random_vector {
        outputs.put(
            slot,
            &ParamVector::random_normal(&model, a.seed).safetensors_bytes(&model, a.dtype.into()),
        )?;
    } else {
        let bytes = match onnx_weights {
            // The trainable initializers: a state_dict that `--weights` overrides by name.
            Some(w) => ParamVector { tensors: w.params }.safetensors_bytes(&model, a.dtype.into()),
            None => Weights::init(&model, a.seed).safetensors_bytes(&model, a.dtype.into()),
        };
        outputs.put(slot, &bytes)?;
    }
    outputs
        .commit()
        .with_context(|| format!("writing {}", a.out.display()))?;
    println!(
        "{} for {arch}: {} trainable parameters in {} tensors, written to {}",
        if a.random_vector { "random vector" } else { "weights" },
        model.num_params(),
        model.params.len(),
        a.out.display()
    );
    Ok(())
}
