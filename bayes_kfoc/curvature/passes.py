"""A fit's setup (validated model, first batch, target modules) and its passes over the loader."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..options import FisherType, Mode, Structure
from ..stats import Collector, KronStats, Target, probe, select, unpack_batch
from ..stats.inputs import Inputs, batch_size
from ._checks import check_determinism, check_train_mode, snapshot_buffers
from ._loader import PassRecord, check_batch, check_pass, is_one_shot, one_shot_error
from ._reduce import Reducer
from .options import FitOptions

Update = Callable[[KronStats], list[Tensor]]
"""The per-batch work of a streaming pass for one layer: tensors to sum over the data."""


def loader_length(loader: Iterable[Any]) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def dataset_size(loader: Iterable[Any]) -> int | None:
    ds = getattr(loader, "dataset", None)
    try:
        return len(ds) if ds is not None else None
    except TypeError:
        return None


class DataPasses:
    """Passes over the loader for one fit, on the model's device and dtype, with its reducer.

    The first pass resumes the iterator the setup started (so a shuffling loader is not
    re-drawn, and its first batch not loaded twice); every pass draws the MC labels from the same
    base seed, so the same batches give the same labels. The first pass records what it saw;
    every later pass must see the same points (see :mod:`._loader`), and a one-shot loader
    (``one_shot``) cannot be passed over twice.
    """

    def __init__(self, model: nn.Module, loader: Iterable[Any], opts: FitOptions):
        self.model = model
        self.loader = loader
        self.opts = opts
        self.reducer = Reducer.detect(opts.distributed)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.resume: Iterator[Any] | None = None
        self.one_shot = False
        self.record: PassRecord | None = None
        self.passes_done = 0

    def generator(self) -> torch.Generator:
        """The same MC labels in every pass: a fresh generator from one base seed."""
        g = torch.Generator(device=self.device)
        g.manual_seed(self.opts.base_seed)
        return g

    def batches(self, desc: str) -> Iterator[tuple[Inputs, Tensor]]:
        """One pass over the loader: validated ``(x, y)`` on the model's device."""
        if self.resume is None and self.one_shot:
            raise one_shot_error(self.loader, "this fit (streaming K-FOC)")
        it: Iterable[Any] = self.loader if self.resume is None else self.resume
        self.resume = None
        ref, seen = self.record, PassRecord()
        ordered = self.opts.fisher is FisherType.MC
        index = self.passes_done + 1
        bar = tqdm(
            it,
            desc=desc,
            total=loader_length(self.loader),
            disable=not self.opts.progress,
            leave=False,
        )
        for batch in bar:
            x, y = unpack_batch(batch, self.device, self.dtype)
            if batch_size(x) == 0:
                continue
            seen.add(x, y)
            if ref is not None and ordered:
                check_batch(ref, seen, index)
            yield x, y
        if ref is None:
            self.record = seen
        else:
            check_pass(ref, seen, index, ordered)
        self.passes_done += 1

    def stream(self, collector: Collector, work: dict[str, Update]) -> dict[str, list[Tensor]]:
        """One pass: ``work[k](stats)`` for every batch and layer ``k``, summed over the batches
        and all-reduced over the ranks (in the same order on every rank)."""
        acc: dict[str, list[Tensor]] = {}
        gen = self.generator()  # the same MC labels in every pass
        for x, y in self.batches("K-FOC pass"):
            stats, _ = collector.batch(x, y, gen, names=set(work))
            for k, fn in work.items():
                st = stats[k]
                assert isinstance(st, KronStats)
                # per-direction gradients M when they make the updates cheaper
                vals = fn(st.compact())
                acc[k] = (
                    vals if k not in acc else [a + v for a, v in zip(acc[k], vals, strict=True)]
                )
        return {k: [self.reducer.sum(t) for t in v] for k, v in acc.items()}


@dataclass
class FitSetup:
    """What :func:`prepare` established before the first pass.

    Attributes:
        passes: the loader passes of this fit.
        targets: the modules that get blocks, in forward-call order.
        skipped: ``{module: reason}`` for parameter owners without a block.
        first: the loader's first batch, as it yielded it.
    """

    passes: DataPasses
    targets: list[Target]
    skipped: dict[str, str]
    first: Any


def prepare(model: nn.Module, loader: Iterable[Any], opts: FitOptions) -> FitSetup:
    """Validate the model and the first batch, and resolve the target modules (call order)."""
    if not any(True for _ in model.parameters()):
        raise ValueError(f"fit_curvature: {type(model).__name__} has no parameters.")
    check_train_mode(model)
    p = next(model.parameters())
    if opts.dtype is None and p.dtype in (torch.float16, torch.bfloat16):
        opts = dataclasses.replace(opts, dtype=torch.float32)  # half types accumulate in float32
    passes = DataPasses(model, loader, opts)
    started = iter(loader)
    passes.one_shot = is_one_shot(loader, started)
    first = next(started, None)
    if first is None:
        raise ValueError(
            "fit_curvature: the loader yielded no batches; pass a loader over the training data."
        )
    x0, _ = unpack_batch(first, passes.device, passes.dtype)
    buffers = snapshot_buffers(model)
    order, counts, out0 = probe(model, x0)
    targets, skipped = select(model, opts.modules, opts.exclude, order)
    for t in targets:  # weight sharing: one block, statistics summed over the calls
        if counts.get(t.name, 0) > 1:
            note = f"called {counts[t.name]} times per forward pass: statistics summed over calls"
            t.note = f"{t.note}; {note}" if t.note else note
    if opts.check_determinism:
        check_determinism(model, x0, out0, buffers)
    kfoc = opts.structure is Structure.KFOC and any(t.kron_capable for t in targets)
    if passes.one_shot and kfoc and opts.mode is Mode.STREAMING:
        raise one_shot_error(loader, "mode='streaming'")
    passes.resume = itertools.chain([first], started)
    return FitSetup(passes, targets, skipped, first)
