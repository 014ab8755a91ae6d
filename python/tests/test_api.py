"""Every call of the `hvp` Python package against the command line's outputs on
the committed fixtures — bit for bit where the same code runs with the same
inputs (float64 safetensors outputs), to the CSV's 10 significant digits
otherwise — and against the PyTorch float64 references."""

import json

import numpy as np
import pytest

import hvp
from conftest import FIXTURES, read_safetensors


def model_args(case):
    return ["--arch", case["arch"], "--weights", case["weights"]]


def data_args(case):
    return ["--inputs", case["inputs"], "--labels", case["labels"]]


@pytest.fixture(scope="module")
def problem(mlp_case):
    m = hvp.Model.builtin(mlp_case["arch"], mlp_case["weights"])
    return hvp.Problem(m, hvp.Data(mlp_case["x"], mlp_case["y"]), batch_size=256, dtype="float64")


def assert_reference(value, expected, rtol, atol):
    """`expected` is the PyTorch reference, flattened (every k-th element above the fixture's cap)."""
    flat = value.reshape(-1)
    stride = -(-flat.size // expected.size)
    np.testing.assert_allclose(flat[::stride], expected.reshape(-1), rtol=rtol, atol=atol)


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_parameters_in_state_dict_order(problem):
    assert problem.parameters() == {"0.weight": (16, 64), "0.bias": (16,), "2.weight": (10, 16), "2.bias": (10,)}
    assert list(problem.model.parameters()) == list(problem.parameters())


def test_gradient_and_loss_equal_cli_and_pytorch(problem, mlp_case, cli, tmp_path):
    cli("grad", *model_args(mlp_case), *data_args(mlp_case), "--dtype", "f64", "--out", tmp_path / "g.safetensors")
    g = problem.gradient(progress=False)
    assert_same(g, read_safetensors(tmp_path / "g.safetensors"))
    ref = mlp_case["expected"]
    for name, value in g.items():
        assert_reference(value, ref[f"grad/{name}"], rtol=1e-10, atol=1e-13)
    assert abs(problem.loss(progress=False) - float(ref["loss"].reshape(-1)[0])) < 1e-12


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "fisher"])
def test_products_equal_cli(problem, mlp_case, cli, tmp_path, curvature):
    out = tmp_path / "mv.safetensors"
    cli("product", *model_args(mlp_case), *data_args(mlp_case), "--dtype", "f64", "--curvature", curvature,
        "--vector", mlp_case["vector"], "--out", out)
    v = read_safetensors(mlp_case["vector"])
    mv = {"hessian": problem.hvp, "ggn": problem.ggn, "fisher": problem.fisher}[curvature](v, progress=False)
    assert_same(mv, read_safetensors(out))
    if curvature in ("hessian", "ggn"):
        key = "hvp" if curvature == "hessian" else "ggn"
        for name, value in mv.items():
            assert_reference(value, mlp_case["expected"][f"{key}/{name}"], rtol=1e-9, atol=1e-12)


def test_torch_style_vectors_and_flat_round_trip(problem):
    v = {n: np.random.default_rng(1).standard_normal(s) for n, s in problem.parameters().items()}
    flat = problem.flatten(v)
    assert flat.shape == (1210,) and flat.dtype == np.float64
    assert_same(problem.unflatten(flat), v)
    assert_same(problem.hvp(flat, progress=False), problem.hvp(v, progress=False))


def test_solve_equals_cli_and_scipy_cg_on_the_linear_operator(problem, mlp_case, cli, tmp_path):
    rhs = tmp_path / "rhs.safetensors"
    cli("grad", *model_args(mlp_case), *data_args(mlp_case), "--dtype", "f64", "--out", rhs)
    cli("solve", *model_args(mlp_case), *data_args(mlp_case), "--dtype", "f64", "--rhs", rhs, "--solver", "cg",
        "--curvature", "ggn", "--damping", "0.01", "--tol", "1e-10", "--max-iter", "500",
        "--out", tmp_path / "x.safetensors", "--report", tmp_path / "r.json")
    g = problem.gradient(progress=False)
    x, report = problem.solve(g, solver="cg", curvature="ggn", damping=0.01, tol=1e-10, max_iter=500, progress=False)
    assert_same(x, read_safetensors(tmp_path / "x.safetensors"))
    cli_report = json.loads((tmp_path / "r.json").read_text())
    assert report.keys() == cli_report.keys()
    for k in ("status", "iterations", "products", "relative_residual", "damping", "curvature", "dtype"):
        assert report[k] == cli_report[k], k
    assert report["status"] == "converged" and report["relative_residual"] <= 1e-10

    from scipy.sparse.linalg import cg

    op = problem.linear_operator("ggn", damping=0.01)
    flat_g = problem.flatten(g)
    xs, info = cg(op, flat_g, rtol=1e-12, maxiter=1000)
    assert info == 0
    assert np.linalg.norm(xs - problem.flatten(x)) <= 1e-8 * np.linalg.norm(xs)
    np.testing.assert_allclose(op.matvec(flat_g), problem.flatten(problem.ggn(g, progress=False)) + 0.01 * flat_g)


