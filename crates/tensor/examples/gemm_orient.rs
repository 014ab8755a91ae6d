//! GFLOP/s of one GEMM shape in all four storage orientations (NN, NT, TN, TT),
//! single-threaded, for choosing how a convolution lays out its operands, and of
//! the stacked forms (`[W; Ẇ]` with twice the rows, `[ġ; g]` with twice the inner
//! dimension) against the plain ones.
//!
//!     cargo run --release -p hvp-tensor --example gemm_orient

use hvp_tensor::linalg::{gemm_into, Par};
use std::time::Instant;

fn gflops(m: usize, n: usize, k: usize, ta: bool, tb: bool) -> f64 {
    let a = vec![0.5f32; m * k];
    let b = vec![0.25f32; k * n];
    let mut c = vec![0f32; m * n];
    let reps = (2e9 / (2.0 * (m * n * k) as f64)).ceil() as usize;
    gemm_into(&mut c, &a, ta, &b, tb, m, n, k, false, Par::Serial);
    let t = Instant::now();
    for _ in 0..reps {
        gemm_into(&mut c, &a, ta, &b, tb, m, n, k, false, Par::Serial);
    }
    2.0 * (m * n * k * reps) as f64 / t.elapsed().as_secs_f64() / 1e9
}

fn main() {
    println!("backend: {}", hvp_tensor::onednn::gemm_backend().1);
    println!("| m×n×k | NN | NT | TN | TT |");
    println!("|---|---|---|---|---|");
    for &(m, n, k) in &[
        (16, 1024, 144),
        (32, 1024, 144),
        (32, 256, 288),
        (64, 256, 288),
        (64, 64, 576),
        (128, 64, 576),
        (144, 1024, 16),
        (144, 1024, 32),
        (288, 256, 32),
        (288, 256, 64),
        (576, 64, 64),
        (576, 64, 128),
        (144, 16, 1024),
        (16, 1024, 16),
    ] {
        let v: Vec<String> = [(false, false), (false, true), (true, false), (true, true)]
            .iter()
            .map(|&(a, b)| format!("{:.1}", gflops(m, n, k, a, b)))
            .collect();
        println!("| {m}×{n}×{k} | {} |", v.join(" | "));
    }
}
