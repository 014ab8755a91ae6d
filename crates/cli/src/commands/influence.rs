//! `hvp influence`: the influence of every training example on test predictions.
//!
//! Convention: `score(i, t) = ∇ℓ(z_t)ᵀ (M + λI)⁻¹ ∇ℓ(z_i) / N` = the predicted
//! increase of test example t's loss if training example i is removed (positive =
//! helpful, negative = harmful). `s_test = (M + λI)⁻¹ ∇ℓ(z_t)` comes from the
//! chosen solver; the scores of a whole training set are one forward-mode pass
//! (JVP of the per-example losses along s_test), never per-example gradients.

use super::solve::{report_json, SolverOptions};
use crate::args::{load_model, open_data_spec, set_threads, ModelArgs, RunArgs};
use crate::output::Outputs;
use crate::picture::{grid, Tile, BLACK, GREEN, RED};
use crate::report::{summary, Progress};
use anyhow::{bail, Context, Result};
use clap::Args;
use hvp_curvature::Problem;
use hvp_data::{check_labels, Dataset, Subset};
use hvp_influence::{scores, InfluenceError};
use hvp_model::Model;
use hvp_solvers::PreparedSolver;
use rayon::prelude::*;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub use hvp_influence::scores::{top_k, CONVENTION};

#[derive(Args)]
#[command(group(clap::ArgGroup::new("scores_output").required(true).multiple(true).args(["out", "matrix"])))]
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
    #[arg(value_parser = crate::checks::pad, long, default_value_t = 0)]
    pub pad: usize,
    /// Keep only these classes of both sets, relabelled 0, 1, … (e.g. 1,7).
    #[arg(long, value_delimiter = ',')]
    pub classes: Option<Vec<usize>>,
    /// Use only the first N training examples (alias --limit).
    #[arg(value_parser = crate::checks::limit, long, visible_alias = "limit")]
    pub limit_train: Option<usize>,
    /// Use only the first N test examples.
    #[arg(value_parser = crate::checks::limit, long)]
    pub limit_test: Option<usize>,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub solver: SolverOptions,
    /// L2 coefficient of the training objective (adds w·I to the curvature).
    #[arg(value_parser = crate::checks::non_negative, long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Helpful and harmful examples listed per test point.
    #[arg(value_parser = crate::checks::small_count, long, default_value_t = 5)]
    pub top: usize,
    /// Scores as CSV: train_index,test_index,score,label,solve_status,relative_residual
    /// (one row per training example and test point). Give this, --matrix, or both.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Scores as an NPY matrix `[Q, N]` of float64 (C order): row q holds every
    /// training example's score for the q-th of --test-indices, column i training
    /// example i. Written a group at a time (8·N bytes per test point, against
    /// ~40·N for the CSV); the top-k lists go to --json.
    #[arg(long)]
    pub matrix: Option<PathBuf>,
    /// Metadata, solver reports and top-k lists as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Continue an interrupted run from OUT.partial (finished groups of test points are kept).
    #[arg(long)]
    pub resume: bool,
    /// Test points scored together in one pass over the training data (when every
    /// parameter is in a Linear, Conv2d or BatchNorm layer); the partial files, and
    /// so --resume, advance a group at a time.
    #[arg(value_parser = crate::checks::iterations, long, default_value_t = 32)]
    pub query_group: usize,
    /// PNG: each test image with its label and prediction, then its top-k helpful
    /// (green) and harmful (red) training images with labels and scores.
    #[arg(long)]
    pub picture: Option<PathBuf>,
}

/// Draws the influence grid for the explained test points (PNG bytes).
pub fn draw(
    problem: &Problem,
    test: &dyn Dataset,
    queries: &[(usize, serde_json::Value)],
    top: usize,
) -> Result<Vec<u8>> {
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
        let pred = Problem::new(problem.model, problem.weights, &one, 1)?.predictions_as::<f64>()?[0];
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
    grid(&rows, &shape)
}

