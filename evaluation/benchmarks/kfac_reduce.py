"""K-FAC "expand" against "reduce" against K-FOC on a transformer text classifier (issue 12).

A seeded ``evaluation.zoo.text_transformer`` (PyTorch's ``nn.TransformerEncoder``, dict inputs,
padding mask, masked mean pooling) is trained briefly on ``evaluation.zoo.token_task``. For every
Kronecker block (the attention in-projections and ``out_proj``, the feed-forward Linears, the
head) the relative Frobenius error ``||F − K|| / ||F||`` against the exact summed Fisher block
of the training points (exact Fisher, float64, matrix-free: ``bayes_kfoc.diagnostics``) is
printed for K-FAC expand, K-FAC reduce (the default for Linear layers over sequences) and K-FOC.

Run: ``python -m evaluation.benchmarks.kfac_reduce [--points 256] [--seed 0]``
"""

from __future__ import annotations

import argparse
import os

import torch
from torch.utils.data import DataLoader, Dataset

from bayes_kfoc import fit_curvature
from bayes_kfoc.diagnostics import fisher_fidelity
from evaluation.zoo import text_transformer, token_task


class Tokens(Dataset[tuple[dict[str, torch.Tensor], torch.Tensor]]):
    def __init__(self, x: dict[str, torch.Tensor], y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return {k: v[i] for k, v in self.x.items()}, self.y[i]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--points", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load {os.getloadavg()}")
    torch.manual_seed(args.seed)
    x, y = token_task(args.points, seed=args.seed)
    model = text_transformer(50, 3, dim=16, depth=2, heads=2, ff=32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    train = DataLoader(Tokens(x, y), batch_size=32, shuffle=True)
    for _ in range(args.epochs):
        for xb, yb in train:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(**xb), yb).backward()
            opt.step()
    model = model.double().eval()
    with torch.no_grad():
        acc = (model(**x).argmax(1) == y).double().mean().item()
    print(f"training accuracy {acc:.3f} on {args.points} points")
    loader = DataLoader(Tokens(x, y), batch_size=64)
    fits = {
        "kfac expand": fit_curvature(
            model, loader, "kfac", kfac_reduction="expand", progress=False
        ),
        "kfac reduce": fit_curvature(
            model, loader, "kfac", kfac_reduction="reduce", progress=False
        ),
        "kfoc": fit_curvature(model, loader, "kfoc", tol=1e-8, max_iter=1000, progress=False),
    }
    rows = fisher_fidelity(model, loader, "exact", curvatures=fits)
    print(f"\n{'module':<34}" + "".join(f"{s:>13}" for s in fits))
    for r in rows:
        if type(fits["kfoc"].blocks[r.module]).__name__ != "KronBlock":
            continue
        print(f"{r.module:<34}" + "".join(f"{r.errors[s]:>13.4f}" for s in fits))


if __name__ == "__main__":
    main()
