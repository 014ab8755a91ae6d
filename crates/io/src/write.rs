//! Outputs written all together or not at all, never through a planted symlink.
//!
//! Every output is first a temporary file in its destination's folder, created
//! with `O_CREAT | O_EXCL` (so an existing file or symlink at that name is never
//! opened) under an unpredictable name; all temporaries are renamed into place
//! by [`Outputs::commit`], and removed if the run fails before that.

use crate::IoError;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name no other process will guess: pid, a per-process counter and the clock.
fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // A cheap mix so consecutive names differ in every digit.
    let mixed = (nanos ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    format!("{}.{:016x}", std::process::id(), mixed)
}

fn folder_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Creates a new file at exactly `path`, failing if anything (a file, a symlink,
/// dangling or not) is already there.
pub fn create_exclusive(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().write(true).create_new(true).mode(0o644).open(path)
}

/// Checks that `path` can be an output: a file name in an existing folder, not a
/// directory itself.
pub fn check_destination(path: &Path) -> Result<(), IoError> {
    let bad = |reason: String| IoError::Destination {
        path: path.to_path_buf(),
        reason,
    };
    if path.file_name().is_none() {
        return Err(bad("the path names no file".into()));
    }
    let dir = folder_of(path);
    if !dir.is_dir() {
        return Err(bad(format!("the folder {} does not exist", dir.display())));
    }
    let real = dir.canonicalize().unwrap_or_else(|_| dir.clone());
    if ["/dev", "/proc", "/sys"].iter().any(|p| real.starts_with(p)) {
        return Err(bad(format!(
            "{} holds devices and kernel files, not outputs; give a path to a file elsewhere",
            real.display()
        )));
    }
    if path.is_dir() {
        return Err(bad("it is a directory".into()));
    }
    // Replacing a device or a FIFO (e.g. /dev/null as root) with a file would be
    // worse than failing; a symlink itself is replaced, its target left alone.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        let t = meta.file_type();
        if !t.is_file() && !t.is_symlink() {
            return Err(bad(
                "it exists and is not a regular file (a device, FIFO or socket)".into()
            ));
        }
    }
    Ok(())
}

