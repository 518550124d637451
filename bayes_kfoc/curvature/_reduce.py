"""Sums over data, all-reduced across ``torch.distributed`` ranks when a group is active."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class Reducer:
    """All-reduces (sums) tensors across ranks when ``enabled``; the identity otherwise.

    Every sum over data points in a fit passes through :meth:`sum`, so that a fit on sharded data
    equals a single-process fit on the union of the shards.
    """

    def __init__(self, enabled: bool):
        if enabled and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "distributed=True, but no torch.distributed process group is initialised; call "
                "torch.distributed.init_process_group (or launch with torchrun) first."
            )
        self.enabled = enabled

    @staticmethod
    def detect(distributed: bool | None) -> Reducer:
        if distributed is None:
            distributed = (
                dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
            )
        return Reducer(distributed)

    def sum(self, tensor: Tensor) -> Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def sum_int(self, value: int, device: torch.device) -> int:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return int(t.item())

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())
