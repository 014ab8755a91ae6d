//! Progress bars (stderr) and end-of-run summaries (stdout); peak memory.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A progress bar over examples that appears only once a run has lasted a second.
pub struct Progress {
    bar: ProgressBar,
    start: Instant,
    shown: AtomicBool,
    quiet: bool,
}

impl Progress {
    pub fn new(total: usize, label: &str, quiet: bool) -> Self {
        Self::with_bar(
            Some(total),
            "{msg} [{bar:30}] {pos}/{len} images, {per_sec}, ETA {eta}",
            label,
            quiet,
        )
    }

    /// A counter of images read, for runs whose number of passes over the
    /// data is not known in advance (solves, spectra).
    pub fn unbounded(label: &str, quiet: bool) -> Self {
        Self::with_bar(None, "{msg}: {pos} images read, {per_sec}, {elapsed}", label, quiet)
    }

    /// This bar as a problem's watch: every pass over the data advances it.
    pub fn watch(self: &std::sync::Arc<Self>) -> hvp_curvature::Watch {
        let progress = self.clone();
        std::sync::Arc::new(move |n| {
            progress.advance(n);
            true
        })
    }

    fn with_bar(total: Option<usize>, template: &str, label: &str, quiet: bool) -> Self {
        let bar = ProgressBar::with_draw_target(total.map(|t| t as u64), ProgressDrawTarget::hidden());
        bar.set_style(
            ProgressStyle::with_template(template)
                .expect("static template")
                .progress_chars("=> "),
        );
        bar.set_message(label.to_string());
        Progress {
            bar,
            start: Instant::now(),
            shown: AtomicBool::new(false),
            quiet,
        }
    }

    /// Records `n` more examples done.
    pub fn advance(&self, n: usize) {
        if !self.quiet && !self.shown.load(Ordering::Relaxed) && self.start.elapsed() > Duration::from_secs(1) {
            self.shown.store(true, Ordering::Relaxed);
            self.bar.set_draw_target(ProgressDrawTarget::stderr());
        }
        self.bar.inc(n as u64);
    }

    /// Replaces the text before the bar (e.g. the current loss).
    pub fn message(&self, msg: &str) {
        self.bar.set_message(msg.to_string());
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Peak resident memory of this process in bytes (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resets the peak-RSS mark to the current RSS (Linux ≥ 4.0), so a measurement
/// that follows reports its own peak. Returns false where unsupported.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

pub fn format_bytes(b: Option<u64>) -> String {
    match b {
        Some(b) => format!("{:.0} MB", b as f64 / 1e6),
        None => "n/a".into(),
    }
}

/// The one-line summary printed at the end of a run.
pub fn summary(what: &str, n: usize, elapsed: Duration, quiet: bool) {
    if quiet {
        return;
    }
    let s = elapsed.as_secs_f64();
    let processes = if hvp_dist::is_distributed() {
        let c = hvp_dist::communication_seconds();
        format!(
            ", {} processes, allreduce {c:.3} s ({:.1}% of rank 0's time)",
            hvp_dist::size(),
            100.0 * c / s.max(1e-9)
        )
    } else {
        String::new()
    };
    println!(
        "{what}: N={n}, {s:.3} s, {:.1} images/s, peak memory {}{processes}",
        n as f64 / s.max(1e-9),
        format_bytes(peak_rss_bytes())
    );
}
