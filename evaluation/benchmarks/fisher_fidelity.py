"""Fisher fidelity on digits: per-layer relative Frobenius error of diag / K-FAC / K-FOC.

The paper's proof of concept (Schnaus, Lee & Triebel, 2021): a seeded MAP MLP 64-128-128-10 and a
small CNN (digits as 1×8×8 images). For data sets of 1, 32 and all training points, every
structure is compared with the exact summed Fisher block of those points (exact, type-2 Fisher),
in float64, matrix-free (``bayes_kfoc.diagnostics``). For 1 and 32 points errors are averaged over
``--draws`` random subsets. The K-FOC certificate (from σ₁ alone) is printed beside its error.

Run: ``python -m evaluation.benchmarks.fisher_fidelity [--draws 5] [--seed 0]``
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from bayes_kfoc.diagnostics import Fidelity, fisher_fidelity
from datasets import load_dataset
from evaluation.models import build_model
from evaluation.structures import STRUCTURES
from evaluation.training import train_map


def fidelity_table(
    model: nn.Module,
    train: torch.utils.data.Dataset,
    sizes: list[int | None],
    draws: int,
    seed: int,
) -> dict[str, dict[str, list[float]]]:
    """``{size_label: {f"{module}/{structure}": [errors per draw]}}``."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, dict[str, list[float]]] = {}
    n_total = len(train)  # type: ignore[arg-type]
    for size in sizes:
        label = "all" if size is None else str(size)
        acc: dict[str, list[float]] = defaultdict(list)
        for _ in range(1 if size is None else draws):
            idx = (
                torch.arange(n_total)
                if size is None
                else torch.randperm(n_total, generator=gen)[:size]
            )
            loader = DataLoader(Subset(train, idx.tolist()), batch_size=256)
            rows: list[Fidelity] = fisher_fidelity(
                model, loader, "exact", STRUCTURES, tol=1e-8, max_iter=2000
            )
            for r in rows:
                for s in STRUCTURES:
                    acc[f"{r.module}/{s}"].append(r.errors[s])
                if r.kfoc_certificate is not None:
                    acc[f"{r.module}/certificate"].append(r.kfoc_certificate)
        out[label] = dict(acc)
    return out


def print_table(name: str, table: dict[str, dict[str, list[float]]]) -> None:
    print(f"\n== {name}: relative Frobenius error ||F - K||/||F|| per layer (exact Fisher)")
    cols = [*STRUCTURES, "certificate"]
    print(f"{'points':>7} {'layer':>7} " + "".join(f"{c:>13}" for c in cols))
    for label, acc in table.items():
        layers = sorted({k.split("/")[0] for k in acc}, key=lambda s: (len(s), s))
        for layer in layers:
            vals = []
            for c in cols:
                v = acc.get(f"{layer}/{c}")
                vals.append(f"{sum(v) / len(v):>13.4f}" if v else f"{'-':>13}")
            print(f"{label:>7} {layer:>7} " + "".join(vals))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=100)
    args = parser.parse_args()
    sizes: list[int | None] = [1, 32, None]
    for model_name, flat in [("mlp", True), ("cnn", False)]:
        splits = load_dataset("digits", seed=args.seed, flat=flat)
        torch.manual_seed(args.seed)
        model = build_model(model_name, splits.input_shape, splits.num_classes)
        model = train_map(model, splits.train, epochs=args.epochs, seed=args.seed)
        x, y = splits.train.tensors
        train64 = TensorDataset(x.double(), y)  # float64: errors near 0 need no cancellation noise
        table = fidelity_table(model.double(), train64, sizes, args.draws, args.seed)
        print_table(f"digits {model_name} ({len(splits.train)} training points)", table)


if __name__ == "__main__":
    main()
