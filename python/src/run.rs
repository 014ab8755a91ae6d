//! How a long call runs: without the GIL, on its own thread (inside the
//! problem's thread pool when it has one), with a progress bar on stderr, while
//! the calling thread watches for Ctrl-C and stops the work between batches.

use hvp_curvature::Watch;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// A progress bar over examples: a bar with ETA when the total is known (one
/// pass), a counter with its rate otherwise (solves run as many passes as they need).
fn progress_bar(shown: bool, label: &str, total: Option<u64>) -> ProgressBar {
    let target = if shown {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let (bar, template) = match total {
        Some(n) => (
            ProgressBar::with_draw_target(Some(n), target),
            "{msg} [{bar:30}] {pos}/{len} examples, {per_sec}, ETA {eta}",
        ),
        None => (
            ProgressBar::with_draw_target(None, target),
            "{msg} {pos} examples read, {per_sec}, {elapsed}",
        ),
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(label.to_string());
    bar
}

/// Runs `work(watch)`; `watch` must be given to the problem the work uses, so
/// that its passes advance the bar and stop when Ctrl-C is pressed.
pub fn run<R: Send>(
    py: Python<'_>,
    pool: Option<&rayon::ThreadPool>,
    progress: bool,
    label: &str,
    total: Option<u64>,
    work: impl FnOnce(Watch) -> PyResult<R> + Send,
) -> PyResult<R> {
    let bar = progress_bar(progress, label, total);
    let stop = Arc::new(AtomicBool::new(false));
    let watch: Watch = {
        let (bar, stop) = (bar.clone(), stop.clone());
        Arc::new(move |n| {
            bar.inc(n as u64);
            !stop.load(Ordering::Relaxed)
        })
    };
    let mut interrupt: Option<PyErr> = None;
    let result = py.detach(|| {
        std::thread::scope(|scope| {
            let (tx, rx) = mpsc::channel();
            scope.spawn(move || {
                let job = move || std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(watch)));
                let r = match pool {
                    Some(p) => p.install(job),
                    None => job(),
                };
                let _ = tx.send(r);
            });
            loop {
                match rx.recv_timeout(Duration::from_millis(50)) {
                    Ok(r) => return r,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if interrupt.is_none() {
                            if let Err(e) = Python::attach(|py| py.check_signals()) {
                                stop.store(true, Ordering::Relaxed);
                                interrupt = Some(e);
                            }
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        return Ok(Err(PyRuntimeError::new_err("the computation ended without a result")))
                    }
                }
            }
        })
    });
    bar.finish_and_clear();
    if let Some(e) = interrupt {
        return Err(e);
    }
    match result {
        Ok(r) => r,
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(PyRuntimeError::new_err(format!("internal error in hvp: {what}")))
        }
    }
}
