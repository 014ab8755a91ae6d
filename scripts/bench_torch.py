#!/usr/bin/env python3
"""Time one exact HVP of the seed ResNet (resnet-cifar:2,2,2) over N random
CIFAR-shaped images in PyTorch, the way researchers do it, side by side with
`hvp bench` on the same machine in the same sitting.

    python3 scripts/bench_torch.py --sizes 1000,4000 --threads 2 --hvp target/release/hvp

Methods (float32, BatchNorm in eval mode, loss = mean cross-entropy over N):
  seed     one forward over all N, autograd.grad(create_graph=True), second grad
  chunked  the same per chunk of --chunk images, summed (exact in eval mode)
  func     torch.func.jvp(torch.func.grad(loss)) per chunk (forward-over-reverse)
  grad     one gradient over N per chunk (the cost unit)
Each (method, N) runs in a fresh process: peak RSS is that process's ru_maxrss.
With --rounds R the whole sequence (every torch method and hvp, for every N) runs R
times in turn, torch first in odd-numbered rounds and hvp first in even-numbered ones,
so slow stretches of a shared machine fall on both tools, and a table gives each ratio
of issue 19's goals per round and its median over the rounds.
`--summarize F.jsonl [G.jsonl ...]` times nothing: it prints the same tables for rows
written earlier by --json, pooling the rounds of several runs (no torch needed):

    python3 scripts/bench_torch.py --summarize docs/bench/2026-12-03-amd-rounds1[0-2].jsonl
If torch is missing, the script creates a venv in ~/.cache/hvp-bench-venv, installs
torch there with pip (about 3 GB), says so, and re-runs itself with it.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

VENV = Path.home() / ".cache" / "hvp-bench-venv"


def ensure_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        py = VENV / "bin" / "python"
        if not py.exists():
            print(f"torch is not installed: creating {VENV} and installing torch into it (about 3 GB)", file=sys.stderr)
            subprocess.check_call([sys.executable, "-m", "venv", str(VENV)])
            subprocess.check_call([str(py), "-m", "pip", "install", "-q", "torch", "numpy"])
        os.execv(str(py), [str(py)] + sys.argv)


def one(method, n, chunk, threads, repeats):
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from torch_models import ResNetCifar

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = ResNetCifar([2, 2, 2]).eval()
    names = [k for k, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    v = [torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) for p in params]
    buffers = dict(model.named_buffers())

    def chunks():
        c = n if method == "seed" else chunk
        for s in range(0, n, c):
            yield x[s : s + c], y[s : s + c]

    def run():
        acc = [torch.zeros_like(p) for p in params]
        for xc, yc in chunks():
            if method == "grad":
                loss = F.cross_entropy(model(xc), yc, reduction="sum") / n
                out = torch.autograd.grad(loss, params)
            elif method in ("seed", "chunked"):
                loss = F.cross_entropy(model(xc), yc, reduction="sum") / n
                gr = torch.autograd.grad(loss, params, create_graph=True)
                out = torch.autograd.grad(gr, params, grad_outputs=v)
            else:
                def loss_fn(ps, xc=xc, yc=yc):
                    z = torch.func.functional_call(model, ({**dict(zip(names, ps)), **buffers},), (xc,))
                    return F.cross_entropy(z, yc, reduction="sum") / n

                _, out = torch.func.jvp(torch.func.grad(loss_fn), (tuple(params),), (tuple(v),))
            for a, o in zip(acc, out):
                a += o.detach()
        return acc

    run()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    times.sort()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"method": method, "n": n, "seconds": times[len(times) // 2], "peak_rss_bytes": rss,
            "threads": threads, "chunk": chunk, "torch": torch.__version__}


def run_torch(a, n, rnd):
    """Every torch method at N, each in a fresh process."""
    rows = []
    for method in a.methods.split(","):
        out = subprocess.run([sys.executable, __file__, "--one", method, str(n), "--chunk", str(a.chunk),
                              "--threads", str(a.threads), "--repeats", str(a.repeats)],
                             check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        row["tool"], row["round"] = "torch", rnd
        rows.append(row)
        print(f"torch {method:8s} N={n:5d}  {row['seconds']:8.3f} s  {n / row['seconds']:8.1f} images/s  "
              f"peak RSS {row['peak_rss_bytes'] / 1e6:7.0f} MB", flush=True)
    return rows


def run_hvp(a, n, rnd):
    """`hvp bench` at N (gradient, HVP, GGN) in one process."""
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"hvp-bench-{os.getpid()}.jsonl"
    subprocess.run([a.hvp, "bench", "--sizes", str(n), "--threads", str(a.threads), "--batch-size",
                    str(a.chunk), "--repeats", str(a.repeats), "--json", str(tmp)], check=True,
                   stdout=subprocess.DEVNULL)
    rows = []
    for line in tmp.read_text().splitlines():
        row = json.loads(line)
        row["tool"], row["round"] = "hvp", rnd
        rows.append(row)
        print(f"hvp   {row['method']:8s} N={n:5d}  {row['seconds']:8.3f} s  {row['images_per_s']:8.1f} images/s  "
              f"peak RSS {row['peak_rss_bytes'] / 1e6:7.0f} MB", flush=True)
    tmp.unlink()
    return rows


def cell(rows, tool, method, n, rnd):
    return next((r for r in rows if r["tool"] == tool and r["method"] == method and r["n"] == n
                 and r.get("round", 0) == rnd), None)


def best_torch_hvp(rows, n, rnd):
    ts = [r for r in rows if r["tool"] == "torch" and r["n"] == n and r.get("round", 0) == rnd
          and r["method"] != "grad"]
    return min(ts, key=lambda r: r["seconds"]) if ts else None


def print_speedups(rows):
    print("\n| round | N | hvp HVP (s) | best torch HVP (s) | speed-up | hvp peak RSS | torch peak RSS | hvp HVP / hvp grad |")
    print("|---|---|---|---|---|---|---|---|")
    for rnd in sorted({r.get("round", 0) for r in rows}):
        for n in sorted({r["n"] for r in rows}):
            h, hg = cell(rows, "hvp", "hvp", n, rnd), cell(rows, "hvp", "grad", n, rnd)
            best = best_torch_hvp(rows, n, rnd)
            if not h or not best:
                continue
            ratio = f"{h['seconds'] / hg['seconds']:.2f}" if hg else "–"
            print(f"| {rnd + 1} | {n} | {h['seconds']:.3f} | {best['seconds']:.3f} ({best['method']}) | "
                  f"{best['seconds'] / h['seconds']:.2f}x | {h['peak_rss_bytes'] / 1e6:.0f} MB | "
                  f"{best['peak_rss_bytes'] / 1e6:.0f} MB | {ratio} |")


# Issue 19's goals: (name, value from one round's cells, threshold, True when the value must be at least it).
GOALS = [
    ("HVP speed-up over torch's best", lambda c: c["torch_best"]["seconds"] / c["hvp"]["seconds"], 2.0, True),
    ("gradient speed-up over torch's", lambda c: c["torch_grad"]["seconds"] / c["grad"]["seconds"], 1.25, True),
    ("HVP time / hvp gradient time", lambda c: c["hvp"]["seconds"] / c["grad"]["seconds"], 2.2, False),
    ("HVP time / GGN time", lambda c: c["hvp"]["seconds"] / c["ggn"]["seconds"], 1.5, True),
    ("peak RSS / torch's (HVP)", lambda c: c["hvp"]["peak_rss_bytes"] / c["torch_best"]["peak_rss_bytes"], 0.4, False),
    ("HVP share of the GEMM peak", lambda c: c["hvp"]["of_gemm_peak"], 0.65, True),
]


# Above this many rounds the goal table gives each goal's range instead of every round.
MAX_ROUND_COLUMNS = 6


def print_goals(rows):
    """Each goal's value per round (or, over many rounds, its range) and its median."""
    rounds = sorted({r.get("round", 0) for r in rows})
    compact = len(rounds) > MAX_ROUND_COLUMNS
    if compact:
        print(f"\n| goal | N | rounds | min | max | median | met by the median |")
        print("|---|---|---|---|---|---|---|")
    else:
        print(f"\n| goal | N | {' | '.join(f'round {r + 1}' for r in rounds)} | median | met by the median |")
        print(f"|---|---|{'---|' * len(rounds)}---|---|")
    for name, value, threshold, at_least in GOALS:
        for n in sorted({r["n"] for r in rows}):
            values = []
            for rnd in rounds:
                c = {"hvp": cell(rows, "hvp", "hvp", n, rnd), "grad": cell(rows, "hvp", "grad", n, rnd),
                     "ggn": cell(rows, "hvp", "ggn", n, rnd), "torch_grad": cell(rows, "torch", "grad", n, rnd),
                     "torch_best": best_torch_hvp(rows, n, rnd)}
                try:
                    values.append(value(c))
                except (TypeError, KeyError, ZeroDivisionError):
                    values.append(None)
            known = sorted(v for v in values if v is not None)
            if not known:
                continue
            median = known[len(known) // 2] if len(known) % 2 else (known[len(known) // 2 - 1] + known[len(known) // 2]) / 2
            met = median >= threshold if at_least else median <= threshold
            if compact:
                shown = f"{len(known)} | {known[0]:.2f} | {known[-1]:.2f}"
            else:
                shown = " | ".join("–" if v is None else f"{v:.2f}" for v in values)
            sign = "≥" if at_least else "≤"
            print(f"| {name} ({sign} {threshold}) | {n} | {shown} | {median:.2f} | {'yes' if met else 'NO'} |")


def load_rows(paths):
    """The rows of several `--json` files, each file's rounds renumbered after the
    previous file's, so runs made at different times pool into one table."""
    rows = []
    for path in paths:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as e:
            sys.exit(f"cannot read {path}: {e.strerror}")
        first = 1 + max((r["round"] for r in rows), default=-1)
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                row["round"] = first + int(row.get("round", 0))
                row["tool"], row["method"], row["n"], row["seconds"]
            except (ValueError, TypeError, KeyError, AttributeError) as e:
                sys.exit(f"{path}:{number}: not a row written by --json ({type(e).__name__}: {e})")
            rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,4000")
    ap.add_argument("--methods", default="grad,chunked,func")
    ap.add_argument("--chunk", type=int, default=250)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hvp", help="path of the hvp binary: also run `hvp bench` for each N, in the same sitting")
    ap.add_argument("--json", help="append all rows here as JSON lines")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the whole torch-then-hvp sequence this many times in turn (rows carry their round)")
    ap.add_argument("--summarize", nargs="+", metavar="JSONL",
                    help="time nothing: print the tables for rows written earlier by --json; several "
                         "files pool their rounds (torch is not needed)")
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.summarize:
        rows = load_rows(a.summarize)
        print_speedups(rows)
        print_goals(rows)
        return
    ensure_torch()
    if a.one:
        print(json.dumps(one(a.one[0], int(a.one[1]), a.chunk, a.threads, a.repeats)))
        return
    if a.rounds < 1:
        sys.exit("--rounds must be at least 1")
    rows = []
    for rnd in range(a.rounds):
        if a.rounds > 1:
            print(f"round {rnd + 1} of {a.rounds}", flush=True)
        for n in [int(s) for s in a.sizes.split(",")]:
            # Odd rounds run hvp first: whichever tool runs second starts on a
            # machine that has been busy longer (a throttled or shared CPU).
            if a.hvp and rnd % 2 == 1:
                rows += run_hvp(a, n, rnd)
            rows += run_torch(a, n, rnd)
            if a.hvp and rnd % 2 == 0:
                rows += run_hvp(a, n, rnd)
    if a.hvp:
        print_speedups(rows)
        print_goals(rows)
    if a.json:
        with open(a.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
