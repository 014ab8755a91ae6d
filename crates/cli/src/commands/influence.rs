//! `hvp influence`: the influence of every training example on test predictions.
//!
//! Convention: `score(i, t) = ∇ℓ(z_t)ᵀ (M + λI)⁻¹ ∇ℓ(z_i) / N` = the predicted
//! increase of test example t's loss if training example i is removed (positive =
//! helpful, negative = harmful). `s_test = (M + λI)⁻¹ ∇ℓ(z_t)` comes from the
//! chosen solver; the scores of a whole training set are one forward-mode pass
//! (JVP of the per-example losses along s_test), never per-example gradients.

use super::solve::{report_json, run_solver, SolverOptions};
use super::write_json;
use crate::args::{load_model, open_data_spec, set_threads, ModelArgs, RunArgs};
use crate::picture::{grid, Tile, BLACK, GREEN, RED};
use crate::report::{summary, Progress};
use anyhow::{bail, Context, Result};
use clap::Args;
use hvp_curvature::Problem;
use hvp_data::{check_labels, Dataset, Subset};
use hvp_tensor::DType;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const CONVENTION: &str = "score(i, t) = grad loss(z_t)^T (M + lambda I)^-1 grad loss(z_i) / N: the predicted increase of \
test loss t if training example i is removed (positive = helpful, negative = harmful); M = Hessian (or GGN/Fisher) of the \
mean training loss, plus weight_decay * I";

#[derive(Args)]
pub struct InfluenceArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Training data: mnist:DIR[:train|test], cifar10:DIR[:train|test] or npy:X.npy,Y.npy.
    #[arg(long)]
    pub train: String,
    /// Test data, same forms.
    #[arg(long)]
    pub test: String,
    /// Test examples to explain (default: 0).
    #[arg(long, value_delimiter = ',')]
    pub test_indices: Option<Vec<usize>>,
    /// Zero-pad images of both sets by P pixels.
    #[arg(long, default_value_t = 0)]
    pub pad: usize,
    /// Keep only these classes of both sets, relabelled 0, 1, … (e.g. 1,7).
    #[arg(long, value_delimiter = ',')]
    pub classes: Option<Vec<usize>>,
    /// Use only the first N training examples.
    #[arg(long)]
    pub limit_train: Option<usize>,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub solver: SolverOptions,
    /// L2 coefficient of the training objective (adds w·I to the curvature).
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Helpful and harmful examples listed per test point.
    #[arg(long, default_value_t = 5)]
    pub top: usize,
    /// Scores as CSV: train_index,test_index,score,label.
    #[arg(long)]
    pub out: PathBuf,
    /// Metadata, solver reports and top-k lists as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Continue an interrupted run from OUT.partial (finished test points are kept).
    #[arg(long)]
    pub resume: bool,
    /// PNG: each test image with its label and prediction, then its top-k helpful
    /// (green) and harmful (red) training images with labels and scores.
    #[arg(long)]
    pub picture: Option<PathBuf>,
}

/// Draws the influence grid for the explained test points.
pub fn draw(
    path: &Path,
    problem: &Problem,
    test: &dyn Dataset,
    queries: &[(usize, serde_json::Value)],
    top: usize,
) -> Result<()> {
    let shape = test.sample_shape();
    if shape.len() != 3 {
        bail!("--picture needs image data [C, H, W], these examples have shape {shape:?}");
    }
    let image = |ds: &dyn Dataset, i: usize| -> Result<Vec<f64>> {
        let mut b = hvp_data::Batch::default();
        ds.read(&[i], &mut b)?;
        Ok(b.x)
    };
    let mut rows = Vec::new();
    for (t, meta) in queries {
        let one = Subset::new(test, vec![*t])?;
        let pred = Problem::new(problem.model, problem.weights, &one, 1)?.predictions::<f64>()?[0];
        let label = test.label(*t);
        let mut tiles = vec![Tile {
            pixels: image(test, *t)?,
            caption: vec![
                (format!("test {t}"), BLACK),
                (format!("label {label}"), BLACK),
                (format!("pred {pred}"), if pred == label { GREEN } else { RED }),
            ],
        }];
        for (key, colour) in [("top_helpful", GREEN), ("top_harmful", RED)] {
            for e in meta[key]
                .as_array()
                .map(|v| v.as_slice())
                .unwrap_or(&[])
                .iter()
                .take(top)
            {
                let i = e["train_index"].as_u64().unwrap_or(0) as usize;
                tiles.push(Tile {
                    pixels: image(problem.data, i)?,
                    caption: vec![
                        (format!("#{i}"), BLACK),
                        (format!("label {}", problem.data.label(i)), BLACK),
                        (format!("{:+.2e}", e["score"].as_f64().unwrap_or(0.0)), colour),
                    ],
                });
            }
        }
        rows.push((
            format!("test {t}: helpful (green) then harmful (red) training examples"),
            tiles,
        ));
    }
    grid(&rows, &shape, path)
}

