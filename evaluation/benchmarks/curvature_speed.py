"""K-FOC fit time relative to K-FAC fit time, in the same process, plus peak memory.

Columns: ``K-FOC s`` is the default fit (Lanczos, ``tol=1e-3``); ``half`` the largest number of
half-steps (``A`` or ``G`` updates) over the layers; ``floor`` is the time of a K-FOC fit capped
at one Lanczos step (``max_iter=1``: one ``G`` and one ``A`` update, then the residual test),
divided by the K-FAC time. That is the least work any K-FOC fit that *checks* its convergence
can do, even from an already optimal warm start, so ``floor`` bounds the achievable ratio.

*resnet18*: the zoo's torchvision-faithful ResNet-18 (11.2 M parameters, random weights, eval
mode) on ``--points`` random 3×32×32 images, batch 32 (issue 20). ``--variants`` adds, for each
model, K-FOC with ``mode="streaming"`` (what ``mode="auto"`` chose on ResNet-18 before the
cached solver's memory estimate counted one layer's solver temporaries at a time) and K-FOC
without the row-space solver (``_rowspace.ROW_FRACTION = 0``), each over the same K-FAC time.

Every time is the best of ``--repeats`` runs; ``cpu`` is that run's process CPU time (all
threads) over K-FAC's, which the other jobs on a shared machine disturb less than wall time.
The load average (``os.getloadavg()``) is printed before and after each model.

Run: ``python -m evaluation.benchmarks.curvature_speed [--models digits,wide,resnet18]
[--repeats 3] [--points 256] [--variants] [--layers]``; ``--layers`` prints each layer's cached
solver time (input size ``n``, stacked inputs ``R``, half-steps) for the timed K-FOC fit.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bayes_kfoc.curvature._rowspace as rowspace
import bayes_kfoc.curvature.fit as fit_module
from bayes_kfoc import fit_curvature
from bayes_kfoc.curvature import ConvergenceWarning
from datasets import load_dataset
from evaluation.models import mlp
from evaluation.training import train_map
from evaluation.zoo_resnet import resnet18


def digits_problem(seed: int = 0, device: str = "cpu") -> tuple[nn.Module, DataLoader]:
    splits = load_dataset("digits", seed=seed)
    torch.manual_seed(seed)
    model = train_map(mlp(64, 10), splits.train, epochs=100, seed=seed).to(device)
    return model, DataLoader(splits.train, batch_size=256)


def wide_problem(
    seed: int = 0, n: int = 10_000, device: str = "cpu"
) -> tuple[nn.Module, DataLoader]:
    torch.manual_seed(seed)
    model = mlp(784, 10, hidden=(1024, 1024), activation=nn.ReLU).eval().to(device)
    x = torch.rand(n, 784, device=device)
    y = torch.randint(0, 10, (n,), device=device)
    return model, DataLoader(TensorDataset(x, y), batch_size=256)


def resnet18_problem(
    seed: int = 0, n: int = 256, device: str = "cpu"
) -> tuple[nn.Module, DataLoader]:
    torch.manual_seed(seed)
    model = resnet18(num_classes=10).eval().to(device)
    x = torch.randn(n, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (n,), device=device)
    return model, DataLoader(TensorDataset(x, y), batch_size=32)


PROBLEMS: dict[str, Callable[..., tuple[nn.Module, DataLoader]]] = {
    "digits": digits_problem,
    "wide": wide_problem,
    "resnet18": resnet18_problem,
}

CPU_TIMES: dict[int, float] = {}  # id(result) -> process CPU seconds of the best run


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Best of ``repeats`` wall-clock runs (CUDA synchronised); the best run's process CPU time
    is kept in :data:`CPU_TIMES` under the result's id."""
    best, out, cpu = float("inf"), None, float("nan")
    for _ in range(repeats):
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        res = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t, c = time.perf_counter() - t0, time.process_time() - c0
        if t < best:
            best, out, cpu = t, res, c
    CPU_TIMES[id(out)] = cpu
    return best, out


LAYER_TIMES: list[tuple[int, int, int, int, float, float]] = []
"""Per cached K-FOC layer: ``(n, d_out, stacked inputs R, half-steps, wall s, cpu s)``."""


