"""K-FOC fit time relative to K-FAC fit time, in the same process, plus peak memory.

Columns: ``K-FOC s`` is the default fit (Lanczos, ``tol=1e-3``); ``half`` the largest number of
half-steps (``A`` or ``G`` updates) over the layers; ``floor`` is the time of a K-FOC fit capped
at one Lanczos step (``max_iter=1``: one ``G`` and one ``A`` update, then the residual test),
divided by the K-FAC time. That is the least work any K-FOC fit that *checks* its convergence
can do, even from an already optimal warm start, so ``floor`` bounds the achievable ratio.

Run: ``python -m evaluation.benchmarks.curvature_speed [--models digits,wide] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import gc
import resource
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayes_kfoc import fit_curvature
from bayes_kfoc.curvature import ConvergenceWarning
from datasets import load_dataset
from evaluation.models import mlp
from evaluation.training import train_map


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


PROBLEMS: dict[str, Callable[..., tuple[nn.Module, DataLoader]]] = {
    "digits": digits_problem,
    "wide": wide_problem,
}


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Best of ``repeats`` wall-clock runs (CUDA synchronised)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="digits,wide")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fisher", default="exact")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, fisher={args.fisher}, "
        f"device={args.device}"
    )
    print(
        f"{'model':<8}{'K-FAC s':>10}{'K-FOC s':>10}{'ratio':>8}{'iters':>7}{'half':>6}"
        f"{'floor':>8}{'mode':>9}"
    )
    for name in args.models.split(","):
        model, loader = PROBLEMS[name](device=args.device)

        def fit(
            structure: str, model: nn.Module = model, loader: DataLoader = loader, **kw: Any
        ) -> Any:
            return fit_curvature(model, loader, structure, args.fisher, progress=False, **kw)

        fit("kfac")  # warm-up
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
                t_kfac = t
            else:
                t_kfoc, curv = t, out
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter=1 stops unconverged
            t_floor, _ = timed(lambda: fit("kfoc", max_iter=1), args.repeats)
        conv = curv.convergence().values()
        iters = max(v["iterations"] for v in conv)
        half = max(v.get("half_steps", 2 * v["iterations"]) for v in conv)
        print(
            f"{name:<8}{t_kfac:>10.3f}{t_kfoc:>10.3f}{t_kfoc / t_kfac:>8.2f}{iters:>7}{half:>6}"
            f"{t_floor / t_kfac:>8.2f}{curv.mode:>9}"
        )
        est = curv.info.get("cache_bytes_estimate", 0) / 2**20
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            f"          K-FOC cache estimate {est:.1f} MiB; process peak RSS {rss:.0f} MiB; "
            f"CUDA peak K-FAC {peaks['kfac']:.0f} MiB, K-FOC {peaks['kfoc']:.0f} MiB"
        )


if __name__ == "__main__":
    main()
