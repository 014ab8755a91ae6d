//! glibc malloc settings for a process that allocates megabyte-sized tensors
//! batch after batch.
//!
//! With glibc's defaults, freed blocks of a few megabytes (one activation of a
//! batch) go back to the kernel (unmapped, or trimmed off the heap top), and
//! the next batch faults the same pages back in, zero-filled: measured on the
//! seed ResNet (`hvp bench --sizes 500`), 0.9–1.6 million page faults and
//! 2.5–4 s of system time per run, the gradient 13% and the GGN 15–20% slower
//! than with the pages kept. Peak RSS is the same either way (it is the working
//! set of one batch), so the freed pages are kept for reuse instead.

/// Environment variable that, set to `default`, leaves glibc's settings alone
/// (to measure the difference).
pub const OPT_OUT: &str = "HVP_MALLOC";

static APPLIED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// What `hvp bench` prints about the allocator.
pub fn describe() -> &'static str {
    if APPLIED.load(std::sync::atomic::Ordering::Relaxed) {
        "glibc, freed pages kept"
    } else {
        "system defaults"
    }
}

/// Applies the settings; returns whether they were applied.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn keep_freed_pages() -> bool {
    if std::env::var(OPT_OUT).is_ok_and(|v| v == "default") {
        return false;
    }
    // A fixed mmap threshold (32 MiB, glibc's largest) stops the dynamic one
    // from sending each new size class to mmap first; the trim threshold keeps
    // freed heap tops; the top pad grows the heap in 64 MiB steps.
    let settings = [
        (libc::M_MMAP_THRESHOLD, 32 << 20),
        (libc::M_TRIM_THRESHOLD, i32::MAX),
        (libc::M_TOP_PAD, 64 << 20),
    ];
    // SAFETY: mallopt only changes allocator parameters; called before any
    // other thread exists.
    let applied = settings
        .iter()
        .all(|&(param, value)| unsafe { libc::mallopt(param, value) } == 1);
    APPLIED.store(applied, std::sync::atomic::Ordering::Relaxed);
    applied
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn keep_freed_pages() -> bool {
    false
}
