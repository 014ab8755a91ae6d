//! `hvp bench`: time per gradient, Hessian-vector and GGN-vector product on the
//! seed ResNet (resnet-cifar:2,2,2) over N random CIFAR-shaped images, with
//! throughput, achieved GFLOP/s and peak memory, for comparison side by side
//! with `scripts/bench_torch.py` (same model, data distribution and FLOP units).

use crate::args::{set_threads, DTypeArg};
use crate::report::{format_bytes, peak_rss_bytes, reset_peak_rss};
use anyhow::{Context, Result};
use clap::Args;
use hvp_curvature::{Curvature, Problem};
use hvp_data::{Batch, DataError, Dataset};
use hvp_model::{Architecture, Model, ParamVector, Weights};
use hvp_tensor::DType;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct BenchArgs {
    /// Dataset sizes N to time.
    #[arg(value_parser = crate::checks::iterations, long, value_delimiter = ',', default_value = "100,1000,4000")]
    pub sizes: Vec<usize>,
    /// Timed repeats per measurement (the median is reported), after one warm-up.
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
    /// Architecture to time (default: the seed ResNet).
    #[arg(long, default_value = "resnet-cifar:2,2,2")]
    pub arch: String,
    /// Sub-batches per batch (default: one per worker thread, more for models
    /// with large activations, so each stays in a core's cache; 1 runs each
    /// batch whole with the threads inside the kernels).
    #[arg(value_parser = crate::checks::iterations, long)]
    pub sub_batches: Option<usize>,
    /// Also write the rows as JSON lines here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Methods to time, in this order (e.g. `ggn` alone, to profile it).
    #[arg(long, value_delimiter = ',', default_value = "grad,hvp,ggn")]
    pub methods: Vec<BenchMethod>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchMethod {
    /// The gradient.
    Grad,
    /// The exact Hessian-vector product.
    Hvp,
    /// The Gauss-Newton-vector product.
    Ggn,
}

impl BenchMethod {
    fn name(self) -> &'static str {
        match self {
            BenchMethod::Grad => "grad",
            BenchMethod::Hvp => "hvp",
            BenchMethod::Ggn => "ggn",
        }
    }

    /// FLOP units as counted for PyTorch in the docs: grad = 3 forwards, HVP = 9
    /// (gradient and its tangent), GGN = 5.
    fn forward_units(self) -> f64 {
        match self {
            BenchMethod::Grad => 3.0,
            BenchMethod::Hvp => 9.0,
            BenchMethod::Ggn => 5.0,
        }
    }
}

/// N(0, 1)-like images generated from (seed, index): no memory held, the same
/// examples for every run.
struct SyntheticImages {
    n: usize,
    shape: Vec<usize>,
    classes: usize,
}

