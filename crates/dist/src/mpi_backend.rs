//! The MPI implementation (rsmpi over the system's MPI library).

use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};

static RANK: AtomicUsize = AtomicUsize::new(0);
static SIZE: AtomicUsize = AtomicUsize::new(1);
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// The original stderr of a silenced rank, for error messages.
static REAL_STDERR: AtomicI32 = AtomicI32::new(2);

pub struct Guard(#[allow(dead_code)] Option<Universe>);

impl Drop for Guard {
    fn drop(&mut self) {
        ACTIVE.store(false, Ordering::SeqCst);
    }
}

fn world() -> SimpleCommunicator {
    SimpleCommunicator::world()
}

pub fn init() -> Guard {
    // Only the main thread calls MPI; rayon workers never do.
    let Some((universe, _)) = mpi::initialize_with_threading(mpi::Threading::Funneled) else {
        return Guard(None);
    };
    let w = universe.world();
    RANK.store(w.rank() as usize, Ordering::SeqCst);
    SIZE.store(w.size() as usize, Ordering::SeqCst);
    ACTIVE.store(true, Ordering::SeqCst);
    if w.size() > 1 {
        std::panic::set_hook(Box::new(|info| {
            report_error(&format!("rank {}: {info}", RANK.load(Ordering::SeqCst)));
            abort(101);
        }));
        if w.rank() != 0 {
            silence_output();
        }
    }
    Guard(Some(universe))
}

/// Points stdout and stderr of this rank at /dev/null, keeping the real stderr
/// for errors.
fn silence_output() {
    // SAFETY: plain POSIX descriptor calls on descriptors this process owns.
    unsafe {
        let saved: RawFd = libc::dup(2);
        if saved >= 0 {
            REAL_STDERR.store(saved, Ordering::SeqCst);
        }
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
        if null >= 0 {
            libc::dup2(null, 1);
            libc::dup2(null, 2);
            libc::close(null);
        }
    }
}

pub fn rank() -> usize {
    RANK.load(Ordering::SeqCst)
}

pub fn size() -> usize {
    if ACTIVE.load(Ordering::SeqCst) {
        SIZE.load(Ordering::SeqCst)
    } else {
        1
    }
}

pub fn allreduce_sum(buf: &mut [f64]) {
    let w = world();
    let root = w.process_at_rank(0);
    // Reduce to one rank and broadcast, so all ranks hold identical bits.
    if w.rank() == 0 {
        let mut sum = vec![0.0; buf.len()];
        root.reduce_into_root(&*buf, &mut sum[..], SystemOperation::sum());
        buf.copy_from_slice(&sum);
    } else {
        root.reduce_into(&*buf, SystemOperation::sum());
    }
    root.broadcast_into(buf);
}

pub fn report_error(message: &str) {
    let line = format!("{message}\n");
    let fd = REAL_STDERR.load(Ordering::SeqCst);
    // SAFETY: writing a byte buffer to an open descriptor.
    unsafe {
        libc::write(fd, line.as_ptr().cast(), line.len());
    }
}

pub fn abort(code: i32) -> ! {
    if ACTIVE.load(Ordering::SeqCst) && SIZE.load(Ordering::SeqCst) > 1 {
        world().abort(code)
    }
    std::process::exit(code)
}