/// One explained test point: the scores and their JSON metadata.
pub struct Query {
    pub scores: Vec<f64>,
    pub meta: serde_json::Value,
}

/// The CSV header of the scores: solve status and residual repeat the test
/// point's, so every row says how far its s_test is from (M + λI)⁻¹ ∇ℓ(z_t).
pub const CSV_HEADER: &str = "train_index,test_index,score,label,solve_status,relative_residual";

/// s_test and the scores of every training example for test example `t`
/// (`hvp_influence::scores::explain`), with the CLI's reporting: a failed solve
/// is exit code 3 unless `--keep-unconverged`.
pub fn explain(
    train: &Problem,
    test: &dyn Dataset,
    t: usize,
    opts: &SolverOptions,
    solver: &PreparedSolver,
    progress: &dyn Fn(usize),
) -> Result<Query> {
    let mut all = explain_group(train, test, &[t], opts, solver, progress)?;
    Ok(all.remove(0))
}

/// [`explain`] for several test points, scored in one pass
/// (`hvp_influence::scores::explain_all`).
fn explain_group(
    train: &Problem,
    test: &dyn Dataset,
    ts: &[usize],
    opts: &SolverOptions,
    solver: &PreparedSolver,
    progress: &dyn Fn(usize),
) -> Result<Vec<Query>> {
    let all = match scores::explain_all(train, test, ts, solver, opts.keep_unconverged, progress) {
        Err(InfluenceError::SolveFailed { report, test_index }) => {
            super::solve::print_report(&report);
            return Err(super::solve::failed(
                &report,
                &format!("test example {test_index} was not scored and no scores were written"),
            ));
        }
        other => other?,
    };
    // One line for the group, not one per test point.
    let unmeasured = all.iter().filter(|e| is_unmeasured(&e.report)).count();
    if unmeasured > 0 {
        eprintln!(
            "warning: residual not measured for {unmeasured} of {} test points (--residuals): the \
             approximation's error of their s_test is unknown; --residuals all measures every one",
            all.len()
        );
    }
    Ok(all.into_iter().map(|e| query(train, opts, e)).collect())
}

/// Whether a usable report's residual was left unmeasured (`--residuals`).
fn is_unmeasured(report: &hvp_solvers::SolveReport) -> bool {
    report.usable() && report.relative_residual.is_nan()
}

/// One explained test point with the CLI's warnings and JSON metadata.
fn query(train: &Problem, opts: &SolverOptions, e: scores::Explanation) -> Query {
    let t = e.test_index;
    let report = &e.report;
    if !report.usable() {
        super::solve::print_report(report);
        eprintln!("warning (test {t}): scoring from a FAILED solve (--keep-unconverged); the scores are not influence");
    }
    // The group has said which residuals were not measured.
    let skip = |w: &&String| is_unmeasured(report) && w.starts_with("residual not measured");
    for w in report.warnings.iter().filter(|w| !skip(w)) {
        eprintln!("warning (test {t}): {}", crate::output::as_flags(w));
    }
    let meta = serde_json::json!({
        "test_index": t,
        "label": e.label,
        "test_loss": e.test_loss,
        "solve_status": report.status.name(),
        "relative_residual": report.relative_residual,
        "solver_report": report_json(report, opts, train.data.len(), train.dtype()),
        "s_test_norm": e.s_test_norm,
    });
    Query { scores: e.scores, meta }
}

/// A partial-result file, written (and fsynced) only by rank 0. Created
/// exclusively: whatever was at its name (an old partial file, a planted
/// symlink) is removed first, never opened.
struct PartialFile(Option<std::fs::File>);

