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
        # a one-shot loader stays one-shot (its own iterator), so the fit's check still sees it
        self.one_shot = iter(loader) is loader
        self.limit = limit
        self._xs: list[Tensor] = []
        self._ys: list[Tensor] = []
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
        if self._count < self.limit and isinstance(batch, list | tuple) and len(batch) == 2:
            x, y = batch
            same = not self._xs or x.shape[1:] == self._xs[0].shape[1:]  # one sequence length
            if isinstance(x, Tensor) and isinstance(y, Tensor) and same:
                take = min(self.limit - self._count, len(x))
                self._xs.append(x[:take].detach().cpu().clone())
                self._ys.append(y[:take].detach().cpu().clone())
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

    def sample(self) -> tuple[Tensor, Tensor] | None:
        import torch

        if not self._xs:
            return None
        return torch.cat(self._xs), torch.cat(self._ys)
