"""``fit_curvature``: K-FOC, K-FAC, diagonal or dense Fisher blocks of a trained classifier."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._options import FisherType, Mode, Solver, Structure
from ..blocks import CurvatureBlock, DenseBlock, DiagBlock, KronBlock
from ..stats import (
    Collector,
    KronStats,
    LinearStats,
    SharedStats,
    Stats,
    Target,
    probe,
    select,
    unpack_batch,
)
from ._checks import (
    check_determinism as _check_determinism,
)
from ._checks import (
    check_train_mode,
    default_memory_budget,
    human_bytes,
    snapshot_buffers,
)
from ._kfoc import (
    Request,
    lanczos_bidiag,
    lanczos_steps,
    power_iteration,
    power_iteration_jacobi,
)
from ._reduce import Reducer
from ._result import Curvature

LANCZOS_RESTART = 8  # Krylov steps kept before an explicit restart (memory: up to 9 A, 8 G)


def _dataset_size(loader: Iterable[Any]) -> int | None:
    ds = getattr(loader, "dataset", None)
    try:
        return len(ds) if ds is not None else None
    except TypeError:
        return None


def _len(loader: Iterable[Any]) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def _finite(name: str, tensors: dict[str, Tensor]) -> None:
    for k, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise FloatingPointError(
                f"fit_curvature: the curvature of module {name!r} ({k}) contains NaN/Inf; check "
                "the model's weights and inputs, or fit in float64."
            )


class _Fitter:
    """One fit: holds the options and runs the passes over the loader."""

    def __init__(
        self,
        model: nn.Module,
        loader: Iterable[Any],
        structure: Structure,
        fisher: FisherType,
        mc_samples: int,
        base_seed: int,
        progress: bool,
        reducer: Reducer,
    ):
        self.model = model
        self.loader = loader
        self.structure = structure
        self.fisher = fisher
        self.mc_samples = mc_samples
        self.base_seed = base_seed
        self.progress = progress
        self.reducer = reducer
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.skipped: dict[str, str] = {}
        self.resume: Iterator[Any] | None = None

    def generator(self) -> torch.Generator:
        """The same MC labels in every pass: a fresh generator from one base seed."""
        g = torch.Generator(device=self.device)
        g.manual_seed(self.base_seed)
        return g

    def batches(self, desc: str) -> Iterator[tuple[Tensor, Tensor]]:
        """One pass over the loader; the first pass resumes the iterator ``prepare`` started, so
        a shuffling loader is not re-drawn (and its first batch not loaded twice)."""
        it: Iterable[Any] = self.loader if self.resume is None else self.resume
        self.resume = None
        bar = tqdm(it, desc=desc, total=_len(self.loader), disable=not self.progress, leave=False)
        for batch in bar:
            x, y = unpack_batch(batch, self.device, self.dtype)
            if x.shape[0] == 0:
                continue
            yield x, y


def prepare(
    model: nn.Module,
    loader: Iterable[Any],
    structure: Structure,
    fisher: str,
    modules: str | Sequence[str],
    exclude: Sequence[str],
    mc_samples: int,
    seed: int | None,
    generator: torch.Generator | None,
    progress: bool,
    check_determinism: bool,
    distributed: bool | None,
) -> tuple[_Fitter, list[Target], Any]:
    """Validate the options, model and first batch; resolve the target modules."""
    f = FisherType.parse(fisher, "fit_curvature: fisher")
    if not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"fit_curvature: mc_samples must be a positive integer, got {mc_samples}.")
    if not any(True for _ in model.parameters()):
        raise ValueError(f"fit_curvature: {type(model).__name__} has no parameters.")
    check_train_mode(model)
    reducer = Reducer.detect(distributed)
    if generator is not None:
        base_seed = int(torch.randint(2**62, (1,), generator=generator).item())
    elif seed is not None:
        base_seed = int(seed)
    else:
        base_seed = int(torch.randint(2**62, (1,)).item())
    fitter = _Fitter(model, loader, structure, f, mc_samples, base_seed, progress, reducer)

    started = iter(loader)
    first = next(started, None)
    if first is None:
        raise ValueError(
            "fit_curvature: the loader yielded no batches; pass a loader over the training data."
        )
    x0, _ = unpack_batch(first, fitter.device, fitter.dtype)
    buffers = snapshot_buffers(model)
    order, counts, out0 = probe(model, x0)
    targets, _skipped = select(model, modules, exclude, order)
    fitter.skipped = _skipped
    shared = [t.name for t in targets if counts.get(t.name, 0) > 1]
    if shared:
        raise RuntimeError(
            f"fit_curvature: module(s) {shared} are called more than once per forward pass "
            "(weight sharing), which is not supported; exclude them with exclude=[...]."
        )
    if check_determinism:
        _check_determinism(model, x0, out0, buffers)
    fitter.resume = itertools.chain([first], started)
    return fitter, targets, first


def fit_curvature(
    model: nn.Module,
    loader: Iterable[Any],
    structure: str = "kfoc",
    fisher: str = "exact",
    modules: str | Sequence[str] = "all",
    *,
    exclude: Sequence[str] = (),
    mc_samples: int = 1,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    mode: str = "auto",
    memory_budget: int | None = None,
    tol: float = 1e-6,
    max_iter: int = 100,
    progress: bool = True,
    check_determinism: bool = True,
    distributed: bool | None = None,
    dtype: torch.dtype | None = None,
    solver: str = "lanczos",
) -> Curvature:
    """Fit curvature blocks of a classifier's **summed** Fisher over every batch of ``loader``.

    Each module that owns trainable parameters gets one block, in
    ``parameters_to_vector(module.parameters())`` order (weight row-major, then bias):

    - ``structure="kfoc"``: ``G ⊗ A``, the Frobenius-optimal Kronecker approximation of the exact
      summed block over the whole data set (Schnaus, Lee & Triebel, 2021): the top singular pair
      of the Van Loan–Pitsianis rearrangement, warm-started from K-FAC, found without forming
      the Fisher by Lanczos bidiagonalisation (``solver``) or power iteration. Linear layers
      never form per-point gradients; Conv2d uses the per-point gradient matrices ``M_n`` or
      the unfold, whichever is cheaper.
    - ``"kfac"``: ``(Σ_n B_n) ⊗ (1/N Σ_n ā ā^T)`` for Linear; the KFC "expand" form
      ``(Σ_{n,t} δδ^T) ⊗ (1/(N·T) Σ_{n,t} ā ā^T)`` for Conv2d.
    - ``"diag"``: the exact diagonal; ``"full"``: the exact dense block (small modules only).

    Modules other than Linear / Conv2d(groups=1) (BatchNorm, LayerNorm, Embedding, ...) get their
    exact diagonal under ``kfoc``/``kfac``. ``Curvature.coverage`` says how each parameter is
    covered. In the Kronecker factors ``A`` is the input side (bias last), ``G`` the output side.

    Args:
        model: a classifier returning logits ``[N, C]``, in eval mode.
        loader: an iterable of ``(x, y)`` batches (re-iterable for ``mode="streaming"``).
        structure: ``"kfoc"``, ``"kfac"``, ``"diag"`` or ``"full"``.
        fisher: ``"exact"`` (type-2), ``"mc"`` (``mc_samples`` sampled labels, averaged) or
            ``"empirical"`` (observed labels).
        modules: ``"all"``, ``"last_layer"`` (the last Linear/Conv2d called, else the last
            parameter-owning module called) or a list of module names
            (containers expand to their parameter-owning submodules).
        exclude: module names to leave out (reported in ``coverage``).
        mc_samples: labels sampled per point for ``fisher="mc"``.
        seed, generator: make ``fisher="mc"`` reproducible.
        mode: ``"auto"``, ``"cached"`` or ``"streaming"`` (K-FOC only). Streaming with
            ``fisher="mc"`` needs a loader that yields the same batches in every pass (no
            shuffling): the sampled labels are re-drawn batch by batch from one seed.
        memory_budget: bytes allowed for cached statistics (default: half the free CUDA memory or
            a quarter of the available host memory).
        tol: stop when the relative change that one more power half-step would make to a factor
            falls below ``tol`` (floored at 50 ulp of the dtype). Power iteration measures that
            change; Lanczos its exact upper bound, the relative residual of its Ritz pair.
        max_iter: most iterations (pairs of ``A``/``G`` updates); a run that stops there warns
            with its residual. ``blocks[name].info`` has ``iterations``, ``residual``,
            ``converged``, ``sigma1``, ``scheme`` and ``mode`` per K-FOC block.
        progress: show tqdm progress bars.
        check_determinism: re-run the first batch and raise if outputs or buffers change.
        distributed: all-reduce every sum over data across ``torch.distributed`` ranks (each rank
            iterating over its own shard); ``None`` detects an initialised group.
        dtype: accumulate statistics and factors in this dtype (e.g. ``torch.float64`` for a
            float32 or bfloat16 model); default: the model's dtype.
        solver: K-FOC's solver: ``"lanczos"`` (default: Golub–Kahan–Lanczos from K-FAC's
            ``A``, whose first ``G`` update replaces K-FAC's ``Σ B_n``; Ritz factors projected
            onto the PSD cone, the removed part ``O(tol)`` is ``info["psd_clamped"]``) or
            ``"power"`` (power iteration from K-FAC's ``(A, G)``, PSD at every step). Streaming
            Lanczos runs one data pass per half-step for all layers at once; streaming power
            iteration is Jacobi (both updates of every layer from one pass).

    Returns:
        A :class:`Curvature` with ``blocks[module_name]``.

    .. warning:: The Fisher is **summed** over data points, not averaged: a loss with mean
       reduction corresponds to ``1/N`` times these blocks.
    """
    s = Structure.parse(structure, "fit_curvature: structure")
    m = Mode.parse(mode, "fit_curvature: mode")
    solver_ = Solver.parse(solver, "fit_curvature: solver")
    if not tol > 0:
        raise ValueError(f"fit_curvature: tol must be positive, got {tol}.")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"fit_curvature: max_iter must be a positive integer, got {max_iter}.")
    fitter, targets, first = prepare(
        model,
        loader,
        s,
        fisher,
        modules,
        exclude,
        mc_samples,
        seed,
        generator,
        progress,
        check_determinism,
        distributed,
    )
    f = fitter.fisher
    budget = default_memory_budget(fitter.device) if memory_budget is None else memory_budget
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"fit_curvature: dtype must be a floating dtype, got {dtype}.")
    with Collector(model, targets, f, mc_samples, dtype) as collector:
        blocks, used_mode, info = _fit(
            fitter, collector, targets, first, m, budget, tol, max_iter, solver_
        )
    coverage = _coverage(model, blocks, targets, fitter.skipped)
    return Curvature(blocks, s.value, f.value, info.pop("num_data"), used_mode, coverage, info)


def _fit(
    fitter: _Fitter,
    collector: Collector,
    targets: list[Target],
    first: Any,
    mode: Mode,
    budget: int,
    tol: float,
    max_iter: int,
    solver: Solver,
) -> tuple[dict[str, CurvatureBlock], str, dict[str, Any]]:
    s = fitter.structure
    red = fitter.reducer
    kron = {t.name for t in targets if t.kron_capable and s in (Structure.KFOC, Structure.KFAC)}
    want_cache = s is Structure.KFOC and mode is not Mode.STREAMING and kron
    cache: dict[str, list[KronStats]] | None = {k: [] for k in kron} if want_cache else None
    cache_bytes = work = 0
    estimate: int | None = None
    sums: dict[str, list[Any]] = {}
    num_data = 0
    # Lanczos starts from K-FAC's A alone (its first G update replaces Σ B_n, cached or
    # streaming), so Σ B_n is only summed for K-FAC itself and for the power iteration's start.
    need_g = s is Structure.KFAC or solver is Solver.POWER
    copies = 2 * LANCZOS_RESTART + 4 if solver is Solver.LANCZOS else 4
    log_lik = torch.zeros((), dtype=fitter.dtype, device=fitter.device)
    gen = fitter.generator()
    for i, (x, y) in enumerate(fitter.batches("curvature")):
        stats, logits = collector.batch(x, y, gen)
        num_data += x.shape[0]
        log_lik += torch.log_softmax(logits, dim=-1).gather(1, y.unsqueeze(1)).sum()
        for t in targets:
            st: Stats = stats[t.name]
            if t.name in kron:
                assert isinstance(st, LinearStats | SharedStats)
                ks = st.kfac_sums(with_g=need_g)
                g_part = ks.g if ks.g is not None else 0
                _accumulate(sums, t.name, [ks.a, g_part, ks.count])
                if cache is not None:
                    cache[t.name].append(st.compact())
                    cache_bytes += cache[t.name][-1].nbytes
            elif s is Structure.FULL:
                g = st.grads()
                _accumulate(sums, t.name, [g.T @ g])
            else:
                _accumulate(sums, t.name, [st.diag()])
        if cache is not None and i == 0:
            # Per-layer work besides the cache: ``copies`` of the factors (iterates, updates and
            # the Lanczos bases) and one batch's temporaries (about that batch's statistics).
            work = cache_bytes + sum(
                copies * (st.n**2 + st.o**2) * st.element_size
                for k, st in stats.items()
                if k in kron and isinstance(st, KronStats)
            )
            size = _dataset_size(fitter.loader)
            if size is not None:
                estimate = int(cache_bytes / x.shape[0] * size)
        if cache is not None and max(cache_bytes, estimate or 0) + work > budget:
            need = human_bytes(max(cache_bytes, estimate or 0) + work)
            if mode is Mode.CACHED:
                raise MemoryError(
                    f"fit_curvature: mode='cached' needs about {need} (statistics cache plus "
                    f"per-layer work), over the memory_budget of {human_bytes(budget)}; use "
                    "mode='auto' or 'streaming', or raise memory_budget."
                )
            cache = None  # auto: fall back to streaming
    if num_data == 0:
        raise ValueError("fit_curvature: the loader yielded only empty batches.")
    if want_cache and red.any(cache is None, fitter.device):
        cache = None  # every rank must take the same path (the collectives differ)
    num_data = red.sum_int(num_data, fitter.device)
    for k, vals in sums.items():
        sums[k] = [
            red.sum(v) if isinstance(v, Tensor) else red.sum_int(v, fitter.device) for v in vals
        ]

    blocks: dict[str, CurvatureBlock] = {}
    info: dict[str, Any] = {
        "num_data": num_data,
        "base_seed": fitter.base_seed,
        "log_likelihood": float(red.sum(log_lik)),
        "input_shape": tuple(first[0].shape[1:]),
    }
    if estimate is not None or cache_bytes:
        info["cache_bytes_estimate"] = max(cache_bytes, estimate or 0)
        info["peak_bytes_estimate"] = max(cache_bytes, estimate or 0) + work
    used_mode = "single-pass"
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    for t in targets:
        if t.name in kron:
            a_sum, g_sum, count = sums[t.name]
            factors[t.name] = (a_sum / count, g_sum)  # g_sum is zeros (unused) under Lanczos
    results: dict[str, tuple[Tensor, Tensor, dict[str, Any]]] = {}
    if s is Structure.KFOC and kron:
        if cache is not None:
            used_mode = "cached"
            for name in [t.name for t in targets if t.name in kron]:
                results[name] = _kfoc_cached(
                    name, cache[name], *factors[name], red, tol, max_iter, solver
                )
        else:
            used_mode = "streaming"
            stream = _lanczos_streaming if solver is Solver.LANCZOS else _jacobi_streaming
            results = stream(fitter, collector, sorted(kron), factors, tol, max_iter)
    for t in targets:
        block: CurvatureBlock
        if t.name in kron:
            if s is Structure.KFOC:
                A, G, it_info = results[t.name]
            else:
                (A, G), it_info = factors[t.name], {}
            _finite(t.name, {"A": A, "G": G})
            block = KronBlock(t.name, t.param_shapes, A, G)
            block.info = it_info
        elif s is Structure.FULL:
            _finite(t.name, {"dense": sums[t.name][0]})
            block = DenseBlock(t.name, t.param_shapes, sums[t.name][0])
        else:
            _finite(t.name, {"diag": sums[t.name][0]})
            block = DiagBlock(t.name, t.param_shapes, sums[t.name][0])
        blocks[t.name] = block
    return blocks, used_mode, info


def _accumulate(sums: dict[str, list[Any]], name: str, vals: list[Any]) -> None:
    if name not in sums:
        sums[name] = list(vals)
    else:
        for i, v in enumerate(vals):
            sums[name][i] = sums[name][i] + v


def _kfoc_cached(
    name: str,
    stats: list[KronStats],
    A0: Tensor,
    G0: Tensor,
    red: Reducer,
    tol: float,
    max_iter: int,
    solver: Solver,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    def a_update(G: Tensor) -> Tensor:
        return red.sum(sum((st.a_update(G) for st in stats[1:]), stats[0].a_update(G)))

    def g_update(A: Tensor) -> Tensor:
        return red.sum(sum((st.g_update(A) for st in stats[1:]), stats[0].g_update(A)))

    if solver is Solver.POWER:
        A, G, info = power_iteration(name, a_update, g_update, A0, G0, tol, max_iter)
    else:  # starts from K-FAC's A; its first step is the G update (G0 was not summed)
        A, G, info = lanczos_bidiag(name, a_update, g_update, A0, tol, max_iter, LANCZOS_RESTART)
    info["mode"] = "cached"
    return A, G, info


Update = Callable[[KronStats], list[Tensor]]


def _both_updates(A: Tensor, G: Tensor) -> Update:
    return lambda st: [st.a_update(G), st.g_update(A)]


def _requested_update(kind: str, mat: Tensor) -> Update:
    return lambda st: [st.g_update(mat) if kind == "g" else st.a_update(mat)]


def _stream_pass(
    fitter: _Fitter, collector: Collector, work: dict[str, Update]
) -> dict[str, list[Tensor]]:
    """One pass over the loader: ``work[k](stats)`` for every batch and layer ``k``, summed over
    the batches and all-reduced over the ranks (in the same order on every rank)."""
    acc: dict[str, list[Any]] = {}
    gen = fitter.generator()  # the same MC labels in every pass
    for x, y in fitter.batches("K-FOC pass"):
        stats, _ = collector.batch(x, y, gen, names=set(work))
        for k, fn in work.items():
            st = stats[k]
            assert isinstance(st, KronStats)
            # per-direction gradients M when they make the updates cheaper
            _accumulate(acc, k, fn(st.compact()))
    return {k: [fitter.reducer.sum(t) for t in v] for k, v in acc.items()}


def _jacobi_streaming(
    fitter: _Fitter,
    collector: Collector,
    names: list[str],
    factors: dict[str, tuple[Tensor, Tensor]],
    tol: float,
    max_iter: int,
) -> dict[str, tuple[Tensor, Tensor, dict[str, Any]]]:
    def updates(state: dict[str, tuple[Tensor, Tensor]]) -> dict[str, tuple[Tensor, Tensor]]:
        work = {k: _both_updates(A, G) for k, (A, G) in state.items()}
        return {k: (v[0], v[1]) for k, v in _stream_pass(fitter, collector, work).items()}

    bar = tqdm(total=max_iter, desc="K-FOC iterations", disable=not fitter.progress, leave=False)

    def tick(it: int, done: int) -> None:
        bar.update(1)
        bar.set_postfix(converged=f"{done}/{len(names)}")

    try:
        out = power_iteration_jacobi(names, updates, factors, tol, max_iter, tick)
    finally:
        bar.close()
    for v in out.values():
        v[2]["mode"] = "streaming"
    return out


def _lanczos_streaming(
    fitter: _Fitter,
    collector: Collector,
    names: list[str],
    factors: dict[str, tuple[Tensor, Tensor]],
    tol: float,
    max_iter: int,
) -> dict[str, tuple[Tensor, Tensor, dict[str, Any]]]:
    """Lanczos bidiagonalisation of every layer at once, one data pass per half-step.

    Each pass answers the pending request (``Rᵀ(A)`` or ``R(G)``) of every layer still iterating.
    """
    steps = {k: lanczos_steps(k, factors[k][0], tol, max_iter, LANCZOS_RESTART) for k in names}
    pending: dict[str, Request] = {}
    out: dict[str, tuple[Tensor, Tensor, dict[str, Any]]] = {}

    def advance(k: str, value: Tensor | None) -> None:
        try:
            pending[k] = next(steps[k]) if value is None else steps[k].send(value)
        except StopIteration as done:
            out[k] = done.value
            pending.pop(k, None)

    for k in names:
        advance(k, None)
    bar = tqdm(total=2 * max_iter, desc="K-FOC passes", disable=not fitter.progress, leave=False)
    try:
        while pending:
            work = {k: _requested_update(kind, mat) for k, (kind, mat) in pending.items()}
            sums = _stream_pass(fitter, collector, work)
            for k in list(pending):
                advance(k, sums[k][0])
            bar.update(1)
            bar.set_postfix(converged=f"{len(out)}/{len(names)}")
    finally:
        bar.close()
    for v in out.values():
        v[2]["mode"] = "streaming"
    return out


def _coverage(
    model: nn.Module,
    blocks: dict[str, CurvatureBlock],
    targets: list[Target],
    skipped: dict[str, str],
) -> dict[str, str]:
    notes = {t.name: t.note for t in targets}
    owner_of: dict[str, str] = {}
    for mname, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            owner_of.setdefault(f"{mname}.{pname}" if mname else pname, mname)
    out: dict[str, str] = {}
    for full, p in model.named_parameters():
        owner = owner_of[full]
        if not p.requires_grad:
            out[full] = "frozen (requires_grad=False): not part of the curvature"
        elif owner in blocks:
            kind = {"kron": "Kronecker", "diag": "diagonal", "full": "dense"}[
                blocks[owner].structure
            ]
            extra = f"; {notes[owner]}" if notes.get(owner) else ""
            out[full] = f"{kind} block {owner!r}{extra}"
        else:
            out[full] = skipped.get(owner, "not covered")
    return out