/// One explained test point.
pub struct Query {
    pub scores: Vec<f64>,
    pub meta: serde_json::Value,
}

/// Top-k helpful (largest) and harmful (smallest) training indices.
pub fn top_k(scores: &[f64], k: usize) -> (Vec<usize>, Vec<usize>) {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let helpful = order.iter().take(k).copied().collect();
    let harmful = order.iter().rev().take(k).copied().collect();
    (helpful, harmful)
}

/// s_test and the scores of every training example for test example `t`.
pub fn explain(
    train: &Problem,
    test: &dyn Dataset,
    t: usize,
    opts: &SolverOptions,
    dtype: DType,
    progress: &dyn Fn(usize),
) -> Result<Query> {
    let one = Subset::new(test, vec![t])?;
    let test_problem = Problem::new(train.model, train.weights, &one, 1)?;
    let g = test_problem.gradient::<f64>(&|_| {})?;
    let (s_test, report) = run_solver(train, opts, dtype, &g.value)?;
    let n = train.data.len() as f64;
    let scores: Vec<f64> = match dtype {
        DType::F32 => train.loss_directional::<f32>(&s_test, progress)?,
        DType::F64 => train.loss_directional::<f64>(&s_test, progress)?,
    }
    .into_iter()
    .map(|d| d / n)
    .collect();
    let mut meta = serde_json::json!({
        "test_index": t,
        "label": test.label(t),
        "test_loss": g.loss,
        "solver_report": report_json(&report, opts, train.data.len(), dtype),
    });
    if !report.warnings.is_empty() {
        for w in &report.warnings {
            eprintln!("warning (test {t}): {w}");
        }
    }
    meta["s_test_norm"] = s_test.norm().into();
    Ok(Query { scores, meta })
}

/// A partial-result file, written (and fsynced) only by rank 0.
struct PartialFile(Option<std::fs::File>);

impl PartialFile {
    fn create(path: &Path, root: bool) -> Result<Self> {
        Ok(PartialFile(if root {
            Some(std::fs::File::create(path).with_context(|| format!("writing {}", path.display()))?)
        } else {
            None
        }))
    }

    fn sync_data(&self) -> std::io::Result<()> {
        self.0.as_ref().map_or(Ok(()), |f| f.sync_data())
    }
}

impl Write for PartialFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.as_mut().map_or(Ok(buf.len()), |f| f.write(buf))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.as_mut().map_or(Ok(()), |f| f.flush())
    }
}

fn partial_paths(out: &Path) -> (PathBuf, PathBuf) {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    (
        out.with_file_name(format!("{name}.partial")),
        out.with_file_name(format!("{name}.partial.json")),
    )
}

/// Test points whose rows and metadata are complete in the partial files.
fn completed(csv: &Path, meta: &Path, n: usize) -> Result<Vec<(usize, serde_json::Value)>> {
    let (Ok(c), Ok(m)) = (std::fs::File::open(csv), std::fs::read_to_string(meta)) else {
        return Ok(vec![]);
    };
    let mut counts = std::collections::BTreeMap::<usize, usize>::new();
    for line in std::io::BufReader::new(c).lines().skip(1) {
        let line = line?;
        if let Some(t) = line.split(',').nth(1).and_then(|t| t.parse().ok()) {
            *counts.entry(t).or_default() += 1;
        }
    }
    let mut done = Vec::new();
    for line in m.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).context("reading the partial metadata")?;
        let t = v["test_index"]
            .as_u64()
            .context("partial metadata without test_index")? as usize;
        if counts.get(&t) == Some(&n) {
            done.push((t, v));
        }
    }
    Ok(done)
}

