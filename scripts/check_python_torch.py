"""Checks `hvp.Model.from_torch` against torch.func, in float64, and times the
README's Python job against the same job written with torch.func.

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch onnx onnxscript numpy scipy ./python
    /tmp/venv/bin/python scripts/check_python_torch.py            # the check (seconds)
    /tmp/venv/bin/python scripts/check_python_torch.py --bench 1000 --threads 2   # + the timing table

The check: the seed ResNet (`resnet-cifar:2,2,2`, BatchNorm in eval mode with
non-trivial running statistics) and a small custom CNN, exported in-process by
`Model.from_torch`; their float64 HVPs against torch.func's forward-over-reverse
HVP, relative error per parameter ≤ 1e-9. Exits non-zero when a check fails.
"""

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torch_models import ResNetCifar  # noqa: E402

import hvp  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def with_running_stats(model, seed):
    """Eval mode with running statistics that differ from the batch's."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g, dtype=m.running_mean.dtype))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g, dtype=m.running_var.dtype))
    return model.eval()


class CustomCNN(torch.nn.Module):
    """A small CNN of the kind a researcher writes: BatchNorm, max pooling, a
    biased convolution, sigmoid and exact-GELU activations, two linear layers."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(4)
        self.conv2 = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.fc1 = torch.nn.Linear(8 * 3 * 3, 16)
        self.fc2 = torch.nn.Linear(16, 10)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        h = F.max_pool2d(torch.sigmoid(self.conv2(h)), 2)
        return self.fc2(F.gelu(self.fc1(h.flatten(1))))


def torch_func_hvp(model, x, y, v):
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(ps):
        return F.cross_entropy(torch.func.functional_call(model, ({**ps, **buffers},), (x,)), y)

    _, hv = torch.func.jvp(torch.func.grad(loss), (params,), ({n: v[n] for n in names},))
    return hv


def check(name, model, x, y, tol=1e-9):
    torch.manual_seed(1)
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    reference = torch_func_hvp(model, x, y, v)
    m = hvp.Model.from_torch(model, x[:2])
    p = hvp.Problem(m, hvp.Data(x, y), dtype="float64")
    mine = p.hvp(v, progress=False)
    assert list(mine) == list(reference), f"{name}: parameters {list(mine)} vs {list(reference)}"
    worst = 0.0
    for n, ref in reference.items():
        ref = ref.numpy()
        err = np.linalg.norm(mine[n] - ref) / max(np.linalg.norm(ref), 1e-300)
        worst = max(worst, err)
    status = "ok" if worst <= tol else "FAILED"
    print(f"{name}: {len(reference)} parameter tensors, {m.num_params} parameters, "
          f"worst relative error of H v vs torch.func (float64) {worst:.2e} (≤ {tol:.0e}): {status}")
    return worst <= tol


HVP_JOB = """
import sys, time, resource, numpy as np, torch
sys.path.insert(0, {scripts!r}); from torch_models import ResNetCifar
torch.set_num_threads({threads}); torch.manual_seed(0)
net = ResNetCifar((2, 2, 2), in_channels=1).eval()
x_train = torch.randn({n}, 1, 32, 32); y_train = torch.randint(0, 10, ({n},))
x_test, y_test = x_train[:8].clone(), y_train[:8].clone()
v = {{k: torch.randn_like(p) for k, p in net.named_parameters()}}
start = time.perf_counter()
{job}
print(f"{{time.perf_counter() - start:.2f}} {{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}}")
"""

# The README's job: an HVP, an inverse product (GGN, CG) and influence scores.
HVP_PACKAGE = """
import hvp
m = hvp.Model.from_torch(net, x_train[:2])
p = hvp.Problem(m, hvp.Data(x_train, y_train), threads={threads})
hv = p.hvp(v, progress=False)
x, report = p.solve(p.gradient(progress=False), solver="cg", curvature="ggn", damping=0.01,
                    max_iter=10, tol=1e-12, keep_unconverged=True, progress=False)
scores, report = hvp.influence(p, hvp.Data(x_test, y_test), solver="cg", curvature="ggn", damping=0.01,
                               test_indices=[0], max_iter=10, tol=1e-12, keep_unconverged=True, progress=False)
"""

