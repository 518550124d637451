"""Where each posterior block's parameters sit in the model's full parameter vector."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


def architecture(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """``[(name, shape)]`` of every parameter, in ``named_parameters`` order."""
    return [(k, tuple(p.shape)) for k, p in model.named_parameters()]


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

    @staticmethod
    def build(model: nn.Module, blocks: dict[str, list[str]], device: torch.device) -> Layout:
        offsets: dict[str, tuple[int, int]] = {}
        pos = 0
        for k, p in model.named_parameters():
            offsets[k] = (pos, pos + p.numel())
            pos += p.numel()
        index = {}
        for name, local in blocks.items():
            parts = []
            for pname in local:
                full = f"{name}.{pname}" if name else pname
                a, b = offsets[full]
                parts.append(torch.arange(a, b, device=device))
            index[name] = torch.cat(parts)
        return Layout(pos, offsets, index)