impl PartialFile {
    fn create(path: &Path, root: bool) -> Result<Self> {
        if !root {
            return Ok(PartialFile(None));
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing the old {}", path.display())),
        }
        let f = hvp_io::write::create_exclusive(path).with_context(|| format!("writing {}", path.display()))?;
        Ok(PartialFile(Some(f)))
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

use hvp_io::hash::{fnv1a, FNV_OFFSET};

/// Content hash of a file given on the command line (for the fingerprint).
fn file_hash(path: &Path) -> Result<String> {
    let (mut f, _) = hvp_io::read::open_regular(path)?;
    let mut h = FNV_OFFSET;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut f, &mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h = fnv1a(&buf[..n], h);
    }
    Ok(format!("{h:016x}"))
}

/// Content hash of a dataset: every label, and the inputs of its first and
/// last examples (a full pass would cost as much as scoring).
fn data_hash(ds: &dyn Dataset) -> Result<String> {
    let mut h = FNV_OFFSET;
    for i in 0..ds.len() {
        h = fnv1a(&(ds.label(i) as u64).to_le_bytes(), h);
    }
    let n = ds.len();
    let ends: Vec<usize> = (0..n.min(64)).chain(n.saturating_sub(64).max(n.min(64))..n).collect();
    let mut b = hvp_data::Batch::default();
    ds.read(&ends, &mut b)?;
    for v in b.x.iter().chain(&b.targets) {
        h = fnv1a(&v.to_le_bytes(), h);
    }
    Ok(format!("{n}:{h:016x}"))
}

/// Everything that determines the scores of a run: a resumed run must match
/// it field by field.
fn fingerprint(a: &InfluenceArgs, train: &dyn Dataset, test: &dyn Dataset) -> Result<serde_json::Value> {
    let hash_opt = |p: &Option<PathBuf>| p.as_deref().map(file_hash).transpose();
    let o = &a.solver;
    Ok(serde_json::json!({
        "model": a.model.model.as_ref().map(|p| p.display().to_string()),
        "model_hash": hash_opt(&a.model.model)?,
        "arch": a.model.arch,
        "weights_hash": hash_opt(&a.model.weights)?,
        "params": a.model.params,
        "loss": format!("{:?}", a.model.loss),
        "train_data": data_hash(train)?,
        "test_data": data_hash(test)?,
        "test_indices": a.test_indices.clone().unwrap_or_else(|| vec![0]),
        "dtype": format!("{:?}", a.run.dtype),
        "query_group": a.query_group,
        "weight_decay": a.weight_decay,
        "solver": format!("{:?}", o.solver),
        "curvature": format!("{:?}", o.curvature),
        "damping": o.damping,
        "tol": o.tol,
        "max_iter": o.max_iter,
        "depth": o.depth,
        "repeats": o.repeats,
        "scale": o.scale,
        "lissa_batch": o.lissa_batch,
        "rank": o.rank,
        "seed": o.seed,
        "factors_hash": hash_opt(&o.factors)?,
        "fisher": format!("{:?}", o.fisher),
        "keep_unconverged": o.keep_unconverged,
    }))
}

/// Where a run's score matrix is written as it goes: the NPY header of the
/// whole `[Q, N]` matrix, then the rows of the test points scored so far, in
/// `--test-indices` order.
struct PartialMatrix<'p> {
    path: &'p Path,
    header: Vec<u8>,
    row_bytes: u64,
}

impl PartialMatrix<'_> {
    /// Rows complete on disk (0 when the file is missing or its header differs).
    fn rows_on_disk(&self) -> Result<usize> {
        if !self.path.exists() {
            return Ok(0);
        }
        let (mut f, len) = hvp_io::read::open_regular(self.path)?;
        let mut header = vec![0u8; self.header.len()];
        if len < self.header.len() as u64 || std::io::Read::read_exact(&mut f, &mut header).is_err() {
            return Ok(0);
        }
        if header != self.header {
            return Ok(0);
        }
        Ok(((len - self.header.len() as u64) / self.row_bytes.max(1)) as usize)
    }

    /// A fresh partial file holding the header and the first `rows` rows of
    /// the old one (the rest was cut by the interruption or is scored again).
    fn restart(&self, rows: usize, root: bool) -> Result<PartialFile> {
        // Opened before `create` removes the name: the rows stay readable.
        let old = if rows > 0 {
            Some(hvp_io::read::open_regular(self.path)?.0)
        } else {
            None
        };
        let mut file = PartialFile::create(self.path, root)?;
        match old {
            Some(old) => {
                let keep = self.header.len() as u64 + rows as u64 * self.row_bytes;
                let copied = std::io::copy(&mut std::io::Read::take(old, keep), &mut file)
                    .with_context(|| format!("keeping the scored rows of {}", self.path.display()))?;
                if copied != keep {
                    bail!(
                        "{} lost rows while resuming; rerun without --resume",
                        self.path.display()
                    );
                }
            }
            None => file.write_all(&self.header)?,
        }
        Ok(file)
    }
}

