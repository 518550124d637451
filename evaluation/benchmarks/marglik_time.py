"""Marglik training time against plain training, and where the time goes.

On the study's digits network (CNN by default), the same number of epochs of plain Adam training
(``evaluation.training.train_map``'s loop) and of ``bayes_kfoc.marglik_training`` at
``frequency=1`` (a curvature refit and 100 hyper-steps every epoch) for each structure, in the
same process, interleaved (plain, then each structure, repeated ``--repeats`` times, the median
kept) so that the ratio means something under load. Prints the ratios (the issue's bars: K-FAC ≤
2×, K-FOC ≤ 3×), the per-epoch profile (training steps / curvature fit / hyper-steps), K-FOC's
solver iterations per refit, and the load average before and after.

    python -m evaluation.benchmarks.marglik_time [--model cnn] [--epochs 5] [--repeats 3]
        [--fisher exact|mc]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn
from torch.utils.data import DataLoader

from bayes_kfoc import marglik_training
from datasets import load_dataset
from evaluation.models import build_model


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _plain(model: nn.Module, loader: DataLoader, epochs: int) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--structures", default="kfac,kfoc,diag")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fisher", default="exact", help="exact, mc or empirical")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average before: {_load()}  (threads {args.threads})")
    splits = load_dataset(args.dataset, seed=0, flat=args.model == "mlp")
    structures = args.structures.split(",")

    def fresh() -> nn.Module:
        torch.manual_seed(0)
        return build_model(args.model, splits.input_shape, splits.num_classes)

    def loader() -> DataLoader:
        gen = torch.Generator().manual_seed(0)
        return DataLoader(splits.train, batch_size=args.batch_size, shuffle=True, generator=gen)

    plain: list[float] = []
    runs: dict[str, list[float]] = {s: [] for s in structures}
    profile: dict[str, tuple[float, float, float, list[int | None]]] = {}
    for _ in range(args.repeats):
        plain.append(_plain(fresh(), loader(), args.epochs))
        for s in structures:
            start = time.perf_counter()
            result = marglik_training(
                fresh(), loader(), s, epochs=args.epochs, fisher=args.fisher, progress=False
            )
            runs[s].append(time.perf_counter() - start)
            h = result.history
            fit = sum(e.fit_seconds for e in h)
            hyper = sum(e.hyper_seconds for e in h)
            total = sum(e.seconds for e in h)
            profile[s] = (total - fit - hyper, fit, hyper, [e.solver_iterations for e in h])
    base = statistics.median(plain)
    n = len(splits.train)
    print(
        f"{args.dataset} {args.model}, {n} training points, batch {args.batch_size}, "
        f"{args.epochs} epochs, median of {args.repeats}, fisher={args.fisher}"
    )
    print(f"plain training: {base:.2f} s ({base / args.epochs:.3f} s/epoch)")
    print(f"{'structure':<10}{'seconds':>9}{'ratio':>8}  profile of the last run per epoch")
    for s in structures:
        t = statistics.median(runs[s])
        train_s, fit_s, hyper_s, its = profile[s]
        e = args.epochs
        print(
            f"{s:<10}{t:>9.2f}{t / base:>8.2f}  train {train_s / e:.3f} s, fit {fit_s / e:.3f} s, "
            f"hyper-steps {hyper_s / e:.3f} s"
            + (f", K-FOC iterations per refit {its}" if s == "kfoc" else "")
        )
    print(f"load average after: {_load()}")


if __name__ == "__main__":
    main()
