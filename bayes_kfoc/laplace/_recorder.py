"""A pass-through loader that keeps the first points it yields (for tuning without validation)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from ..stats.inputs import Batches, batch_size, inputs_to, merge_batches, split_inputs

TRAIN_SAMPLE = 1000  # training points ``Laplace.fit`` keeps for the consistency rule


class Recorder:
    """Iterates ``loader`` unchanged (``len`` and ``dataset`` pass through) and keeps a CPU copy
    of the first ``limit`` points of its first pass, as ``(x, y)`` batches (tensor or mapping
    inputs, any sequence length)."""

    def __init__(self, loader: Iterable[Any], limit: int):
        self.loader = loader
        # a one-shot loader stays one-shot (its own iterator), so the fit's check still sees it
        self.one_shot = iter(loader) is loader
        self.limit = limit
        self._batches: Batches = []
        self._count = 0
        self._passes = 0

    def __iter__(self) -> Iterator[Any]:
        if self.one_shot:  # its own iterator, like the loader: the fit's one-shot check sees it
            return self
        return self._records()

    def __next__(self) -> Any:
        batch = next(self.loader)  # type: ignore[call-overload]
        self._record(batch)
        return batch

    def _record(self, batch: Any) -> None:
        if self._count >= self.limit or not isinstance(batch, list | tuple) or len(batch) != 2:
            return
        x, y = batch
        if not isinstance(x, Tensor | Mapping) or not isinstance(y, Tensor):
            return
        take = min(self.limit - self._count, batch_size(x))
        x = split_inputs(inputs_to(x, torch.device("cpu")), take)[0]
        if isinstance(x, Tensor):
            x = x.detach().clone()
        else:
            x = {k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in x.items()}
        self._batches.append((x, y[:take].detach().cpu().clone()))
        self._count += take

    def _records(self) -> Iterator[Any]:
        first = self._passes == 0
        self._passes += 1
        for batch in self.loader:
            if first:
                self._record(batch)
            yield batch

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    @property
    def dataset(self) -> Any:
        return getattr(self.loader, "dataset", None)

    def sample(self) -> Batches | None:
        return merge_batches(self._batches) or None