/// Test points whose rows and metadata are complete in the partial files,
/// after checking the partial files were written by the same configuration:
/// with a CSV, all `n` of its rows are on disk; with a matrix, its row is
/// (rows are kept for a prefix of `indices` only).
fn completed(
    csv: Option<&Path>,
    matrix: Option<&PartialMatrix>,
    meta: &Path,
    (n, indices): (usize, &[usize]),
    expected: &serde_json::Value,
) -> Result<Vec<(usize, serde_json::Value)>> {
    if !meta.exists() || csv.is_some_and(|c| !c.exists()) {
        return Ok(vec![]);
    }
    let m = String::from_utf8_lossy(&hvp_io::read::read_bounded(meta, 1 << 30, "influence metadata")?).into_owned();
    let mut lines = m.lines().filter(|l| !l.trim().is_empty());
    let recorded: serde_json::Value = lines
        .next()
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .and_then(|v| v.get("fingerprint").cloned())
        .unwrap_or(serde_json::Value::Null);
    if &recorded != expected {
        let differs: Vec<String> = match (recorded.as_object(), expected.as_object()) {
            (Some(r), Some(e)) => e
                .iter()
                .filter(|(k, v)| r.get(*k) != Some(v))
                .map(|(k, v)| format!("{k}: {} then, {v} now", r.get(k).unwrap_or(&serde_json::Value::Null)))
                .collect(),
            _ => vec!["the partial file records no configuration".into()],
        };
        bail!(
            "--resume: {} was written by a run with another configuration ({}); rerun with the original options, \
             or without --resume to start over",
            meta.display(),
            differs.join("; ")
        );
    }
    let mut counts = std::collections::BTreeMap::<usize, usize>::new();
    if let Some(csv) = csv {
        // Regular files only: a FIFO planted at these names must not hang the run.
        let (c, _) = hvp_io::read::open_regular(csv)?;
        for line in std::io::BufReader::new(c).lines().skip(1) {
            let line = line?;
            if let Some(t) = line.split(',').nth(1).and_then(|t| t.parse().ok()) {
                *counts.entry(t).or_default() += 1;
            }
        }
    }
    let matrix_rows = match matrix {
        Some(m) => m.rows_on_disk()?,
        None => usize::MAX,
    };
    let mut done = Vec::new();
    for line in lines {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue; // a line cut by the interruption
        };
        let Some(t) = v["test_index"].as_u64().map(|t| t as usize) else {
            continue;
        };
        let rows_complete = csv.is_none() || counts.get(&t) == Some(&n);
        let row_on_disk = indices.iter().position(|&u| u == t).is_some_and(|k| k < matrix_rows);
        if rows_complete && row_on_disk {
            done.push((t, v));
        }
    }
    Ok(done)
}

