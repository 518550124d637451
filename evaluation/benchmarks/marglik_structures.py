"""Marglik training with every structure on a net small enough for dense blocks (the full-GGN
reference row the study's MLP is too big for).

A digits MLP ``64 → 16 → 16 → 10`` (Tanh, 1,562 parameters; the largest dense block is 1,040²)
is trained from the same initialisation with ``bayes_kfoc.marglik_training`` at its defaults
for each structure (``full``, ``kfoc``, ``kfac``, ``diag``), with plain MAP training (Adam, no
weight decay) as the baseline, for ``--seeds`` seeds. Printed per structure: test NLL, ECE,
accuracy and the entropy score's AUROC against uniform noise (far OOD), mean ± sd over seeds.
The Laplace Redux ordering (Table 2, Fashion-MNIST CNNs) is full > K-FAC > diag in OOD AUROC.

    python -m evaluation.benchmarks.marglik_structures [--seeds 3] [--epochs 100]
"""

from __future__ import annotations

import argparse
import os
import statistics

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from bayes_kfoc import marglik_training
from datasets import load_dataset, load_ood
from evaluation.metrics.calibration import ece
from evaluation.metrics.classification import accuracy, nll
from evaluation.metrics.ood import auroc, predictive_entropy
from evaluation.models import mlp
from evaluation.training import train_map


def _row(probs: torch.Tensor, probs_ood: torch.Tensor, y: torch.Tensor) -> list[float]:
    p, q, labels = probs.double().numpy(), probs_ood.double().numpy(), y.numpy()
    ent_in, ent_out = -predictive_entropy(p), -predictive_entropy(q)
    return [nll(p, labels), ece(p, labels), accuracy(p, labels), auroc(ent_in, ent_out)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--structures", default="full,kfoc,kfac,diag")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("load average before: " + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    rows: dict[str, list[list[float]]] = {}
    for seed in range(args.seeds):
        splits = load_dataset("digits", seed=seed, flat=True)
        x, y = splits.test.tensors
        noise = load_ood("uniform", splits, seed=seed)

        def fresh(seed: int = seed) -> nn.Module:
            torch.manual_seed(seed)
            return mlp(64, 10, hidden=(16, 16))

        net = train_map(fresh(), splits.train, epochs=args.epochs, weight_decay=0.0, seed=seed)
        with torch.no_grad():
            rows.setdefault("map", []).append(_row(net(x).softmax(-1), net(noise).softmax(-1), y))
        for s in args.structures.split(","):
            gen = torch.Generator().manual_seed(seed)
            loader = DataLoader(splits.train, batch_size=64, shuffle=True, generator=gen)
            result = marglik_training(
                fresh(), loader, s, epochs=args.epochs, seed=seed, progress=False
            )
            la = result.laplace
            rows.setdefault(f"marglik-{s}", []).append(_row(la.predict(x), la.predict(noise), y))
            print(f"seed {seed} {s}: {np.round(rows[f'marglik-{s}'][-1], 4).tolist()}", flush=True)
    print(f"digits MLP 64-16-16-10, {args.epochs} epochs, {args.seeds} seeds (mean ± sd)")
    print(f"{'method':<15}{'NLL':>16}{'ECE':>16}{'acc':>16}{'AUROC uniform':>16}")
    for name, values in rows.items():
        cells = []
        for j in range(4):
            col = [v[j] for v in values]
            sd = statistics.stdev(col) if len(col) > 1 else 0.0
            cells.append(f"{statistics.mean(col):.4f} ± {sd:.4f}")
        print(f"{name:<15}" + "".join(f"{c:>16}" for c in cells))
    print("load average after: " + " ".join(f"{v:.2f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
