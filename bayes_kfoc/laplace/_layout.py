"""Where each posterior block's parameters sit in the model's full parameter vector."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

Architecture = list[tuple[str, tuple[int, ...]]]


def architecture(model: nn.Module) -> Architecture:
    """``[(name, shape)]`` of every parameter, in ``named_parameters`` order."""
    return [(k, tuple(p.shape)) for k, p in model.named_parameters()]


def check_architecture(expected: Architecture, model: nn.Module, what: str, fix: str) -> None:
    """Raise a ``ValueError`` naming the first parameter where ``model`` differs from
    ``expected`` (``[(name, shape)]``); ``what`` prefixes the message, ``fix`` ends it."""
    ours = architecture(model)
    for i in range(max(len(expected), len(ours))):
        a = expected[i] if i < len(expected) else None
        b = ours[i] if i < len(ours) else None
        if a != b:
            raise ValueError(
                f"{what}: architecture mismatch at parameter #{i}: the posterior has {a}, the "
                f"model has {b}. {fix}"
            )


@dataclass(frozen=True)
class Layout:
    """Offsets of every parameter inside ``parameters_to_vector(model.parameters())``.

    ``block_index[name]`` is a ``LongTensor`` of the full-vector positions of the block's
    parameters, in the block's own order (``parameters_to_vector(module.parameters())`` of that
    module's own parameters).
    """

    num_params: int
    offsets: dict[str, tuple[int, int]]
    block_index: dict[str, Tensor]
    block_slice: dict[str, slice | None]

    @staticmethod
    def build(model: nn.Module, blocks: dict[str, list[str]], device: torch.device) -> Layout:
        offsets: dict[str, tuple[int, int]] = {}
        pos = 0
        for k, p in model.named_parameters():
            offsets[k] = (pos, pos + p.numel())
            pos += p.numel()
        index: dict[str, Tensor] = {}
        slices: dict[str, slice | None] = {}
        for name, local in blocks.items():
            # a block of a parameter the model itself owns is named by the parameter
            ranges = [offsets.get(f"{name}.{p}") or offsets[p] for p in local]
            index[name] = torch.cat([torch.arange(a, b, device=device) for a, b in ranges])
            contiguous = all(r[1] == s[0] for r, s in itertools.pairwise(ranges))
            slices[name] = slice(ranges[0][0], ranges[-1][1]) if contiguous else None
        return Layout(pos, offsets, index, slices)

    def scatter_add_(self, name: str, full: Tensor, values: Tensor) -> None:
        """``full[..., positions of block name] += values`` (a slice when contiguous)."""
        sl = self.block_slice[name]
        if sl is not None:
            full[..., sl] += values
        else:
            full[..., self.block_index[name]] += values
