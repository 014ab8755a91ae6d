"""Shared fixtures: the repository's committed test data and the `hvp` binary
the Python results are compared with."""

import json
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"


def read_safetensors(path):
    """name -> float64 array from a safetensors file (F32/F64; no torch needed)."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    body = raw[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = {"F64": "<f8", "F32": "<f4", "I64": "<i8"}[info["dtype"]]
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(body[start:end], dtype=dtype).astype(np.float64).reshape(info["shape"])
    return out


@pytest.fixture(scope="session")
def hvp_bin():
    """The release binary built by `cargo build --release` (or $HVP_BIN)."""
    path = Path(os.environ.get("HVP_BIN", REPO / "target" / "release" / "hvp"))
    if not path.exists():
        subprocess.run(["cargo", "build", "--release", "-p", "hvp"], cwd=REPO, check=True)
    return path


@pytest.fixture
def cli(hvp_bin, tmp_path):
    """Runs `hvp ARGS... --quiet` in tmp_path; returns the completed process."""

    def run(*args, check=True):
        p = subprocess.run(
            [str(hvp_bin), *map(str, args), "--quiet"], cwd=tmp_path, capture_output=True, text=True
        )
        if check and p.returncode != 0:
            raise AssertionError(f"hvp {' '.join(map(str, args))} failed:\n{p.stderr}")
        return p

    return run


@pytest.fixture(scope="session")
def mlp_case():
    """The PyTorch-referenced MLP fixture: mlp:64,16,10 on 32 digits, float64."""
    d = FIXTURES / "mlp"
    return {
        "dir": d,
        "arch": "mlp:64,16,10",
        "weights": d / "weights.safetensors",
        "inputs": d / "inputs.npy",
        "labels": d / "labels.npy",
        "vector": d / "vector.safetensors",
        "expected": read_safetensors(d / "expected.safetensors"),
        "x": np.load(d / "inputs.npy"),
        "y": np.load(d / "labels.npy"),
    }
