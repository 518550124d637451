"""The default tuning on hand-built realistic models: a ResNet with BatchNorm and a ViT-like net.

Each is trained on the bundled digits as 8x8 images (Adam, weight decay 1e-4, ``--epochs``),
then an all-weights Laplace posterior is fitted and tuned with the library's defaults on the
validation split. It prints test NLL / ECE of the MAP and of the posterior, the chosen prior
scale ``s`` and temperature ``T``, and whether ``s`` lies inside the searched range (the issue's
check: inside the range, and NLL ≤ the MAP's).

    python -m evaluation.benchmarks.realistic_models [--structure kfoc] [--epochs 30]
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
from evaluation.training import train_map
from evaluation.zoo import resnet, vit


def _nll(probs: torch.Tensor, y: torch.Tensor) -> float:
    return float(-probs.gather(1, y[:, None]).clamp_min(1e-12).log().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structure", default="kfoc")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("load average: " + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    splits = load_dataset("digits", seed=args.seed, flat=False)
    xt, yt = splits.test.tensors
    print(f"{'model':<8}{'MAP nll/ece':>14}{'Laplace nll/ece':>17}{'s':>10}{'T':>7}  inside")
    for name, build in (("resnet", lambda: resnet(1, 10)), ("vit", lambda: vit(1, 8, 10))):
        torch.manual_seed(args.seed)
        model = train_map(build(), splits.train, epochs=args.epochs, seed=args.seed)
        with torch.no_grad():
            p_map = torch.softmax(model(xt), -1)
        la = Laplace(model, structure=args.structure, progress=False)
        la.fit(DataLoader(splits.train, batch_size=128))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            la.optimize_prior_precision(val_loader=DataLoader(splits.val, batch_size=128))
        p = la.predict(xt)
        tuning = la.tuning
        assert tuning is not None and tuning.scale is not None
        print(
            f"{name:<8}{_nll(p_map, yt):>7.3f}/{ece(p_map.numpy(), yt.numpy()):.3f}"
            f"{_nll(p, yt):>10.3f}/{ece(p.numpy(), yt.numpy()):.3f}{tuning.scale:>10.3g}"
            f"{la.temperature:>7.2f}  {not tuning.at_edge}",
            flush=True,
        )


if __name__ == "__main__":
    main()
