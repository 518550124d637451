"""Which dimension of a module's input or output is the batch: 0 (batch first) or 1 (sequence
first, e.g. ``nn.TransformerEncoderLayer(batch_first=False)``'s Linear layers on ``[L, N, E]``).

Statistics are per point, so a module applied to ``[L, N, E]`` must not have its ``L`` positions
taken for points. The dimension of size ``N`` (the batch size) is the batch; when both are of
size ``N`` (``L == N``), the module's dimension seen on an earlier batch decides, or else one
forward pass on ``N − 1`` points does (:class:`BatchDims`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .batch import call_model
from .inputs import Inputs, split_inputs

SHARED = -1
"""The tensor has no batch dimension: every point uses it (the collector hands it on expanded
along the batch, :func:`expand_batch`)."""


FOLDED = -2
"""The tensor's first dimension is ``k·N`` (``k > 1``): a module that folds the batch, e.g. window
attention on ``[N·windows, tokens, C]``; batch-major (point ``n`` owns rows ``n·k … n·k + k − 1``),
which the collector checks on the first batch."""


def expand_batch(t: Tensor, n: int) -> Tensor:
    """``t`` (no batch dimension) as ``n`` points' copies, batch first: a leading dimension of
    size one becomes ``n`` (``[1, T, E] -> [n, T, E]``), else one is prepended (``[T, E] ->
    [n, T, E]``). A real copy, so later in-place operations stay legal."""
    if t.ndim >= 1 and t.shape[0] == 1:
        return t.expand(n, *t.shape[1:]).contiguous()
    return t.unsqueeze(0).expand(n, *t.shape).contiguous()


def candidates(shape: Sequence[int], n: int) -> list[int]:
    """Dimensions (0 and 1) of ``shape`` that could be the batch of ``n`` points."""
    return [d for d in (0, 1) if len(shape) > d + (d == 1) and shape[d] == n]


class BatchDims:
    """Remembers each module's batch dimension (see the module docstring)."""

    def __init__(self) -> None:
        self.known: dict[str, int] = {}

    def decide(
        self,
        name: str,
        shape: Sequence[int],
        n: int,
        what: str,
        shared_ok: bool = False,
        fold_ok: bool = False,
    ) -> int | None:
        """The batch dimension of module ``name`` for a tensor of ``shape`` in a batch of ``n``
        points, or ``None`` when only a pass on fewer points can tell (:meth:`resolve`), or
        :data:`SHARED` when the tensor has no batch dimension (e.g. a position embedding of
        ``arange(T)``, broadcast over the batch later) and ``shared_ok``, or :data:`FOLDED` when
        its first dimension is a multiple ``k·N`` of the batch and ``fold_ok``."""
        c = candidates(shape, n)
        if not c and fold_ok and n > 1 and len(shape) > 1 and shape[0] > n and shape[0] % n == 0:
            return FOLDED
        if not c and shared_ok:
            return SHARED
        if not c:
            raise ValueError(
                f"fit_curvature: module {name!r} got an {what} of shape {tuple(shape)} in a batch "
                f"of {n} points: neither dimension 0 nor 1 is the batch. Statistics are per "
                "point, so the module must keep the batch in dimension 0 (or 1, sequence first); "
                "exclude it with exclude=[...] otherwise."
            )
        if len(c) == 1:
            if self.known.setdefault(name, c[0]) != c[0]:
                raise ValueError(
                    f"fit_curvature: module {name!r} had its batch in dimension "
                    f"{self.known[name]} before and now in {c[0]} ({what} {tuple(shape)})."
                )
            return c[0]
        return self.known.get(name, 0 if n == 1 else None)

    def resolve(
        self,
        model: nn.Module,
        x: Inputs,
        n: int,
        modules: dict[str, nn.Module],
        output: set[str],
    ) -> None:
        """One forward pass on ``n − 1`` points that records the shapes of ``modules`` (their
        output for the names in ``output``, else their first input) and fixes their batch
        dimension. The pass runs with gradients, as the fit does (PyTorch's fused transformer
        path off), and sees whatever the caller has exposed (the collector's attention)."""
        seen: dict[str, Sequence[int]] = {}
        handles = []
        for name, mod in modules.items():

            def hook(m: nn.Module, args: tuple, out: object, name: str = name) -> None:
                t = out if name in output else (args[0] if args else None)
                if isinstance(t, torch.Tensor):
                    seen.setdefault(name, tuple(t.shape))

            handles.append(mod.register_forward_hook(hook))
        try:
            with torch.enable_grad():
                call_model(model, split_inputs(x, n - 1)[0], "fit_curvature")
        finally:
            for h in handles:
                h.remove()
        for name in modules:
            c = candidates(seen.get(name, ()), n - 1)
            if len(c) != 1:
                raise ValueError(
                    f"fit_curvature: cannot tell the batch dimension of module {name!r}: with "
                    f"{n} points its shape has {n} in dimensions 0 and 1, and with {n - 1} "
                    f"points it is {seen.get(name)}. Use a batch size that differs from the "
                    "sequence length."
                )
            self.known[name] = c[0]
