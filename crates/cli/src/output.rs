//! The output files of one command, written all together or not at all.
//!
//! Every destination is reserved before the computation starts (so a missing
//! folder or a read-only destination is reported at once, not after an hour),
//! written to an exclusively created temporary, and renamed into place only
//! when the whole command succeeded. In a multi-process (MPI) job only rank 0
//! writes; on the other ranks every call is a no-op.

use anyhow::{Context, Result};
use hvp_io::write::{OutputId, Outputs as Staged};
use std::fs::File;
use std::path::{Path, PathBuf};

/// One reserved output.
#[derive(Clone, Copy, Debug)]
pub struct Slot(Option<OutputId>);

pub struct Outputs {
    staged: Option<Staged>,
}

impl Outputs {
    pub fn new() -> Self {
        Outputs {
            staged: hvp_dist::is_root().then(Staged::new),
        }
    }

    /// Reserves `path` (its temporary is created now).
    pub fn reserve(&mut self, path: &Path) -> Result<Slot> {
        match &mut self.staged {
            Some(s) => {
                Ok(Slot(Some(s.reserve(path).with_context(|| {
                    format!("cannot create the output {}", path.display())
                })?)))
            }
            None => Ok(Slot(None)),
        }
    }

    /// Reserves `path` when given.
    pub fn reserve_opt(&mut self, path: Option<&PathBuf>) -> Result<Option<Slot>> {
        path.map(|p| self.reserve(p)).transpose()
    }

    /// Sets the whole content of an output.
    pub fn put(&mut self, slot: Slot, bytes: &[u8]) -> Result<()> {
        if let (Some(s), Some(id)) = (&mut self.staged, slot.0) {
            s.write(id, bytes)?;
        }
        Ok(())
    }

    /// The temporary of an output for streamed writes (`None` off rank 0).
    pub fn file(&mut self, slot: Slot) -> Option<&mut File> {
        match (&mut self.staged, slot.0) {
            (Some(s), Some(id)) => Some(s.file(id)),
            _ => None,
        }
    }

    /// Drops one output: its destination is left as it was.
    pub fn discard(&mut self, slot: Slot) {
        if let (Some(s), Some(id)) = (&mut self.staged, slot.0) {
            s.discard(id);
        }
    }

    /// Renames every output into place.
    pub fn commit(self) -> Result<()> {
        match self.staged {
            Some(s) => Ok(s.commit()?),
            None => Ok(()),
        }
    }
}

impl Default for Outputs {
    fn default() -> Self {
        Self::new()
    }
}

/// Library text with its quoted setting names (`` `damping` ``) as this
/// program's flags (`--damping`).
pub fn as_flags(text: &str) -> String {
    hvp_model::render_settings(text, |s| format!("--{}", s.name().replace('_', "-")))
}
