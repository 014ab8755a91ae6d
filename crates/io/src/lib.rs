//! File access that a hostile or broken input cannot turn against the user:
//!
//! * [`read`]: reads of regular files only (no FIFOs, devices or directories),
//!   bounded in size, and gzip decompression bounded by what the format declares;
//! * [`confine`]: paths named *inside* a file (ONNX external data) resolved
//!   only within the folder of that file;
//! * [`write`]: outputs written to temporaries created exclusively (never through
//!   a planted symlink), renamed into place all together or not at all, and lock
//!   files so that two runs never share one output;
//! * [`fuzz`]: a deterministic mutator for the parsers' fuzz tests;
//! * [`memory`]: allocations sized from headers or flags checked against the
//!   memory the machine has before they are made.

pub mod confine;
pub mod fuzz;
pub mod hash;
pub mod memory;
pub mod read;
pub mod write;

use std::path::PathBuf;

/// Why a file could not be read or written safely.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is {kind}, not a regular file; give a regular file")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{path} has {size} bytes, more than the {limit} bytes accepted for {what}")]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
        what: String,
    },
    #[error("{path}: the gzip stream inflates to more than {limit} bytes, more than any file of this kind needs; the file is corrupt or not what it claims")]
    Inflate { path: PathBuf, limit: u64 },
    #[error("{path}: gzip stream is damaged ({reason})")]
    BadGzip { path: PathBuf, reason: String },
    #[error("{file}: refers to '{location}', which is outside the folder {base}; external files must lie inside the model's folder (no '..', no absolute paths, no symlinks out)")]
    Escapes {
        file: PathBuf,
        location: String,
        base: PathBuf,
    },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {reason}")]
    Destination { path: PathBuf, reason: String },
    #[error("another hvp run is writing {path} (lock file {lock}{holder}); wait for it to finish, or delete the lock file if no run is active")]
    Locked {
        path: PathBuf,
        lock: PathBuf,
        holder: String,
    },
    #[error("{what} needs about {need_mb} MB of memory, but this machine has {available_mb} MB available; {fix}")]
    Memory {
        what: String,
        need_mb: u64,
        available_mb: u64,
        fix: String,
    },
    #[error("{what}: size overflows ({detail}); the header or option is corrupt")]
    Overflow { what: String, detail: String },
}
