#!/usr/bin/env python3
"""Write tests/fixtures/zoo/: small modern architectures (scripts/zoo_models.py)
exported by both PyTorch ONNX exporters, with float64 references computed by
PyTorch on exactly the exported float32 weights (rerunnable, deterministic).

    /tmp/venv/bin/python scripts/make_zoo.py            # all models
    /tmp/venv/bin/python scripts/make_zoo.py vit mixer  # some of them

Needs torch, numpy, safetensors, onnx and onnxscript (CI never runs it). Each
model's folder holds dynamo.onnx, legacy.onnx, inputs.npy (float32 images or
int64 token ids), labels.npy, vector.safetensors (float32), meta.json and
expected.safetensors: `loss`, `grad/NAME`, `hvp/NAME` (double backward, checked
against torch.func's `jvp(grad)` to 1e-12, the agreement kept in meta.json) and
`ggn/NAME` (torch.func.jvp, output Hessian, VJP), every k-th element of tensors
above `subset_cap`. Checked by crates/cli/tests/onnx_models.rs: 1e-9 relative in f64,
1e-4 in f32. BatchNorm in eval mode with non-trivial running statistics.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file
from torch.nn.attention import SDPBackend, sdpa_kernel

from make_fixtures import export_both, save_expected
from zoo_models import MobileNetV2, Mixer, ResNet18, TextTransformer, TinyGPT, TinyUNet, ViT

ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "zoo"
CAP = 128
OPSET21 = {"unet"}


def randomise_norms(model):
    """Non-trivial BatchNorm statistics and affine parameters of every norm layer."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.3, 0.3)
                mod.running_var.uniform_(0.5, 1.5)
            if isinstance(mod, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
                mod.weight.uniform_(0.8, 1.2)
                mod.bias.uniform_(-0.2, 0.2)


def torch_func_agreement(model, x, y, v, d):
    """The stored HVP (double backward) against torch.func's forward-over-reverse
    `jvp(grad(loss))`: the two PyTorch methods must agree before the fixture is
    trusted; returns their relative difference."""
    from safetensors.torch import load_file
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for _, p in model.named_parameters())
    buffers = dict(model.named_buffers())

    def loss(ps):
        out = torch.func.functional_call(model, ({**dict(zip(names, ps)), **buffers},), (x,))
        return torch.nn.functional.cross_entropy(out, y)

    _, hv = torch.func.jvp(torch.func.grad(loss), (params,), (tuple(v[n] for n in names),))
    stored = load_file(str(d / "expected.safetensors"))
    num = den = 0.0
    for n, h in zip(names, hv):
        flat = h.reshape(-1)
        k = -(-flat.numel() // CAP) if flat.numel() > CAP else 1
        ref = stored[f"hvp/{n}"]
        num += float(((flat[::k] - ref) ** 2).sum())
        den += float((ref ** 2).sum())
    err = (num / den) ** 0.5
    if err > 1e-12:
        raise SystemExit(f"{d.name}: torch.func's HVP differs from double backward by {err:e}")
    return err


def strip_node_metadata(path):
    """Drops the dynamo exporter's per-node stack traces and FX names (70% of
    the file); the graph, its shapes and its weights are unchanged."""
    import onnx
    m = onnx.load(str(path))
    for node in m.graph.node:
        del node.metadata_props[:]
    onnx.save(m, str(path))


def cases():
    """(name, model, example inputs, labels) with float32 weights."""
    images = lambda n, c, s: torch.randn(n, c, s, s, dtype=torch.float64)
    return {
        "resnet18": lambda: (ResNet18(), images(3, 3, 32), torch.tensor([1, 7, 4])),
        "mobilenet_v2": lambda: (MobileNetV2(), images(3, 3, 16), torch.tensor([3, 0, 9])),
        "vit": lambda: (ViT(), images(3, 3, 16), torch.tensor([5, 2, 2])),
        "text_transformer": lambda: (TextTransformer(), torch.randint(0, 50, (4, 8)), torch.tensor([0, 3, 1, 2])),
        "mixer": lambda: (Mixer(), images(3, 3, 16), torch.tensor([8, 6, 1])),
        "unet": lambda: (TinyUNet(), images(3, 3, 16), torch.tensor([4, 4, 0])),
        "gpt": lambda: (TinyGPT(), torch.randint(0, 40, (4, 8)), torch.tensor([1, 4, 0, 2])),
    }


def write(name, build):
    torch.manual_seed(sum(name.encode()))
    model, x, y = build()
    if x.dtype != torch.int64:
        x = x.float().double()  # stored as float32, exactly
    randomise_norms(model)
    model = model.float().eval()
    d = ROOT / name
    d.mkdir(parents=True, exist_ok=True)
    example = x[:2] if x.dtype == torch.int64 else x[:2].float()
    export_both(model, example, d)
    strip_node_metadata(d / "dynamo.onnx")
    exports = ["dynamo", "legacy"]
    if name in OPSET21:
        # Opset 21 keeps GroupNormalization as one operator (earlier ones decompose it).
        torch.onnx.export(model, (example,), str(d / "dynamo_opset21.onnx"), opset_version=21, optimize=False,
                          do_constant_folding=False, external_data=False)
        strip_node_metadata(d / "dynamo_opset21.onnx")
        exports.append("dynamo_opset21")
    v32 = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    save_file({k: t.contiguous() for k, t in v32.items()}, str(d / "vector.safetensors"))
    model = model.double()
    v = {k: t.double() for k, t in v32.items()}
    # Double backward through attention needs the math kernel (the fused CPU
    # kernels have no second derivative); it is also the plainest reference.
    # nn.MultiheadAttention's inference fast path has no forward-mode derivative.
    torch.backends.mha.set_fastpath_enabled(False)
    with sdpa_kernel(SDPBackend.MATH):
        names, loss = save_expected(d, model, x, y, v, CAP)
        agreement = torch_func_agreement(model, x, y, v, d)
    np.save(d / "inputs.npy", x.numpy() if x.dtype == torch.int64 else x.numpy().astype(np.float32))
    np.save(d / "labels.npy", y.numpy().astype(np.int64))
    params = sum(p.numel() for p in model.parameters())
    meta = {"n": int(x.shape[0]), "subset_cap": CAP, "vector": "file", "torch": torch.__version__,
            "params": names, "parameter_count": params, "loss": "ce", "exports": exports,
            "torch_func_hvp_vs_double_backward": agreement}
    (d / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    size = sum(f.stat().st_size for f in d.iterdir())
    print(f"zoo/{name}: {params} parameters, loss {loss.item():.6f}, {size / 1024:.0f} KiB")


def main():
    wanted = sys.argv[1:] or list(cases())
    table = cases()
    for name in wanted:
        if name not in table:
            raise SystemExit(f"unknown model {name!r}; known: {', '.join(table)}")
        write(name, table[name])


if __name__ == "__main__":
    main()
