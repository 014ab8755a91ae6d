//! Output cotangents of the per-example losses behind S: sampled from the
//! model (true Fisher), the true labels, or every output-Hessian direction.

use super::*;

/// Output cotangents `[B, C]` of the per-example losses (weight 1) for each sample.
///
/// Sampled labels come from one random stream per example, seeded by `seed` and
/// the example's index in the dataset (`first + row`), so the samples do not
/// depend on the batch size or on how the data is sharded over processes.
pub(super) fn cotangent_samples(
    logits: &Tensor<f64>,
    targets: Targets,
    fisher: FisherKind,
    seed: u64,
    first: usize,
) -> Vec<Tensor<f64>> {
    let rng = |row: usize| example_rng(seed, first + row);
    let labels = match targets {
        Targets::Classes(labels) => labels,
        Targets::Values(values) => return mse_cotangent_samples(logits, values, fisher, &rng),
    };
    let (b, c) = logits.rows_cols();
    let out = loss::softmax_cross_entropy(logits, labels, 1.0);
    let grad = out.cotangent; // p − e_y
    let probs: Vec<f64> = grad
        .data()
        .iter()
        .enumerate()
        .map(|(k, g)| g + if labels[k / c] == k % c { 1.0 } else { 0.0 })
        .collect();
    let with_label = |y: &dyn Fn(usize) -> usize| {
        let mut t = Tensor::new(vec![b, c], probs.clone()).expect("b*c");
        for i in 0..b {
            t.data_mut()[i * c + y(i)] -= 1.0;
        }
        t
    };
    match fisher {
        FisherKind::Empirical => vec![grad],
        FisherKind::Mc => {
            let sampled: Vec<usize> = (0..b)
                .map(|i| {
                    let u: f64 = rng(i).random();
                    let row = &probs[i * c..(i + 1) * c];
                    let mut acc = 0.0;
                    row.iter()
                        .position(|&p| {
                            acc += p;
                            u < acc
                        })
                        .unwrap_or(c - 1)
                })
                .collect();
            vec![with_label(&|i| sampled[i])]
        }
        FisherKind::Exact => (0..c)
            .map(|col| {
                // Column `col` of L = diag(√p) − p √pᵀ, with L Lᵀ = diag(p) − p pᵀ.
                let mut t = Tensor::zeros(&[b, c]);
                for i in 0..b {
                    let row = &probs[i * c..(i + 1) * c];
                    let sq = row[col].sqrt();
                    for (k, (out, &pk)) in t.data_mut()[i * c..(i + 1) * c].iter_mut().zip(row).enumerate() {
                        *out = sq * ((k == col) as u8 as f64 - pk);
                    }
                }
                t
            })
            .collect(),
    }
}

/// [`cotangent_samples`] for the mean squared error, whose output Hessian is
/// `(2/K) I`: the empirical gradient, `√(2/K)·ε` with ε standard normal (the
/// Fisher of a unit-variance Gaussian likelihood), or the K columns of `√(2/K) I`.
pub(super) fn mse_cotangent_samples(
    outputs: &Tensor<f64>,
    targets: &[f64],
    fisher: FisherKind,
    rng: &dyn Fn(usize) -> StdRng,
) -> Vec<Tensor<f64>> {
    let (b, k) = outputs.rows_cols();
    let scale = (2.0 / k as f64).sqrt();
    match fisher {
        FisherKind::Empirical => vec![loss::mse(outputs, targets, 1.0).cotangent],
        FisherKind::Mc => {
            // Box–Muller pairs from the seeded stream.
            let normal = |rng: &mut StdRng| {
                let (u1, u2): (f64, f64) = (rng.random(), rng.random());
                (-2.0 * (1.0 - u1).ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
            };
            let mut data = Vec::with_capacity(b * k);
            for i in 0..b {
                let mut r = rng(i);
                data.extend((0..k).map(|_| scale * normal(&mut r)));
            }
            vec![mat(b, k, data)]
        }
        FisherKind::Exact => (0..k)
            .map(|col| {
                mat(
                    b,
                    k,
                    (0..b * k).map(|i| if i % k == col { scale } else { 0.0 }).collect(),
                )
            })
            .collect(),
    }
}

/// The random stream of example `index` (SplitMix64-mixed, so nearby indices
/// get unrelated streams).
pub(super) fn example_rng(seed: u64, index: usize) -> StdRng {
    let mut z = seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    StdRng::seed_from_u64(z ^ (z >> 31))
}
