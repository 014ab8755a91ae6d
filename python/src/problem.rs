//! `Problem`: a model, its weights and a dataset — the training loss — and the
//! calls on it: loss, gradient, curvature products, solves, influence,
//! self-influence, spectrum.

use crate::data::Data;
use crate::errors::{bad_input, curvature, influence, solver};
use crate::model::Model;
use crate::run::run;
use hvp_curvature::{Curvature, Watch};
use hvp_data::Dataset;
use hvp_model::{ParamVector, Weights};
use hvp_solvers::kfac::{FactorKind, Factors, FisherKind};
use hvp_solvers::spectrum::{spectrum, SpectrumConfig};
use hvp_solvers::{SolveReport, SolverConfig, SolverKind};
use hvp_tensor::DType;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use std::path::PathBuf;
use std::sync::Arc;

/// Little-endian f64 bytes → values.
pub fn f64s(raw: &[u8]) -> PyResult<Vec<f64>> {
    if !raw.len().is_multiple_of(8) {
        return Err(PyValueError::new_err(
            "a float64 buffer's length must be a multiple of 8 bytes",
        ));
    }
    Ok(raw
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().expect("8-byte chunk")))
        .collect())
}

/// Values → little-endian f64 bytes.
pub fn bytes(values: impl Iterator<Item = f64>) -> Vec<u8> {
    values.flat_map(|v| v.to_le_bytes()).collect()
}

fn parse_curvature(name: &str) -> PyResult<Curvature> {
    match name {
        "hessian" => Ok(Curvature::Hessian),
        "ggn" => Ok(Curvature::Ggn),
        "fisher" => Ok(Curvature::Fisher),
        other => Err(PyValueError::new_err(format!(
            "curvature '{other}' is not one of 'hessian', 'ggn', 'fisher'"
        ))),
    }
}

fn parse_fisher(name: &str) -> PyResult<FisherKind> {
    match name {
        "mc" => Ok(FisherKind::Mc),
        "empirical" => Ok(FisherKind::Empirical),
        "exact" => Ok(FisherKind::Exact),
        other => Err(PyValueError::new_err(format!(
            "fisher '{other}' is not one of 'mc', 'empirical', 'exact'"
        ))),
    }
}

fn parse_solver(name: &str) -> PyResult<SolverKind> {
    Ok(match name {
        "direct" => SolverKind::Direct,
        "cg" => SolverKind::Cg,
        "lissa" => SolverKind::Lissa,
        "arnoldi" => SolverKind::Arnoldi,
        "kfac" => SolverKind::Kfac,
        "ekfac" => SolverKind::Ekfac,
        "pcg" => SolverKind::Pcg,
        other => {
            return Err(PyValueError::new_err(format!(
                "solver '{other}' is not one of 'direct', 'cg', 'lissa', 'arnoldi', 'kfac', 'ekfac', 'pcg'"
            )))
        }
    })
}

/// A solver's options, as the Python half passes them (names as in `hvp solve`).
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
pub struct SolverOptions {
    solver: String,
    curvature: String,
    damping: f64,
    tol: f64,
    max_iter: usize,
    depth: usize,
    repeats: usize,
    scale: Option<f64>,
    lissa_batch: usize,
    rank: usize,
    seed: u64,
    fisher: String,
    factors: Option<PathBuf>,
    residuals: String,
}

impl SolverOptions {
    fn config(&self) -> PyResult<SolverConfig> {
        Ok(SolverConfig {
            kind: parse_solver(&self.solver)?,
            curvature: parse_curvature(&self.curvature)?,
            damping: self.damping,
            tol: self.tol,
            max_iter: self.max_iter,
            depth: self.depth,
            repeats: self.repeats,
            scale: self.scale,
            lissa_batch: self.lissa_batch,
            rank: self.rank,
            seed: self.seed,
            factors: self.factors.clone(),
            fisher: parse_fisher(&self.fisher)?,
            factor_cache: None,
            residuals: self.residuals.parse().map_err(PyValueError::new_err)?,
        })
    }
}

/// The training loss of a model on a dataset.
#[pyclass(module = "hvp._native", frozen)]
pub struct Problem {
    model: Arc<hvp_model::Model>,
    weights: Arc<Weights>,
    data: Arc<dyn Dataset>,
    batch_size: usize,
    dtype: DType,
    weight_decay: f64,
    pool: Option<rayon::ThreadPool>,
}

