//! Views of a dataset: a subset of its examples, zero padding of its images.

use crate::{Batch, DataError, Dataset};

/// The examples of `inner` at `indices`, in that order (`--limit`, random subsets).
pub struct Subset<'a> {
    inner: &'a dyn Dataset,
    indices: Vec<usize>,
}

impl<'a> Subset<'a> {
    pub fn new(inner: &'a dyn Dataset, indices: Vec<usize>) -> Result<Self, DataError> {
        if let Some(&i) = indices.iter().find(|&&i| i >= inner.len()) {
            return Err(DataError::Mismatch(format!(
                "index {i} is out of range for {}",
                inner.describe()
            )));
        }
        Ok(Subset { inner, indices })
    }

    /// The first `n` examples (all when `n` exceeds the length).
    pub fn first(inner: &'a dyn Dataset, n: usize) -> Self {
        Subset {
            inner,
            indices: (0..n.min(inner.len())).collect(),
        }
    }
}

impl Dataset for Subset<'_> {
    fn len(&self) -> usize {
        self.indices.len()
    }
    fn sample_shape(&self) -> Vec<usize> {
        self.inner.sample_shape()
    }
    fn label(&self, i: usize) -> usize {
        self.inner.label(self.indices[i])
    }
    fn target_width(&self) -> Option<usize> {
        self.inner.target_width()
    }
    fn read(&self, indices: &[usize], batch: &mut Batch) -> Result<(), DataError> {
        let mapped: Vec<usize> = indices.iter().map(|&i| self.indices[i]).collect();
        self.inner.read(&mapped, batch)
    }
    fn describe(&self) -> String {
        format!("{} examples of {}", self.len(), self.inner.describe())
    }
}

/// The first `n` examples of a dataset it owns (a `Subset::first` that can
/// outlive its caller's borrow).
pub struct Limited<D> {
    inner: D,
    n: usize,
}

impl<D: Dataset> Limited<D> {
    pub fn new(inner: D, n: usize) -> Self {
        let n = n.min(inner.len());
        Limited { inner, n }
    }
}

impl<D: Dataset> Dataset for Limited<D> {
    fn len(&self) -> usize {
        self.n
    }
    fn sample_shape(&self) -> Vec<usize> {
        self.inner.sample_shape()
    }
    fn label(&self, i: usize) -> usize {
        self.inner.label(i)
    }
    fn target_width(&self) -> Option<usize> {
        self.inner.target_width()
    }
    fn read(&self, indices: &[usize], batch: &mut Batch) -> Result<(), DataError> {
        if let Some(&i) = indices.iter().find(|&&i| i >= self.n) {
            return Err(DataError::Mismatch(format!(
                "index {i} is beyond the first {} examples",
                self.n
            )));
        }
        self.inner.read(indices, batch)
    }
    fn describe(&self) -> String {
        format!("the first {} examples of {}", self.n, self.inner.describe())
    }
}

/// Images `[C, H, W]` zero-padded by `pad` pixels on every side (e.g. 28×28
/// Fashion-MNIST to the 32×32 the CIFAR ResNet was designed for).
pub struct Padded<D> {
    inner: D,
    pad: usize,
}

impl<D: Dataset> Padded<D> {
    pub fn new(inner: D, pad: usize) -> Result<Self, DataError> {
        if inner.sample_shape().len() != 3 {
            return Err(DataError::Mismatch(format!(
                "padding needs images [C, H, W], {} has examples of shape {:?}",
                inner.describe(),
                inner.sample_shape()
            )));
        }
        Ok(Padded { inner, pad })
    }
}

impl<D: Dataset> Dataset for Padded<D> {
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn sample_shape(&self) -> Vec<usize> {
        let s = self.inner.sample_shape();
        vec![s[0], s[1] + 2 * self.pad, s[2] + 2 * self.pad]
    }
    fn label(&self, i: usize) -> usize {
        self.inner.label(i)
    }
    fn target_width(&self) -> Option<usize> {
        self.inner.target_width()
    }
    fn read(&self, indices: &[usize], batch: &mut Batch) -> Result<(), DataError> {
        let mut raw = Batch::default();
        self.inner.read(indices, &mut raw)?;
        let s = self.inner.sample_shape();
        let (c, h, w) = (s[0], s[1], s[2]);
        let (ph, pw) = (h + 2 * self.pad, w + 2 * self.pad);
        batch.x.clear();
        batch.x.resize(indices.len() * c * ph * pw, 0.0);
        for (plane_out, plane_in) in batch.x.chunks_mut(ph * pw).zip(raw.x.chunks(h * w)) {
            for y in 0..h {
                let dst = (y + self.pad) * pw + self.pad;
                plane_out[dst..dst + w].copy_from_slice(&plane_in[y * w..(y + 1) * w]);
            }
        }
        batch.labels = raw.labels;
        batch.targets = raw.targets;
        Ok(())
    }
    fn describe(&self) -> String {
        format!("{} padded by {}", self.inner.describe(), self.pad)
    }
}

/// Examples held in memory as f64 (synthetic data, tests, benchmarks).
pub struct InMemory {
    shape: Vec<usize>,
    x: Vec<f64>,
    labels: Vec<usize>,
}

