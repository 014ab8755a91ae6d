use crate::arch::{Init, ParamSpec};
use crate::io::{read_safetensors, StoredTensor};
use crate::{Architecture, Model, ModelError};
use hvp_tensor::{DType, Tensor};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::collections::BTreeMap;
use std::path::Path;

/// A model's parameter and buffer values (stored in f64, cast to the compute
/// dtype per run), aligned with [`Model::params`] and [`Model::buffers`].
#[derive(Clone, Debug)]
pub struct Weights {
    pub params: Vec<Tensor<f64>>,
    pub buffers: Vec<Tensor<f64>>,
}

fn init_tensor(spec: &ParamSpec, rng: &mut StdRng) -> Tensor<f64> {
    let n = spec.numel();
    let data = match spec.init {
        Init::Ones => vec![1.0; n],
        Init::Zeros => vec![0.0; n],
        Init::FanIn(fan_in) => {
            let bound = 1.0 / (fan_in as f64).sqrt();
            (0..n).map(|_| rng.random_range(-bound..bound)).collect()
        }
    };
    Tensor::new(spec.shape.clone(), data).expect("spec shape")
}

/// Suffix of PyTorch's BatchNorm step counter, which eval mode does not use.
const IGNORED_SUFFIX: &str = "num_batches_tracked";

impl Weights {
    /// PyTorch's default initialisation (Linear/Conv: U(±1/√fan_in), BatchNorm
    /// γ=1, β=0, running mean 0, variance 1) from a seeded generator.
    pub fn init(model: &Model, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        Weights {
            params: model.params.iter().map(|s| init_tensor(s, &mut rng)).collect(),
            buffers: model.buffers.iter().map(|s| init_tensor(s, &mut rng)).collect(),
        }
    }

    /// The first parameter or buffer holding a finite value beyond the f32 range
    /// (name and value): computing in f32 would overflow it to infinity. (An
    /// infinite constant, such as an attention mask's `-inf`, is one in f32 too.)
    pub fn first_beyond_f32(&self, model: &Model) -> Option<(String, f64)> {
        let named = model
            .params
            .iter()
            .zip(&self.params)
            .chain(model.buffers.iter().zip(&self.buffers));
        for (spec, t) in named {
            if let Some(v) = t.data().iter().find(|v| v.is_finite() && v.abs() > f32::MAX as f64) {
                return Some((spec.name.clone(), *v));
            }
        }
        None
    }

    /// Reads a state_dict for `arch`, building the model it fits (a `resnet-cifar`
    /// takes its input channels from `conv.weight`); the file is read once.
    pub fn load_for(arch: &Architecture, path: &Path) -> Result<(Model, Self), ModelError> {
        Self::stored_for(arch, path, read_safetensors(path)?)
    }

    /// [`Weights::load_for`] from tensors in memory, name → (shape, row-major
    /// values), e.g. a state_dict handed over by Python; `source` names them in
    /// errors.
    pub fn from_named_for(
        arch: &Architecture,
        source: &str,
        tensors: Vec<(String, Vec<usize>, Vec<f64>)>,
    ) -> Result<(Model, Self), ModelError> {
        let stored = tensors
            .into_iter()
            .map(|(name, shape, data)| (name, Ok(StoredTensor { shape, data })))
            .collect();
        Self::stored_for(arch, Path::new(source), stored)
    }

    fn stored_for(
        arch: &Architecture,
        path: &Path,
        stored: BTreeMap<String, Result<StoredTensor, String>>,
    ) -> Result<(Model, Self), ModelError> {
        let channels = match (arch, stored.get("conv.weight")) {
            (Architecture::ResNetCifar { .. }, Some(Ok(t))) if t.shape.len() == 4 => t.shape[1],
            (Architecture::ResNetCifar { .. }, _) => 3,
            _ => 1,
        };
        let model = Model::new(arch, channels)?;
        let weights = Self::from_stored(&model, path, stored)?;
        Ok((model, weights))
    }

    /// Reads a PyTorch `state_dict` saved with `safetensors.torch.save_file`
    /// (F32 or F64). Every parameter and buffer must be present with its shape;
    /// `num_batches_tracked` is ignored; anything else is an error naming it.
    pub fn load(model: &Model, path: &Path) -> Result<Self, ModelError> {
        Self::from_stored(model, path, read_safetensors(path)?)
    }

