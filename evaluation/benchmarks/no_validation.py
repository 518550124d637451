"""Prior tuning without validation data: the default (training-consistency rule) against the
evidence and the MAP, all weights, on the study's models and data.

For each data set / model / seed it trains the study's MAP network (same settings: Adam, 100
epochs, weight decay 1e-4), fits an all-weights Laplace posterior and prints test NLL and ECE of
the MAP, of ``optimize_prior_precision(method="marglik")`` (per-module evidence) and of
``optimize_prior_precision()`` with no arguments (the consistency rule), plus the chosen prior
scale. The issue's bar (digits MLP): NLL ≤ the MAP's and ECE ≤ 0.03.

    python -m evaluation.benchmarks.no_validation [--structure kfoc] [--seeds 3] [--models mlp,cnn]
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch
from torch.utils.data import DataLoader

from bayes_kfoc import Laplace
from datasets import load_dataset
from evaluation.metrics.calibration import ece
from evaluation.models import build_model
from evaluation.training import train_map


def _nll(probs: torch.Tensor, y: torch.Tensor) -> float:
    return float(-probs.gather(1, y[:, None]).clamp_min(1e-12).log().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structure", default="kfoc")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--datasets", default="digits,digits04")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("load average: " + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    head = f"{'data':<9}{'model':<6}{'seed':>4}  {'MAP nll/ece':>13}  {'marglik':>13}  "
    print(head + f"{'default':>13}  scale")
    for name in args.datasets.split(","):
        for model_name in args.models.split(","):
            for seed in range(args.seeds):
                splits = load_dataset(name, seed=seed, flat=model_name == "mlp")
                torch.manual_seed(seed)
                model = build_model(model_name, splits.input_shape, splits.num_classes)
                model = train_map(model, splits.train, epochs=100, seed=seed)
                xt, yt = splits.test.tensors
                with torch.no_grad():
                    p_map = torch.softmax(model(xt), -1)
                la = Laplace(model, structure=args.structure, progress=False)
                la.fit(DataLoader(splits.train, batch_size=128))
                row = [(_nll(p_map, yt), ece(p_map.numpy(), yt.numpy()))]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    la.optimize_prior_precision(method="marglik")
                    p = la.predict(xt)
                    row.append((_nll(p, yt), ece(p.numpy(), yt.numpy())))
                    la.optimize_prior_precision()
                    p = la.predict(xt)
                    row.append((_nll(p, yt), ece(p.numpy(), yt.numpy())))
                cells = "  ".join(f"{a:>6.3f}/{b:.3f}" for a, b in row)
                scale = la.tuning.scale if la.tuning is not None else float("nan")
                print(f"{name:<9}{model_name:<6}{seed:>4}  {cells}  {scale:.3g}", flush=True)


if __name__ == "__main__":
    main()
