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
    for &(m, n, k) in &[
        (16, 1024, 16),
        (32, 256, 32),
        (64, 64, 64),
        (16, 16, 1024),
        (32, 32, 256),
        (64, 64, 64),
        (32, 1024, 144),
        (16, 1024, 288),
        (16, 1024, 144),
        (1024, 16, 144),
        (144, 1024, 16),
        (1024, 144, 16),
        (144, 16, 1024),
        (16, 144, 1024),
        (32, 256, 288),
        (256, 32, 288),
        (288, 256, 32),
        (256, 288, 32),
        (64, 64, 576),
        (576, 64, 64),
    ] {
        let v: Vec<String> = [(false, false), (false, true), (true, false), (true, true)]
            .iter()
            .map(|&(a, b)| format!("{:.1}", gflops(m, n, k, a, b)))
            .collect();
        println!("{m}x{n}x{k}: NN {} NT {} TN {} TT {}", v[0], v[1], v[2], v[3]);
    }
}
