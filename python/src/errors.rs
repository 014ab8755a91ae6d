//! Library errors as Python exceptions: bad input is `ValueError` (a missing
//! file `FileNotFoundError`), a failed or diverged solve `hvp.SolveError`, a
//! pass stopped by Ctrl-C `KeyboardInterrupt`. Messages are the library's.

use hvp_curvature::CurvatureError;
use hvp_influence::InfluenceError;
use hvp_solvers::SolverError;
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyFileNotFoundError, PyKeyboardInterrupt, PyValueError};
use pyo3::PyErr;

create_exception!(
    _native,
    SolveError,
    PyException,
    "A solve that did not reach its tolerance, diverged or broke down; the message says why and what to change."
);

fn is_not_found(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::NotFound;
        }
        cause = c.source();
    }
    false
}

/// Bad input: `FileNotFoundError` for a missing file, `ValueError` otherwise.
pub fn bad_input(e: impl std::error::Error + 'static) -> PyErr {
    if is_not_found(&e) {
        PyFileNotFoundError::new_err(e.to_string())
    } else {
        PyValueError::new_err(e.to_string())
    }
}

pub fn curvature(e: CurvatureError) -> PyErr {
    match e {
        CurvatureError::Interrupted => PyKeyboardInterrupt::new_err("interrupted between batches"),
        other => bad_input(other),
    }
}

pub fn solver(e: SolverError) -> PyErr {
    match e {
        SolverError::Curvature(c) => curvature(c),
        SolverError::Diverged(_) | SolverError::Dense(_) | SolverError::FullSolveFailed(_) => {
            SolveError::new_err(e.to_string())
        }
        other => bad_input(other),
    }
}

pub fn influence(e: InfluenceError) -> PyErr {
    match e {
        InfluenceError::Curvature(c) => curvature(c),
        InfluenceError::Solver(s) => solver(s),
        e @ InfluenceError::SolveFailed { .. } => SolveError::new_err(e.to_string()),
        other => bad_input(other),
    }
}
