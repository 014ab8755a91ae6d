#!/usr/bin/env python3
"""Write the PyTorch reference fixtures in tests/fixtures/ (rerunnable, deterministic).

Needs torch, numpy, safetensors, onnx and onnxscript (any recent version; CI
never runs this):

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch numpy safetensors onnx onnxscript
    /tmp/venv/bin/python scripts/make_fixtures.py               # everything
    /tmp/venv/bin/python scripts/make_fixtures.py --only onnx   # tests/fixtures/onnx only

Each case directory holds the inputs (NPY), the weights and direction (safetensors
written by safetensors.torch.save_file, or "generated" from a SplitMix64 stream the
Rust tests reproduce bit for bit, to keep the repo small), and expected.safetensors
with the gradient, Hessian-vector product and GGN-vector product computed in float64
by PyTorch: `grad/NAME`, `hvp/NAME`, `ggn/NAME`, plus the mean `loss`. For large
tensors only every k-th element (k = ceil(numel / cap)) is stored.

Loss: softmax cross-entropy, mean over the N examples; BatchNorm in eval mode.
HVP: double backward (reverse-over-reverse), a method independent of hvp's
forward-over-reverse. GGN: torch.func.jvp of the logits, the softmax
cross-entropy's Hessian (diag(p) - p p^T)/N, then a VJP.
"""
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from torch_models import ResNetCifar, SmallCNN, mlp

ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
MASK64 = (1 << 64) - 1


# ---- SplitMix64 stream, reproduced in crates/cli/tests/common/mod.rs ----
def fnv1a(name: str) -> int:
    h = 0xCBF29CE484222325
    for b in name.encode():
        h = ((h ^ b) * 0x100000001B3) & MASK64
    return h


def uniform_stream(seed: int, count: int):
    """count values in [-1, 1): (z >> 11) * 2^-53 * 2 - 1 of SplitMix64 outputs."""
    s = seed & MASK64
    out = np.empty(count, dtype=np.float64)
    for i in range(count):
        s = (s + 0x9E3779B97F4A7C15) & MASK64
        z = s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        z ^= z >> 31
        out[i] = (z >> 11) * (2.0**-53) * 2.0 - 1.0
    return out


def generated_tensor(name, shape, seed):
    """Deterministic weights per tensor name (rule mirrored in the Rust tests)."""
    n = int(np.prod(shape)) if shape else 1
    u = uniform_stream(seed ^ fnv1a(name), n)
    if name.endswith("running_var"):
        v = 1.0 + 0.5 * u
    elif name.endswith("running_mean"):
        v = 0.2 * u
    elif len(shape) == 1 and name.endswith(".weight"):  # BatchNorm gamma
        v = 1.0 + 0.2 * u
    elif len(shape) == 1:  # biases
        v = 0.2 * u
    else:  # conv / linear weights: U(+-1/sqrt(fan_in))
        v = u / math.sqrt(int(np.prod(shape[1:])))
    return torch.from_numpy(v.reshape(shape))


def generated_vector(name, shape, seed):
    """Direction entries in [-1, 1) per parameter name."""
    n = int(np.prod(shape))
    return torch.from_numpy(uniform_stream(seed ^ fnv1a("vector:" + name), n).reshape(shape))


def subset(t: torch.Tensor, cap):
    flat = t.reshape(-1)
    if cap is None or flat.numel() <= cap:
        return flat.clone()
    k = math.ceil(flat.numel() / cap)
    return flat[::k].clone()


def products(model, x, y, v, loss_kind="ce"):
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    logits = model(x)
    loss = F.cross_entropy(logits, y) if loss_kind == "ce" else F.mse_loss(logits, y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    hvp = torch.autograd.grad(grads, params, grad_outputs=[v[n] for n in names])

    pdict = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}

    def f(*ps):
        return torch.func.functional_call(model, ({**dict(zip(names, ps)), **buffers},), (x,))

    z, jv = torch.func.jvp(f, tuple(pdict[n] for n in names), tuple(v[n] for n in names))
    if loss_kind == "ce":
        p = torch.softmax(z, dim=1)
        hjv = (p * jv - p * (p * jv).sum(dim=1, keepdim=True)) / x.shape[0]
    else:  # mean over N*K elements of (z - t)^2: output Hessian 2/(N*K) I
        hjv = 2.0 * jv / z.numel()
    z2 = f(*params)
    ggn = torch.autograd.grad(z2, params, grad_outputs=hjv)
    return names, loss.detach(), [g.detach() for g in grads], [h.detach() for h in hvp], [g.detach() for g in ggn]


