"""Prior tuning against its own floor: one GLM pass over the validation set.

For a trained ViT-like net (Linear layers on ``[B, T, d]``, attention from Linear layers,
LayerNorm) and a ResNet with BatchNorm on the bundled digits (8x8 images), it times in one
process, interleaved, median of ``--repeats``:

- ``glm``: one GLM probit prediction on the validation points (``la.predict``);
- ``tune``: ``la.optimize_prior_precision(val_loader=...)`` (the default grid, 29 + 7 τ values);

and prints ``tune / glm`` (the issue's target is ≤ 3x: the Jacobian-side work is done once, each
τ is a contraction in the blocks' eigenbases).

    python -m evaluation.benchmarks.tuning_speed [--structure kfac] [--val 300] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch
from torch.utils.data import DataLoader, TensorDataset

from bayes_kfoc import Laplace
from datasets import load_dataset
from evaluation.benchmarks.timing import median_time
from evaluation.training import train_map
from evaluation.zoo import resnet, vit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structure", default="kfac", choices=["kfac", "kfoc", "diag"])
    parser.add_argument("--val", type=int, default=300, help="validation points")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    splits = load_dataset("digits", seed=0, flat=False)
    xv, yv = splits.val.tensors
    xv, yv = xv[: args.val], yv[: args.val]
    print("load average: " + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    print(f"{'model':<8}{'params':>8}{'glm s':>9}{'tune s':>9}{'tune/glm':>10}  τ")
    for name, build in (("vit", lambda: vit(1, 8, 10)), ("resnet", lambda: resnet(1, 10))):
        torch.manual_seed(0)
        model = train_map(build(), splits.train, epochs=args.epochs, seed=0)
        la = Laplace(model, structure=args.structure, progress=False)
        la.fit(DataLoader(splits.train, batch_size=128))
        val = DataLoader(TensorDataset(xv, yv), batch_size=128)

        def tune(la: Laplace = la, val: DataLoader = val) -> torch.Tensor:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return la.optimize_prior_precision(val_loader=val)

        t_glm, _ = median_time(lambda la=la: la.predict(xv), args.repeats, warmup=True)
        t_tune, tau = median_time(tune, args.repeats, warmup=True)
        params = sum(p.numel() for p in model.parameters())
        print(
            f"{name:<8}{params:>8}{t_glm:>9.3f}{t_tune:>9.3f}{t_tune / t_glm:>9.1f}x  "
            f"{float(tau[0]):.3g}"
        )


if __name__ == "__main__":
    main()
