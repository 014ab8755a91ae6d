//! Allocations sized by a file header or a flag, checked before they are made.

use crate::IoError;

/// Bytes of memory available to new allocations (Linux `MemAvailable`), if known.
pub fn available_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb.saturating_mul(1024))
}

/// `a × b × …` without overflow, or an error naming `what`.
pub fn checked_product(dims: &[usize], what: &str) -> Result<usize, IoError> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| IoError::Overflow {
            what: what.to_string(),
            detail: format!("the product of {dims:?} exceeds {}", usize::MAX),
        })
}

/// Refuses an allocation of `bytes` that the machine cannot hold. `fix` says
/// what the user can change (a smaller --batch-size, a smaller model).
pub fn check_fits(bytes: u64, what: &str, fix: &str) -> Result<(), IoError> {
    match available_bytes() {
        Some(avail) if bytes > avail => Err(IoError::Memory {
            what: what.to_string(),
            need_mb: bytes.div_ceil(1_000_000),
            available_mb: avail / 1_000_000,
            fix: fix.to_string(),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_and_absurd_sizes_are_refused() {
        assert_eq!(checked_product(&[2, 3, 4], "x").expect("small"), 24);
        assert!(checked_product(&[usize::MAX, 2], "x").is_err());
        assert!(check_fits(1 << 20, "a test", "none").is_ok());
        let e = check_fits(u64::MAX / 2, "a test buffer", "use less").expect_err("too big");
        assert!(e.to_string().contains("a test buffer needs about"), "{e}");
    }
}
