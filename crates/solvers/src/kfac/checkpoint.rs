//! Checkpoints of a factor computation: the running sums of the pass under
//! way and how many batches they hold, saved atomically every so often, so a
//! run that was stopped continues where its last save left it.

use super::*;
use std::path::PathBuf;
use std::time::Duration;

/// Where and how often a factor computation saves its progress.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// The checkpoint file (safetensors, written atomically).
    pub path: PathBuf,
    /// The least time between two saves (zero: after every batch).
    pub every: Duration,
    /// Continue from the file when it exists (it must hold this configuration).
    pub resume: bool,
}

/// The pass a checkpoint was saved in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Stage {
    /// The first pass (`A`, `S`, the diagonal).
    Covariance,
    /// EK-FAC's eigenvalue corrections (the first pass complete).
    Correction,
}

impl Stage {
    fn code(self) -> f64 {
        match self {
            Stage::Covariance => 0.0,
            Stage::Correction => 1.0,
        }
    }
}

/// Saves the sums after a batch when `every` has passed since the last save.
pub(super) struct Saver {
    path: PathBuf,
    key: String,
    batch_size: usize,
    every: Duration,
    last: Instant,
    pub(super) stage: Stage,
}

impl Saver {
    pub(super) fn new(checkpoint: &Checkpoint, key: &str, batch_size: usize) -> Self {
        Saver {
            path: checkpoint.path.clone(),
            key: key.to_string(),
            batch_size,
            every: checkpoint.every,
            last: Instant::now(),
            stage: Stage::Covariance,
        }
    }

    /// Called with the number of batches of the current pass done.
    pub(super) fn after_batch(&mut self, batches: usize, sums: &Sums) -> Result<(), SolverError> {
        if self.last.elapsed() < self.every {
            return Ok(());
        }
        save(&self.path, &self.key, self.stage, (batches, self.batch_size), sums)?;
        self.last = Instant::now();
        Ok(())
    }
}

/// `(batches, batch_size)`: the batches of the pass the sums hold, and their
/// size (the batch boundaries, and so the label sampling and the batches to
/// skip, depend on it; the key of the factors does not).
fn save(
    path: &Path,
    key: &str,
    stage: Stage,
    (batches, batch_size): (usize, usize),
    sums: &Sums,
) -> Result<(), SolverError> {
    let vector = |v: &[f64]| Tensor::new(vec![v.len()], v.to_vec()).expect("1-d");
    let mut named = vec![
        (format!("key.{key}"), vector(&[0.0])),
        ("stage".to_string(), vector(&[stage.code()])),
        ("batches".to_string(), vector(&[batches as f64])),
        ("batch_size".to_string(), vector(&[batch_size as f64])),
    ];
    let groups = [("a", &sums.a), ("s", &sums.s), ("diag", &sums.diag)];
    for (name, parts) in groups {
        named.extend(
            parts
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("{name}.{i}"), vector(v))),
        );
    }
    if stage == Stage::Correction {
        named.extend(
            sums.corrected
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("corrected.{i}"), vector(v))),
        );
    }
    write_safetensors(path, &named, DType::F64)
        .map_err(|e| SolverError::BadOption(format!("saving the factor checkpoint {}: {e}", path.display())))
}

/// Restores `sums` from the checkpoint when its file exists: the stage it was
/// saved in and the batches of that pass it holds. A file of another
/// configuration, or not a checkpoint, is an error naming it.
pub(super) fn load(
    checkpoint: &Checkpoint,
    key: &str,
    batch_size: usize,
    sums: &mut Sums,
) -> Result<Option<(Stage, usize)>, SolverError> {
    let path = &checkpoint.path;
    if !path.is_file() {
        return Ok(None);
    }
    let unusable = |why: String| {
        SolverError::BadOption(format!(
            "the factor checkpoint {} {why}; delete it to start over, or rerun with the options that wrote it",
            path.display()
        ))
    };
    let mut stored = read_safetensors(path).map_err(|e| unusable(format!("cannot be read ({e})")))?;
    if !stored.contains_key(&format!("key.{key}")) {
        let other = stored.keys().find_map(|k| k.strip_prefix("key.")).map(str::to_string);
        return Err(unusable(match other {
            Some(k) => format!("was written for another model, data or setting (key {k}, this run's {key})"),
            None => "is not a factor checkpoint".to_string(),
        }));
    }
    let mut take = |name: String, len: usize| match stored.remove(&name) {
        Some(Ok(t)) if t.data.len() == len => Ok(t.data),
        _ => Err(unusable(format!("has no {name} of {len} numbers"))),
    };
    let stage = match take("stage".into(), 1)?[0] {
        0.0 => Stage::Covariance,
        1.0 => Stage::Correction,
        other => return Err(unusable(format!("names an unknown pass ({other})"))),
    };
    let batches = take("batches".into(), 1)?[0] as usize;
    let saved_size = take("batch_size".into(), 1)?[0] as usize;
    if saved_size != batch_size {
        return Err(unusable(format!(
            "was written with batches of {saved_size} (this run: {batch_size}); rerun with --batch-size {saved_size}"
        )));
    }
    for (name, parts) in [("a", &mut sums.a), ("s", &mut sums.s), ("diag", &mut sums.diag)] {
        for (i, v) in parts.iter_mut().enumerate() {
            *v = take(format!("{name}.{i}"), v.len())?;
        }
    }
    if stage == Stage::Correction {
        for (i, v) in sums.corrected.iter_mut().enumerate() {
            *v = take(format!("corrected.{i}"), v.len())?;
        }
    }
    Ok(Some((stage, batches)))
}

impl Checkpoint {
    /// Removes the file once the factors it led to are stored (a leftover one
    /// is harmless: its key names the configuration it belongs to).
    pub fn discard(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
