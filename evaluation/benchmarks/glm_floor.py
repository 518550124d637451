"""The GLM predictive's cost on the study's CNN at MNIST size, against its own floor (issue 14).

One GLM probit pass over ``--points`` 1×28×28 inputs with the study's CNN (10 classes), all
weights, each structure, split into its parts and compared with:

- ``forward``: the MAP network's forward pass over the same points (what the MAP baseline costs);
- ``jacobians``: the per-point Jacobian statistics alone (``Collector.jacobians``: one forward and
  a backward pass per class to every layer's output, and the per-layer statistics), the least
  any exact GLM predictive needs (``C`` vector-Jacobian products per point);
- ``glm``: the whole ``Laplace.glm_distribution`` (Jacobians, then ``J (F + τI)^{-1} Jᵀ`` per
  block in its eigenbasis).

The posterior is fitted on ``--fit-points`` random inputs (its values do not change the cost).
Run: ``python -m evaluation.benchmarks.glm_floor [--points 2000] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import os

import torch

from bayes_kfoc import Laplace
from bayes_kfoc.laplace.predictive import jacobians
from evaluation.benchmarks.timing import median_time
from evaluation.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--points", type=int, default=2000)
    parser.add_argument("--fit-points", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load {os.getloadavg()}")
    torch.manual_seed(0)
    model = build_model("cnn", (1, 28, 28), 10).eval()
    x = torch.rand(args.points, 1, 28, 28)
    xf, yf = torch.rand(args.fit_points, 1, 28, 28), torch.randint(0, 10, (args.fit_points,))
    params = sum(p.numel() for p in model.parameters())
    print(f"study CNN: {params:,} parameters; {args.points} points of 1x28x28, 10 classes")

    def forward() -> None:
        with torch.no_grad():
            for xb in x.split(256):
                model(xb)

    t_fwd, _ = median_time(forward, args.repeats, warmup=True)
    print(
        f"\n{'structure':<10}{'forward s':>11}{'jacobians s':>13}{'glm s':>9}"
        f"{'glm/fwd':>9}{'glm/jac':>9}"
    )
    for structure in ("diag", "kfac", "kfoc"):
        la = Laplace(model, structure=structure, prior_precision=1.0, progress=False)
        la.fit([(xf[i : i + 256], yf[i : i + 256]) for i in range(0, args.fit_points, 256)])
        view = la.view()
        t_jac, _ = median_time(lambda view=view: jacobians(view, x), args.repeats, warmup=True)
        t_glm, _ = median_time(lambda la=la: la.glm_distribution(x), args.repeats)
        print(
            f"{structure:<10}{t_fwd:>11.2f}{t_jac:>13.2f}{t_glm:>9.2f}"
            f"{t_glm / t_fwd:>9.1f}{t_glm / t_jac:>9.2f}"
        )
    print(f"\nload at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
