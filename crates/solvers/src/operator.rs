use crate::SolverError;
use hvp_curvature::{Curvature, Problem};
use hvp_model::ParamVector;
use std::cell::Cell;

/// `v ↦ A v` on parameter-space vectors: all a solver needs of a matrix.
pub trait LinearOperator {
    /// Number of scalar unknowns.
    fn dim(&self) -> usize;
    fn apply(&self, v: &ParamVector) -> Result<ParamVector, SolverError>;
    /// Products computed so far (the cost unit solvers report).
    fn products(&self) -> usize;
}

/// The Hessian, GGN or empirical Fisher of a [`Problem`]'s mean loss, one
/// streamed pass over its data per product.
pub struct CurvatureOperator<'a> {
    pub problem: &'a Problem<'a>,
    pub curvature: Curvature,
    count: Cell<usize>,
}

impl<'a> CurvatureOperator<'a> {
    pub fn new(problem: &'a Problem<'a>, curvature: Curvature) -> Self {
        CurvatureOperator {
            problem,
            curvature,
            count: Cell::new(0),
        }
    }
}

impl LinearOperator for CurvatureOperator<'_> {
    fn dim(&self) -> usize {
        self.problem.model.num_params()
    }
    fn apply(&self, v: &ParamVector) -> Result<ParamVector, SolverError> {
        self.count.set(self.count.get() + 1);
        Ok(self.problem.product(self.curvature, v, &|_| {})?.value)
    }
    fn products(&self) -> usize {
        self.count.get()
    }
}

/// `A + λI`.
pub struct Damped<'a> {
    pub inner: &'a dyn LinearOperator,
    pub damping: f64,
}

impl LinearOperator for Damped<'_> {
    fn dim(&self) -> usize {
        self.inner.dim()
    }
    fn apply(&self, v: &ParamVector) -> Result<ParamVector, SolverError> {
        let mut out = self.inner.apply(v)?;
        if self.damping != 0.0 {
            out.axpy(self.damping, v);
        }
        Ok(out)
    }
    fn products(&self) -> usize {
        self.inner.products()
    }
}