def save_expected(d, model, x, y, v, cap, loss_kind="ce"):
    """expected.safetensors of a case: loss, and grad/hvp/ggn per parameter (subsampled)."""
    names, loss, grads, hvps, ggns = products(model, x, y, v, loss_kind)
    expected = {"loss": loss.reshape(1)}
    for n, g, h, gg in zip(names, grads, hvps, ggns):
        expected[f"grad/{n}"] = subset(g, cap)
        expected[f"hvp/{n}"] = subset(h, cap)
        expected[f"ggn/{n}"] = subset(gg, cap)
    save_file(expected, str(d / "expected.safetensors"))
    return names, loss


def write_case(name, model, arch, in_channels, x, y, v, cap, weights_mode):
    d = ROOT / name
    d.mkdir(parents=True, exist_ok=True)
    model = model.double().eval()
    names, loss = save_expected(d, model, x, y, v, cap)
    np.save(d / "inputs.npy", x.numpy())
    np.save(d / "labels.npy", y.numpy().astype(np.int64))
    meta = {"arch": arch, "in_channels": in_channels, "n": int(x.shape[0]), "subset_cap": cap,
            "weights": weights_mode, "torch": torch.__version__}
    if weights_mode == "file":
        # The weights in the precision they were used, as PyTorch writes a state_dict.
        save_file({k: t.contiguous() for k, t in model.state_dict().items()}, str(d / "weights.safetensors"))
        save_file({k: t.contiguous() for k, t in v.items()}, str(d / "vector.safetensors"))
    (d / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters, loss {loss.item():.6f}")


def export_both(model, x, d):
    """Writes d/dynamo.onnx (torch.export-based exporter, fixed example batch as a
    user would export) and d/legacy.onnx (TorchScript exporter, dynamic batch),
    both keeping BatchNorm and the state_dict names."""
    model = model.eval()
    torch.onnx.export(model, (x,), str(d / "dynamo.onnx"), optimize=False, do_constant_folding=False,
                      external_data=False)
    torch.onnx.export(model, (x,), str(d / "legacy.onnx"), dynamo=False, do_constant_folding=False,
                      input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "batch"}})
    for f in ("dynamo.onnx", "legacy.onnx"):
        data = d / (f + ".data")
        if data.exists():
            raise SystemExit(f"{data}: the exporter wrote external data; keep fixtures small")


def onnx_cases():
    """tests/fixtures/onnx/: the same models exported to ONNX by both exporters,
    with PyTorch float64 references computed on exactly the exported weights."""
    root = ROOT / "onnx"
    torch.manual_seed(1)

    # Seed ResNet, float32 weights (generated, then rounded, as exported).
    model = ResNetCifar([2, 2, 2], in_channels=3)
    with torch.no_grad():
        for n, t in model.state_dict().items():
            if not n.endswith("num_batches_tracked"):
                t.copy_(generated_tensor(n, list(t.shape), 42))
    model = model.float()
    d = root / "seed_resnet"
    d.mkdir(parents=True, exist_ok=True)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    export_both(model, x[:2].float(), d)
    v = {n: generated_vector(n, list(p.shape), 42) for n, p in model.named_parameters()}
    y = torch.tensor([1, 7, 4])
    write_onnx_case(d, model.double(), x, y, v, 256, "generated:42")

    # MLP in float64 (DOUBLE initializers and input).
    model = mlp([64, 16, 10]).double()
    d = root / "mlp"
    d.mkdir(parents=True, exist_ok=True)
    x = torch.rand(5, 64, dtype=torch.float64)
    export_both(model, x[:2], d)
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    save_file({k: t.contiguous() for k, t in v.items()}, str(d / "vector.safetensors"))
    write_onnx_case(d, model, x, torch.tensor([0, 3, 9, 3, 5]), v, None, "file")

    # Small CNN in float64 with MaxPool, Sigmoid and friends.
    model = SmallCNN().double()
    d = root / "small_cnn"
    d.mkdir(parents=True, exist_ok=True)
    x = torch.rand(4, 1, 12, 12, dtype=torch.float64)
    export_both(model, x[:2], d)
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    save_file({k: t.contiguous() for k, t in v.items()}, str(d / "vector.safetensors"))
    write_onnx_case(d, model, x, torch.tensor([2, 0, 7, 7]), v, None, "file")

    # Regression: a tanh MLP with 3 outputs, float targets, MSE loss.
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    d = root / "regression"
    d.mkdir(parents=True, exist_ok=True)
    x = torch.rand(6, 8, dtype=torch.float64)
    export_both(model, x[:2], d)
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    save_file({k: t.contiguous() for k, t in v.items()}, str(d / "vector.safetensors"))
    write_onnx_case(d, model, x, torch.randn(6, 3, dtype=torch.float64), v, None, "file", "mse")


