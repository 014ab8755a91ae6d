//! Paths named inside a file, resolved only within that file's folder.

use crate::IoError;
use std::path::{Component, Path, PathBuf};

/// Resolves `location` (a relative path written inside `file`, e.g. an ONNX
/// tensor's external data) against `base`, the folder of `file`. Refused: an
/// absolute path, any `..` component, and any path whose real location
/// (symlinks followed) is outside `base`.
pub fn resolve_inside(base: &Path, location: &str, file: &Path) -> Result<PathBuf, IoError> {
    let escapes = || IoError::Escapes {
        file: file.to_path_buf(),
        location: location.to_string(),
        base: base.to_path_buf(),
    };
    let rel = Path::new(location);
    if location.is_empty() || location.contains('\0') {
        return Err(escapes());
    }
    if rel
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(escapes());
    }
    let joined = base.join(rel);
    let real_base = base.canonicalize().map_err(|source| IoError::Read {
        path: base.to_path_buf(),
        source,
    })?;
    let real = joined.canonicalize().map_err(|source| IoError::Read {
        path: joined.clone(),
        source,
    })?;
    if !real.starts_with(&real_base) {
        return Err(escapes());
    }
    Ok(real)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_paths_inside_the_folder_resolve() {
        let scratch = tempfile::Builder::new()
            .prefix("hvp-io-confine-")
            .tempdir()
            .expect("temp dir");
        let root = scratch.path();
        let base = root.join("model");
        std::fs::create_dir_all(base.join("sub")).expect("dirs");
        std::fs::write(base.join("sub/w.bin"), b"x").expect("w");
        std::fs::write(root.join("secret"), b"s").expect("s");
        std::os::unix::fs::symlink(root.join("secret"), base.join("link")).expect("symlink");
        let file = base.join("m.onnx");
        assert!(resolve_inside(&base, "sub/w.bin", &file).is_ok());
        assert!(resolve_inside(&base, "./sub/w.bin", &file).is_ok());
        for bad in ["../secret", "sub/../../secret", "/etc/passwd", "link", ""] {
            let e = resolve_inside(&base, bad, &file).expect_err(bad);
            assert!(matches!(e, IoError::Escapes { .. }), "{bad}: {e}");
        }
    }
}
