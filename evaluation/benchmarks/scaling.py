"""Fit time and peak memory of K-FAC and K-FOC against data-set size N and layer width.

Run::

    .venv/bin/python -m evaluation.benchmarks.scaling --threads 1     # default sweep
    .venv/bin/python -m evaluation.benchmarks.scaling --quick         # smaller sweep

The default sweep took 150 s on the 2-core development box (``--threads 1``, load ~7 from other
jobs); ``--quick`` takes about a third of that.

Problem
    An MLP ``in-width-width-classes`` (tanh, seeded random weights, eval mode), seeded random
    Gaussian inputs and uniform random labels, a ``DataLoader`` with ``--batch-size`` points per
    batch, exact (type-2) Fisher, CPU, float32, ``torch.get_num_threads()`` threads. Two sweeps:

    - N sweep: ``--ns`` (default 1k, 5k, 10k, 25k, 50k) at width ``--n-width`` (default 128);
    - width sweep: ``--widths`` (default 256, 512, 1024, 2048) at ``N = --width-n`` (default 2k).

What is measured, and how
    Every (structure, N, width) configuration runs in a fresh Python subprocess (this script with
    ``--worker``), so one configuration's allocations cannot hide another's. The worker builds the
    model, data and loader, fits once on the first batch (warm-up: kernels, thread pools, lazy
    imports), reads its current resident set size (``/proc/self/statm``) and then times one
    ``fit_curvature(model, loader, structure, fisher="exact", mode=--mode, progress=False)`` call
    with ``time.perf_counter`` (library defaults otherwise: ``tol=1e-6``, ``max_iter=100``, and
    the determinism re-run of the first batch).

    Peak memory is ``ru_maxrss`` after the fit (``resource.getrusage``, the process's high-water
    resident set) minus the resident set just before it: the extra host memory the fit needed at
    its peak, covering every tensor torch allocated on the CPU (which ``tracemalloc`` does not
    see). It is a conservative estimate: the allocator may reuse pages freed after the warm-up
    without raising the RSS. When the fit never exceeded the earlier high-water mark the row is
    marked ``<=`` (the value is then an upper bound). ``cache`` is the size of K-FOC's cached
    per-layer statistics as the library reports it (``curv.info["cache_bytes_estimate"]``).

    The parent prints a table, writes ``scaling.json`` and ``scaling.png`` (time and peak memory
    against N and against width, log-log) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayes_kfoc import fit_curvature
from evaluation.models import mlp


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def maxrss_bytes() -> int:
    """High-water resident set size (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_problem(
    n: int, in_features: int, width: int, classes: int, batch_size: int, seed: int
) -> tuple[nn.Module, DataLoader]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = mlp(in_features, classes, hidden=(width, width), activation=nn.Tanh).eval()
    x = torch.randn(n, in_features, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return model, DataLoader(TensorDataset(x, y), batch_size=batch_size)


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration in this (fresh) process: warm-up, then one timed and measured fit."""
    model, loader = make_problem(
        args.n, args.in_features, args.width, args.classes, args.batch_size, args.seed
    )
    kw = {"fisher": "exact", "progress": False}
    if args.structure == "kfoc":
        kw["mode"] = args.mode
    first = next(iter(loader))
    fit_curvature(model, [first], args.structure, **kw)  # warm-up on one batch
    before, high_before = rss_bytes(), maxrss_bytes()
    t0 = time.perf_counter()
    curv = fit_curvature(model, loader, args.structure, **kw)
    seconds = time.perf_counter() - t0
    high_after = maxrss_bytes()
    iters = [b.info.get("iterations", 0) for b in curv.blocks.values() if getattr(b, "info", None)]
    return {
        "structure": args.structure,
        "n": args.n,
        "width": args.width,
        "seconds": seconds,
        "peak_bytes": high_after - before,
        "peak_is_upper_bound": high_after <= high_before,
        "cache_bytes": int(curv.info.get("cache_bytes_estimate", 0)),
        "mode": curv.mode,
        "iterations": iters,
        "params": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
    }


def run_config(args: argparse.Namespace, structure: str, n: int, width: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "evaluation.benchmarks.scaling",
        "--worker",
        "--structure",
        structure,
        "--n",
        str(n),
        "--width",
        str(width),
        "--in-features",
        str(args.in_features),
        "--classes",
        str(args.classes),
        "--batch-size",
        str(args.batch_size),
        "--mode",
        args.mode,
        "--seed",
        str(args.seed),
    ]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise RuntimeError(f"worker failed for {structure} N={n} width={width}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def mib(b: float) -> float:
    return b / 2**20


def print_row(r: dict[str, Any]) -> None:
    le = "<=" if r["peak_is_upper_bound"] else "  "
    its = "/".join(str(i) for i in r["iterations"]) or "-"
    print(
        f"{r['sweep']:<6}{r['structure']:<6}{r['n']:>7}{r['width']:>7}{r['params']:>10}"
        f"{r['seconds']:>9.2f}{le:>4}{mib(r['peak_bytes']):>8.1f}{mib(r['cache_bytes']):>9.1f}"
        f"  {r['mode']:<12}{its}",
        flush=True,
    )


def plot(rows: list[dict[str, Any]], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    for col, (sweep, key, label) in enumerate(
        [("N", "n", f"N (width {args.n_width})"), ("width", "width", f"width (N = {args.width_n})")]
    ):
        for s, marker in (("kfac", "o"), ("kfoc", "s")):
            rs = sorted((r for r in rows if r["sweep"] == sweep and r["structure"] == s),
                        key=lambda r: r[key])  # fmt: skip
            if not rs:
                continue
            xs = [r[key] for r in rs]
            axes[0, col].plot(xs, [r["seconds"] for r in rs], marker=marker, label=s.upper())
            axes[1, col].plot(xs, [mib(r["peak_bytes"]) for r in rs], marker=marker, label=s)
            if s == "kfoc":
                axes[1, col].plot(
                    xs, [mib(r["cache_bytes"]) for r in rs], "k:", marker=".", label="kfoc cache"
                )
        axes[0, col].set(xscale="log", yscale="log", xlabel=label, ylabel="fit time (s)")
        axes[1, col].set(xscale="log", yscale="log", xlabel=label, ylabel="peak extra RSS (MiB)")
        for ax in axes[:, col]:
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    fig.suptitle(
        f"fit_curvature scaling, MLP {args.in_features}-w-w-{args.classes}, exact Fisher, "
        f"CPU float32, {torch.get_num_threads()} threads"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ints(text: str) -> list[int]:
    return [int(float(v)) for v in text.split(",") if v]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ns", type=ints, default=None, help="N sweep (default 1k,5k,10k,25k,50k)")
    parser.add_argument("--n-width", type=int, default=128, help="width in the N sweep")
    parser.add_argument("--widths", type=ints, default=None, help="default 256,512,1024,2048")
    parser.add_argument("--width-n", type=int, default=2000, help="N in the width sweep")
    parser.add_argument("--structures", default="kfac,kfoc")
    parser.add_argument("--in-features", type=int, default=256)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--mode", choices=["auto", "cached", "streaming"], default="cached")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker")
    parser.add_argument("--quick", action="store_true", help="N 1k,5k,10k; widths 256,512,1024")
    parser.add_argument("--out", type=Path, default=Path("reports/scaling"))
    # worker-only options
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--structure", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.ns is None:
        args.ns = [1000, 5000, 10000] if args.quick else [1000, 5000, 10000, 25000, 50000]
    if args.widths is None:
        args.widths = [256, 512, 1024] if args.quick else [256, 512, 1024, 2048]
    if args.quick and args.width_n == 2000:
        args.width_n = 1000
    structures = args.structures.split(",")

    cores, load = os.cpu_count(), os.getloadavg()[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cores} cores, load")
    print(f"average {load:.1f}; MLP {args.in_features}-w-w-{args.classes} tanh, exact Fisher,")
    print(f"float32, batch {args.batch_size}, K-FOC mode={args.mode!r}")
    print("time: one fit_curvature call after a one-batch warm-up, fresh process per row;")
    print("peak: ru_maxrss after the fit minus the RSS before it (MiB); cache: K-FOC statistics")
    hdr = f"{'sweep':<6}{'fit':<6}{'N':>7}{'width':>7}{'params':>10}{'time s':>9}{'':>4}"
    print(hdr + f"{'peak':>8}{'cache':>9}  {'mode':<12}iterations/layer")
    rows: list[dict[str, Any]] = []
    configs = [("N", n, args.n_width) for n in args.ns]
    configs += [("width", args.width_n, w) for w in args.widths]
    t0 = time.perf_counter()
    for sweep, n, w in configs:
        for s in structures:
            r = run_config(args, s, n, w)
            r["sweep"] = sweep
            rows.append(r)
            print_row(r)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_end": os.getloadavg(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    (args.out / "scaling.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    plot(rows, args.out / "scaling.png", args)
    print(f"total {time.perf_counter() - t0:.0f} s; wrote {args.out}/scaling.json, scaling.png")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
