//! How accurate is a product over a random subset of the data? The error of an
//! m-example curvature product, predicted from the spread of a few mini-batch
//! products, without the full pass.

use hvp_model::ParamVector;

/// Predicted relative error of an m-example product from `k` mini-batch products
/// of `b` examples: per-example spread σ² ≈ b·s²·(N−1)/(N−b) with s² the variance
/// of the batch means; E‖H_m v − H v‖² = σ²/m · (N−m)/(N−1); ‖H v‖² ≈ ‖mean‖² less
/// the mean's own variance.
pub struct Prediction {
    pub sigma2: f64,
    pub norm2: f64,
    pub n: usize,
}

impl Prediction {
    /// `batches`: at least two products over random mini-batches of `b` examples
    /// each, from a dataset of `n`.
    pub fn from_batches(batches: &[ParamVector], b: usize, n: usize) -> Self {
        let k = batches.len() as f64;
        let mut mean = batches[0].zeros_like();
        for h in batches {
            mean.axpy(1.0 / k, h);
        }
        let s2 = batches
            .iter()
            .map(|h| {
                let mut d = h.clone();
                d.axpy(-1.0, &mean);
                d.dot(&d)
            })
            .sum::<f64>()
            / (k - 1.0);
        let fpc = |m: f64| {
            if n > 1 {
                ((n as f64 - m) / (n as f64 - 1.0)).max(0.0)
            } else {
                0.0
            }
        };
        let sigma2 = if fpc(b as f64) > 0.0 {
            b as f64 * s2 / fpc(b as f64)
        } else {
            0.0
        };
        let norm2 = (mean.dot(&mean) - sigma2 / (k * b as f64) * fpc(k * b as f64)).max(mean.dot(&mean) * 1e-6);
        Prediction { sigma2, norm2, n }
    }

    pub fn relative_error(&self, m: usize) -> f64 {
        let n = self.n as f64;
        let fpc = if self.n > 1 {
            ((n - m as f64) / (n - 1.0)).max(0.0)
        } else {
            0.0
        };
        (self.sigma2 / m as f64 * fpc / self.norm2).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hvp_tensor::Tensor;

    #[test]
    fn identical_batches_predict_zero_error_and_spread_predicts_some() {
        let v = |x: f64, y: f64| ParamVector {
            tensors: vec![Tensor::new(vec![2], vec![x, y]).unwrap()],
        };
        let same = Prediction::from_batches(&[v(1.0, 2.0), v(1.0, 2.0), v(1.0, 2.0)], 10, 1000);
        assert_eq!(same.relative_error(100), 0.0);
        let spread = Prediction::from_batches(&[v(1.0, 2.0), v(1.2, 1.8), v(0.8, 2.2)], 10, 1000);
        let (e100, e400) = (spread.relative_error(100), spread.relative_error(400));
        assert!(e100 > e400 && e400 > 0.0);
        // The full dataset has no subsampling error.
        assert_eq!(spread.relative_error(1000), 0.0);
    }
}
