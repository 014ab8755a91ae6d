"""Bad input raises ValueError (FileNotFoundError for a missing file), a failed
solve hvp.SolveError, Ctrl-C KeyboardInterrupt between batches — with the
library's messages, and never a crash of the interpreter."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import hvp
from conftest import FIXTURES, REPO


@pytest.fixture(scope="module")
def model(mlp_case):
    return hvp.Model.builtin(mlp_case["arch"], mlp_case["weights"])


@pytest.fixture(scope="module")
def problem(model, mlp_case):
    return hvp.Problem(model, hvp.Data(mlp_case["x"], mlp_case["y"]), dtype="float64")


def test_data_that_does_not_fit(model, mlp_case):
    x, y = mlp_case["x"], mlp_case["y"]
    with pytest.raises(ValueError, match="64"):
        hvp.Problem(model, hvp.Data(x[:, :10], y))
    with pytest.raises(ValueError, match="labels for"):
        hvp.Data(x, y[:5])
    with pytest.raises(ValueError, match="out of range"):
        hvp.Problem(model, hvp.Data(x, y + 10))
    with pytest.raises(ValueError, match="negative"):
        hvp.Data(x, y - 100)
    with pytest.raises(ValueError, match="empty"):
        hvp.Data(x[:0], y[:0])
    with pytest.raises(ValueError, match="class labels or float regression targets"):
        hvp.Data(x, y.astype(str))


def test_nan_inputs_are_named_when_read(model, mlp_case):
    x = mlp_case["x"].copy()
    x[7, 3] = np.nan
    p = hvp.Problem(model, hvp.Data(x, mlp_case["y"]))
    with pytest.raises(ValueError, match="example 7 contains NaN"):
        p.gradient(progress=False)


def test_bad_settings(model, mlp_case, problem):
    d = hvp.Data(mlp_case["x"], mlp_case["y"])
    with pytest.raises(ValueError, match="dtype"):
        hvp.Problem(model, d, dtype="float16")
    with pytest.raises(ValueError, match="batch_size"):
        hvp.Problem(model, d, batch_size=0)
    with pytest.raises(ValueError, match="threads"):
        hvp.Problem(model, d, threads=0)
    with pytest.raises(ValueError, match="weight_decay"):
        hvp.Problem(model, d, weight_decay=-1.0)
    g = problem.gradient(progress=False)
    with pytest.raises(ValueError, match="solver 'newton'"):
        problem.solve(g, solver="newton", progress=False)
    with pytest.raises(ValueError, match="curvature 'laplacian'"):
        problem.solve(g, curvature="laplacian", progress=False)
    with pytest.raises(ValueError, match="damping"):
        problem.solve(g, solver="ekfac", damping=0.0, progress=False)
    with pytest.raises(ValueError, match="damping"):
        hvp.self_influence(problem, damping=0.0, progress=False)


def test_vectors_must_match_the_parameters(problem):
    g = problem.gradient(progress=False)
    with pytest.raises(ValueError, match="missing: 2.bias"):
        problem.hvp({k: v for k, v in g.items() if k != "2.bias"}, progress=False)
    with pytest.raises(ValueError, match="not parameters: extra"):
        problem.hvp({**g, "extra": np.zeros(1)}, progress=False)
    with pytest.raises(ValueError, match="shape"):
        problem.hvp({**g, "0.bias": np.zeros(3)}, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        problem.hvp({**g, "0.bias": np.full(16, np.nan)}, progress=False)


def test_missing_and_corrupt_model_files(tmp_path, mlp_case):
    with pytest.raises(FileNotFoundError):
        hvp.Model.from_onnx(tmp_path / "absent.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all")
    with pytest.raises(ValueError, match="not a valid ONNX model"):
        hvp.Model.from_onnx(bad)
    with pytest.raises(ValueError, match="missing|Missing|not found|absent"):
        hvp.Model.builtin(mlp_case["arch"], {"0.weight": np.zeros((16, 64))})
    with pytest.raises(ValueError):
        hvp.Model.builtin("resnet-cifar:0,x", mlp_case["weights"])


def test_failed_and_diverged_solves(problem):
    g = problem.gradient(progress=False)
    with pytest.raises(hvp.SolveError, match="negative curvature"):
        problem.solve(g, solver="cg", curvature="hessian", damping=0.0, progress=False)
    x, report = problem.solve(g, solver="cg", curvature="hessian", damping=0.0, keep_unconverged=True,
                              progress=False)
    assert report["status"] == "failed" and report["kept_unconverged"] is True
    assert report["relative_residual"] > 1e-6 and set(x) == set(g)
    with pytest.raises(hvp.SolveError, match="diverged"):
        problem.solve(g, solver="lissa", curvature="hessian", damping=0.0, scale=1e-3, progress=False)
    test = hvp.Data(problem.data._inputs, np.zeros(len(problem), dtype=np.int64))
    with pytest.raises(hvp.SolveError, match="test example 0"):
        hvp.influence(problem, test, solver="cg", damping=0.0, test_indices=[0], progress=False)


def test_from_torch_needs_torch_or_says_so():
    try:
        import torch  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError):
            hvp.Model.from_torch(object(), np.zeros((1, 2)))


CHILD = textwrap.dedent(
    """
    import sys, time, numpy as np, hvp
    onnx = sys.argv[1]
    m = hvp.Model.from_onnx(onnx)
    x = np.random.default_rng(0).standard_normal((20000, 3, 32, 32)).astype(np.float32)
    p = hvp.Problem(m, hvp.Data(x, np.zeros(20000, dtype=np.int64)), batch_size=50)
    v = {n: np.ones(s) for n, s in p.parameters().items()}
    print("ready", flush=True)
    start = time.time()
    try:
        p.hvp(v, progress=False)
        print("finished", flush=True)
    except KeyboardInterrupt:
        print(f"interrupted {time.time() - start:.2f}", flush=True)
    # The problem stays usable after an interrupted pass.
    small = hvp.Problem(m, hvp.Data(x[:4], np.zeros(4, dtype=np.int64)))
    print("loss", small.loss(progress=False), flush=True)
    """
)


def test_ctrl_c_stops_a_long_pass_between_batches(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    onnx = FIXTURES / "onnx" / "seed_resnet" / "legacy.onnx"
    child = subprocess.Popen([sys.executable, str(script), str(onnx)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert child.stdout.readline().strip() == "ready"
    time.sleep(1.0)
    sent = time.time()
    child.send_signal(signal.SIGINT)
    out, _ = child.communicate(timeout=60)
    waited = time.time() - sent
    lines = out.split("\n")
    assert lines[0].startswith("interrupted"), out
    assert lines[1].startswith("loss"), out
    assert child.returncode == 0
    # One batch of 50 seed-ResNet images is well under a second; the pass itself would take minutes.
    assert waited < 10, f"took {waited:.1f} s to stop"
