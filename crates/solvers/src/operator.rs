use crate::kfac::FisherKind;
use crate::SolverError;
use hvp_curvature::{Curvature, Problem};
use hvp_model::ParamVector;
use std::cell::Cell;

/// `v ↦ A v` on parameter-space vectors: all a solver needs of a matrix.
pub trait LinearOperator {
    /// Number of scalar unknowns.
    fn dim(&self) -> usize;
    fn apply(&self, v: &ParamVector) -> Result<ParamVector, SolverError>;
    /// `A v` for several vectors; an operator that can share work between them
    /// (one pass over the data) overrides this.
    fn apply_many(&self, vs: &[ParamVector]) -> Result<Vec<ParamVector>, SolverError> {
        vs.iter().map(|v| self.apply(v)).collect()
    }
    /// Products computed so far (the cost unit solvers report; a block of k
    /// vectors counts k).
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
    /// The empirical Fisher of two or more vectors in one pass that contracts
    /// per-example gradients with all of them (`kfac::block_product`; on the
    /// seed ResNet, PCG's rounds of up to ten vectors cost 1.03 s on 500 images
    /// against 0.77 s for one single product), and so the GGN once there are at least as
    /// many vectors as outputs (it takes one backward pass per output);
    /// otherwise, and for the Hessian, one pass per vector.
    fn apply_many(&self, vs: &[ParamVector]) -> Result<Vec<ParamVector>, SolverError> {
        let fisher = match self.curvature {
            Curvature::Fisher if vs.len() >= 2 => Some(FisherKind::Empirical),
            Curvature::Ggn if vs.len() >= self.problem.model.num_classes.max(2) => Some(FisherKind::Exact),
            _ => None,
        };
        if let Some(fisher) = fisher {
            if let Some(out) = crate::kfac::block_product(self.problem, fisher, vs, &|_| {})? {
                self.count.set(self.count.get() + vs.len());
                return Ok(out);
            }
        }
        vs.iter().map(|v| self.apply(v)).collect()
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
    fn apply_many(&self, vs: &[ParamVector]) -> Result<Vec<ParamVector>, SolverError> {
        let mut out = self.inner.apply_many(vs)?;
        if self.damping != 0.0 {
            out.iter_mut().zip(vs).for_each(|(o, v)| o.axpy(self.damping, v));
        }
        Ok(out)
    }
    fn products(&self) -> usize {
        self.inner.products()
    }
}