def _time_layers() -> None:
    """Wrap the cached solver of ``fit_curvature`` to record each layer's time (``--layers``)."""
    real = fit_module.kfoc_cached

    def timed_layer(stats: list[Any], start: Any, red: Any, opts: Any) -> Any:
        t0, c0 = time.perf_counter(), time.process_time()
        out = real(stats, start, red, opts)
        rows = sum(st.a.numel() // st.n if hasattr(st, "a") else 0 for st in stats)
        half = out[2].half_steps or 2 * out[2].iterations
        t, c = time.perf_counter() - t0, time.process_time() - c0
        LAYER_TIMES.append((stats[0].n, stats[0].o, rows, half, t, c))
        return out

    fit_module.kfoc_cached = timed_layer  # type: ignore[assignment]


def _print_layers(repeats: int) -> None:
    """The last of ``repeats`` timed fits' layers (not the best run's: per-layer detail)."""
    rows_out = LAYER_TIMES[-(len(LAYER_TIMES) // repeats) :]
    total = sum(r[4] for r in rows_out)
    print(f"          cached solver per layer, last run (total {total:.2f} s wall):")
    head = f"{'n':>6}{'d_out':>6}{'R':>7}{'row space':>10}{'half':>5}{'wall s':>8}{'cpu s':>8}"
    print(f"          {head}")
    for n, o, rows, half, t, c in rows_out:
        space = "yes" if 0 < rows <= rowspace.ROW_FRACTION * n else "no"
        print(f"          {n:>6}{o:>6}{rows:>7}{space:>10}{half:>5}{t:>8.2f}{c:>8.2f}")
    LAYER_TIMES.clear()


def load() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="digits,wide")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fisher", default="exact")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--points", type=int, default=256, help="resnet18's random images")
    parser.add_argument("--variants", action="store_true", help="streaming / no row space")
    parser.add_argument("--layers", action="store_true", help="per-layer cached solver times")
    args = parser.parse_args()
    if args.layers:
        _time_layers()
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, fisher={args.fisher}, "
        f"device={args.device}"
    )
    print(
        f"{'model':<8}{'K-FAC s':>10}{'K-FOC s':>10}{'ratio':>8}{'iters':>7}{'half':>6}"
        f"{'floor':>8}{'mode':>9}{'cpu':>7}"
    )
    for name in args.models.split(","):
        kw_problem: dict[str, Any] = {"n": args.points} if name == "resnet18" else {}
        model, loader = PROBLEMS[name](device=args.device, **kw_problem)
        print(f"{name}: load average before {load()}")

        def fit(
            structure: str, model: nn.Module = model, loader: DataLoader = loader, **kw: Any
        ) -> Any:
            return fit_curvature(model, loader, structure, args.fisher, progress=False, **kw)

        fit("kfac")  # warm-up
        LAYER_TIMES.clear()
        peaks = {}
        for s in ("kfac", "kfoc"):
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            t, out = timed(lambda s=s: fit(s), args.repeats)
            peaks[s] = (
                torch.cuda.max_memory_allocated() / 2**20
                if args.device.startswith("cuda")
                else float("nan")
            )
            if s == "kfac":
                t_kfac, kfac_out = t, out
            else:
                t_kfoc, curv = t, out
                if args.layers:
                    _print_layers(args.repeats)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter=1 stops unconverged
            t_floor, _ = timed(lambda: fit("kfoc", max_iter=1), args.repeats)
        LAYER_TIMES.clear()
        conv = curv.convergence().values()
        iters = max(v["iterations"] for v in conv)
        half = max(v.get("half_steps", 2 * v["iterations"]) for v in conv)
        cpu = CPU_TIMES[id(curv)] / CPU_TIMES[id(kfac_out)]
        print(
            f"{name:<8}{t_kfac:>10.3f}{t_kfoc:>10.3f}{t_kfoc / t_kfac:>8.2f}{iters:>7}{half:>6}"
            f"{t_floor / t_kfac:>8.2f}{curv.mode:>9}{cpu:>7.2f}"
        )
        if args.variants:
            t_stream, out = timed(lambda: fit("kfoc", mode="streaming"), args.repeats)
            c_stream = CPU_TIMES[id(out)] / CPU_TIMES[id(kfac_out)]
            saved = rowspace.ROW_FRACTION
            rowspace.ROW_FRACTION = 0.0
            try:
                t_full, out = timed(lambda: fit("kfoc"), args.repeats)
            finally:
                rowspace.ROW_FRACTION = saved
            c_full = CPU_TIMES[id(out)] / CPU_TIMES[id(kfac_out)]
            print(
                f"          K-FOC streaming {t_stream:.3f} s ({t_stream / t_kfac:.2f}x K-FAC, "
                f"cpu {c_stream:.2f}x); cached without row space {t_full:.3f} s "
                f"({t_full / t_kfac:.2f}x, cpu {c_full:.2f}x)"
            )
        est = curv.info.get("cache_bytes_estimate", 0) / 2**20
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            f"          K-FOC cache estimate {est:.1f} MiB; process peak RSS {rss:.0f} MiB; "
            f"CUDA peak K-FAC {peaks['kfac']:.0f} MiB, K-FOC {peaks['kfoc']:.0f} MiB"
        )
        print(f"          load average after {load()}")


if __name__ == "__main__":
    main()