def write_onnx_case(d, model, x, y, v, cap, vector_mode, loss_kind="ce"):
    model = model.double().eval()
    names, loss = save_expected(d, model, x, y, v, cap, loss_kind)
    np.save(d / "inputs.npy", x.numpy())
    np.save(d / "labels.npy", y.numpy().astype(np.int64) if loss_kind == "ce" else y.numpy())
    meta = {"n": int(x.shape[0]), "subset_cap": cap, "vector": vector_mode, "torch": torch.__version__,
            "params": names, "loss": loss_kind}
    (d / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"onnx/{d.name}: {sum(p.numel() for p in model.parameters())} parameters, loss {loss.item():.6f}")


def main():
    import sys
    if sys.argv[1:] == ["--only", "onnx"]:
        onnx_cases()
        return
    torch.manual_seed(0)

    # 1. MLP on the first 32 UCI digits (8x8, scaled to [0, 1]), f64 weights.
    digits = np.loadtxt(Path(__file__).resolve().parent / "digits_first32.csv", delimiter=",")
    x = torch.from_numpy(digits[:, :64] / 16.0)
    y = torch.from_numpy(digits[:, 64].astype(np.int64))
    model = mlp([64, 16, 10]).double()
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    write_case("mlp", model, "mlp:64,16,10", 1, x, y, v, None, "file")

    # 2. resnet-cifar:1,1,1 on 1-channel 16x16 inputs; weights rounded to float32
    #    and saved as float32, as most state_dicts are.
    model = ResNetCifar([1, 1, 1], in_channels=1)
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.3, 0.3)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.8, 1.2)
                mod.bias.uniform_(-0.2, 0.2)
    model = model.float()
    v32 = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    x = torch.randn(6, 1, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 10, (6,))
    d = ROOT / "resnet111"
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: t.contiguous() for k, t in model.state_dict().items()}, str(d / "weights.safetensors"))
    save_file({k: t.contiguous() for k, t in v32.items()}, str(d / "vector.safetensors"))
    v64 = {k: t.double() for k, t in v32.items()}
    write_case("resnet111", model, "resnet-cifar:1,1,1", 1, x, y, v64, 512, "file-f32")

    # 3. The seed ResNet (resnet-cifar:2,2,2) on 3x32x32 inputs, weights and vector
    #    generated (SplitMix64 per tensor name, seed 42), only expected values stored.
    model = ResNetCifar([2, 2, 2], in_channels=3).double()
    seed = 42
    with torch.no_grad():
        for n, t in model.state_dict().items():
            if n.endswith("num_batches_tracked"):
                continue
            t.copy_(generated_tensor(n, list(t.shape), seed))
    v = {n: generated_vector(n, list(p.shape), seed) for n, p in model.named_parameters()}
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([3, 8, 0, 6])
    write_case("seed_resnet", model, "resnet-cifar:2,2,2", 3, x, y, v, 256, "generated:42")

    onnx_cases()


if __name__ == "__main__":
    main()
