//! Factors saved as safetensors and read back, every shape checked.

use super::*;

impl Factors {
    /// Writes the factors as safetensors: `layer.NAME.{A,S}_{eigenvalues,eigenvectors}`,
    /// `layer.NAME.corrected_eigenvalues` (EK-FAC), `diagonal.NAME`, `examples`.
    pub fn save(&self, model: &Model, path: &Path) -> Result<(), ModelError> {
        let mut named = vec![(
            "examples".to_string(),
            Tensor::new(vec![1], vec![self.examples as f64]).expect("1"),
        )];
        let layers = layers_of(model);
        for (f, l) in self.layers.iter().zip(&layers) {
            let name = l.stored_name(model);
            let (s, a) = (f.s_dim(), f.a_dim());
            named.push((
                format!("layer.{name}.A_eigenvalues"),
                mat(1, a, f.a_vals.clone()).reshape(&[a]).expect("a"),
            ));
            named.push((format!("layer.{name}.A_eigenvectors"), mat(a, a, f.a_vecs.clone())));
            named.push((
                format!("layer.{name}.S_eigenvalues"),
                mat(1, s, f.s_vals.clone()).reshape(&[s]).expect("s"),
            ));
            named.push((format!("layer.{name}.S_eigenvectors"), mat(s, s, f.s_vecs.clone())));
            if let Some(c) = &f.corrected {
                named.push((format!("layer.{name}.corrected_eigenvalues"), mat(s, a, c.clone())));
            }
        }
        for (p, d) in &self.diagonal {
            let spec = &model.params[*p];
            named.push((
                format!("diagonal.{}", spec.name),
                Tensor::new(spec.shape.clone(), d.clone()).expect("param shape"),
            ));
        }
        write_safetensors(path, &named, DType::F64)
    }

    /// Reads factors written by [`Factors::save`] for this model, checking every shape.
    pub fn load(model: &Model, path: &Path) -> Result<Factors, ModelError> {
        let mut stored = read_safetensors(path)?;
        let bad = |name: String, reason: &str| ModelError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("{name}: {reason} (were these factors computed for {}?)", model.arch),
        };
        let mut take = |name: String, len: usize| -> Result<Vec<f64>, ModelError> {
            match stored.remove(&name) {
                Some(Ok(t)) if t.data.len() == len => Ok(t.data),
                Some(_) => Err(bad(name, "wrong size or dtype")),
                None => Err(bad(name, "missing")),
            }
        };
        let examples = take("examples".into(), 1)?[0] as usize;
        let mut layers = Vec::new();
        let mut kinds = Vec::new();
        for l in layers_of(model) {
            let name = l.stored_name(model);
            let (s, a) = (l.s_dim, l.a_dim);
            let corrected = take(format!("layer.{name}.corrected_eigenvalues"), s * a).ok();
            kinds.push(corrected.is_some());
            layers.push(LayerFactors {
                weight: l.weight,
                bias: l.bias,
                row0: l.row0(),
                a_vals: take(format!("layer.{name}.A_eigenvalues"), a)?,
                a_vecs: take(format!("layer.{name}.A_eigenvectors"), a * a)?,
                s_vals: take(format!("layer.{name}.S_eigenvalues"), s)?,
                s_vecs: take(format!("layer.{name}.S_eigenvectors"), s * s)?,
                corrected,
            });
        }
        let in_layer = |p: usize| layers.iter().any(|l| l.weight == p || l.bias == Some(p));
        let with_diagonal = batch_norm_params(model);
        let mut diagonal = Vec::new();
        for (p, spec) in model.params.iter().enumerate() {
            if !in_layer(p) && with_diagonal.contains(&p) {
                diagonal.push((p, take(format!("diagonal.{}", spec.name), spec.numel())?));
            }
        }
        let kind = if !kinds.is_empty() && kinds.iter().all(|&k| k) {
            FactorKind::Ekfac
        } else {
            FactorKind::Kfac
        };
        Ok(Factors {
            kind,
            layers,
            diagonal,
            examples,
        })
    }
}