#[pymethods]
impl Problem {
    #[new]
    #[pyo3(signature = (model, data, batch_size=256, dtype="float32", weight_decay=0.0, threads=None))]
    fn new(
        model: &Model,
        data: &Data,
        batch_size: usize,
        dtype: &str,
        weight_decay: f64,
        threads: Option<usize>,
    ) -> PyResult<Self> {
        let dtype = match dtype {
            "float32" | "f32" => DType::F32,
            "float64" | "f64" => DType::F64,
            other => {
                return Err(PyValueError::new_err(format!(
                    "dtype '{other}' is not 'float32' or 'float64'"
                )))
            }
        };
        if !(1..=65_536).contains(&batch_size) {
            return Err(PyValueError::new_err(format!(
                "batch_size must be between 1 and 65536, got {batch_size}"
            )));
        }
        if !(weight_decay.is_finite() && weight_decay >= 0.0) {
            return Err(PyValueError::new_err(format!(
                "weight_decay must be finite and ≥ 0, got {weight_decay}"
            )));
        }
        let pool = match threads {
            None => None,
            Some(t) => {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                if t == 0 || t > 8 * cores {
                    return Err(PyValueError::new_err(format!(
                        "threads must be between 1 and {} (8 × the {cores} cores), got {t}",
                        8 * cores
                    )));
                }
                Some(
                    rayon::ThreadPoolBuilder::new()
                        .num_threads(t)
                        .build()
                        .map_err(|e| PyValueError::new_err(format!("cannot start {t} threads: {e}")))?,
                )
            }
        };
        if dtype == DType::F32 {
            if let Some((name, v)) = model.weights.first_beyond_f32(&model.model) {
                return Err(PyValueError::new_err(format!(
                    "tensor '{name}' holds {v:e}, beyond the f32 range (±3.4e38): computing in float32 would \
                     overflow to infinity; use dtype='float64'"
                )));
            }
        }
        let p = Problem {
            model: model.model.clone(),
            weights: model.weights.clone(),
            data: data.data.clone(),
            batch_size,
            dtype,
            weight_decay,
            pool,
        };
        // The checks of every pass, once now: data shape, labels, memory.
        p.problem(None).map_err(curvature)?;
        Ok(p)
    }

    fn __len__(&self) -> usize {
        self.data.len()
    }

    #[getter]
    fn dtype(&self) -> &'static str {
        match self.dtype {
            DType::F32 => "float32",
            DType::F64 => "float64",
        }
    }

    #[getter]
    fn weight_decay(&self) -> f64 {
        self.weight_decay
    }

    /// Mean loss over the N examples, plus (w/2)‖θ‖² with weight decay w.
    #[pyo3(signature = (progress=true))]
    fn loss(&self, py: Python<'_>, progress: bool) -> PyResult<f64> {
        let n = self.data.len() as u64;
        run(py, self.pool.as_ref(), progress, "loss", Some(n), |watch| {
            let losses = self.problem(Some(watch)).and_then(|p| p.losses()).map_err(curvature)?;
            let theta: f64 = self.weights.params.iter().flat_map(|t| t.data()).map(|v| v * v).sum();
            Ok(losses.iter().sum::<f64>() / losses.len() as f64 + 0.5 * self.weight_decay * theta)
        })
    }

    /// (loss, gradient as f64 bytes).
    #[pyo3(signature = (progress=true))]
    fn gradient(&self, py: Python<'_>, progress: bool) -> PyResult<(f64, Vec<u8>)> {
        let n = self.data.len() as u64;
        run(py, self.pool.as_ref(), progress, "gradient", Some(n), |watch| {
            let r = self
                .problem(Some(watch))
                .and_then(|p| p.gradient(&|_| {}))
                .map_err(curvature)?;
            Ok((r.loss, bytes(r.value.to_flat().into_iter())))
        })
    }

    /// M v for the curvature M, as f64 bytes.
    #[pyo3(signature = (curvature_name, v, progress=true))]
    fn product(&self, py: Python<'_>, curvature_name: &str, v: &[u8], progress: bool) -> PyResult<Vec<u8>> {
        let c = parse_curvature(curvature_name)?;
        let v = self.vector(v)?;
        let n = self.data.len() as u64;
        run(py, self.pool.as_ref(), progress, curvature_name, Some(n), |watch| {
            let r = self
                .problem(Some(watch))
                .and_then(|p| p.product(c, &v, &|_| {}))
                .map_err(curvature)?;
            Ok(bytes(r.value.to_flat().into_iter()))
        })
    }

    /// (x as f64 bytes, report as JSON) for x = (M + λI)⁻¹ g.
    #[pyo3(signature = (g, options, progress=true))]
    fn solve(&self, py: Python<'_>, g: &[u8], options: SolverOptions, progress: bool) -> PyResult<(Vec<u8>, String)> {
        let config = options.config()?;
        let g = self.vector(g)?;
        run(py, self.pool.as_ref(), progress, "solve", None, |watch| {
            let p = self.problem(Some(watch)).map_err(curvature)?;
            let (x, report) = hvp_solvers::solve(&p, &config, &g).map_err(solver)?;
            Ok((bytes(x.to_flat().into_iter()), self.report_json(&report, &config)))
        })
    }

    /// Influence scores of every training example on each test example:
    /// (scores [Q × N] as f64 bytes, Q, the reports as JSON).
    #[pyo3(signature = (test, test_indices, options, allow_failed=false, progress=true))]
    fn influence(
        &self,
        py: Python<'_>,
        test: &Data,
        test_indices: Option<Vec<usize>>,
        options: SolverOptions,
        allow_failed: bool,
        progress: bool,
    ) -> PyResult<(Vec<u8>, usize, Vec<String>)> {
        let config = options.config()?;
        let test = test.data.clone();
        let indices = test_indices.unwrap_or_else(|| (0..test.len()).collect());
        if indices.is_empty() {
            return Err(PyValueError::new_err("no test examples to score"));
        }
        run(py, self.pool.as_ref(), progress, "influence", None, |watch| {
            let p = self.problem(Some(watch)).map_err(curvature)?;
            let prepared = config.prepare(&p).map_err(solver)?;
            let all = hvp_influence::scores::explain_all(&p, test.as_ref(), &indices, &prepared, allow_failed, &|_| {})
                .map_err(influence)?;
            let scores = bytes(all.iter().flat_map(|e| e.scores.iter().copied()));
            let reports = all.iter().map(|e| self.report_json(&e.report, &config)).collect();
            Ok((scores, all.len(), reports))
        })
    }

    /// Self-influence of every training example (EK-FAC), as f64 bytes.
    #[pyo3(signature = (damping, fisher="mc", seed=0, factors=None, progress=true))]
    fn self_influence(
        &self,
        py: Python<'_>,
        damping: f64,
        fisher: &str,
        seed: u64,
        factors: Option<PathBuf>,
        progress: bool,
    ) -> PyResult<Vec<u8>> {
        let fisher = parse_fisher(fisher)?;
        let damping = damping + self.weight_decay;
        hvp_influence::self_influence::check_damping(damping).map_err(influence)?;
        run(py, self.pool.as_ref(), progress, "self-influence", None, |watch| {
            let p = self.problem(Some(watch)).map_err(curvature)?;
            let factors = match &factors {
                Some(path) => Factors::load(&self.model, path).map_err(bad_input)?,
                None => Factors::compute(&p, FactorKind::Ekfac, fisher, seed, &|_| {}).map_err(solver)?,
            };
            let values =
                hvp_influence::self_influence::self_influence(&p, &factors, damping, &|_| {}).map_err(influence)?;
            Ok(bytes(values.into_iter()))
        })
    }

    /// Extreme eigenvalues and trace, as JSON.
    #[allow(clippy::too_many_arguments)] // the keyword arguments of `Problem.spectrum`
    #[pyo3(signature = (curvature_name="hessian", top=10, steps=None, trace_samples=10, seed=0, progress=true))]
    fn spectrum(
        &self,
        py: Python<'_>,
        curvature_name: &str,
        top: usize,
        steps: Option<usize>,
        trace_samples: usize,
        seed: u64,
        progress: bool,
    ) -> PyResult<String> {
        let config = SpectrumConfig {
            curvature: parse_curvature(curvature_name)?,
            top,
            steps,
            trace_samples,
            seed,
        };
        run(py, self.pool.as_ref(), progress, "spectrum", None, |watch| {
            let p = self.problem(Some(watch)).map_err(curvature)?;
            let s = spectrum(&p, &config).map_err(solver)?;
            let mut v = serde_json::to_value(&s).map_err(bad_input)?;
            if let Some(m) = v.as_object_mut() {
                m.insert("curvature".into(), curvature_name.into());
                m.insert("examples".into(), self.data.len().into());
            }
            Ok(v.to_string())
        })
    }
}