fn hash(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Dataset for SyntheticImages {
    fn len(&self) -> usize {
        self.n
    }
    fn sample_shape(&self) -> Vec<usize> {
        self.shape.clone()
    }
    fn label(&self, i: usize) -> usize {
        (hash(i as u64 ^ 0xABCD) % self.classes as u64) as usize
    }
    fn read(&self, indices: &[usize], batch: &mut Batch) -> Result<(), DataError> {
        let size: usize = self.shape.iter().product();
        batch.x.clear();
        batch.labels.clear();
        for &i in indices {
            // Sum of 4 uniforms, centred and scaled: mean 0, variance 1.
            batch.x.extend((0..size).map(|j| {
                let h = hash(((i * size + j) as u64) << 2);
                let u: f64 = (0..4).map(|k| ((h >> (16 * k)) & 0xFFFF) as f64 / 65536.0).sum();
                (u - 2.0) * 3f64.sqrt()
            }));
            batch.labels.push(self.label(i));
        }
        Ok(())
    }
    fn describe(&self) -> String {
        format!("{} synthetic images {:?}", self.n, self.shape)
    }
}

#[derive(Serialize)]
struct Row {
    method: &'static str,
    n: usize,
    seconds: f64,
    images_per_s: f64,
    gflop_per_s: f64,
    ratio_to_grad: f64,
    /// `gflop_per_s` as a fraction of `gemm_peak_gflop_per_s`.
    of_gemm_peak: f64,
    /// The highest GEMM rate read during the run (see [`GemmPeak`]).
    gemm_peak_gflop_per_s: f64,
    peak_rss_bytes: Option<u64>,
    threads: usize,
    dtype: &'static str,
}

/// The GEMM rate the kernels can reach here, measured as they run it: every
/// worker thread multiplying its own 256×256×256 matrices single-threaded (as
/// each image's convolution GEMMs run). One reading is the best of five rounds
/// of about 20 ms each. A busy or shared machine only ever reads *low* (nothing
/// runs faster than the hardware), so a run takes a reading before the first
/// timing and after each dataset size, and rates every row against the highest.
struct GemmPeak<T> {
    a: Vec<T>,
    b: Vec<T>,
    readings: Vec<f64>,
}

impl<T: hvp_tensor::Float> GemmPeak<T> {
    const SIZE: usize = 256;
    const REPEATS: usize = 64;
    const ROUNDS: usize = 5;

    fn new() -> Self {
        let n = Self::SIZE * Self::SIZE;
        GemmPeak {
            a: (0..n).map(|i| T::from_f64((i % 7) as f64 * 0.1 - 0.3)).collect(),
            b: (0..n).map(|i| T::from_f64((i % 5) as f64 * 0.1 - 0.2)).collect(),
            readings: Vec::new(),
        }
    }

    /// Takes one reading (GFLOP/s over all worker threads) and returns it.
    fn read(&mut self) -> f64 {
        use hvp_tensor::linalg::{gemm_into, Par};
        use rayon::prelude::*;
        let size = Self::SIZE;
        let threads = hvp_tensor::threads().max(1);
        let (a, b) = (&self.a, &self.b);
        let round = || {
            let start = Instant::now();
            (0..threads).into_par_iter().for_each(|_| {
                let mut c = vec![T::ZERO; size * size];
                for _ in 0..Self::REPEATS {
                    gemm_into(&mut c, a, false, b, false, size, size, size, false, Par::Serial);
                }
                std::hint::black_box(&c);
            });
            start.elapsed().as_secs_f64()
        };
        round();
        let best = (0..Self::ROUNDS).map(|_| round()).fold(f64::INFINITY, f64::min);
        let gflops = (2 * size * size * size * Self::REPEATS * threads) as f64 / best / 1e9;
        self.readings.push(gflops);
        gflops
    }

    /// The highest reading so far.
    fn best(&self) -> f64 {
        self.readings.iter().copied().fold(f64::NAN, f64::max)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn run(a: BenchArgs) -> Result<()> {
    set_threads(a.threads)?;
    let arch: Architecture = a.arch.parse()?;
    let model = Model::new(&arch, 3)?;
    let weights = Weights::init(&model, 0);
    let v = ParamVector::random_normal(&model, 2);
    let shape = match arch {
        Architecture::ResNetCifar { .. } => vec![3, 32, 32],
        Architecture::Mlp { ref sizes, .. } => vec![sizes[0]],
        Architecture::Onnx { ref input_shape, .. } => input_shape.clone(),
    };
    let param_shapes: Vec<Vec<usize>> = model.params.iter().map(|p| p.shape.clone()).collect();
    let fwd = model.graph.forward_flops(&shape, &param_shapes);
    let dtype: DType = a.dtype.into();
    let threads = hvp_tensor::threads();
    println!(
        "hvp bench: {arch}, {} parameters, {dtype}, {threads} threads, batch {}, forward {:.1} MFLOP/image, f32 GEMM: {}, malloc: {}",
        model.num_params(),
        a.batch_size,
        fwd / 1e6,
        hvp_tensor::onednn::gemm_backend().1,
        crate::allocator::describe()
    );
    match dtype {
        DType::F32 => time_methods::<f32>(&a, &model, &weights, &v, &shape, fwd),
        DType::F64 => time_methods::<f64>(&a, &model, &weights, &v, &shape, fwd),
    }
}

/// Times every method at every size, then prints the table (each row's share of
/// the best GEMM peak read during the run) and writes the JSON rows.
fn time_methods<T: hvp_tensor::Float>(
    a: &BenchArgs,
    model: &Model,
    weights: &Weights,
    v: &ParamVector,
    shape: &[usize],
    fwd: f64,
) -> Result<()> {
    let dtype: DType = a.dtype.into();
    let threads = hvp_tensor::threads();
    let mut peak = GemmPeak::<T>::new();
    eprintln!("{dtype} GEMM peak, first reading: {:.1} GFLOP/s", peak.read());
    let mut rows = Vec::new();
    let mut warmed = false;
    for &n in &a.sizes {
        let data = SyntheticImages {
            n,
            shape: shape.to_vec(),
            classes: model.num_classes,
        };
        let problem = Problem::new(model, weights, &data, a.batch_size)?.with_dtype(dtype);
        let problem = match a.sub_batches {
            Some(n) => problem.with_sub_batches(n),
            None => problem,
        };
        reset_peak_rss();
        let mut grad_time = f64::NAN;
        for &method in &a.methods {
            let units = method.forward_units();
            let once = || -> Result<f64> {
                let start = Instant::now();
                let none = |_: usize| {};
                match method {
                    BenchMethod::Grad => drop(problem.gradient(&none)?),
                    BenchMethod::Hvp => drop(problem.product(Curvature::Hessian, v, &none)?),
                    BenchMethod::Ggn => drop(problem.product(Curvature::Ggn, v, &none)?),
                }
                Ok(start.elapsed().as_secs_f64())
            };
            if !warmed {
                once()?;
            }
            let times = (0..a.repeats.max(1)).map(|_| once()).collect::<Result<Vec<_>>>()?;
            let t = median(times);
            if method == BenchMethod::Grad {
                grad_time = t;
            }
            eprintln!("{} N={n}: {t:.3} s", method.name());
            rows.push(Row {
                method: method.name(),
                n,
                seconds: t,
                images_per_s: n as f64 / t,
                gflop_per_s: units * fwd * n as f64 / t / 1e9,
                ratio_to_grad: t / grad_time,
                of_gemm_peak: f64::NAN,
                gemm_peak_gflop_per_s: f64::NAN,
                peak_rss_bytes: peak_rss_bytes(),
                threads,
                dtype: dtype.name(),
            });
        }
        warmed = true;
        eprintln!("{dtype} GEMM peak, reading after N={n}: {:.1} GFLOP/s", peak.read());
    }
    let best = peak.best();
    for row in &mut rows {
        row.gemm_peak_gflop_per_s = best;
        row.of_gemm_peak = row.gflop_per_s / best;
    }
    let readings: Vec<String> = peak.readings.iter().map(|r| format!("{r:.1}")).collect();
    println!(
        "{dtype} GEMM peak here: {best:.1} GFLOP/s ({threads} threads, each 256×256×256, as the convolutions run; best of the readings {} GFLOP/s)",
        readings.join(", ")
    );
    println!("| method | N | time (s) | images/s | GFLOP/s | of GEMM peak | × grad | peak RSS |");
    println!("|---|---|---|---|---|---|---|---|");
    for row in &rows {
        println!(
            "| {} | {} | {:.3} | {:.1} | {:.1} | {:.0}% | {} | {} |",
            row.method,
            row.n,
            row.seconds,
            row.images_per_s,
            row.gflop_per_s,
            100.0 * row.of_gemm_peak,
            if row.ratio_to_grad.is_finite() {
                format!("{:.2}", row.ratio_to_grad)
            } else {
                "–".to_string()
            },
            format_bytes(row.peak_rss_bytes)
        );
    }
    if let Some(path) = &a.json {
        let text: String = rows
            .iter()
            .map(|r| serde_json::to_string(r).map(|s| s + "\n"))
            .collect::<Result<_, _>>()?;
        hvp_model::io::atomic_write(path, text.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
