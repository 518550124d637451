"""A pass-through loader that keeps the first points it yields (for tuning without validation)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from torch import Tensor

TRAIN_SAMPLE = 1000  # training points ``Laplace.fit`` keeps for the consistency rule


class Recorder:
    """Iterates ``loader`` unchanged (``len`` and ``dataset`` pass through) and keeps a CPU copy
    of the first ``limit`` ``(x, y)`` points of its first pass (only the batches whose inputs have
    the first batch's shape, so varying sequence lengths still give one tensor)."""

    def __init__(self, loader: Iterable[Any], limit: int):
        self.loader = loader
        self.limit = limit
        self._xs: list[Tensor] = []
        self._ys: list[Tensor] = []
        self._count = 0
        self._passes = 0

    def __iter__(self) -> Iterator[Any]:
        first = self._passes == 0
        self._passes += 1
        for batch in self.loader:
            if first and self._count < self.limit and isinstance(batch, list | tuple):
                if len(batch) == 2 and all(isinstance(t, Tensor) for t in batch):
                    x, y = batch
                    if self._xs and x.shape[1:] != self._xs[0].shape[1:]:
                        yield batch  # another sequence length: the sample keeps one shape
                        continue
                    take = min(self.limit - self._count, len(x))
                    self._xs.append(x[:take].detach().cpu().clone())
                    self._ys.append(y[:take].detach().cpu().clone())
                    self._count += take
            yield batch

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    @property
    def dataset(self) -> Any:
        return getattr(self.loader, "dataset", None)

    def sample(self) -> tuple[Tensor, Tensor] | None:
        import torch

        if not self._xs:
            return None
        return torch.cat(self._xs), torch.cat(self._ys)
