r"""Temperature scaling (Guo et al., 2017): one scalar ``T`` that rescales the logits.

The calibrated predictive is ``softmax(f(x) / T)``. ``T`` minimises the validation NLL

.. math::
    \mathcal L(T) = -\frac1N \sum_n \log \operatorname{softmax}(f(x_n)/T)_{y_n},

optimised over ``log T`` (so ``T > 0`` without constraints) with L-BFGS and a strong-Wolfe line
search, in float64. Accuracy is unchanged: dividing by ``T > 0`` keeps the arg-max.

References:
    C. Guo, G. Pleiss, Y. Sun, K. Q. Weinberger. On Calibration of Modern Neural Networks.
    ICML 2017.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from bayes_kfoc.stats import call_model

__all__ = ["TemperatureScaled", "fit_temperature"]


def fit_temperature(logits: Tensor, labels: Tensor, *, max_iter: int = 100) -> float:
    """The temperature minimising the mean NLL of ``softmax(logits / T)``.

    Args:
        logits: Validation logits ``[N, C]`` (any float dtype; optimised in float64).
        labels: Validation labels ``[N]``, int64 in ``[0, C)``.
        max_iter: L-BFGS iterations.

    Returns:
        ``T > 0``.

    Raises:
        ValueError: On mismatched shapes, non-finite logits, or an optimisation that ends on a
            non-finite temperature or loss.
    """
    if logits.dim() != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(
            f"fit_temperature: need logits [N, C] and labels [N], got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}."
        )
    if not torch.isfinite(logits).all():
        raise ValueError("fit_temperature: the validation logits contain NaN or Inf.")
    z = logits.detach().to(torch.float64)
    y = labels.detach()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [log_t], lr=1.0, max_iter=max_iter, tolerance_grad=1e-12, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    temperature = float(log_t.detach().exp())
    final = float(nn.functional.cross_entropy(z / temperature, y))
    if not (math.isfinite(temperature) and temperature > 0 and math.isfinite(final)):
        raise ValueError(
            f"fit_temperature: L-BFGS ended at T={temperature!r} (validation NLL {final!r})."
        )
    return temperature


class TemperatureScaled:
    """A classifier whose logits are divided by a fitted temperature.

    Args:
        model: The trained classifier (logits ``[B, C]``), in eval mode.
        temperature: ``T > 0``.
    """

    def __init__(self, model: nn.Module, temperature: float):
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"TemperatureScaled: temperature must be > 0, got {temperature!r}.")
        self.model = model
        self.temperature = float(temperature)

    @classmethod
    def fit(cls, model: nn.Module, x_val: Tensor, y_val: Tensor) -> TemperatureScaled:
        """Fit ``T`` on the validation set (see :func:`fit_temperature`)."""
        with torch.no_grad():
            logits = call_model(model, x_val)
        return cls(model, fit_temperature(logits, y_val))

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Class probabilities ``softmax(f(x) / T)``, ``[B, C]``."""
        return torch.softmax(call_model(self.model, x) / self.temperature, dim=-1)
