//! GFLOP/s of hvp's f32 GEMM (oneDNN where installed, else the `gemm` crate) on the
//! GEMM shapes the seed ResNet's convolutions produce, single-threaded (as the conv
//! kernels call it, one image per rayon task): first the shapes as the kernels
//! store them, then the main ones in all four storage orientations (NN, NT, TN,
//! TT) and stacked (`[W; Ẇ]` with twice the rows, `[ġ; g]` with twice the inner
//! dimension), for choosing how a convolution lays out its operands.
//!
//!     cargo run --release -p hvp-tensor --example gemm_shapes

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
    println!("| m | n | k | transA | transB | GFLOP/s (1 thread) |");
    println!("|---|---|---|---|---|---|");
    for &(m, n, k, ta, tb) in &[
        (16, 1024, 144, false, false),
        (16, 8192, 144, false, false),
        (1024, 16, 144, false, false),
        (1024, 16, 144, true, true),
        (256, 32, 288, true, true),
        (64, 64, 576, true, true),
        (144, 1024, 16, true, false),
        (144, 1024, 32, true, false),
        (16, 144, 1024, false, true),
        (144, 16, 1024, false, true),
        (16, 144, 8192, false, true),
        (144, 16, 8192, false, true),
        (32, 144, 1024, false, true),
        (32, 288, 256, false, false),
        (64, 64, 576, false, false),
        (64, 512, 576, false, false),
        (576, 64, 64, true, false),
        (64, 576, 64, false, true),
        (256, 256, 256, false, false),
        (16, 25600, 144, false, false),
        (144, 25600, 16, false, false),
        (64, 6400, 576, false, false),
        (1024, 1024, 1024, false, false),
    ] {
        println!("| {m} | {n} | {k} | {ta} | {tb} | {:.1} |", gflops(m, n, k, ta, tb));
    }
    println!();
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
        // Row patches (k = C·3 per kernel row): stages 1-3, single and stacked.
        (16, 1024, 48),
        (32, 1024, 48),
        (32, 256, 96),
        (64, 256, 96),
        (64, 64, 192),
        (128, 64, 192),
        (48, 16, 1024),
        (96, 32, 256),
        (192, 64, 64),
        // Weight gradients with few input channels (the 3-channel stem, rows of
        // x or of gy), and all three kernel rows as one product.
        (9, 16, 1024),
        (48, 3, 1024),
        (3, 48, 1024),
        (48, 48, 1024),
    ] {
        let speeds: Vec<String> = [(false, false), (false, true), (true, false), (true, true)]
            .iter()
            .map(|&(ta, tb)| format!("{:.1}", gflops(m, n, k, ta, tb)))
            .collect();
        println!("| {m}×{n}×{k} | {} |", speeds.join(" | "));
    }
}
