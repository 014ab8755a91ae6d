//! The native half of the `hvp` Python package: models, datasets and problems
//! over the hvp crates. Vectors cross the boundary as flat little-endian f64
//! bytes in `state_dict` order; the Python half (`hvp/__init__.py`) turns them
//! into dicts of numpy arrays, and into the package's documented API.

mod data;
mod errors;
mod model;
mod problem;
mod run;

use pyo3::prelude::*;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<model::Model>()?;
    m.add_class::<data::Data>()?;
    m.add_class::<problem::Problem>()?;
    m.add("SolveError", m.py().get_type::<errors::SolveError>())?;
    m.add("SCORE_CONVENTION", hvp_influence::scores::CONVENTION)?;
    m.add("DEFAULT_DAMPING", hvp_solvers::DEFAULT_DAMPING)?;
    Ok(())
}
