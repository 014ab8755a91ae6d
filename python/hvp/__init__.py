"""Exact, streamed Hessian-vector products, inverse-HVP solvers and influence
functions for neural networks, from Python.

>>> import hvp
>>> m = hvp.Model.from_torch(net.eval(), x[:2])          # or Model.from_onnx / Model.builtin
>>> p = hvp.Problem(m, hvp.Data(x_train, y_train))
>>> hv = p.hvp(v)                                          # dict name -> np.ndarray (float64)
>>> x, report = p.solve(p.gradient(), solver="cg", curvature="ggn", damping=0.01)
>>> scores, report = hvp.influence(p, hvp.Data(x_test, y_test), solver="ekfac", damping=0.01)

Conventions are the command line's: the loss is the mean over the N training
examples (plus (w/2)||theta||^2 with weight decay w), BatchNorm uses its running
statistics (eval mode), and an influence score is
grad loss(z_t)^T (M + lambda I)^-1 grad loss(z_i) / N, the predicted increase of
test loss t when training example i is removed (positive = helpful).
Vectors in parameter space are dicts name -> array in state_dict order; results
are float64 numpy arrays whatever the compute dtype. Long calls release the GIL,
show a progress bar on stderr (``progress=False`` hides it) and stop between
batches on Ctrl-C (``KeyboardInterrupt``).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import _native

__all__ = [
    "Model",
    "Data",
    "Problem",
    "influence",
    "self_influence",
    "SolveError",
    "DEFAULT_DAMPING",
    "SCORE_CONVENTION",
]

SolveError = _native.SolveError
DEFAULT_DAMPING: float = _native.DEFAULT_DAMPING
"""lambda in (M + lambda I) when none is given, as on the command line."""
SCORE_CONVENTION: str = _native.SCORE_CONVENTION
"""The sign and scale of influence scores."""

Vector = Mapping[str, Any]
"""A vector in parameter space: parameter name -> array (numpy or torch)."""


def _to_numpy(x: Any) -> np.ndarray:
    """A numpy view of a numpy array or a CPU torch tensor (no copy), else np.asarray."""
    if hasattr(x, "detach") and hasattr(x, "cpu") and hasattr(x, "numpy"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _f64_bytes(x: np.ndarray) -> bytes:
    return np.ascontiguousarray(x, dtype="<f8").tobytes()


class Model:
    """A network and its weights; its trainable tensors are the parameters.

    Build one with :meth:`from_onnx`, :meth:`builtin` or :meth:`from_torch`.
    """

    __slots__ = ("_native",)

    def __init__(self, native: Any) -> None:
        self._native = native

    @classmethod
    def from_onnx(cls, path: Union[str, os.PathLike], params: Optional[str] = None) -> "Model":
        """Imports an ONNX file. Every trainable float initializer is a parameter;
        ``params`` (a glob such as ``"fc.*"``) keeps only the matching ones."""
        return cls(_native.Model.from_onnx(os.fspath(path), params))

    @classmethod
    def builtin(cls, spec: str, weights: Union[Vector, str, os.PathLike]) -> "Model":
        """A built-in architecture (``"resnet-cifar:2,2,2"``, ``"mlp:784,32,10"``,
        ...) with ``weights``: a state_dict (name -> array, numpy or torch) or the
        path of a ``.safetensors`` file. Every parameter and buffer must be given
        with its shape; ``num_batches_tracked`` is ignored."""
        if isinstance(weights, (str, os.PathLike)):
            return cls(_native.Model.builtin_from_file(spec, os.fspath(weights)))
        tensors = []
        for name, value in weights.items():
            a = _to_numpy(value)
            if name.endswith("num_batches_tracked"):
                continue
            tensors.append((str(name), list(a.shape), _f64_bytes(a)))
        return cls(_native.Model.builtin_from_tensors(spec, tensors))

    @classmethod
    def from_torch(cls, module: Any, example_input: Any, params: Optional[str] = None) -> "Model":
        """Exports ``module`` (an ``nn.Module`` in eval mode) to ONNX in-process
        and imports it. ``example_input`` is a batch of inputs (e.g. ``x[:2]``).
        Needs torch (and onnx for its exporter)."""
        import torch  # noqa: F401  (a clear ImportError when torch is absent)

        if getattr(module, "training", False):
            raise ValueError(
                "the module is in training mode: call module.eval() first (hvp differentiates the eval-mode "
                "loss, with BatchNorm on its running statistics)"
            )
        with tempfile.TemporaryDirectory(prefix="hvp-export-") as folder:
            path = os.path.join(folder, "model.onnx")
            try:
                torch.onnx.export(
                    module, (example_input,), path, optimize=False, do_constant_folding=False, verbose=False
                )
            except Exception as default_failed:  # the torch.export-based exporter refuses some modules
                try:
                    torch.onnx.export(
                        module,
                        (example_input,),
                        path,
                        dynamo=False,
                        do_constant_folding=False,
                        input_names=["input"],
                        output_names=["logits"],
                        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                    )
                except Exception:
                    raise default_failed
            return cls.from_onnx(path, params)

    def parameters(self) -> Dict[str, Tuple[int, ...]]:
        """Parameter name -> shape, in state_dict order."""
        return {n: tuple(s) for n, s in zip(self._native.param_names(), self._native.param_shapes())}

    def state(self) -> Dict[str, np.ndarray]:
        """The parameters' current values (float64), in state_dict order."""
        return _unflatten(self.parameters(), np.frombuffer(self._native.param_values(), dtype="<f8"))

    @property
    def num_params(self) -> int:
        """Number of scalar parameters."""
        return self._native.num_params()

    @property
    def warnings(self) -> list:
        """Notes from the import, e.g. BatchNorm folded away by the exporter."""
        return list(self._native.warnings)

    def __repr__(self) -> str:
        return repr(self._native)


