//! `hvp demo`: the seed experiment on the bundled Fashion-MNIST subset. The
//! seed ResNet (resnet-cifar:2,2,2, one input channel, images padded to 32×32)
//! at PyTorch-default initial weights: exact HVP over N = 250 … 2000 images
//! (time and peak memory per N: time linear, memory flat), then the relative
//! error of HVPs over random subsets of m images against the full-data HVP.

use crate::args::{set_threads, DTypeArg};
use crate::picture::{grid, Tile, BLACK, GREEN, RED};
use crate::report::{format_bytes, peak_rss_bytes, reset_peak_rss};
use anyhow::{bail, Context, Result};
use clap::Args;
use hvp_curvature::{Curvature, Problem};
use hvp_data::Relabelled;
use hvp_data::{Dataset, Idx, Padded, Subset};
use hvp_influence::train::{train, Optimizer, TrainOptions};
use hvp_model::{Architecture, Model, ParamVector, Weights};
use hvp_solvers::kfac::{FactorKind, Factors, FisherKind};
use hvp_solvers::subset::{mean_sd, subset_errors, SubsetStudy};
use hvp_tensor::DType;
use rand::rngs::StdRng;
use rand::RngExt;
use rand::SeedableRng;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct DemoArgs {
    /// Directory with Fashion-MNIST IDX files (default: the subset bundled in the repo).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Dataset sizes N for the exact HVP.
    #[arg(value_parser = crate::checks::iterations, long, value_delimiter = ',', default_value = "250,500,1000,2000")]
    pub sizes: Vec<usize>,
    /// Subset sizes m for the subsampling error (against the largest N).
    #[arg(value_parser = crate::checks::iterations, long, value_delimiter = ',', default_value = "100,250,500")]
    pub subsets: Vec<usize>,
    /// Random subsets per m.
    #[arg(value_parser = crate::checks::iterations, long, default_value_t = 3)]
    pub repeats: usize,
    /// Examples per batch (memory is one batch of activations and tangents).
    #[arg(value_parser = crate::checks::batch_size, long, default_value_t = 250)]
    pub batch_size: usize,
    /// Worker threads (default: all cores).
    #[arg(value_parser = crate::checks::threads, long)]
    pub threads: Option<usize>,
    /// Compute dtype; sums over batches are accumulated in f64 either way.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
    /// Seed of every random choice (sampled labels, subsets, start vectors).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where the demo writes its figures.
    #[arg(long, default_value = "demo-output")]
    pub out_dir: PathBuf,
    /// Skip the influence part (train, influence picture, mislabel detection).
    #[arg(long)]
    pub no_influence: bool,
}

fn bundled_data() -> PathBuf {
    let in_repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/fashion-mnist-subset");
    if in_repo.is_dir() {
        in_repo
    } else {
        PathBuf::from("data/fashion-mnist-subset")
    }
}

fn product(problem: &Problem, v: &ParamVector) -> Result<ParamVector> {
    Ok(problem.product(Curvature::Hessian, v, &|_| {})?.value)
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
        let problem = Problem::new(&model, &weights, &view, a.batch_size)?.with_dtype(dtype);
        reset_peak_rss();
        let start = Instant::now();
        let hv = product(&problem, &v)?;
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
    // The prediction `hvp subsample-error` makes without the full pass, from 8 batches of 50.
    let all = Subset::first(&data, n_max);
    let study = SubsetStudy {
        curvature: Curvature::Hessian,
        sizes: a.subsets.clone(),
        repeats: a.repeats,
        predict_batches: 8,
        predict_batch_size: 50,
        seed: a.seed + 2,
        solver: None,
    };
    let problem = Problem::new(&model, &weights, &all, a.batch_size)?.with_dtype(dtype);
    subset_errors(&problem, &v, Some(&full), &study, &mut |row| {
        let (mean, _) = mean_sd(&row.measured);
        let (lo, hi) = row
            .measured
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &e| (l.min(e), h.max(e)));
        println!("| {} | {mean:.3} | {lo:.3} | {hi:.3} | {:.3} |", row.m, row.predicted);
    })?;
    println!(
        "\nTime grows linearly with N at flat memory (one batch of activations and tangents); a \
         subset's HVP is cheaper but its error above is what it costs."
    );
    if !a.no_influence {
        std::fs::create_dir_all(&a.out_dir).with_context(|| format!("creating {}", a.out_dir.display()))?;
        influence_part(&a, &dir, &data, &model, dtype)?;
        mislabel_part(&a, &dir, dtype)?;
    }
    Ok(())
}