def test_influence_equals_cli(problem, mlp_case, cli, tmp_path):
    spec = f"npy:{mlp_case['inputs']},{mlp_case['labels']}"
    cli("influence", *model_args(mlp_case), "--train", spec, "--test", spec, "--test-indices", "3,0",
        "--solver", "cg", "--curvature", "ggn", "--damping", "0.01", "--tol", "1e-10", "--max-iter", "500",
        "--dtype", "f64", "--out", tmp_path / "s.csv")
    rows = np.genfromtxt(tmp_path / "s.csv", delimiter=",", names=True, dtype=None, encoding=None)
    test = hvp.Data(mlp_case["x"], mlp_case["y"])
    scores, report = hvp.influence(problem, test, solver="cg", curvature="ggn", damping=0.01, tol=1e-10,
                                   max_iter=500, test_indices=[3, 0], progress=False)
    assert scores.shape == (2, 32) and scores.dtype == np.float64
    for q, t in enumerate([3, 0]):
        mine = rows[rows["test_index"] == t]
        np.testing.assert_allclose(scores[q, mine["train_index"]], mine["score"], rtol=1e-9, atol=1e-15)
    assert report["solve_status"] == ["converged", "converged"]
    assert report["test_indices"] == [3, 0] and "removed" in report["convention"]
    # Solvers with factors make them once for all test points; EK-FAC is an approximation.
    ek, r = hvp.influence(problem, test, solver="ekfac", damping=0.01, test_indices=[0, 1], progress=False)
    assert ek.shape == (2, 32) and r["solve_status"] == ["approximate", "approximate"]
    # Residuals of the first test point only: the same scores, the other residual unmeasured.
    ek1, r1 = hvp.influence(problem, test, solver="ekfac", damping=0.01, test_indices=[0, 1], progress=False,
                            residuals=1)
    np.testing.assert_allclose(ek1, ek, rtol=1e-12, atol=0)
    assert r1["queries"][0]["relative_residual"] == r["queries"][0]["relative_residual"]
    assert r1["queries"][1]["relative_residual"] is None
    assert any("residual not measured" in w for w in r1["queries"][1]["warnings"])
    with pytest.raises(ValueError, match="not a residual choice"):
        hvp.influence(problem, test, solver="ekfac", damping=0.01, test_indices=[0], progress=False, residuals="x")


def test_self_influence_equals_cli(problem, mlp_case, cli, tmp_path):
    cli("self-influence", *model_args(mlp_case), *data_args(mlp_case), "--dtype", "f64", "--damping", "0.01",
        "--out", tmp_path / "si.csv")
    rows = np.genfromtxt(tmp_path / "si.csv", delimiter=",", names=True)
    s = hvp.self_influence(problem, damping=0.01, progress=False)
    assert s.shape == (32,)
    np.testing.assert_allclose(s[rows["train_index"].astype(int)], rows["self_influence"], rtol=1e-9)


def test_spectrum_equals_cli(problem, mlp_case, cli, tmp_path):
    cli("spectrum", *model_args(mlp_case), *data_args(mlp_case), "--dtype", "f64", "--top", "5",
        "--report", tmp_path / "s.json")
    cli_s = json.loads((tmp_path / "s.json").read_text())
    s = problem.spectrum(top=5, progress=False)
    assert s == cli_s
    assert s["top_eigenvalues"][0] >= s["top_eigenvalues"][-1] and len(s["top_eigenvalues"]) == 5


def test_onnx_models_equal_cli(mlp_case, cli, tmp_path):
    d = FIXTURES / "onnx" / "mlp"
    x, y = np.load(d / "inputs.npy"), np.load(d / "labels.npy")
    v = read_safetensors(d / "vector.safetensors")
    for exported in ("dynamo.onnx", "legacy.onnx"):
        cli("product", "--model", d / exported, "--inputs", d / "inputs.npy", "--labels", d / "labels.npy",
            "--dtype", "f64", "--vector", d / "vector.safetensors", "--out", tmp_path / "hv.safetensors")
        p = hvp.Problem(hvp.Model.from_onnx(d / exported), hvp.Data(x, y), dtype="float64")
        assert_same(p.hvp(v, progress=False), read_safetensors(tmp_path / "hv.safetensors"))


def test_builtin_from_a_state_dict_equals_from_its_file(problem, mlp_case):
    state = read_safetensors(mlp_case["weights"])
    m = hvp.Model.builtin(mlp_case["arch"], state)
    assert_same(m.state(), problem.model.state())
    p = hvp.Problem(m, hvp.Data(mlp_case["x"], mlp_case["y"]), dtype="float64")
    assert_same(p.gradient(progress=False), problem.gradient(progress=False))


def test_float32_inputs_are_used_in_place(mlp_case):
    x = np.ascontiguousarray(mlp_case["x"], dtype=np.float32)
    d = hvp.Data(x, mlp_case["y"])
    assert d._inputs is x
    m = hvp.Model.builtin(mlp_case["arch"], mlp_case["weights"])
    p32 = hvp.Problem(m, d, dtype="float32")
    p64 = hvp.Problem(m, hvp.Data(x.astype(np.float64), mlp_case["y"]), dtype="float64")
    g32, g64 = p32.gradient(progress=False), p64.gradient(progress=False)
    for k in g32:
        assert g32[k].dtype == np.float64
        np.testing.assert_allclose(g32[k], g64[k], rtol=1e-4, atol=1e-6)


def test_dataset_specs_as_on_the_command_line():
    d = hvp.Data.load(f"mnist:{FIXTURES.parents[1] / 'data' / 'mnist-subset'}:train", limit=50, pad=2)
    assert len(d) == 50 and d.sample_shape == (1, 32, 32)
    m = hvp.Model.builtin("mlp:1024,10", {"0.weight": np.zeros((10, 1024)), "0.bias": np.zeros(10)})
    assert abs(hvp.Problem(m, d).loss(progress=False) - np.log(10)) < 1e-6


def test_regression_targets_use_mean_squared_error():
    d = FIXTURES / "onnx" / "regression"
    x, y = np.load(d / "inputs.npy"), np.load(d / "labels.npy")
    assert np.issubdtype(y.dtype, np.floating)
    onnx = next(d.glob("*.onnx"))
    p = hvp.Problem(hvp.Model.from_onnx(onnx), hvp.Data(x, y), dtype="float64")
    assert np.isfinite(p.loss(progress=False))