class Data:
    """Examples: inputs ``float [N, ...]`` with class labels ``int [N]`` (softmax
    cross-entropy) or float regression targets ``[N]``/``[N, K]`` (mean squared
    error). numpy arrays or torch tensors; C-contiguous float32 or float64 inputs
    are read in place, without a copy."""

    __slots__ = ("_native", "_inputs")

    def __init__(self, inputs: Any, labels: Any) -> None:
        x = _to_numpy(inputs)
        if x.dtype not in (np.float32, np.float64) or not x.flags["C_CONTIGUOUS"] or not x.dtype.isnative:
            x = np.ascontiguousarray(x, dtype=np.float64 if x.dtype == np.float64 else np.float32)
        y = _to_numpy(labels)
        if y.ndim == 0 or y.shape[0] != x.shape[0]:
            raise ValueError(f"{y.shape[0] if y.ndim else 0} labels for {x.shape[0] if x.ndim else 0} examples")
        address = x.__array_interface__["data"][0]
        float64 = x.dtype == np.float64
        if np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
            if y.ndim != 1:
                raise ValueError(f"class labels must have shape [N], got {list(y.shape)}")
            self._native = _native.Data.from_buffer(
                x, address, list(x.shape), float64, labels=np.ascontiguousarray(y, dtype="<i8").tobytes()
            )
        elif np.issubdtype(y.dtype, np.floating):
            if y.ndim not in (1, 2):
                raise ValueError(f"regression targets must have shape [N] or [N, K], got {list(y.shape)}")
            width = 1 if y.ndim == 1 else y.shape[1]
            self._native = _native.Data.from_buffer(
                x, address, list(x.shape), float64, targets=_f64_bytes(y), target_width=width
            )
        else:
            raise ValueError(f"labels of dtype {y.dtype}: give int class labels or float regression targets")
        self._inputs = x

    @classmethod
    def load(
        cls, spec: str, limit: Optional[int] = None, pad: int = 0, classes: Optional[Sequence[int]] = None
    ) -> "Data":
        """A dataset spec as on the command line: ``mnist:DIR[:train|test]``,
        ``cifar10:DIR[:train|test]`` or ``npy:X.npy,Y.npy``; the first ``limit``
        examples, images zero-padded by ``pad`` pixels, only ``classes``."""
        d = cls.__new__(cls)
        d._native = _native.Data.load(spec, limit, pad, None if classes is None else list(classes))
        d._inputs = None
        return d

    def __len__(self) -> int:
        return len(self._native)

    @property
    def sample_shape(self) -> Tuple[int, ...]:
        """Shape of one example."""
        return tuple(self._native.sample_shape)

    def __repr__(self) -> str:
        return repr(self._native)