    fn from_stored(
        model: &Model,
        path: &Path,
        mut stored: BTreeMap<String, Result<StoredTensor, String>>,
    ) -> Result<Self, ModelError> {
        let arch = model.arch.to_string();
        let mut take = |spec: &ParamSpec| -> Result<Tensor<f64>, ModelError> {
            match stored.remove(&spec.name) {
                None => Err(ModelError::Missing {
                    path: path.to_path_buf(),
                    name: spec.name.clone(),
                    arch: arch.clone(),
                }),
                Some(t) => checked(path, &arch, spec, t),
            }
        };
        let params = model.params.iter().map(&mut take).collect::<Result<Vec<_>, _>>()?;
        let buffers = model.buffers.iter().map(&mut take).collect::<Result<Vec<_>, _>>()?;
        reject_extra(path, &arch, stored)?;
        Ok(Weights { params, buffers })
    }

    /// Replaces, by name, the parameters and buffers stored in `path` (a
    /// safetensors `state_dict`, possibly partial); returns how many were
    /// replaced. Names the model does not have are an error (a typo or another
    /// model's file), `num_batches_tracked` counters excepted.
    pub fn override_from(&mut self, model: &Model, path: &Path) -> Result<usize, ModelError> {
        let mut stored = read_safetensors(path)?;
        let arch = model.arch.to_string();
        let mut replaced = 0;
        for (specs, values) in [(&model.params, &mut self.params), (&model.buffers, &mut self.buffers)] {
            for (spec, value) in specs.iter().zip(values.iter_mut()) {
                if let Some(t) = stored.remove(&spec.name) {
                    *value = checked(path, &arch, spec, t)?;
                    replaced += 1;
                }
            }
        }
        reject_extra(path, &arch, stored)?;
        Ok(replaced)
    }

    /// Writes a loadable `state_dict` (parameters, buffers and, for BatchNorm, a
    /// zero `num_batches_tracked`, so `model.load_state_dict` accepts it strictly).
    pub fn save(&self, model: &Model, path: &Path, dtype: DType) -> Result<(), ModelError> {
        crate::io::atomic_write(path, &self.safetensors_bytes(model, dtype))
    }

    /// The weights as a PyTorch `state_dict` in safetensors (parameters, buffers,
    /// and a zero `num_batches_tracked` per BatchNorm).
    pub fn safetensors_bytes(&self, model: &Model, dtype: DType) -> Vec<u8> {
        let named: Vec<(String, Tensor<f64>)> = model
            .params
            .iter()
            .zip(&self.params)
            .chain(model.buffers.iter().zip(&self.buffers))
            .map(|(s, t)| (s.name.clone(), t.clone()))
            .collect();
        let counters: Vec<String> = model
            .buffers
            .iter()
            .filter_map(|s| s.name.strip_suffix(".running_mean"))
            .map(|p| format!("{p}.{IGNORED_SUFFIX}"))
            .collect();
        crate::io::safetensors_bytes(&named, dtype, &counters)
    }

    /// Parameters cast to the compute type.
    pub fn params_as<T: hvp_tensor::Float>(&self) -> Vec<Tensor<T>> {
        self.params.iter().map(|t| t.cast()).collect()
    }

    /// Buffers cast to the compute type.
    pub fn buffers_as<T: hvp_tensor::Float>(&self) -> Vec<Tensor<T>> {
        self.buffers.iter().map(|t| t.cast()).collect()
    }
}

/// Checks dtype, shape and finiteness of one stored tensor against its spec.
pub(crate) fn checked(
    path: &Path,
    arch: &str,
    spec: &ParamSpec,
    t: Result<StoredTensor, String>,
) -> Result<Tensor<f64>, ModelError> {
    let t = t.map_err(|dtype| ModelError::DType {
        path: path.to_path_buf(),
        name: spec.name.clone(),
        dtype,
    })?;
    if t.shape != spec.shape {
        return Err(ModelError::Shape {
            path: path.to_path_buf(),
            name: spec.name.clone(),
            actual: t.shape,
            expected: spec.shape.clone(),
            arch: arch.to_string(),
        });
    }
    if t.data.iter().any(|v| !v.is_finite()) {
        return Err(ModelError::NonFinite {
            path: path.to_path_buf(),
            name: spec.name.clone(),
        });
    }
    Ok(Tensor::new(t.shape, t.data).expect("shape checked"))
}

/// Errors on the first tensor left over after all expected ones were taken
/// (BatchNorm step counters excepted).
pub(crate) fn reject_extra(
    path: &Path,
    arch: &str,
    rest: BTreeMap<String, Result<StoredTensor, String>>,
) -> Result<(), ModelError> {
    match rest.into_keys().find(|name| !name.ends_with(IGNORED_SUFFIX)) {
        Some(name) => Err(ModelError::Extra {
            path: path.to_path_buf(),
            name,
            arch: arch.to_string(),
        }),
        None => Ok(()),
    }
}