/// Trains the seed ResNet briefly, then explains test images with EK-FAC
/// influence and draws them.
fn influence_part(a: &DemoArgs, dir: &std::path::Path, data: &dyn Dataset, model: &Model, dtype: DType) -> Result<()> {
    let start = Instant::now();
    let mut weights = Weights::init(model, a.seed);
    let opts = TrainOptions {
        epochs: 2,
        batch_size: 64,
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 5e-4,
        optimizer: Optimizer::Sgd,
        seed: a.seed,
    };
    let reports = train(model, &mut weights, data, &opts, dtype, &mut |_, _, _| {})?;
    let test = Padded::new(Idx::open(dir, false)?, 2)?;
    let test_problem = Problem::new(model, &weights, &test, a.batch_size)?;
    let accuracy = test_problem
        .predictions_as::<f32>()?
        .iter()
        .enumerate()
        .filter(|(i, &p)| p == test.label(*i))
        .count() as f64
        / test.len() as f64;
    println!(
        "\nInfluence functions. The seed ResNet trained for 2 epochs (SGD, momentum 0.9, weight decay 5e-4; \
         last epoch: loss {:.3}, train accuracy {:.3}; test accuracy {accuracy:.3}) in {:.0} s.",
        reports.last().map_or(0.0, |r| r.loss),
        reports.last().map_or(0.0, |r| r.accuracy),
        start.elapsed().as_secs_f64()
    );
    let problem = Problem::new(model, &weights, data, a.batch_size)?
        .with_weight_decay(opts.weight_decay)
        .with_dtype(dtype);
    let t0 = Instant::now();
    // The factors are an estimate: 400 images keep the demo under 5 minutes.
    let sample = Subset::first(data, 400);
    let factor_problem = Problem::new(model, &weights, &sample, a.batch_size)?.with_dtype(dtype);
    let factors = Factors::compute(&factor_problem, FactorKind::Ekfac, FisherKind::Mc, a.seed, &|_| {})?;
    let damping = 1e-3;
    let mut queries = Vec::new();
    for t in [0usize, 1, 2] {
        let (g, _) = hvp_influence::scores::test_gradient(&problem, &test, t)?;
        let s_test = factors.inverse_product(&g, damping + opts.weight_decay);
        let scores = hvp_influence::scores::scores(&problem, &s_test, &|_| {})?;
        let (helpful, harmful) = hvp_influence::scores::top_k(&scores, 4);
        let entry = |i: &usize| serde_json::json!({"train_index": i, "score": scores[*i]});
        queries.push((
            t,
            serde_json::json!({
                "top_helpful": helpful.iter().map(entry).collect::<Vec<_>>(),
                "top_harmful": harmful.iter().map(entry).collect::<Vec<_>>(),
            }),
        ));
    }
    let path = a.out_dir.join("influence.png");
    let png = super::influence::draw(&problem, &test, &queries, 4)?;
    hvp_model::io::atomic_write(&path, &png).with_context(|| format!("writing {}", path.display()))?;
    println!(
        "EK-FAC factors (true Fisher, one sampled label per image, from 400 training images), s_test = (F + λI)⁻¹∇ℓ(z_test) with \
         λ = {damping} + weight decay, and the scores of all {} training images for 3 test images by one \
         forward-mode pass each: {:.0} s. Picture: {}",
        data.len(),
        t0.elapsed().as_secs_f64(),
        path.display()
    );
    Ok(())
}

/// Flips 5% of the labels, trains an MLP, ranks examples by self-influence.
fn mislabel_part(a: &DemoArgs, dir: &std::path::Path, dtype: DType) -> Result<()> {
    let start = Instant::now();
    let clean = Idx::open(dir, true)?;
    let n = clean.len();
    let mut rng = StdRng::seed_from_u64(a.seed + 5);
    let flips: std::collections::BTreeMap<usize, usize> = rand::seq::index::sample(&mut rng, n, n / 20)
        .into_iter()
        .map(|i| (i, (clean.label(i) + rng.random_range(1..10)) % 10))
        .collect();
    let noisy = Relabelled::new(clean, flips.clone());
    let model = Model::new(&"mlp:784,64,10".parse::<Architecture>()?, 1)?;
    let mut weights = Weights::init(&model, a.seed);
    let opts = TrainOptions {
        epochs: 8,
        batch_size: 32,
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 1e-4,
        optimizer: Optimizer::Sgd,
        seed: a.seed,
    };
    train(&model, &mut weights, &noisy, &opts, dtype, &mut |_, _, _| {})?;
    let problem = Problem::new(&model, &weights, &noisy, a.batch_size)?.with_dtype(dtype);
    let factors = Factors::compute(&problem, FactorKind::Ekfac, FisherKind::Mc, a.seed, &|_| {})?;
    let si = hvp_influence::self_influence::self_influence(&problem, &factors, 1e-3 + opts.weight_decay, &|_| {})?;
    let order = hvp_influence::self_influence::ranking(&si);
    let caught = |frac: f64| {
        let top = &order[..(frac * n as f64) as usize];
        top.iter().filter(|i| flips.contains_key(i)).count() as f64 / flips.len() as f64
    };
    println!(
        "\nMislabel detection. {} of {n} training labels flipped at random; mlp:784,64,10 trained 8 epochs; \
         EK-FAC self-influence ∇ℓ_iᵀ(F + λI)⁻¹∇ℓ_i of every image ({:.0} s):\n",
        flips.len(),
        start.elapsed().as_secs_f64()
    );
    println!("| inspected (highest self-influence first) | flipped labels found | random inspection |");
    println!("|---|---|---|");
    for frac in [0.05, 0.1, 0.2] {
        println!(
            "| top {:.0}% | {:.0}% | {:.0}% |",
            frac * 100.0,
            100.0 * caught(frac),
            100.0 * frac.min(1.0)
        );
    }
    let shape = noisy.sample_shape();
    let tiles = order
        .iter()
        .take(12)
        .map(|&i| -> Result<Tile> {
            let mut b = hvp_data::Batch::default();
            noisy.read(&[i], &mut b)?;
            let flipped = flips.contains_key(&i);
            Ok(Tile {
                pixels: b.x,
                caption: vec![
                    (format!("#{i}"), BLACK),
                    (format!("label {}", noisy.label(i)), if flipped { RED } else { BLACK }),
                    (
                        if flipped {
                            "flipped".to_string()
                        } else {
                            "original".to_string()
                        },
                        if flipped { RED } else { GREEN },
                    ),
                ],
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let path = a.out_dir.join("self-influence.png");
    let png = grid(
        &[("highest self-influence (red: label was flipped)".to_string(), tiles)],
        &shape,
    )?;
    hvp_model::io::atomic_write(&path, &png).with_context(|| format!("writing {}", path.display()))?;
    println!("\nPicture of the 12 highest: {}", path.display());
    Ok(())
}
