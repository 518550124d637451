"""The probe: one forward pass that tells which parameter owners a model calls, in which order
and how often (weight sharing), before any statistics are collected."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .attention import exposed_attention
from .batch import call_model
from .inputs import Inputs
from .targets import owners


def probe(model: nn.Module, x: Inputs) -> tuple[list[str], dict[str, int], Tensor]:
    """One forward pass (no backward): call order and call counts of parameter owners."""
    order: list[str] = []
    counts: dict[str, int] = {}
    handles = []
    for name, module in owners(model).items():

        def hook(mod: nn.Module, args: Any, out: Any, name: str = name) -> None:
            counts[name] = counts.get(name, 0) + 1
            if name not in order:
                order.append(name)

        handles.append(module.register_forward_hook(hook))
    try:
        # with gradients, as the fit runs: PyTorch's fused transformer fast path (and its nested
        # tensors) is off then, so the probe sees the modules the fit will see
        with torch.enable_grad(), exposed_attention(model, _ignore):
            out = call_model(model, x, "fit_curvature").detach()
    finally:
        for h in handles:
            h.remove()
    return order, counts, out


def _ignore(*args: Any) -> None:
    return None
