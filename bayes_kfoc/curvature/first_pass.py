"""The first pass over the data: every structure's sums, and K-FOC's statistics cache.

It sums, per target module, what its structure needs (K-FAC's ``Σ ā āᵀ`` and, when needed,
``Σ δ δᵀ``; the exact diagonal; the dense block), the log-likelihood and the point count, and
for K-FOC keeps each batch's statistics while they fit the memory budget (else the solver
streams). Every sum is all-reduced over ``torch.distributed`` ranks at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..options import FisherType, KfacReduction, Mode, Structure
from ..stats import (
    CONV2D,
    Collector,
    GradientStats,
    KronStats,
    LinearStats,
    SharedStats,
    Stats,
    Target,
)
from ..stats.inputs import batch_size
from ._checks import default_memory_budget, human_bytes
from ._loader import one_shot_error
from ._rowspace import ROW_FRACTION
from .passes import FitSetup, dataset_size


@dataclass
class KronSums:
    """K-FAC's sums of one module over the data: ``Σ ā āᵀ``, ``Σ δ δᵀ`` (``None`` unless
    K-FAC or power iteration needs it) and the count that averages the first (``N·T``
    expanded, ``N`` reduced)."""

    a: Tensor
    g: Tensor | None
    count: int

    @property
    def kfac_a(self) -> Tensor:
        """K-FAC's input factor ``Σ ā āᵀ / count``."""
        return self.a / self.count


@dataclass
class FirstPass:
    """The result of :func:`first_pass` (all sums over every rank).

    Attributes:
        num_data: points summed over.
        log_likelihood: ``Σ_n log p(y_n | x_n)`` at the fitted weights.
        kron: K-FAC sums of the Kronecker modules.
        exact: the exact diagonal (``diag`` and non-Kronecker modules) or dense block
            (``full``) of every other module.
        cache: K-FOC's per-batch statistics per Kronecker module, or ``None`` (streaming, or not
            K-FOC).
        cache_bytes_estimate / peak_bytes_estimate: K-FOC's estimated cache for the whole loader,
            and that plus one batch's work (:func:`batch_work_bytes`) and the solver's
            factor-sized copies (:func:`cached_solver_bytes`; ``None`` when nothing was
            cached).
    """

    num_data: int
    log_likelihood: float
    kron: dict[str, KronSums]
    exact: dict[str, Tensor]
    cache: dict[str, list[KronStats]] | None
    cache_bytes_estimate: int | None
    peak_bytes_estimate: int | None


def kron_names(setup: FitSetup) -> list[str]:
    """The target modules that get Kronecker blocks (K-FOC / K-FAC on Linear / Conv2d)."""
    opts = setup.passes.opts
    kfoc = opts.structure is Structure.KFOC
    return [
        t.name
        for t in setup.targets
        if (t.kron_capable and opts.kronecker) or (t.tied_matrix and kfoc)
    ]


BATCH_COPIES = 3
"""A batch's statistics are alive about three times over while it is processed: the backward
pass's per-direction output gradients and their temporaries, the statistics, their compact
form (measured: ``evaluation/benchmarks/memory.py``)."""


def batch_work_bytes(stats: dict[str, Stats], logits: Tensor, fisher: FisherType) -> int:
    """Bytes alive while one batch is processed, besides the cache: :data:`BATCH_COPIES` times
    its statistics, and for the exact Fisher the ``[N, C, C]`` Householder rows of its
    directions (three such tensors at once; ``docs/math.md``, "Fisher directions")."""
    n, c = logits.shape
    directions = 3 * n * c * c * logits.element_size() if fisher is FisherType.EXACT else 0
    return directions + BATCH_COPIES * sum(st.nbytes for st in stats.values())


KEPT_COPIES = 3
"""Factor-sized tensors every Kronecker layer keeps until a cached fit returns: its K-FAC sums,
its solved factors and its block's symmetrised copy."""


def cached_solver_bytes(stats: list[KronStats], factor_copies: int, num_points: int | None) -> int:
    """Factor memory of a cached K-FOC fit: :data:`KEPT_COPIES` per layer, plus the solver's
    ``factor_copies`` temporaries (iterates, updates, Lanczos bases) of **one** layer at a time,
    the largest (the cached solver runs the layers one after another; counting every layer's
    temporaries at once sent ResNet-18 to streaming, 8 extra passes over the data). A layer
    that will be solved in its inputs' row space (``num_points`` known, see
    :mod:`._rowspace`) has ``R x R`` temporaries plus the basis ``Q`` and its input copy."""
    kept = temp = 0
    for st in stats:
        size = st.n
        if num_points is not None and isinstance(st, LinearStats | SharedStats):
            rows = st.a.numel() // (st.n * st.num_points) * num_points
            if 0 < rows <= ROW_FRACTION * st.n:
                size = rows
        extra = 2 * st.n * size if size < st.n else 0
        kept += st.n**2 + st.o**2
        temp = max(temp, factor_copies * (size**2 + st.o**2) + extra)
    return (KEPT_COPIES * kept + temp) * (stats[0].element_size if stats else 0)