pub fn run(a: InfluenceArgs) -> Result<()> {
    set_threads(a.run.threads)?;
    let root = hvp_dist::is_root();
    // The CSV's path (else the matrix's) names the run's lock and metadata.
    let anchor: &Path = match (&a.out, &a.matrix) {
        (Some(out), _) => out,
        (None, Some(matrix)) => matrix,
        (None, None) => {
            bail!("give --out scores.csv (one row per score), --matrix scores.npy (the [Q, N] matrix), or both")
        }
    };
    if a.out.is_some() && a.out == a.matrix {
        bail!("--out and --matrix name the same file; give them different paths");
    }
    // One run per output at a time: a second fails here, before any work.
    for path in a.out.iter().chain(&a.matrix) {
        hvp_io::write::check_destination(path)?;
    }
    let _lock = if root {
        Some(hvp_io::write::Lock::acquire(anchor)?)
    } else {
        None
    };
    let mut outputs = Outputs::new();
    let out_slot = outputs.reserve_opt(a.out.as_ref())?;
    let matrix_slot = outputs.reserve_opt(a.matrix.as_ref())?;
    let json_slot = outputs.reserve_opt(a.json.as_ref())?;
    let picture_slot = outputs.reserve_opt(a.picture.as_ref())?;
    let (model, weights) = load_model(&a.model)?;
    crate::args::check_weights_fit(&model, &weights, a.run.dtype.into())?;
    let train_src = open_data_spec(&a.train, a.pad, a.classes.as_deref())?;
    let train_view = Subset::first(train_src.as_ref(), a.limit_train.unwrap_or(usize::MAX));
    let test_src = open_data_spec(&a.test, a.pad, a.classes.as_deref())?;
    let test = Subset::first(test_src.as_ref(), a.limit_test.unwrap_or(usize::MAX));
    let test: &dyn Dataset = &test;
    crate::args::check_loss(a.model.loss, train_src.as_ref())?;
    crate::args::check_loss(a.model.loss, test)?;
    model.check_input(&test.sample_shape()).map_err(anyhow::Error::msg)?;
    check_labels(test, model.num_classes)?;
    if a.picture.is_some() && test.sample_shape().len() != 3 {
        bail!(
            "--picture needs image data [C, H, W], these examples have shape {:?}; drop --picture",
            test.sample_shape()
        );
    }
    let indices = a.test_indices.clone().unwrap_or_else(|| vec![0]);
    if let Some((k, &t)) = indices.iter().enumerate().find(|(k, t)| indices[..*k].contains(t)) {
        bail!(
            "--test-indices lists test example {t} twice (at positions {} and {})",
            indices.iter().position(|&u| u == t).unwrap_or(0) + 1,
            k + 1
        );
    }
    if let Some(&bad) = indices.iter().find(|&&t| t >= test.len()) {
        bail!(
            "--test-indices: {bad} is out of range, the test set has {} examples",
            test.len()
        );
    }
    // A frozen feature extractor runs once per training and test example.
    let frozen = super::frozen_prefix(&model, &weights, &train_view.sample_shape(), a.run.quiet);
    let features = match &frozen {
        Some(f) => Some((
            super::frozen_features(f, &weights, &train_view, None, &a.run)?,
            super::frozen_features(f, &weights, test, Some(&indices), &a.run)?,
        )),
        None => None,
    };
    let (pass_model, pass_train, pass_test): (&Model, &dyn Dataset, &dyn Dataset) = match (&frozen, &features) {
        (Some(f), Some((train_x, test_x))) => (&f.tail, train_x, test_x),
        _ => (&model, &train_view, test),
    };
    let problem = Problem::new(pass_model, &weights, pass_train, a.run.batch_size)?
        .with_weight_decay(a.weight_decay)
        .with_dtype(a.run.dtype.into());
    let n = train_view.len();
    let partial_meta = partial_paths(anchor).1;
    let partial_csv = a.out.as_deref().map(|out| partial_paths(out).0);
    let partial_npy = a.matrix.as_deref().map(|m| partial_paths(m).0);
    let partial_matrix = partial_npy.as_deref().map(|path| PartialMatrix {
        path,
        header: hvp_data::npy_bytes("<f8", &[indices.len(), n], &[]),
        row_bytes: 8 * n as u64,
    });
    let config = fingerprint(&a, &train_view, test)?;
    // Only rank 0 reads and writes the partial files (one process: always).
    let mut done = if a.resume && root {
        completed(
            partial_csv.as_deref(),
            partial_matrix.as_ref(),
            &partial_meta,
            (n, &indices),
            &config,
        )?
    } else {
        vec![]
    };
    // A group of test points is resumed only when all of it is on disk, else
    // scored again whole: the groups (and so the scores, bit for bit) are those
    // of an uninterrupted run.
    let complete_groups: std::collections::BTreeSet<usize> = indices
        .chunks(a.query_group)
        .filter(|g| g.iter().all(|t| done.iter().any(|d| d.0 == *t)))
        .flatten()
        .copied()
        .collect();
    done.retain(|d| complete_groups.contains(&d.0));
    // The matrix keeps its rows in order: only a scored prefix of the test
    // points is kept (an uninterrupted run's groups complete in that order).
    let prefix = indices.iter().take_while(|t| done.iter().any(|d| d.0 == **t)).count();
    done.retain(|d| indices[..prefix].contains(&d.0));
    // Rewrite the partial files with the complete test points only.
    let mut kept_rows: Vec<String> = Vec::new();
    if let (false, Some(partial_csv)) = (done.is_empty(), &partial_csv) {
        let keep: std::collections::BTreeSet<usize> = done.iter().map(|d| d.0).collect();
        let (f, _) = hvp_io::read::open_regular(partial_csv)?;
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
    let mut csv = match &partial_csv {
        Some(path) => {
            let mut csv = PartialFile::create(path, root)?;
            writeln!(csv, "{CSV_HEADER}")?;
            for r in &kept_rows {
                writeln!(csv, "{r}")?;
            }
            Some(csv)
        }
        None => None,
    };
    let mut matrix = match &partial_matrix {
        Some(m) => Some(m.restart(done.len(), root)?),
        None => None,
    };
    let mut meta_file = PartialFile::create(&partial_meta, root)?;
    writeln!(meta_file, "{}", serde_json::json!({ "fingerprint": config }))?;
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
    // Factors (kfac, ekfac, pcg) are loaded or computed once for every test point.
    let solver = a.solver.config().prepare(&problem)?;
    super::solve::state_factor_source(&solver, problem.model, a.run.quiet);
    // One scoring pass per group where every parameter's per-example gradient can
    // be formed layer by layer, else one per test point.
    let one_pass = hvp_solvers::kfac::covers_all_parameters(pass_model);
    let passes: usize = todo
        .chunks(a.query_group)
        .map(|g| if one_pass && g.len() > 1 { 1 } else { g.len() })
        .sum();
    let progress = Progress::new(passes * n, "influence", a.run.quiet);
    let start = Instant::now();
    for group in todo.chunks(a.query_group) {
        let queries = explain_group(&problem, pass_test, group, &a.solver, &solver, &|k| progress.advance(k))?;
        let files = GroupFiles {
            csv: csv.as_mut(),
            matrix: matrix.as_mut(),
            meta: &mut meta_file,
        };
        write_group(files, &train_view, group, queries, a.top, &mut done)?;
    }
    progress.finish();
    drop(csv);
    drop(matrix);
    drop(meta_file);
    done.sort_by_key(|d| indices.iter().position(|&t| t == d.0));
    if let Some(slot) = picture_slot {
        // Pictures show the images and the whole model's predictions.
        let whole = Problem::new(&model, &weights, &train_view, a.run.batch_size)?;
        let png = draw(&whole, test, &done, a.top)?;
        outputs.put(slot, &png)?;
    }
    if let Some(slot) = json_slot {
        let value = serde_json::json!({
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
        });
        outputs.put(slot, (serde_json::to_string_pretty(&value)? + "\n").as_bytes())?;
    }
    let finished = [(out_slot, &partial_csv, &a.out), (matrix_slot, &partial_npy, &a.matrix)];
    for (slot, partial, path) in finished {
        if let (Some(slot), Some(partial), Some(path)) = (slot, partial, path) {
            if let Some(file) = outputs.file(slot) {
                let mut partial =
                    std::fs::File::open(partial).with_context(|| format!("reading {}", partial.display()))?;
                std::io::copy(&mut partial, file).with_context(|| format!("writing {}", path.display()))?;
            }
        }
    }
    outputs.commit()?;
    if root {
        for partial in partial_csv.iter().chain(&partial_npy) {
            let _ = std::fs::remove_file(partial);
        }
        let _ = std::fs::remove_file(&partial_meta);
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
            println!(
                "test {t} (label {}): helpful {} | harmful {}",
                m["label"],
                list("top_helpful"),
                list("top_harmful")
            );
        }
        summary("hvp influence", todo.len() * n, start.elapsed(), false);
        let written: Vec<String> = a.out.iter().chain(&a.matrix).map(|p| p.display().to_string()).collect();
        println!("scores written to {} ({CONVENTION})", written.join(" and "));
    }
    Ok(())
}

