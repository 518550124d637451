"""Optional peer baseline: laplace-torch's Kronecker (``kron``) Laplace, when importable.

Imports only ``torch`` and ``laplace`` so it can be exercised in a venv holding laplace-torch
alone. The flow mirrors our Laplace methods: fit on the training loader, tune the prior
precision by a validation grid search (laplace-torch's ``gridsearch``; its default loss is the
validation NLL), predict with the GLM and the probit link; samples come from the GLM predictive.

.. warning:: Slow on all weights: laplace-torch 0.3's grid search (100 values, each a full GLM
   pass over the validation set) took about 4 minutes for the digits MLP on 2 CPU cores (20 s
   for the last layer), so ``laplace-torch`` is never part of the default methods.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["PeerLaplace", "fit_laplace_torch"]


@dataclass
class PeerLaplace:
    """A fitted laplace-torch posterior with the study's predictor interface."""

    la: Any
    fit_seconds: float
    tune_seconds: float
    prior_precision: float

    def predict(self, x: Tensor) -> Tensor:
        """GLM predictive with the probit link, ``[B, C]``."""
        probs: Tensor = self.la(x, pred_type="glm", link_approx="probit")
        return probs.detach()

    def samples(self, x: Tensor, n: int, seed: int) -> Tensor:
        """``[n, B, C]`` GLM probability samples."""
        gen = torch.Generator().manual_seed(seed)
        out: Tensor = self.la.predictive_samples(x, pred_type="glm", n_samples=n, generator=gen)
        return out.detach()


def fit_laplace_torch(
    model: nn.Module, train_loader: Iterable[Any], val_loader: Iterable[Any], subset: str
) -> PeerLaplace:
    """Fit laplace-torch's ``kron`` Laplace on ``subset`` (``"all"`` or ``"last_layer"``).

    Raises:
        ImportError: When laplace-torch is not installed (the study checks this up front).
    """
    from laplace import Laplace as LaplaceTorch

    start = time.perf_counter()
    la = LaplaceTorch(model, "classification", subset_of_weights=subset, hessian_structure="kron")
    la.fit(train_loader)
    fitted = time.perf_counter()
    la.optimize_prior_precision(
        pred_type="glm", method="gridsearch", val_loader=val_loader, link_approx="probit"
    )
    tuned = time.perf_counter()
    tau = torch.as_tensor(la.prior_precision, dtype=torch.float64).flatten()
    return PeerLaplace(la, fitted - start, tuned - fitted, float(tau.mean()))
