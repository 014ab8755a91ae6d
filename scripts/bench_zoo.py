#!/usr/bin/env python3
"""Exact HVP of a transformer, hvp against torch.func forward-over-reverse,
side by side on the same model, weights, data, vector and threads (f32).

    /tmp/venv/bin/python scripts/bench_zoo.py --model vit --n 512
    /tmp/venv/bin/python scripts/bench_zoo.py --model text_transformer --n 512

The model (scripts/zoo_models.py at a benchmark size) is exported with the
TorchScript exporter; hvp runs `hvp product --curvature hessian` on the ONNX
file (whole process, best of --repeats); torch.func runs `jvp(grad(loss))`
batch by batch in process (best of --repeats). Both are mean-loss HVPs over all
N examples; the script also reports how far apart the two results are.
"""
import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file
from safetensors.torch import save_file
from torch.nn.attention import SDPBackend, sdpa_kernel

from zoo_models import TextTransformer, ViT

ROOT = Path(__file__).resolve().parent.parent


def build(name, n):
    torch.manual_seed(0)
    if name == "vit":
        model = ViT(image=32, patch=4, dim=64, depth=4, heads=4)
        x = torch.randn(n, 3, 32, 32)
    else:
        model = TextTransformer(vocab=1000, seq=64, dim=64, heads=4)
        x = torch.randint(0, 1000, (n, 64))
    return model.float().eval(), x, torch.randint(0, 4 if name != "vit" else 10, (n,))


def torch_hvp(model, x, y, v, batch):
    names = [k for k, _ in model.named_parameters()]
    params = tuple(p.detach() for _, p in model.named_parameters())
    n = x.shape[0]

    def loss(ps, xb, yb):
        out = torch.func.functional_call(model, dict(zip(names, ps)), (xb,))
        return F.cross_entropy(out, yb, reduction="sum") / n

    total = [torch.zeros_like(p) for p in params]
    for s in range(0, n, batch):
        xb, yb = x[s:s + batch], y[s:s + batch]
        _, hv = torch.func.jvp(lambda ps: torch.func.grad(loss)(ps, xb, yb), (params,), (v,))
        for t, h in zip(total, hv):
            t += h
    return dict(zip(names, total))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["vit", "text_transformer"], default="vit")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--hvp", default=str(ROOT / "target" / "release" / "hvp"))
    ap.add_argument("--out", help="append the result row (JSON) to this file")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.backends.mha.set_fastpath_enabled(False)
    model, x, y = build(a.model, a.n)
    params = sum(p.numel() for p in model.parameters())
    work = Path(tempfile.mkdtemp(prefix="hvp-bench-zoo-"))
    torch.onnx.export(model, (x[:2],), str(work / "m.onnx"), dynamo=False, do_constant_folding=False,
                      input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "batch"}})
    np.save(work / "x.npy", x.numpy())
    np.save(work / "y.npy", y.numpy().astype(np.int64))
    v = {k: torch.randn_like(p) for k, p in model.named_parameters()}
    save_file({k: t.contiguous() for k, t in v.items()}, str(work / "v.safetensors"))

    cmd = [a.hvp, "product", "--model", str(work / "m.onnx"), "--inputs", str(work / "x.npy"), "--labels",
           str(work / "y.npy"), "--vector", str(work / "v.safetensors"), "--curvature", "hessian", "--dtype", "f32",
           "--batch-size", str(a.batch), "--threads", str(a.threads), "--quiet", "--out", str(work / "hv.safetensors")]
    hvp_times, torch_times = [], []
    for _ in range(a.repeats):  # interleaved, best of each
        t = time.perf_counter()
        subprocess.run(cmd, check=True)
        hvp_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        # The fused CPU attention kernels have no forward-mode derivative: torch.func
        # needs the math kernel, as any user of forward-over-reverse would.
        with sdpa_kernel(SDPBackend.MATH):
            ref = torch_hvp(model, x, y, tuple(v[k] for k, _ in model.named_parameters()), a.batch)
        torch_times.append(time.perf_counter() - t)
    mine = load_file(str(work / "hv.safetensors"))
    num = sum(float(((torch.from_numpy(mine[k]).double() - r.double()) ** 2).sum()) for k, r in ref.items())
    den = sum(float((r.double() ** 2).sum()) for r in ref.values())
    row = {
        "model": a.model, "n": a.n, "batch": a.batch, "threads": a.threads, "params": params,
        "hvp_s": min(hvp_times), "torch_func_s": min(torch_times),
        "speedup": min(torch_times) / min(hvp_times), "relative_difference": (num / den) ** 0.5,
        "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
        "torch": torch.__version__,
    }
    print(json.dumps(row))
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