/// The partial files a scored group is appended to.
struct GroupFiles<'f> {
    csv: Option<&'f mut PartialFile>,
    matrix: Option<&'f mut PartialFile>,
    meta: &'f mut PartialFile,
}

/// Appends a scored group of test points to the partial CSV, matrix and
/// metadata files and to `done`. The files are synced once the whole group is
/// written: a resumed run keeps complete groups only.
fn write_group(
    files: GroupFiles,
    train_view: &dyn Dataset,
    group: &[usize],
    queries: Vec<Query>,
    top: usize,
    done: &mut Vec<(usize, serde_json::Value)>,
) -> Result<()> {
    let GroupFiles {
        mut csv,
        mut matrix,
        meta,
    } = files;
    let (with_csv, with_matrix) = (csv.is_some(), matrix.is_some());
    // N rows per test point: formatted in parallel, written in order.
    let blocks: Vec<(String, Vec<u8>, serde_json::Value)> = group
        .par_iter()
        .zip(queries)
        .map(|(&t, q)| {
            let row: Vec<u8> = match with_matrix {
                true => q.scores.iter().flat_map(|s| s.to_le_bytes()).collect(),
                false => Vec::new(),
            };
            let (block, meta) = score_rows(train_view, t, q, top, with_csv);
            (block, row, meta)
        })
        .collect();
    for (&t, (block, row, line)) in group.iter().zip(blocks) {
        if let Some(csv) = csv.as_mut() {
            csv.write_all(block.as_bytes())?;
        }
        if let Some(matrix) = matrix.as_mut() {
            matrix.write_all(&row)?;
        }
        writeln!(meta, "{line}")?;
        done.push((t, line));
    }
    for file in csv.into_iter().chain(matrix) {
        file.sync_data()?;
    }
    meta.sync_data()?;
    Ok(())
}