impl InMemory {
    /// `x` holds `labels.len()` examples of `shape`, row-major.
    pub fn new(shape: Vec<usize>, x: Vec<f64>, labels: Vec<usize>) -> Result<Self, DataError> {
        let size: usize = shape.iter().product();
        if x.len() != size * labels.len() {
            return Err(DataError::Mismatch(format!(
                "{} values for {} examples of shape {shape:?}",
                x.len(),
                labels.len()
            )));
        }
        Ok(InMemory { shape, x, labels })
    }
}

impl Dataset for InMemory {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn sample_shape(&self) -> Vec<usize> {
        self.shape.clone()
    }
    fn label(&self, i: usize) -> usize {
        self.labels[i]
    }
    fn read(&self, indices: &[usize], batch: &mut Batch) -> Result<(), DataError> {
        let size: usize = self.shape.iter().product();
        batch.x.clear();
        batch.labels.clear();
        for &i in indices {
            let ex = &self.x[i * size..(i + 1) * size];
            if ex.iter().any(|v| !v.is_finite()) {
                return Err(DataError::NonFinite { index: i });
            }
            batch.x.extend_from_slice(ex);
            batch.labels.push(self.labels[i]);
        }
        Ok(())
    }
    fn describe(&self) -> String {
        format!("{} in-memory examples", self.len())
    }
}

impl<D: Dataset + ?Sized> Dataset for Box<D> {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn sample_shape(&self) -> Vec<usize> {
        (**self).sample_shape()
    }
    fn label(&self, i: usize) -> usize {
        (**self).label(i)
    }
    fn target_width(&self) -> Option<usize> {
        (**self).target_width()
    }
    fn read(&self, indices: &[usize], batch: &mut Batch) -> Result<(), DataError> {
        (**self).read(indices, batch)
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
}

/// The examples of `inner` whose label is in `classes`, relabelled to the position
/// of their label in `classes` (e.g. MNIST 1 vs 7 → labels 0 and 1).
pub struct ClassFilter<D> {
    inner: D,
    indices: Vec<usize>,
    classes: Vec<usize>,
}

impl<D: Dataset> ClassFilter<D> {
    pub fn new(inner: D, classes: Vec<usize>) -> Result<Self, DataError> {
        if inner.target_width().is_some() {
            return Err(DataError::Mismatch(format!(
                "{} holds regression targets, not classes to filter",
                inner.describe()
            )));
        }
        let indices: Vec<usize> = (0..inner.len())
            .filter(|&i| classes.contains(&inner.label(i)))
            .collect();
        if indices.is_empty() {
            return Err(DataError::Mismatch(format!(
                "no example of {} has a label in {classes:?}",
                inner.describe()
            )));
        }
        Ok(ClassFilter {
            inner,
            indices,
            classes,
        })
    }
}

impl<D: Dataset> Dataset for ClassFilter<D> {
    fn len(&self) -> usize {
        self.indices.len()
    }
    fn sample_shape(&self) -> Vec<usize> {
        self.inner.sample_shape()
    }
    fn label(&self, i: usize) -> usize {
        let l = self.inner.label(self.indices[i]);
        self.classes.iter().position(|&c| c == l).unwrap_or(l)
    }
    fn read(&self, indices: &[usize], batch: &mut Batch) -> Result<(), DataError> {
        let mapped: Vec<usize> = indices.iter().map(|&i| self.indices[i]).collect();
        self.inner.read(&mapped, batch)?;
        for l in &mut batch.labels {
            *l = self.classes.iter().position(|c| c == l).unwrap_or(*l);
        }
        Ok(())
    }
    fn describe(&self) -> String {
        format!("classes {:?} of {}", self.classes, self.inner.describe())
    }
}

/// `inner` with the labels of some examples replaced (label-noise experiments).
pub struct Relabelled<D> {
    inner: D,
    new_labels: std::collections::BTreeMap<usize, usize>,
}

impl<D: Dataset> Relabelled<D> {
    /// `new_labels[i]` replaces example i's label.
    pub fn new(inner: D, new_labels: std::collections::BTreeMap<usize, usize>) -> Self {
        Relabelled { inner, new_labels }
    }

    /// Indices whose label was changed.
    pub fn changed(&self) -> Vec<usize> {
        self.new_labels.keys().copied().collect()
    }
}

impl<D: Dataset> Dataset for Relabelled<D> {
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn sample_shape(&self) -> Vec<usize> {
        self.inner.sample_shape()
    }
    fn label(&self, i: usize) -> usize {
        self.new_labels.get(&i).copied().unwrap_or_else(|| self.inner.label(i))
    }
    fn target_width(&self) -> Option<usize> {
        self.inner.target_width()
    }
    fn read(&self, indices: &[usize], batch: &mut Batch) -> Result<(), DataError> {
        self.inner.read(indices, batch)?;
        for (l, i) in batch.labels.iter_mut().zip(indices) {
            if let Some(&n) = self.new_labels.get(i) {
                *l = n;
            }
        }
        Ok(())
    }
    fn describe(&self) -> String {
        format!(
            "{} with {} labels changed",
            self.inner.describe(),
            self.new_labels.len()
        )
    }
}
