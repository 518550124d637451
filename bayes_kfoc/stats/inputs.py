"""Model inputs: a tensor ``[N, ...]`` (``model(x)``) or a mapping of keyword arguments
(``model(**x)``, e.g. ``{"input_ids": ..., "attention_mask": ...}``) whose tensor values share
the batch dimension ``N`` (non-tensor values are passed through unchanged)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

Inputs = Tensor | Mapping[str, Any]

Batches = list[tuple[Inputs, Tensor]]
"""``(x, y)`` batches kept in memory (e.g. for tuning): tensor or mapping inputs, labels ``[N]``;
the batches need not share a shape (sequence lengths may differ)."""


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


def _signature(x: Inputs) -> object:
    if isinstance(x, Tensor):
        return (x.shape[1:], x.dtype, x.device)
    return tuple(
        (k, (v.shape[1:], v.dtype, v.device) if isinstance(v, Tensor) else id(v))
        for k, v in x.items()
    )


def merge_batches(batches: Batches) -> Batches:
    """Consecutive ``(x, y)`` batches whose inputs agree in everything but the batch size (the
    same trailing shapes, dtypes and devices; for a mapping the same keys too) concatenated, so
    that batches of one sequence length are one batch."""
    out: Batches = []
    run: Batches = []

    def flush() -> None:
        if not run:
            return
        xs, ys = [b[0] for b in run], torch.cat([b[1] for b in run])
        first = xs[0]
        if isinstance(first, Tensor):
            out.append((torch.cat(xs), ys))  # type: ignore[arg-type]
        else:
            out.append(
                (
                    {
                        k: torch.cat([x[k] for x in xs]) if isinstance(v, Tensor) else v  # type: ignore[index]
                        for k, v in first.items()
                    },
                    ys,
                )
            )
        run.clear()

    for b in batches:
        if run and _signature(run[0][0]) != _signature(b[0]):
            flush()
        run.append(b)
    flush()
    return out
