use crate::io::read_safetensors;
use crate::weights::{checked, reject_extra};
use crate::{Model, ModelError};
use hvp_tensor::{DType, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use std::path::Path;

/// A vector in parameter space: one f64 tensor per trainable parameter, aligned
/// with [`Model::params`] (gradients, directions `v`, products `H v`).
#[derive(Clone, Debug, PartialEq)]
pub struct ParamVector {
    pub tensors: Vec<Tensor<f64>>,
}

impl ParamVector {
    pub fn zeros(model: &Model) -> Self {
        ParamVector {
            tensors: model.params.iter().map(|s| Tensor::zeros(&s.shape)).collect(),
        }
    }

    /// Entries i.i.d. N(0, 1) from a seeded generator.
    pub fn random_normal(model: &Model, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        ParamVector {
            tensors: model
                .params
                .iter()
                .map(|s| {
                    let data = (0..s.numel()).map(|_| StandardNormal.sample(&mut rng)).collect();
                    Tensor::new(s.shape.clone(), data).expect("spec shape")
                })
                .collect(),
        }
    }

    /// Reads a vector file: exactly one F32/F64 tensor per trainable parameter,
    /// same names and shapes as the weights, all finite.
    pub fn load(model: &Model, path: &Path) -> Result<Self, ModelError> {
        let mut stored = read_safetensors(path)?;
        let arch = model.arch.to_string();
        let tensors = model
            .params
            .iter()
            .map(|spec| match stored.remove(&spec.name) {
                None => Err(ModelError::Missing {
                    path: path.to_path_buf(),
                    name: spec.name.clone(),
                    arch: arch.clone(),
                }),
                Some(t) => checked(path, &arch, spec, t),
            })
            .collect::<Result<Vec<_>, _>>()?;
        reject_extra(path, &arch, stored)?;
        Ok(ParamVector { tensors })
    }

    /// Writes the vector atomically in `dtype`, one tensor per parameter name.
    pub fn save(&self, model: &Model, path: &Path, dtype: DType) -> Result<(), ModelError> {
        crate::io::atomic_write(path, &self.safetensors_bytes(model, dtype))
    }

    /// The vector as a safetensors file in `dtype`, one tensor per parameter.
    pub fn safetensors_bytes(&self, model: &Model, dtype: DType) -> Vec<u8> {
        let named: Vec<(String, Tensor<f64>)> = model
            .params
            .iter()
            .zip(&self.tensors)
            .map(|(s, t)| (s.name.clone(), t.clone()))
            .collect();
        crate::io::safetensors_bytes(&named, dtype, &[])
    }

    fn values(&self) -> impl Iterator<Item = &f64> {
        self.tensors.iter().flat_map(|t| t.data().iter())
    }

    pub fn dot(&self, other: &Self) -> f64 {
        self.values().zip(other.values()).map(|(a, b)| a * b).sum()
    }

    pub fn norm(&self) -> f64 {
        self.dot(self).sqrt()
    }

    /// `self += a · x`.
    pub fn axpy(&mut self, a: f64, x: &Self) {
        for (t, u) in self.tensors.iter_mut().zip(&x.tensors) {
            t.data_mut().iter_mut().zip(u.data()).for_each(|(p, q)| *p += a * q);
        }
    }

    pub fn scale(&mut self, a: f64) {
        for t in &mut self.tensors {
            t.data_mut().iter_mut().for_each(|p| *p *= a);
        }
    }

    /// `‖self − reference‖ / ‖reference‖`.
    pub fn relative_error(&self, reference: &Self) -> f64 {
        let mut diff = self.clone();
        diff.axpy(-1.0, reference);
        diff.norm() / reference.norm().max(f64::MIN_POSITIVE)
    }

    /// Number of scalars.
    pub fn len(&self) -> usize {
        self.tensors.iter().map(|t| t.numel()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A vector of zeros with the same tensor shapes.
    pub fn zeros_like(&self) -> Self {
        ParamVector {
            tensors: self.tensors.iter().map(|t| Tensor::zeros(t.shape())).collect(),
        }
    }

    /// All entries in parameter order, concatenated.
    pub fn to_flat(&self) -> Vec<f64> {
        self.values().copied().collect()
    }

    /// A vector shaped like `self` holding `flat` (in parameter order).
    pub fn with_flat(&self, flat: &[f64]) -> Self {
        assert_eq!(flat.len(), self.len(), "flat vector length");
        let mut out = self.zeros_like();
        let mut at = 0;
        for t in &mut out.tensors {
            let n = t.numel();
            t.data_mut().copy_from_slice(&flat[at..at + n]);
            at += n;
        }
        out
    }

    /// Whether every entry is finite.
    pub fn all_finite(&self) -> bool {
        self.tensors.iter().all(|t| t.all_finite())
    }

    /// The tensors cast to the compute type.
    pub fn as_dtype<T: hvp_tensor::Float>(&self) -> Vec<Tensor<T>> {
        self.tensors.iter().map(|t| t.cast()).collect()
    }
}
