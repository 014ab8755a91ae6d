//! Reads of regular files only, bounded in size.

use crate::IoError;
use flate2::read::MultiGzDecoder;
use std::fs::{File, Metadata};
use std::io::Read;
use std::path::Path;

fn kind(m: &Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = m.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a named pipe (FIFO)"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Opens `path` for reading if it is a regular file (after following symlinks).
/// Checked before opening, so a FIFO is never opened (which would block) and a
/// device such as `/dev/zero` is never read (which would never end).
pub fn open_regular(path: &Path) -> Result<(File, u64), IoError> {
    let err = |source| IoError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(err)?;
    if !meta.is_file() {
        return Err(IoError::NotRegular {
            path: path.to_path_buf(),
            kind: kind(&meta),
        });
    }
    let file = File::open(path).map_err(err)?;
    // The file may have been swapped between the two calls: check what was opened.
    let meta = file.metadata().map_err(err)?;
    if !meta.is_file() {
        return Err(IoError::NotRegular {
            path: path.to_path_buf(),
            kind: kind(&meta),
        });
    }
    Ok((file, meta.len()))
}

/// The whole of the regular file `path`, refused when larger than `limit` bytes
/// (`what` names the kind of file in the message).
pub fn read_bounded(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>, IoError> {
    let (file, size) = open_regular(path)?;
    if size > limit {
        return Err(IoError::TooLarge {
            path: path.to_path_buf(),
            size,
            limit,
            what: what.to_string(),
        });
    }
    let mut bytes = Vec::with_capacity(size as usize);
    // A file that grows while read is cut at the limit and refused.
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| IoError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    if bytes.len() as u64 > limit {
        return Err(IoError::TooLarge {
            path: path.to_path_buf(),
            size: bytes.len() as u64,
            limit,
            what: what.to_string(),
        });
    }
    Ok(bytes)
}

/// True when `bytes` start with the gzip magic number.
pub fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x1f, 0x8b])
}

/// Decompresses a gzip stream read from `path`, refusing to produce more than
/// `limit` bytes (a small file must not inflate to gigabytes).
pub fn gunzip_bounded(path: &Path, bytes: &[u8], limit: u64) -> Result<Vec<u8>, IoError> {
    let mut out = Vec::new();
    MultiGzDecoder::new(bytes)
        .take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| IoError::BadGzip {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if out.len() as u64 > limit {
        return Err(IoError::Inflate {
            path: path.to_path_buf(),
            limit,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A fresh scratch folder, removed when the returned guard drops.
    fn temp_dir(tag: &str) -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix(&format!("hvp-io-read-{tag}-"))
            .tempdir()
            .expect("temp dir")
    }

    #[test]
    fn devices_directories_and_fifos_are_refused_without_reading() {
        for p in ["/dev/zero", "/dev/null", "/"] {
            let e = read_bounded(Path::new(p), 1 << 20, "a test").expect_err(p);
            assert!(matches!(e, IoError::NotRegular { .. }), "{p}: {e}");
        }
        let scratch = temp_dir("fifo");
        let d = scratch.path();
        let fifo = d.join("pipe");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.is_ok_and(|s| s.success()) {
            // Opening a FIFO for reading blocks until a writer comes: must be refused first.
            let e = read_bounded(&fifo, 10, "a test").expect_err("fifo");
            assert!(e.to_string().contains("FIFO"), "{e}");
        }
    }

    #[test]
    fn size_limit_and_gzip_bomb() {
        let scratch = temp_dir("size");
        let d = scratch.path();
        let p = d.join("f");
        std::fs::write(&p, vec![7u8; 100]).expect("write");
        assert_eq!(read_bounded(&p, 100, "x").expect("fits").len(), 100);
        let e = read_bounded(&p, 99, "a test file").expect_err("too large");
        assert!(e.to_string().contains("more than the 99 bytes"), "{e}");
        // 10 MB of zeros compress to ~10 KB; a 1 MB bound refuses them.
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&vec![0u8; 10 << 20]).expect("compress");
        let gz = enc.finish().expect("finish");
        assert!(gz.len() < 100_000);
        let e = gunzip_bounded(&p, &gz, 1 << 20).expect_err("bomb");
        assert!(matches!(e, IoError::Inflate { .. }), "{e}");
        assert_eq!(gunzip_bounded(&p, &gz, 10 << 20).expect("exact bound").len(), 10 << 20);
        let e = gunzip_bounded(&p, &gz[..gz.len() / 2], 10 << 20).expect_err("cut");
        assert!(matches!(e, IoError::BadGzip { .. }), "{e}");
    }
}
