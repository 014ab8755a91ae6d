//! Data-parallel execution: under `mpirun -n K hvp …` (built with the `mpi`
//! feature) rank r streams the contiguous shard r of every dataset-wide pass and
//! the partial sums are combined in f64; without the feature (or with one
//! process) every function here is the single-process identity.
//!
//! Sums are reduced to rank 0 and broadcast back, so every rank holds bitwise
//! the same result and iterative solvers stay in lockstep. Only rank 0 writes
//! files and prints; an error or panic on any rank aborts the whole job.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Time spent in collective communication, for the summary line.
static COMMUNICATION_NANOS: AtomicU64 = AtomicU64::new(0);

fn timed(f: impl FnOnce()) {
    let start = Instant::now();
    f();
    COMMUNICATION_NANOS.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
}

/// Seconds this process has spent in allreduces (waiting for slower ranks included).
pub fn communication_seconds() -> f64 {
    COMMUNICATION_NANOS.load(Ordering::Relaxed) as f64 / 1e9
}

#[cfg(feature = "mpi")]
mod mpi_backend;

#[cfg(feature = "mpi")]
use mpi_backend as backend;

#[cfg(not(feature = "mpi"))]
mod backend {
    pub struct Guard;
    pub fn init() -> Guard {
        Guard
    }
    pub fn rank() -> usize {
        0
    }
    pub fn size() -> usize {
        1
    }
    pub fn allreduce_sum(_: &mut [f64]) {}
    pub fn abort(code: i32) -> ! {
        std::process::exit(code)
    }
    pub fn report_error(message: &str) {
        eprintln!("{message}");
    }
}

/// Keeps the MPI environment alive; dropping it finalizes MPI.
pub struct Guard(#[allow(dead_code)] backend::Guard);

/// Starts MPI when built with it (a no-op otherwise). On ranks other than 0,
/// stdout and stderr are silenced; errors still reach the terminal through
/// [`fail`] and the panic hook, which abort every rank.
pub fn init() -> Guard {
    Guard(backend::init())
}

/// This process's rank (0 without MPI).
pub fn rank() -> usize {
    backend::rank()
}

/// Number of processes (1 without MPI).
pub fn size() -> usize {
    backend::size()
}

/// Whether this process writes outputs and prints (rank 0).
pub fn is_root() -> bool {
    rank() == 0
}

/// Whether more than one process shares the work.
pub fn is_distributed() -> bool {
    size() > 1
}

/// The contiguous block of `0..n` this rank processes: `[r·n/K, (r+1)·n/K)`.
pub fn shard(n: usize) -> Range<usize> {
    shard_of(n, rank(), size())
}

/// The block of `0..n` that rank `r` of `k` processes.
pub fn shard_of(n: usize, r: usize, k: usize) -> Range<usize> {
    (r * n / k)..((r + 1) * n / k)
}

/// Sums `buf` over all ranks, in place; every rank receives the same bits.
pub fn allreduce_sum(buf: &mut [f64]) {
    if is_distributed() {
        timed(|| backend::allreduce_sum(buf));
    }
}

/// The full vector of `n` per-example values, each rank having computed those
/// of its [`shard`] (`local`): placed at their offsets and summed (exact, since
/// every other entry is zero).
pub fn gather_shards(n: usize, local: &[f64]) -> Vec<f64> {
    if !is_distributed() {
        return local.to_vec();
    }
    let range = shard(n);
    assert_eq!(
        local.len(),
        range.len(),
        "a rank returned values for another shard size"
    );
    let mut full = vec![0.0; n];
    full[range].copy_from_slice(local);
    timed(|| backend::allreduce_sum(&mut full));
    full
}

/// Prints `message` (on every rank, through the real stderr) and ends the job:
/// `MPI_Abort` of all ranks when distributed, exit otherwise.
pub fn fail(message: &str, code: i32) -> ! {
    let prefix = if is_distributed() {
        format!("rank {}: ", rank())
    } else {
        String::new()
    };
    backend::report_error(&format!("{prefix}{message}"));
    backend::abort(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_range_once_in_order() {
        for n in [0, 1, 7, 100, 60_000] {
            for k in 1..=5 {
                let parts: Vec<Range<usize>> = (0..k).map(|r| shard_of(n, r, k)).collect();
                assert_eq!(parts[0].start, 0);
                assert_eq!(parts[k - 1].end, n);
                for w in parts.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                }
                let sizes: Vec<usize> = parts.iter().map(|p| p.len()).collect();
                assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
            }
        }
    }

    #[test]
    fn single_process_is_the_identity() {
        assert_eq!((rank(), size()), (0, 1));
        let mut v = vec![1.5, -2.0];
        allreduce_sum(&mut v);
        assert_eq!(v, vec![1.5, -2.0]);
        assert_eq!(gather_shards(2, &v), v);
        assert_eq!(shard(10), 0..10);
    }
}
