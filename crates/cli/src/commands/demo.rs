//! `hvp demo`: the seed experiment on the bundled Fashion-MNIST subset. The
//! seed ResNet (resnet-cifar:2,2,2, one input channel, images padded to 32×32)
//! at PyTorch-default initial weights: exact HVP over N = 250 … 2000 images
//! (time and peak memory per N: time linear, memory flat), then the relative
//! error of HVPs over random subsets of m images against the full-data HVP.

use super::subsample_error::Prediction;
use crate::args::{set_threads, DTypeArg};
use crate::report::{format_bytes, peak_rss_bytes, reset_peak_rss};
use anyhow::{bail, Context, Result};
use clap::Args;
use hvp_curvature::{Curvature, Problem};
use hvp_data::{Dataset, Idx, Padded, Subset};
use hvp_model::{Architecture, Model, ParamVector, Weights};
use hvp_tensor::DType;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct DemoArgs {
    /// Directory with Fashion-MNIST IDX files (default: the subset bundled in the repo).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Dataset sizes N for the exact HVP.
    #[arg(long, value_delimiter = ',', default_value = "250,500,1000,2000")]
    pub sizes: Vec<usize>,
    /// Subset sizes m for the subsampling error (against the largest N).
    #[arg(long, value_delimiter = ',', default_value = "100,250,500")]
    pub subsets: Vec<usize>,
    /// Random subsets per m.
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    #[arg(long, default_value_t = 250)]
    pub batch_size: usize,
    #[arg(long)]
    pub threads: Option<usize>,
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

fn bundled_data() -> PathBuf {
    let in_repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/fashion-mnist-subset");
    if in_repo.is_dir() {
        in_repo
    } else {
        PathBuf::from("data/fashion-mnist-subset")
    }
}

fn product(problem: &Problem, v: &ParamVector, dtype: DType) -> Result<ParamVector> {
    let none = |_: usize| {};
    Ok(match dtype {
        DType::F32 => problem.product::<f32>(Curvature::Hessian, v, &none)?,
        DType::F64 => problem.product::<f64>(Curvature::Hessian, v, &none)?,
    }
    .value)
}

pub fn run(a: DemoArgs) -> Result<()> {
    set_threads(a.threads)?;
    let dir = a.data.clone().unwrap_or_else(bundled_data);
    let dir = dir.canonicalize().unwrap_or(dir);
    let raw = Idx::open(&dir, true).with_context(|| format!("loading the demo data from {}", dir.display()))?;
    let data = Padded::new(raw, 2)?;
    let n_max = a.sizes.iter().copied().max().unwrap_or(0);
    if n_max == 0 || n_max > data.len() {
        bail!(
            "--sizes must be between 1 and {} (the images in {})",
            data.len(),
            dir.display()
        );
    }
    let arch: Architecture = "resnet-cifar:2,2,2".parse()?;
    let model = Model::new(&arch, 1)?;
    let weights = Weights::init(&model, a.seed);
    let mut v = ParamVector::random_normal(&model, a.seed + 1);
    v.scale(1.0 / v.norm());
    let dtype: DType = a.dtype.into();
    println!(
        "hvp demo: seed ResNet ({arch}, {} parameters, BatchNorm in eval mode) on Fashion-MNIST \
         from {}, images padded to 32x32; {dtype}, {} threads, batch {}",
        model.num_params(),
        dir.display(),
        hvp_tensor::threads(),
        a.batch_size
    );
    println!("\nExact Hessian-vector product (forward-over-reverse) over N images:\n");
    println!("| N | time (s) | images/s | peak RSS |");
    println!("|---|---|---|---|");
    let mut full = None;
    for &n in &a.sizes {
        let view = Subset::first(&data, n);
        let problem = Problem::new(&model, &weights, &view, a.batch_size)?;
        reset_peak_rss();
        let start = Instant::now();
        let hv = product(&problem, &v, dtype)?;
        let t = start.elapsed().as_secs_f64();
        println!(
            "| {n} | {t:.2} | {:.0} | {} |",
            n as f64 / t,
            format_bytes(peak_rss_bytes())
        );
        if n == n_max {
            full = Some(hv);
        }
    }
    let full = full.context("the largest N was measured")?;
    println!(
        "\nIs a subset enough? Relative error ‖H_m v − H_N v‖ / ‖H_N v‖ of the HVP over m random \
         images (N = {n_max}, {} subsets each):\n",
        a.repeats
    );
    println!("| m | mean error | min | max | predicted from 8 batches of 50 |");
    println!("|---|---|---|---|---|");
    let mut rng = StdRng::seed_from_u64(a.seed + 2);
    let pool: Vec<usize> = (0..n_max).collect();
    // The prediction `hvp subsample-error` makes without the full pass.
    let batches = (0..8)
        .map(|_| {
            let mut idx = pool.clone();
            idx.shuffle(&mut rng);
            idx.truncate(50.min(n_max));
            let view = Subset::new(&data, idx)?;
            product(&Problem::new(&model, &weights, &view, a.batch_size)?, &v, dtype)
        })
        .collect::<Result<Vec<_>>>()?;
    let prediction = Prediction::from_batches(&batches, 50.min(n_max), n_max);
    for &m in a.subsets.iter().filter(|&&m| m > 0 && m <= n_max) {
        let mut errs = Vec::with_capacity(a.repeats);
        for _ in 0..a.repeats.max(1) {
            let mut idx = pool.clone();
            idx.shuffle(&mut rng);
            idx.truncate(m);
            let view = Subset::new(&data, idx)?;
            let problem = Problem::new(&model, &weights, &view, a.batch_size)?;
            errs.push(product(&problem, &v, dtype)?.relative_error(&full));
        }
        let mean = errs.iter().sum::<f64>() / errs.len() as f64;
        let (lo, hi) = errs
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &e| (l.min(e), h.max(e)));
        println!(
            "| {m} | {mean:.3} | {lo:.3} | {hi:.3} | {:.3} |",
            prediction.relative_error(m)
        );
    }
    println!(
        "\nTime grows linearly with N at flat memory (one batch of activations and tangents); a \
         subset's HVP is cheaper but its error above is what it costs."
    );
    Ok(())
}