/// One scored test point's CSV rows (one per training example; empty unless
/// `csv`) and its metadata line with the top-k helpful and harmful examples.
fn score_rows(train_view: &dyn Dataset, t: usize, q: Query, top: usize, csv: bool) -> (String, serde_json::Value) {
    use std::fmt::Write as _;
    let mut block = String::new();
    if csv {
        let status = q.meta["solve_status"].as_str().unwrap_or("failed").to_string();
        let residual = q.meta["relative_residual"].as_f64().unwrap_or(f64::NAN);
        // The columns after the label are the same on every row.
        let tail = format!("{status},{residual:.3e}\n");
        block.reserve(q.scores.len() * (32 + tail.len()));
        for (i, s) in q.scores.iter().enumerate() {
            // Writing to a String cannot fail.
            let _ = write!(block, "{i},{t},{s:.9e},{},{tail}", train_view.label(i));
        }
    }
    let (helpful, harmful) = top_k(&q.scores, top);
    let entry = |i: &usize| serde_json::json!({"train_index": i, "score": q.scores[*i], "label": train_view.label(*i)});
    let mut meta = q.meta;
    meta["top_helpful"] = helpful.iter().map(entry).collect();
    meta["top_harmful"] = harmful.iter().map(entry).collect();
    (block, meta)
}