# The same job with torch.func: HVP by forward-over-reverse, GGN products by jvp + vjp,
# ten CG iterations, per-example gradients by vmap(grad) in chunks.
TORCH_FUNC = """
from torch.func import functional_call, grad, jvp, vjp, vmap
names = [k for k, _ in net.named_parameters()]
params = {{k: p.detach() for k, p in net.named_parameters()}}
buffers = dict(net.named_buffers())
chunk = 250
def f(ps, xb): return functional_call(net, ({{**ps, **buffers}},), (xb,))
def mean_loss_grad(ps):
    total = {{k: torch.zeros_like(p) for k, p in ps.items()}}
    for i in range(0, len(x_train), chunk):
        g = grad(lambda q: torch.nn.functional.cross_entropy(f(q, x_train[i:i+chunk]), y_train[i:i+chunk], reduction="sum"))(ps)
        for k in total: total[k] += g[k] / len(x_train)
    return total
def hvp_(u):
    out = {{k: torch.zeros_like(p) for k, p in params.items()}}
    for i in range(0, len(x_train), chunk):
        xb, yb = x_train[i:i+chunk], y_train[i:i+chunk]
        lg = lambda q: grad(lambda r: torch.nn.functional.cross_entropy(f(r, xb), yb, reduction="sum"))(q)
        _, h = jvp(lg, (params,), (u,))
        for k in out: out[k] += h[k] / len(x_train)
    return out
def ggn_(u):
    out = {{k: torch.zeros_like(p) for k, p in params.items()}}
    for i in range(0, len(x_train), chunk):
        xb = x_train[i:i+chunk]
        z, jv = jvp(lambda q: f(q, xb), (params,), (u,))
        pr = torch.softmax(z, 1); hjv = (pr * jv - pr * (pr * jv).sum(1, keepdim=True)) / len(x_train)
        _, back = vjp(lambda q: f(q, xb), params)
        g = back(hjv)[0]
        for k in out: out[k] += g[k]
    return out
def dot(a, b): return sum((a[k] * b[k]).sum() for k in a)
def cg(b, iters=10, lam=0.01):
    xk = {{k: torch.zeros_like(t) for k, t in b.items()}}; r = {{k: t.clone() for k, t in b.items()}}
    d = {{k: t.clone() for k, t in r.items()}}; rr = dot(r, r)
    for _ in range(iters):
        ad = ggn_(d); ad = {{k: ad[k] + lam * d[k] for k in ad}}
        a = rr / dot(d, ad)
        xk = {{k: xk[k] + a * d[k] for k in xk}}; r = {{k: r[k] - a * ad[k] for k in r}}
        rr2 = dot(r, r); d = {{k: r[k] + (rr2 / rr) * d[k] for k in r}}; rr = rr2
    return xk
hv = hvp_(v)
x = cg(mean_loss_grad(params))
gt = grad(lambda q: torch.nn.functional.cross_entropy(f(q, x_test[:1]), y_test[:1]))(params)
s_test = cg(gt)
def example_grad(q, xi, yi): return grad(lambda r: torch.nn.functional.cross_entropy(f(r, xi[None]), yi[None]))(q)
scores = []
for i in range(0, len(x_train), chunk):
    g = vmap(example_grad, in_dims=(None, 0, 0))(params, x_train[i:i+chunk], y_train[i:i+chunk])
    scores.append(sum((g[k] * s_test[k]).flatten(1).sum(1) for k in g) / len(x_train))
"""


def bench(n, threads, repeats):
    scripts = str(Path(__file__).resolve().parent)
    rows = []
    for _ in range(repeats):
        for label, job in (("hvp (Python package)", HVP_PACKAGE), ("torch.func", TORCH_FUNC)):
            code = HVP_JOB.format(scripts=scripts, threads=threads, n=n, job=job.format(threads=threads))
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{label} failed:\n{out.stderr}")
            seconds, rss = out.stdout.strip().split("\n")[-1].split()
            rows.append((label, float(seconds), float(rss)))
            print(f"| {label} | N = {n} | {float(seconds):.2f} s | {float(rss):.0f} MB |", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", type=int, metavar="N", help="also time the README's job on N images")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    resnet = with_running_stats(ResNetCifar((2, 2, 2), in_channels=3).double(), 1)
    cnn = with_running_stats(CustomCNN().double(), 2)
    ok = check("seed ResNet (resnet-cifar:2,2,2)", resnet, torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,)))
    ok &= check("small custom CNN", cnn, torch.rand(5, 1, 12, 12), torch.randint(0, 10, (5,)))
    if a.bench:
        torch.set_default_dtype(torch.float32)
        print(f"\n| job: HVP + CG (10 GGN iterations) + influence of 1 test point (10 iterations) | data | time | peak RSS |")
        print("|---|---|---|---|")
        bench(a.bench, a.threads, a.repeats)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
