"""Model inputs: a tensor ``[N, ...]`` (``model(x)``) or a mapping of keyword arguments
(``model(**x)``, e.g. ``{"input_ids": ..., "attention_mask": ...}``) whose tensor values share
the batch dimension ``N`` (non-tensor values are passed through unchanged)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

Inputs = Tensor | Mapping[str, Any]


def first_tensor(x: Inputs, what: str = "fit_curvature") -> Tensor:
    """The tensor that gives the batch size (the first tensor value of a mapping)."""
    if isinstance(x, Tensor):
        return x
    for v in x.values():
        if isinstance(v, Tensor):
            return v
    raise TypeError(
        f"{what}: the input mapping has no tensor values (keys {list(x)}); at least one value "
        "must be a batched tensor [N, ...]."
    )


def batch_size(x: Inputs) -> int:
    return int(first_tensor(x).shape[0])


def check_mapping(x: Mapping[str, Any], what: str) -> None:
    """Raise unless every tensor value of ``x`` has the batch size of the first one."""
    n = batch_size(x)
    bad = {k: tuple(v.shape) for k, v in x.items() if isinstance(v, Tensor) and v.shape[:1] != (n,)}
    if bad:
        raise ValueError(
            f"{what}: the tensor values of an input mapping must share the batch size {n} "
            f"(that of its first tensor); got {bad}."
        )


def inputs_to(x: Inputs, device: torch.device) -> Inputs:
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in x.items()
    }


def split_inputs(x: Inputs, size: int) -> list[Inputs]:
    """Chunks of ``size`` points (every tensor value split along its batch dimension)."""
    if isinstance(x, Tensor):
        return list(torch.split(x, size))
    n = batch_size(x)
    return [
        {k: v[s : s + size] if isinstance(v, Tensor) else v for k, v in x.items()}
        for s in range(0, n, size)
    ]