pub fn run(a: InfluenceArgs) -> Result<()> {
    set_threads(a.run.threads)?;
    let (model, weights) = load_model(&a.model)?;
    let train_src = open_data_spec(&a.train, a.pad, a.classes.as_deref())?;
    let train_view = Subset::first(train_src.as_ref(), a.limit_train.unwrap_or(usize::MAX));
    let test = open_data_spec(&a.test, a.pad, a.classes.as_deref())?;
    crate::args::check_loss(a.model.loss, train_src.as_ref())?;
    crate::args::check_loss(a.model.loss, test.as_ref())?;
    model.check_input(&test.sample_shape()).map_err(anyhow::Error::msg)?;
    check_labels(test.as_ref(), model.num_classes)?;
    let indices = a.test_indices.clone().unwrap_or_else(|| vec![0]);
    if let Some(&bad) = indices.iter().find(|&&t| t >= test.len()) {
        bail!(
            "--test-indices: {bad} is out of range, the test set has {} examples",
            test.len()
        );
    }
    let problem = Problem::new(&model, &weights, &train_view, a.run.batch_size)?.with_weight_decay(a.weight_decay);
    let n = train_view.len();
    let dtype: DType = a.run.dtype.into();
    let (partial_csv, partial_meta) = partial_paths(&a.out);
    // Only rank 0 reads and writes the partial files (one process: always).
    let root = hvp_dist::is_root();
    let mut done = if a.resume && root {
        completed(&partial_csv, &partial_meta, n)?
    } else {
        vec![]
    };
    // Rewrite the partial files with the complete test points only.
    let mut kept_rows: Vec<String> = Vec::new();
    if !done.is_empty() {
        let keep: std::collections::BTreeSet<usize> = done.iter().map(|d| d.0).collect();
        let f = std::fs::File::open(&partial_csv)?;
        for line in std::io::BufReader::new(f).lines().skip(1) {
            let line = line?;
            if line
                .split(',')
                .nth(1)
                .and_then(|t| t.parse::<usize>().ok())
                .is_some_and(|t| keep.contains(&t))
            {
                kept_rows.push(line);
            }
        }
    }
    let mut csv = PartialFile::create(&partial_csv, root)?;
    writeln!(csv, "train_index,test_index,score,label")?;
    for r in &kept_rows {
        writeln!(csv, "{r}")?;
    }
    let mut meta_file = PartialFile::create(&partial_meta, root)?;
    for (_, m) in &done {
        writeln!(meta_file, "{m}")?;
    }
    // Every rank scores the same test points: rank 0 says which are done.
    let mut done_mask: Vec<f64> = indices
        .iter()
        .map(|t| done.iter().any(|d| d.0 == *t) as u8 as f64)
        .collect();
    hvp_dist::allreduce_sum(&mut done_mask);
    let todo: Vec<usize> = indices
        .iter()
        .zip(&done_mask)
        .filter(|(_, &m)| m == 0.0)
        .map(|(&t, _)| t)
        .collect();
    if a.resume && !done.is_empty() && !a.run.quiet {
        eprintln!(
            "resuming: {} of {} test points already scored",
            done.len(),
            indices.len()
        );
    }
    let progress = Progress::new(todo.len() * n, "influence", a.run.quiet);
    let start = Instant::now();
    for &t in &todo {
        let q = explain(&problem, test.as_ref(), t, &a.solver, dtype, &|k| progress.advance(k))?;
        let mut block = String::with_capacity(n * 32);
        for (i, s) in q.scores.iter().enumerate() {
            block.push_str(&format!("{i},{t},{s:.9e},{}\n", train_view.label(i)));
        }
        csv.write_all(block.as_bytes())?;
        csv.sync_data()?;
        let (helpful, harmful) = top_k(&q.scores, a.top);
        let entry =
            |i: &usize| serde_json::json!({"train_index": i, "score": q.scores[*i], "label": train_view.label(*i)});
        let mut meta = q.meta;
        meta["top_helpful"] = helpful.iter().map(entry).collect();
        meta["top_harmful"] = harmful.iter().map(entry).collect();
        writeln!(meta_file, "{meta}")?;
        meta_file.sync_data()?;
        done.push((t, meta));
    }
    progress.finish();
    drop(csv);
    drop(meta_file);
    if root {
        std::fs::rename(&partial_csv, &a.out).with_context(|| format!("writing {}", a.out.display()))?;
        let _ = std::fs::remove_file(&partial_meta);
    }
    done.sort_by_key(|d| indices.iter().position(|&t| t == d.0));
    if let Some(path) = &a.picture {
        draw(path, &problem, test.as_ref(), &done, a.top)?;
    }
    if let Some(path) = &a.json {
        write_json(
            path,
            &serde_json::json!({
                "convention": CONVENTION,
                "model": model.arch.to_string(),
                "train": a.train,
                "test": a.test,
                "train_examples": n,
                "damping": a.solver.damping,
                "weight_decay": a.weight_decay,
                "curvature": format!("{:?}", a.solver.curvature).to_lowercase(),
                "solver": format!("{:?}", a.solver.solver).to_lowercase(),
                "queries": done.iter().map(|d| d.1.clone()).collect::<Vec<_>>(),
            }),
        )?;
    }
    if !a.run.quiet {
        for (t, m) in &done {
            let list = |k: &str| {
                m[k].as_array()
                    .map(|v| {
                        v.iter()
                            .map(|e| format!("{}({:+.2e})", e["train_index"], e["score"].as_f64().unwrap_or(0.0)))
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .unwrap_or_default()
            };
            eprintln!(
                "test {t} (label {}): helpful {} | harmful {}",
                m["label"],
                list("top_helpful"),
                list("top_harmful")
            );
        }
        summary("hvp influence", todo.len() * n, start.elapsed(), false);
        eprintln!("scores written to {} ({CONVENTION})", a.out.display());
    }
    Ok(())
}