/// A temporary beside `path`, created exclusively (retrying on a name clash).
fn create_temporary(path: &Path) -> Result<(PathBuf, File), IoError> {
    check_destination(path)?;
    let dir = folder_of(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut last = None;
    for _ in 0..16 {
        let tmp = dir.join(format!(".{name}.{}.tmp", unique_suffix()));
        match create_exclusive(&tmp) {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(source) => {
                return Err(IoError::Write {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
    Err(IoError::Write {
        path: path.to_path_buf(),
        source: last.unwrap_or_else(|| std::io::Error::other("no free temporary name")),
    })
}

struct Staged {
    dest: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
}

/// The outputs of one run, staged as temporaries until [`Outputs::commit`].
/// Dropped without a commit (an error, a panic), it removes its temporaries and
/// leaves every destination as it was.
#[derive(Default)]
pub struct Outputs {
    staged: Vec<Staged>,
}

/// Refers to one output of an [`Outputs`] set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutputId(usize);

impl Outputs {
    pub fn new() -> Self {
        Outputs::default()
    }

    /// Reserves `path` as an output: its temporary is created now, so an
    /// unwritable folder is reported before any computation. Two outputs may
    /// not name the same file.
    pub fn reserve(&mut self, path: &Path) -> Result<OutputId, IoError> {
        let key = absolute(path);
        if self.staged.iter().any(|s| absolute(&s.dest) == key) {
            return Err(IoError::Destination {
                path: path.to_path_buf(),
                reason: "it is given for two different outputs of this command".into(),
            });
        }
        let (tmp, file) = create_temporary(path)?;
        self.staged.push(Staged {
            dest: path.to_path_buf(),
            tmp,
            file: Some(file),
        });
        Ok(OutputId(self.staged.len() - 1))
    }

    /// The open temporary of an output, for streamed writes.
    pub fn file(&mut self, id: OutputId) -> &mut File {
        // Every temporary stays open from `reserve` until `commit` consumes the set.
        self.staged[id.0]
            .file
            .as_mut()
            .expect("temporaries stay open until commit")
    }

    /// Writes the whole content of an output (replacing what was written).
    pub fn write(&mut self, id: OutputId, bytes: &[u8]) -> Result<(), IoError> {
        let s = &mut self.staged[id.0];
        let err = |source| IoError::Write {
            path: s.dest.clone(),
            source,
        };
        let f = s
            .file
            .as_mut()
            .ok_or_else(|| err(std::io::Error::other("output already closed")))?;
        f.set_len(0).map_err(err)?;
        use std::io::Seek;
        f.seek(std::io::SeekFrom::Start(0)).map_err(err)?;
        f.write_all(bytes).map_err(err)?;
        Ok(())
    }

    /// Gives up one output: its temporary is removed and its destination left as
    /// it was (e.g. the solution of a failed solve, when its report is kept).
    pub fn discard(&mut self, id: OutputId) {
        let s = &mut self.staged[id.0];
        s.file = None;
        let _ = std::fs::remove_file(&s.tmp);
        s.tmp = PathBuf::new();
    }

    /// Flushes every temporary to disk and renames each onto its destination.
    pub fn commit(mut self) -> Result<(), IoError> {
        for s in self.staged.iter_mut().filter(|s| !s.tmp.as_os_str().is_empty()) {
            if let Some(f) = s.file.take() {
                f.sync_all().map_err(|source| IoError::Write {
                    path: s.dest.clone(),
                    source,
                })?;
            }
        }
        let staged: Vec<Staged> = std::mem::take(&mut self.staged)
            .into_iter()
            .filter(|s| !s.tmp.as_os_str().is_empty())
            .collect();
        let mut rest = staged.into_iter();
        while let Some(s) = rest.next() {
            if let Err(source) = std::fs::rename(&s.tmp, &s.dest) {
                let _ = std::fs::remove_file(&s.tmp);
                for r in rest {
                    let _ = std::fs::remove_file(&r.tmp);
                }
                return Err(IoError::Write { path: s.dest, source });
            }
        }
        Ok(())
    }
}

impl Drop for Outputs {
    fn drop(&mut self) {
        for s in self.staged.iter().filter(|s| !s.tmp.as_os_str().is_empty()) {
            let _ = std::fs::remove_file(&s.tmp);
        }
    }
}

fn absolute(path: &Path) -> PathBuf {
    let dir = folder_of(path);
    let dir = dir.canonicalize().unwrap_or(dir);
    match path.file_name() {
        Some(n) => dir.join(n),
        None => dir,
    }
}

/// Writes `bytes` to `path` through an exclusive temporary and a rename.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), IoError> {
    let mut out = Outputs::new();
    let id = out.reserve(path)?;
    out.write(id, bytes)?;
    out.commit()
}

/// An exclusive claim on an output (`OUT.lock`, holding the owner's pid), so a
/// second run on the same output fails at once. Removed when dropped.
pub struct Lock {
    path: PathBuf,
}

impl Lock {
    /// Takes the lock of `output`. A lock left by a process that no longer
    /// exists (killed) is taken over.
    pub fn acquire(output: &Path) -> Result<Lock, IoError> {
        let name = output
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let lock = output.with_file_name(format!("{name}.lock"));
        for _ in 0..2 {
            match create_exclusive(&lock) {
                Ok(mut f) => {
                    let _ = writeln!(f, "{}", std::process::id());
                    return Ok(Lock { path: lock });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    // Read the holder's pid only from a small regular file: a symlink
                    // or FIFO planted as the lock is never followed or opened.
                    let regular = std::fs::symlink_metadata(&lock).is_ok_and(|m| m.file_type().is_file());
                    let holder = if regular {
                        crate::read::read_bounded(&lock, 64, "a lock file")
                            .ok()
                            .and_then(|b| String::from_utf8_lossy(&b).trim().parse::<u32>().ok())
                    } else {
                        None
                    };
                    let alive = holder.is_none_or(|pid| Path::new(&format!("/proc/{pid}")).exists());
                    if alive || !regular {
                        return Err(IoError::Locked {
                            path: output.to_path_buf(),
                            lock: lock.clone(),
                            holder: holder.map_or_else(String::new, |p| format!(", held by process {p}")),
                        });
                    }
                    // Stale: its process is gone. Remove and try once more.
                    let _ = std::fs::remove_file(&lock);
                }
                Err(source) => {
                    return Err(IoError::Write {
                        path: lock.clone(),
                        source,
                    })
                }
            }
        }
        Err(IoError::Locked {
            path: output.to_path_buf(),
            lock,
            holder: String::new(),
        })
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh scratch folder, removed when the returned guard drops.
    fn temp_dir(tag: &str) -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix(&format!("hvp-io-write-{tag}-"))
            .tempdir()
            .expect("temp dir")
    }

    fn leftovers(d: &Path) -> Vec<String> {
        std::fs::read_dir(d)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    #[test]
    fn all_outputs_or_none() {
        let scratch = temp_dir("all");
        let d = scratch.path();
        let (a, b) = (d.join("a"), d.join("b"));
        std::fs::write(&a, b"old a").expect("old");
        {
            let mut out = Outputs::new();
            let ia = out.reserve(&a).expect("a");
            let _ib = out.reserve(&b).expect("b");
            out.write(ia, b"new a").expect("write");
            // Dropped without commit: as if a later step failed.
        }
        assert_eq!(std::fs::read(&a).expect("a"), b"old a");
        assert!(!b.exists());
        assert!(leftovers(d).is_empty(), "{:?}", leftovers(d));
        let mut out = Outputs::new();
        let ia = out.reserve(&a).expect("a");
        let ib = out.reserve(&b).expect("b");
        out.write(ia, b"new a").expect("write");
        out.write(ib, b"new b").expect("write");
        out.commit().expect("commit");
        assert_eq!(std::fs::read(&a).expect("a"), b"new a");
        assert_eq!(std::fs::read(&b).expect("b"), b"new b");
        let mut out = Outputs::new();
        out.reserve(&a).expect("a");
        assert!(out.reserve(&d.join(".").join("a")).is_err(), "same file twice");
        assert!(Outputs::new().reserve(&d.join("missing/x")).is_err());
        assert!(Outputs::new().reserve(d).is_err());
        assert!(Outputs::new().reserve(Path::new("/dev/null")).is_err());
        assert!(Outputs::new().reserve(Path::new("/dev/stdout")).is_err());
    }

    #[test]
    fn planted_symlinks_are_replaced_not_followed() {
        let scratch = temp_dir("symlink");
        let d = scratch.path();
        let victim = d.join("victim");
        std::fs::write(&victim, b"precious").expect("victim");
        let out = d.join("out");
        std::os::unix::fs::symlink(&victim, &out).expect("link");
        atomic_write(&out, b"result").expect("write");
        assert_eq!(std::fs::read(&victim).expect("victim"), b"precious");
        assert_eq!(std::fs::read(&out).expect("out"), b"result");
        assert!(!std::fs::symlink_metadata(&out).expect("meta").file_type().is_symlink());
        // Exclusive creation refuses an existing symlink, dangling or not.
        let planted = d.join("planted");
        std::os::unix::fs::symlink(d.join("nowhere"), &planted).expect("link");
        assert!(create_exclusive(&planted).is_err());
        assert!(!d.join("nowhere").exists());
    }

    #[test]
    fn second_lock_fails_and_stale_lock_is_taken_over() {
        let scratch = temp_dir("lock");
        let d = scratch.path();
        let out = d.join("scores.csv");
        let first = Lock::acquire(&out).expect("first");
        let e = Lock::acquire(&out).err().expect("second must fail");
        assert!(e.to_string().contains("another hvp run is writing"), "{e}");
        drop(first);
        let again = Lock::acquire(&out).expect("released");
        drop(again);
        // A lock whose process is gone (pid beyond pid_max) is stale.
        std::fs::write(d.join("scores.csv.lock"), "4194305\n").expect("stale");
        let taken = Lock::acquire(&out).expect("stale lock taken over");
        drop(taken);
        assert!(!d.join("scores.csv.lock").exists());
        // A symlink to a device planted as the lock: refused without reading it.
        std::os::unix::fs::symlink("/dev/zero", d.join("scores.csv.lock")).expect("link");
        assert!(Lock::acquire(&out).is_err());
    }
}