impl Problem {
    /// The library's problem, checked, with `watch` on its passes.
    fn problem(&self, watch: Option<Watch>) -> Result<hvp_curvature::Problem<'_>, hvp_curvature::CurvatureError> {
        let p = hvp_curvature::Problem::new(&self.model, &self.weights, self.data.as_ref(), self.batch_size)?
            .with_weight_decay(self.weight_decay)
            .with_dtype(self.dtype);
        Ok(match watch {
            Some(w) => p.with_watch(w),
            None => p,
        })
    }

    /// A flat f64 vector in parameter space, checked.
    fn vector(&self, raw: &[u8]) -> PyResult<ParamVector> {
        let flat = f64s(raw)?;
        let p = self.model.num_params();
        if flat.len() != p {
            return Err(PyValueError::new_err(format!(
                "the vector has {} values but the model has {p} parameters",
                flat.len()
            )));
        }
        if flat.iter().any(|v| !v.is_finite()) {
            return Err(PyValueError::new_err("the vector contains NaN or infinite values"));
        }
        Ok(ParamVector::zeros(&self.model).with_flat(&flat))
    }

    /// The report with the problem's context: the fields of `hvp solve --report`.
    fn report_json(&self, report: &SolveReport, config: &SolverConfig) -> String {
        let mut v = serde_json::to_value(report).unwrap_or_default();
        if let Some(m) = v.as_object_mut() {
            m.insert(
                "curvature".into(),
                format!("{:?}", config.curvature).to_lowercase().into(),
            );
            m.insert("damping".into(), config.damping.into());
            m.insert("examples".into(), self.data.len().into());
            m.insert("dtype".into(), self.dtype.name().into());
            m.insert("kept_unconverged".into(), false.into());
        }
        v.to_string()
    }
}
