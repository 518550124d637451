"""K-FOC fit time relative to K-FAC fit time, in the same process, plus peak memory.

Run: ``python -m evaluation.benchmarks.curvature_speed [--models digits,wide] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import gc
import resource
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayes_kfoc import fit_curvature
from datasets import load_dataset
from evaluation.models import mlp
from evaluation.training import train_map


def digits_problem(seed: int = 0) -> tuple[nn.Module, DataLoader]:
    splits = load_dataset("digits", seed=seed)
    torch.manual_seed(seed)
    model = train_map(mlp(64, 10), splits.train, epochs=100, seed=seed)
    return model, DataLoader(splits.train, batch_size=256)


def wide_problem(seed: int = 0, n: int = 10_000) -> tuple[nn.Module, DataLoader]:
    torch.manual_seed(seed)
    model = mlp(784, 10, hidden=(1024, 1024), activation=nn.ReLU).eval()
    x = torch.rand(n, 784)
    y = torch.randint(0, 10, (n,))
    return model, DataLoader(TensorDataset(x, y), batch_size=256)


PROBLEMS: dict[str, Callable[[], tuple[nn.Module, DataLoader]]] = {
    "digits": digits_problem,
    "wide": wide_problem,
}


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def peak_python_mib(fn: Callable[[], Any]) -> float:
    """Peak traced allocation (tensors allocated through CPython's allocator are included)."""
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="digits,wide")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fisher", default="exact")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, fisher={args.fisher}")
    print(f"{'model':<8}{'K-FAC s':>10}{'K-FOC s':>10}{'ratio':>8}{'iters':>7}{'mode':>9}")
    for name in args.models.split(","):
        model, loader = PROBLEMS[name]()

        def fit(structure: str, model: nn.Module = model, loader: DataLoader = loader) -> Any:
            return fit_curvature(model, loader, structure, args.fisher, progress=False)

        fit("kfac")  # warm-up
        t_kfac, _ = timed(lambda: fit("kfac"), args.repeats)
        t_kfoc, curv = timed(lambda: fit("kfoc"), args.repeats)
        iters = max(v["iterations"] for v in curv.convergence().values())
        print(
            f"{name:<8}{t_kfac:>10.3f}{t_kfoc:>10.3f}{t_kfoc / t_kfac:>8.2f}{iters:>7}"
            f"{curv.mode:>9}"
        )
        est = curv.info.get("cache_bytes_estimate", 0) / 2**20
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"          cache estimate {est:.1f} MiB, process peak RSS so far {rss:.0f} MiB")


if __name__ == "__main__":
    main()
