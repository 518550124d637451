"""K-FOC's solver drivers: the solvers of ``_kfoc`` answered from cached statistics or by
streaming passes over the data (one pass per half-step for every layer at once)."""

from __future__ import annotations

import dataclasses

from torch import Tensor
from tqdm.auto import tqdm

from ..options import Solver
from ..stats import Collector, KronStats
from ._kfoc import Result, power_iteration, power_iteration_jacobi
from ._lanczos import Request, lanczos_bidiag, lanczos_steps
from ._reduce import Reducer
from ._rowspace import row_space
from .first_pass import KronSums
from .options import LANCZOS_RESTART, FitOptions
from .passes import DataPasses, Update


def _with_mode(result: Result, mode: str) -> Result:
    A, G, info = result
    return A, G, dataclasses.replace(info, mode=mode)


def kfoc_cached(stats: list[KronStats], start: KronSums, red: Reducer, opts: FitOptions) -> Result:
    """One layer's K-FOC from its cached per-batch statistics (sums all-reduced over ranks).

    On a single process, a layer with fewer stacked inputs than input features is solved in the
    inputs' row space (:mod:`._rowspace`): the same factors, at a fraction of the cost."""
    space = None if red.enabled else row_space(stats, start.kfac_a)
    if space is not None:
        stats = space.stats
    A0 = start.kfac_a if space is None else space.kfac_a

    def a_update(G: Tensor) -> Tensor:
        return red.sum(sum((st.a_update(G) for st in stats[1:]), stats[0].a_update(G)))

    def g_update(A: Tensor) -> Tensor:
        return red.sum(sum((st.g_update(A) for st in stats[1:]), stats[0].g_update(A)))

    if opts.solver is Solver.POWER:
        assert start.g is not None
        out = power_iteration("", a_update, g_update, A0, start.g, opts.tol, opts.max_iter, False)
    else:  # starts from K-FAC's A; its first step is the G update (Σ B_n was not summed)
        out = lanczos_bidiag(
            "", a_update, g_update, A0, opts.tol, opts.max_iter, LANCZOS_RESTART, False
        )
    if space is not None:
        out = (space.expand(out[0]), out[1], out[2])
    return _with_mode(out, "cached")


def _both_updates(A: Tensor, G: Tensor) -> Update:
    return lambda st: [st.a_update(G), st.g_update(A)]


def _requested_update(kind: str, mat: Tensor) -> Update:
    return lambda st: [st.g_update(mat) if kind == "g" else st.a_update(mat)]


def jacobi_streaming(
    passes: DataPasses, collector: Collector, starts: dict[str, KronSums]
) -> dict[str, Result]:
    """Jacobi power iteration of every layer at once: both updates from one data pass."""
    opts = passes.opts
    names = sorted(starts)

    def updates(state: dict[str, tuple[Tensor, Tensor]]) -> dict[str, tuple[Tensor, Tensor]]:
        work = {k: _both_updates(A, G) for k, (A, G) in state.items()}
        return {k: (v[0], v[1]) for k, v in passes.stream(collector, work).items()}

    bar = tqdm(total=opts.max_iter, desc="K-FOC iterations", disable=not opts.progress, leave=False)

    def tick(it: int, done: int) -> None:
        bar.update(1)
        bar.set_postfix(converged=f"{done}/{len(names)}")

    init = {}
    for k in names:
        g = starts[k].g
        assert g is not None
        init[k] = (starts[k].kfac_a, g)
    try:
        out = power_iteration_jacobi(names, updates, init, opts.tol, opts.max_iter, tick, False)
    finally:
        bar.close()
    return {k: _with_mode(v, "streaming") for k, v in out.items()}


def lanczos_streaming(
    passes: DataPasses, collector: Collector, starts: dict[str, KronSums]
) -> dict[str, Result]:
    """Lanczos bidiagonalisation of every layer at once, one data pass per half-step.

    Each pass answers the pending request (``Rᵀ(A)`` or ``R(G)``) of every layer still iterating.
    """
    opts = passes.opts
    names = sorted(starts)
    steps = {
        k: lanczos_steps(starts[k].kfac_a, opts.tol, opts.max_iter, LANCZOS_RESTART) for k in names
    }
    pending: dict[str, Request] = {}
    out: dict[str, Result] = {}

    def advance(k: str, value: Tensor | None) -> None:
        try:
            pending[k] = next(steps[k]) if value is None else steps[k].send(value)
        except StopIteration as done:
            out[k] = _with_mode(done.value, "streaming")
            pending.pop(k, None)

    for k in names:
        advance(k, None)
    bar = tqdm(total=2 * opts.max_iter, desc="K-FOC passes", disable=not opts.progress, leave=False)
    try:
        while pending:
            work = {k: _requested_update(kind, mat) for k, (kind, mat) in pending.items()}
            sums = passes.stream(collector, work)
            for k in list(pending):
                advance(k, sums[k][0])
            bar.update(1)
            bar.set_postfix(converged=f"{len(out)}/{len(names)}")
    finally:
        bar.close()
    return out
