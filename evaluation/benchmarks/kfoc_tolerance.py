"""K-FOC's tolerance: fit time against the one-step floor, and the fidelity each tolerance buys.

For trained networks (the digits MLP 64-128-128-10 and a ViT-like net on 8x8 digit images,
Linear layers on ``[B, 16, 32]``), it fits K-FOC at several ``tol`` and prints, per tolerance:

- ``time / floor``: the fit's time over that of a fit capped at one Lanczos step
  (``max_iter=1``), median of ``--repeats``, interleaved in one process;
- ``excess``: the largest relative excess of the block's Frobenius error over the optimum's,
  ``(‖F − G⊗A‖ − ‖F − K*‖) / ‖F − K*‖`` over the layers, with ``K*`` a float64 fit at
  ``tol=1e-12`` and the errors computed exactly and matrix-free
  (:func:`bayes_kfoc.diagnostics.fisher_fidelity`).

At the optimum the error is second order in the factor error, so ``excess`` falls like ``tol²``.

    python -m evaluation.benchmarks.kfoc_tolerance [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from bayes_kfoc import fit_curvature
from bayes_kfoc.curvature import ConvergenceWarning
from bayes_kfoc.diagnostics import fisher_fidelity
from datasets import load_dataset
from evaluation.benchmarks.timing import median_time
from evaluation.models import mlp
from evaluation.training import train_map
from evaluation.zoo import vit

TOLS = (1e-2, 1e-3, 1e-4, 1e-6)


def _problems(points: int) -> list[tuple[str, nn.Module, DataLoader]]:
    flat = load_dataset("digits", seed=0)
    images = load_dataset("digits", seed=0, flat=False)
    torch.manual_seed(0)
    m1 = train_map(mlp(64, 10), flat.train, epochs=100, seed=0)
    torch.manual_seed(0)
    m2 = train_map(vit(1, 8, 10), images.train, epochs=30, seed=0)
    sub = Subset(images.train, range(min(points, len(images.train))))
    return [
        ("mlp", m1, DataLoader(flat.train, batch_size=256)),
        ("vit", m2, DataLoader(sub, batch_size=128)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vit-points", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", ConvergenceWarning)
    print("load average: " + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    print(f"{'model':<6}{'tol':>8}{'time/floor':>12}{'excess':>12}{'half-steps':>12}")
    for name, model, loader in _problems(args.vit_points):
        loader64 = LoaderAs(loader, torch.float64)
        opt = fit_curvature(
            model.double(), loader64, "kfoc", tol=1e-12, max_iter=1000, progress=False
        )
        rows0 = fisher_fidelity(model, loader64, structures=(), curvatures={"kfoc": opt})
        ref = {r.module: r.errors["kfoc"] for r in rows0}
        model.float()

        def fit(tol: float, max_iter: int = 100, model: nn.Module = model,
                loader: DataLoader = loader) -> object:  # fmt: skip
            return fit_curvature(model, loader, "kfoc", tol=tol, max_iter=max_iter, progress=False)

        t_floor, _ = median_time(lambda: fit(1e-12, 1), args.repeats, warmup=True)
        for tol in TOLS:
            t, curv = median_time(lambda tol=tol: fit(tol), args.repeats)
            cd = curv.to(dtype=torch.float64)  # type: ignore[attr-defined]
            model.double()
            rows = fisher_fidelity(model, loader64, structures=(),
                                   curvatures={"kfoc": cd})  # fmt: skip
            model.float()
            excess = max(
                (r.errors["kfoc"] - ref[r.module]) / ref[r.module]
                for r in rows
                if r.module in ref and ref[r.module] > 0 and r.errors.get("kfoc") is not None
            )
            half = max(int(i.get("half_steps", 0)) for i in cd.convergence().values())
            print(f"{name:<6}{tol:>8.0e}{t / t_floor:>11.2f}x{excess:>12.2e}{half:>12}")


class LoaderAs:
    """``loader`` with floating inputs cast to ``dtype``."""

    def __init__(self, loader: DataLoader, dtype: torch.dtype):
        self.loader, self.dtype = loader, dtype

    def __iter__(self):  # type: ignore[no-untyped-def]
        for x, y in self.loader:
            yield x.to(self.dtype), y

    def __len__(self) -> int:
        return len(self.loader)


if __name__ == "__main__":
    main()