def _add(acc: dict[str, Tensor], name: str, value: Tensor) -> None:
    acc[name] = value if name not in acc else acc[name] + value


def first_pass(setup: FitSetup, collector: Collector) -> FirstPass:
    """One pass over the loader (see the module docstring); decides cached vs streaming."""
    passes, opts = setup.passes, setup.passes.opts
    red = passes.reducer
    kron = set(kron_names(setup))
    want_cache = opts.structure is Structure.KFOC and opts.mode is not Mode.STREAMING and kron
    budget = (
        default_memory_budget(passes.device) if opts.memory_budget is None else opts.memory_budget
    )
    cache: dict[str, list[KronStats]] | None = {k: [] for k in kron} if want_cache else None
    cache_bytes = work = 0
    estimate: int | None = None
    sums: dict[str, KronSums] = {}
    exact: dict[str, Tensor] = {}
    num_data = 0
    acc_dtype = opts.dtype or passes.dtype
    log_lik = torch.zeros((), dtype=acc_dtype, device=passes.device)
    gen = passes.generator()
    for i, (x, y) in enumerate(passes.batches("curvature")):
        stats, logits = collector.batch(x, y, gen)
        num_data += batch_size(x)
        log_lik += torch.log_softmax(logits.to(acc_dtype), dim=-1).gather(1, y.unsqueeze(1)).sum()
        for t in setup.targets:
            st = stats[t.name]
            if t.name in kron:
                assert isinstance(st, LinearStats | SharedStats | GradientStats)
                _accumulate_kron(sums, t, st, opts.needs_g_sum, reduces(t, opts.kfac_reduction))
                if cache is not None:
                    cache[t.name].append(st.compact())
                    cache_bytes += cache[t.name][-1].nbytes
            elif opts.structure is Structure.FULL:
                g = st.grads()
                _add(exact, t.name, g.T @ g)
            else:
                _add(exact, t.name, st.diag())
        if cache is not None and i == 0:
            size = dataset_size(passes.loader)
            work = batch_work_bytes(stats, logits, opts.fisher) + cached_solver_bytes(
                [st for k, st in stats.items() if k in kron and isinstance(st, KronStats)],
                opts.factor_copies,
                None if red.enabled else size,
            )
            if size is not None:
                estimate = int(cache_bytes / batch_size(x) * size)
        if cache is not None and max(cache_bytes, estimate or 0) + work > budget:
            need = human_bytes(max(cache_bytes, estimate or 0) + work)
            if opts.mode is Mode.CACHED:
                raise MemoryError(
                    f"fit_curvature: mode='cached' needs about {need} (statistics cache plus "
                    f"per-layer work), over the memory_budget of {human_bytes(budget)}; use "
                    "mode='auto' or 'streaming', or raise memory_budget."
                )
            if passes.one_shot:
                raise one_shot_error(
                    passes.loader,
                    f"mode='auto' with K-FOC's statistics (about {need}) over the memory_budget "
                    f"of {human_bytes(budget)}: streaming",
                )
            cache = None  # auto: fall back to streaming
    if num_data == 0:
        raise ValueError("fit_curvature: the loader yielded only empty batches.")
    if want_cache and red.any(cache is None, passes.device):
        if passes.one_shot and cache is not None:
            raise one_shot_error(passes.loader, "another rank's streaming fit")
        cache = None  # every rank must take the same path (the collectives differ)
    for s in sums.values():
        s.a = red.sum(s.a)
        s.g = None if s.g is None else red.sum(s.g)
        s.count = red.sum_int(s.count, passes.device)
    cached = estimate is not None or cache_bytes > 0
    return FirstPass(
        num_data=red.sum_int(num_data, passes.device),
        log_likelihood=float(red.sum(log_lik)),
        kron=sums,
        exact={k: red.sum(v) for k, v in exact.items()},
        cache=cache,
        cache_bytes_estimate=max(cache_bytes, estimate or 0) if cached else None,
        peak_bytes_estimate=max(cache_bytes, estimate or 0) + work if cached else None,
    )


def reduces(t: Target, reduction: KfacReduction) -> bool:
    """Whether K-FAC takes the "reduce" form for ``t`` (see :class:`KfacReduction`)."""
    if reduction is KfacReduction.AUTO:
        return t.kind != CONV2D
    return reduction is KfacReduction.REDUCE


def _accumulate_kron(
    sums: dict[str, KronSums],
    t: Target,
    st: LinearStats | SharedStats | GradientStats,
    with_g: bool,
    reduce: bool,
) -> None:
    ks = st.kfac_sums(with_g=with_g, reduce=reduce)
    if t.name not in sums:
        sums[t.name] = KronSums(ks.a, ks.g, ks.count)
        return
    acc = sums[t.name]
    acc.a = acc.a + ks.a
    acc.g = None if ks.g is None or acc.g is None else acc.g + ks.g
    acc.count += ks.count