def _unflatten(shapes: Mapping[str, Tuple[int, ...]], flat: np.ndarray) -> Dict[str, np.ndarray]:
    out, k = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape, dtype=np.int64))
        out[name] = flat[k : k + size].reshape(shape).copy()
        k += size
    return out


def _solver_options(
    solver: str,
    curvature: str,
    damping: float,
    tol: float,
    max_iter: int,
    depth: int,
    repeats: int,
    scale: Optional[float],
    lissa_batch: int,
    rank: int,
    seed: int,
    fisher: str,
    factors: Optional[Union[str, os.PathLike]],
    residuals: Union[str, int] = "all",
) -> Dict[str, Any]:
    return {
        "solver": solver,
        "curvature": curvature,
        "damping": float(damping),
        "tol": float(tol),
        "max_iter": int(max_iter),
        "depth": int(depth),
        "repeats": int(repeats),
        "scale": None if scale is None else float(scale),
        "lissa_batch": int(lissa_batch),
        "rank": int(rank),
        "seed": int(seed),
        "fisher": fisher,
        "factors": None if factors is None else os.fspath(factors),
        "residuals": str(residuals),
    }


class Problem:
    """The training loss of ``model`` on ``data``: the mean loss over the N
    examples (plus (w/2)||theta||^2 for ``weight_decay`` w), streamed in batches of
    ``batch_size``, computed in ``dtype`` ("float32" or "float64"; sums are
    accumulated in float64 either way) on ``threads`` threads (default: all cores)."""

    __slots__ = ("model", "data", "_native", "_shapes")

    def __init__(
        self,
        model: Model,
        data: Data,
        batch_size: int = 256,
        dtype: str = "float32",
        weight_decay: float = 0.0,
        threads: Optional[int] = None,
    ) -> None:
        self.model = model
        self.data = data
        self._native = _native.Problem(model._native, data._native, batch_size, dtype, weight_decay, threads)
        self._shapes = model.parameters()

    def parameters(self) -> Dict[str, Tuple[int, ...]]:
        """Parameter name -> shape, in state_dict order."""
        return dict(self._shapes)

    def flatten(self, v: Union[Vector, Any]) -> np.ndarray:
        """A parameter-space vector (dict name -> array) as one float64 array in
        state_dict order. Every parameter must be present with its shape."""
        if not isinstance(v, Mapping):
            flat = np.asarray(_to_numpy(v), dtype=np.float64).reshape(-1)
            if flat.size != self.model.num_params:
                raise ValueError(f"a flat vector of {flat.size} values for {self.model.num_params} parameters")
            return flat
        missing = [n for n in self._shapes if n not in v]
        extra = [n for n in v if n not in self._shapes]
        if missing or extra:
            raise ValueError(
                "the vector's names do not match the parameters"
                + (f"; missing: {', '.join(missing)}" if missing else "")
                + (f"; not parameters: {', '.join(map(str, extra))}" if extra else "")
            )
        parts = []
        for name, shape in self._shapes.items():
            a = np.asarray(_to_numpy(v[name]), dtype=np.float64)
            if tuple(a.shape) != tuple(shape):
                raise ValueError(f"'{name}' has shape {list(a.shape)}, the parameter {list(shape)}")
            parts.append(a.reshape(-1))
        return np.concatenate(parts) if parts else np.zeros(0)

    def unflatten(self, flat: Any) -> Dict[str, np.ndarray]:
        """A flat float64 array in state_dict order as dict name -> array."""
        flat = np.asarray(_to_numpy(flat), dtype=np.float64).reshape(-1)
        if flat.size != self.model.num_params:
            raise ValueError(f"a flat vector of {flat.size} values for {self.model.num_params} parameters")
        return _unflatten(self._shapes, flat)

    def _dict(self, raw: bytes) -> Dict[str, np.ndarray]:
        return _unflatten(self._shapes, np.frombuffer(raw, dtype="<f8"))

    def _bytes(self, v: Union[Vector, Any]) -> bytes:
        return self.flatten(v).astype("<f8", copy=False).tobytes()

    def loss(self, progress: bool = True) -> float:
        """The mean training loss (plus the weight-decay term)."""
        return self._native.loss(progress)

    def gradient(self, progress: bool = True) -> Dict[str, np.ndarray]:
        """The gradient of the loss, name -> float64 array."""
        _, g = self._native.gradient(progress)
        return self._dict(g)

    def hvp(self, v: Vector, progress: bool = True) -> Dict[str, np.ndarray]:
        """The exact Hessian-vector product H v (forward-over-reverse), streamed."""
        return self._dict(self._native.product("hessian", self._bytes(v), progress))

    def ggn(self, v: Vector, progress: bool = True) -> Dict[str, np.ndarray]:
        """The generalised Gauss-Newton product J^T H_out J v."""
        return self._dict(self._native.product("ggn", self._bytes(v), progress))

    def fisher(self, v: Vector, progress: bool = True) -> Dict[str, np.ndarray]:
        """The empirical Fisher product (1/N) sum_i g_i g_i^T v."""
        return self._dict(self._native.product("fisher", self._bytes(v), progress))

    def solve(
        self,
        g: Vector,
        solver: str = "cg",
        curvature: str = "hessian",
        damping: float = DEFAULT_DAMPING,
        tol: float = 1e-6,
        max_iter: int = 100,
        depth: int = 200,
        repeats: int = 1,
        scale: Optional[float] = None,
        lissa_batch: int = 32,
        rank: int = 50,
        seed: int = 0,
        fisher: str = "mc",
        factors: Optional[Union[str, os.PathLike]] = None,
        keep_unconverged: bool = False,
        progress: bool = True,
    ) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
        """x = (M + damping I)^-1 g for M the ``curvature`` ("hessian", "ggn",
        "fisher") by ``solver`` ("direct", "cg", "lissa", "arnoldi", "kfac",
        "ekfac", "pcg"); returns (x, report). The report (the fields of
        ``hvp solve --report``) says whether the solve ``converged`` (exact
        residual within ``tol``) or is an ``approximate`` one. A ``failed`` solve
        raises :class:`SolveError`, unless ``keep_unconverged``."""
        opts = _solver_options(
            solver, curvature, damping, tol, max_iter, depth, repeats, scale, lissa_batch, rank, seed, fisher, factors
        )
        x, report = self._native.solve(self._bytes(g), opts, progress)
        report = json.loads(report)
        if report.get("status") == "failed":
            if not keep_unconverged:
                raise SolveError(
                    f"{report.get('solver')} solve failed: {report.get('failure') or 'tolerance not reached'} "
                    f"(relative residual {report.get('relative_residual'):.3e}); pass keep_unconverged=True to use "
                    "the result anyway"
                )
            report["kept_unconverged"] = True
        return self._dict(x), report

    def spectrum(
        self,
        top: int = 10,
        curvature: str = "hessian",
        steps: Optional[int] = None,
        trace_samples: int = 10,
        seed: int = 0,
        progress: bool = True,
    ) -> Dict[str, Any]:
        """The ``top`` largest eigenvalues (Lanczos), the smallest eigenvalue
        estimate and the trace (Hutchinson) of the curvature: keys
        ``top_eigenvalues``, ``smallest_eigenvalue``, ``trace``,
        ``trace_standard_error``, ``lanczos_steps``, ``products``, ..."""
        return json.loads(self._native.spectrum(curvature, top, steps, trace_samples, seed, progress))

    def linear_operator(self, curvature: str = "hessian", damping: float = 0.0, progress: bool = False) -> Any:
        """``M + damping I`` as a ``scipy.sparse.linalg.LinearOperator`` on flat
        float64 vectors in state_dict order (symmetric: rmatvec = matvec). Each
        product is one streamed pass over the data. Needs scipy."""
        from scipy.sparse.linalg import LinearOperator

        n = self.model.num_params
        native = self._native

        def matvec(x: np.ndarray) -> np.ndarray:
            x = np.asarray(x, dtype=np.float64).reshape(-1)
            y = np.frombuffer(native.product(curvature, x.astype("<f8", copy=False).tobytes(), progress), dtype="<f8")
            return y + damping * x if damping else y.copy()

        return LinearOperator((n, n), matvec=matvec, rmatvec=matvec, dtype=np.float64)

    def __len__(self) -> int:
        return len(self._native)

    def __repr__(self) -> str:
        return (
            f"Problem({self.model!r}, {self.data!r}, dtype={self._native.dtype}, "
            f"weight_decay={self._native.weight_decay})"
        )


def influence(
    problem: Problem,
    test_data: Data,
    solver: str = "cg",
    curvature: str = "hessian",
    damping: float = DEFAULT_DAMPING,
    test_indices: Optional[Sequence[int]] = None,
    tol: float = 1e-6,
    max_iter: int = 100,
    depth: int = 200,
    repeats: int = 1,
    scale: Optional[float] = None,
    lissa_batch: int = 32,
    rank: int = 50,
    seed: int = 0,
    fisher: str = "mc",
    factors: Optional[Union[str, os.PathLike]] = None,
    keep_unconverged: bool = False,
    progress: bool = True,
    residuals: Union[str, int] = "all",
) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Influence scores of every training example on each test example:
    ``scores[q, i]`` = grad loss(z_t)^T (M + damping I)^-1 grad loss(z_i) / N for
    test example t = ``test_indices[q]`` (default: all of ``test_data``), the
    predicted increase of its loss when training example i is removed (positive
    = helpful). Returns (scores [Q, N] float64, report) with the report's
    ``queries`` holding each solve's report. Factors (kfac, ekfac, pcg) are
    computed once for all test points. A failed solve raises
    :class:`SolveError`, unless ``keep_unconverged``. ``residuals`` ("all",
    "none" or a count K; kfac and ekfac only) says whose exact residuals are
    measured: on the empirical Fisher each costs about as much as its scores;
    unmeasured ones are reported as ``None`` with a warning in the report."""
    opts = _solver_options(
        solver, curvature, damping, tol, max_iter, depth, repeats, scale, lissa_batch, rank, seed, fisher, factors,
        residuals,
    )
    indices = None if test_indices is None else [int(t) for t in test_indices]
    raw, q, reports = problem._native.influence(
        test_data._native, indices, opts, keep_unconverged, progress
    )
    n = len(problem)
    scores = np.frombuffer(raw, dtype="<f8").reshape(q, n).copy()
    queries = [json.loads(r) for r in reports]
    for r in queries:
        if r.get("status") == "failed":
            r["kept_unconverged"] = True
    report = {
        "convention": SCORE_CONVENTION,
        "solver": solver,
        "curvature": curvature,
        "damping": float(damping),
        "test_indices": indices if indices is not None else list(range(len(test_data))),
        "solve_status": [r.get("status") for r in queries],
        "queries": queries,
    }
    return scores, report


def self_influence(
    problem: Problem,
    damping: float = DEFAULT_DAMPING,
    fisher: str = "mc",
    seed: int = 0,
    factors: Optional[Union[str, os.PathLike]] = None,
    progress: bool = True,
) -> np.ndarray:
    """Self-influence grad loss(z_i)^T (F + damping I)^-1 grad loss(z_i) of every
    training example (EK-FAC curvature F, weight decay added to the damping),
    float64 [N]; large values flag mislabelled or atypical examples. An
    approximation through the factors; ``damping`` must be > 0."""
    raw = problem._native.self_influence(float(damping), fisher, int(seed), None if factors is None else os.fspath(factors), progress)
    return np.frombuffer(raw, dtype="<f8").copy()
