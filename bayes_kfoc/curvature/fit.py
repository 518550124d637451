"""``fit_curvature``: K-FOC, K-FAC, diagonal or dense Fisher blocks of a trained classifier.

The fit is short orchestration: options parsed (:class:`FitOptions`), the model and first batch
checked (:func:`~bayes_kfoc.curvature.passes.prepare`), one first pass
(:func:`~bayes_kfoc.curvature.first_pass.first_pass`), K-FOC's solver driven from the cache or by
streaming (:mod:`~bayes_kfoc.curvature.drivers`), then the blocks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..blocks import CurvatureBlock, DenseBlock, DiagBlock, KronBlock
from ..options import Solver, Structure
from ..stats import Collector
from ..stats.inputs import first_tensor
from ._checks import ModelGuard
from ._kfoc import Result, warn_unconverged
from ._result import Curvature
from .coverage import coverage
from .drivers import jacobi_streaming, kfoc_cached, lanczos_streaming
from .first_pass import FirstPass, KronSums, first_pass, kron_names
from .info import FitInfo
from .options import FitOptions
from .passes import FitSetup, prepare


def _finite(name: str, tensors: dict[str, Tensor]) -> None:
    for k, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise FloatingPointError(
                f"fit_curvature: the curvature of module {name!r} ({k}) contains NaN/Inf; check "
                "the model's weights and inputs, or fit in float64."
            )


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
    tol: float = 1e-3,
    max_iter: int = 100,
    progress: bool = True,
    check_determinism: bool = True,
    distributed: bool | None = None,
    dtype: torch.dtype | None = None,
    solver: str = "lanczos",
    kfac_reduction: str = "auto",
    warm_start: Curvature | Mapping[str, tuple[Tensor, Tensor]] | None = None,
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
    - ``"kfac"``: ``(Σ_n B_n) ⊗ (1/N Σ_n ā ā^T)`` for Linear; over positions (Conv2d,
      sequences, attention, weight sharing) the "expand" or "reduce" form (``kfac_reduction``).
    - ``"diag"``: the exact diagonal; ``"full"``: the exact dense block (small modules only).

    Modules other than Linear / Conv2d(groups=1) (BatchNorm, LayerNorm, Embedding, ...) get their
    exact diagonal under ``kfoc``/``kfac``. ``Curvature.coverage`` says how each parameter is
    covered. In the Kronecker factors ``A`` is the input side (bias last), ``G`` the output side.

    Args:
        model: a classifier returning logits ``[N, C]``, in eval mode.
        loader: an iterable of ``(x, y)`` batches (integer labels of any width). Streaming needs
            a re-iterable loader that yields the same points in every pass (checked; a one-shot
            generator or a loader that changes between passes raises, see
            ``docs/bad_inputs.md``); a cached fit takes one pass.
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
            The default ``1e-3`` keeps the block's Frobenius error within ``1e-5`` relative of
            the optimum's (the error is second order in the factors' error; measured
            ``5.5e-7`` on the digits MLP and ``6.0e-6`` on a ViT-like net,
            ``evaluation/benchmarks/kfoc_tolerance.py``); pass ``1e-8`` or less to match the
            SVD optimum's factors themselves.
        max_iter: most iterations (pairs of ``A``/``G`` updates); a fit in which some block
            stops there warns once (a :class:`ConvergenceWarning` naming every such block and
            its residual). ``blocks[name].info`` is a :class:`SolverInfo` per K-FOC block
            (``iterations``, ``residual``, ``converged``, ``sigma1``, ``scheme``, ``mode``).
        progress: show tqdm progress bars.
        check_determinism: re-run the first batch and raise if outputs or buffers change.
        distributed: all-reduce every sum over data across ``torch.distributed`` ranks (each rank
            iterating over its own shard); ``None`` detects an initialised group.
        dtype: accumulate statistics and factors in this dtype (e.g. ``torch.float64`` for a
            float32 or bfloat16 model); default: the model's dtype, float32 for float16 and
            bfloat16 models (their ``eigh`` / ``cholesky`` need it).
        solver: K-FOC's solver: ``"lanczos"`` (default: Golub–Kahan–Lanczos from K-FAC's
            ``A``, whose first ``G`` update replaces K-FAC's ``Σ B_n``; Ritz factors projected
            onto the PSD cone, the removed part ``O(tol)`` is ``info.psd_clamped``) or
            ``"power"`` (power iteration from K-FAC's ``(A, G)``, PSD at every step). Streaming
            Lanczos runs one data pass per half-step for all layers at once; streaming power
            iteration is Jacobi (both updates of every layer from one pass).
        kfac_reduction: K-FAC over positions: ``"auto"`` (``"reduce"`` for Linear layers over
            sequences and attention, ``"expand"`` for Conv2d), ``"expand"`` or ``"reduce"``
            (:class:`~bayes_kfoc.options.KfacReduction`). K-FOC's blocks do not depend on it.
        warm_start: K-FOC only: a previous fit's factors to start the solver from instead of
            K-FAC's (a :class:`Curvature`, or ``{module: (A, G)}``): Lanczos starts from ``A``,
            power iteration from ``(A, G)``. Modules it lacks start from K-FAC. After a small
            change of the weights (marginal-likelihood training) a refit then converges in a
            step or two. The fixed point, and so the result within ``tol``, is the same.

    Returns:
        A :class:`Curvature` with ``blocks[module_name]``.

    .. warning:: The Fisher is **summed** over data points, not averaged: a loss with mean
       reduction corresponds to ``1/N`` times these blocks.
    """
    opts = FitOptions.parse(
        structure,
        fisher,
        modules,
        exclude=exclude,
        mc_samples=mc_samples,
        seed=seed,
        generator=generator,
        mode=mode,
        memory_budget=memory_budget,
        tol=tol,
        max_iter=max_iter,
        progress=progress,
        check_determinism=check_determinism,
        distributed=distributed,
        dtype=dtype,
        solver=solver,
        kfac_reduction=kfac_reduction,
    )
    guard = ModelGuard(model)
    with torch.inference_mode(False):  # e.g. inside Lightning's test loop
        try:
            curv = _fit(model, loader, opts, guard, _warm_factors(warm_start))
        except Exception as err:
            guard.check(cause=err)
            raise
        guard.check()
    return curv


def _warm_factors(
    warm: Curvature | Mapping[str, tuple[Tensor, Tensor]] | None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """``{module: (A, G)}`` from ``warm_start`` (a :class:`Curvature`'s Kronecker blocks)."""
    if warm is None:
        return {}
    if isinstance(warm, Curvature):
        return {k: (b.A, b.G) for k, b in warm.blocks.items() if isinstance(b, KronBlock)}
    return {k: (a, g) for k, (a, g) in warm.items()}


def _starts(
    setup: FitSetup, first: FirstPass, warm: dict[str, tuple[Tensor, Tensor]]
) -> dict[str, KronSums]:
    """The solver's start per Kronecker module: K-FAC's sums, or the warm-start factors (as
    sums with count 1, so that ``kfac_a`` is the given ``A``)."""
    names = kron_names(setup)
    unknown = sorted(set(warm) - set(names))
    if unknown:
        raise ValueError(
            f"fit_curvature: warm_start names module(s) {unknown} that have no K-FOC block in "
            f"this fit (the Kronecker modules are {names}); pass the factors of a fit of the "
            "same model and modules, or drop those entries."
        )
    out = {}
    for k in names:
        sums = first.kron[k]
        if k not in warm:
            out[k] = sums
            continue
        A, G = warm[k]
        t = next(t for t in setup.targets if t.name == k)
        shape = next(iter(t.param_shapes.values()))  # [d_in, d_out] when transposed
        d_out = int(shape[-1] if t.transposed else shape[0])
        if tuple(A.shape) != tuple(sums.a.shape) or tuple(G.shape) != (d_out, d_out):
            raise ValueError(
                f"fit_curvature: warm_start[{k!r}] has A {tuple(A.shape)} and G "
                f"{tuple(G.shape)}, but module {k!r} needs A {tuple(sums.a.shape)} and G "
                f"({d_out}, {d_out}); pass the factors of a fit of the same model, or drop it."
            )
        like = sums.a
        A = A.to(device=like.device, dtype=like.dtype)
        G = G.to(device=like.device, dtype=like.dtype)
        out[k] = KronSums(A, G, 1)
    return out


def _fit(
    model: nn.Module,
    loader: Iterable[Any],
    opts: FitOptions,
    guard: ModelGuard,
    warm: dict[str, tuple[Tensor, Tensor]],
) -> Curvature:
    setup = prepare(model, loader, opts)
    guard.check()  # the probe's forward passes, before the long work
    opts = setup.passes.opts  # with the accumulation dtype resolved
    with Collector(model, setup.targets, opts.fisher, opts.mc_samples, opts.dtype) as collector:
        first = first_pass(setup, collector)
        solved, used_mode = _solve(setup, collector, first, warm)
    warn_unconverged([(k, r[2]) for k, r in solved.items()], stacklevel=3)
    blocks = _blocks(setup, first, solved)
    info = FitInfo(
        log_likelihood=first.log_likelihood,
        input_shape=tuple(first_tensor(setup.first[0]).shape[1:]),
        base_seed=opts.base_seed,
        cache_bytes_estimate=first.cache_bytes_estimate,
        peak_bytes_estimate=first.peak_bytes_estimate,
    )
    return Curvature(
        blocks,
        opts.structure,
        opts.fisher,
        first.num_data,
        used_mode,
        coverage(model, blocks, setup.targets, setup.skipped),
        info,
    )


def _solve(
    setup: FitSetup,
    collector: Collector,
    first: FirstPass,
    warm: dict[str, tuple[Tensor, Tensor]],
) -> tuple[dict[str, Result], str]:
    """K-FOC's factors per Kronecker module, and how the solver saw the data."""
    opts = setup.passes.opts
    names = kron_names(setup)
    if warm and opts.structure is not Structure.KFOC:
        raise ValueError(
            f"fit_curvature: warm_start applies to structure='kfoc' only (this fit is "
            f"{opts.structure.value!r}); drop warm_start."
        )
    if opts.structure is not Structure.KFOC or not names:
        return {}, "single-pass"
    starts = _starts(setup, first, warm)
    if first.cache is not None:
        red = setup.passes.reducer
        return {k: kfoc_cached(first.cache[k], starts[k], red, opts) for k in names}, "cached"
    stream = lanczos_streaming if opts.solver is Solver.LANCZOS else jacobi_streaming
    return stream(setup.passes, collector, starts), "streaming"


def _blocks(
    setup: FitSetup, first: FirstPass, solved: dict[str, Result]
) -> dict[str, CurvatureBlock]:
    opts = setup.passes.opts
    blocks: dict[str, CurvatureBlock] = {}
    for t in setup.targets:
        block: CurvatureBlock
        if t.name in first.kron:
            if t.name in solved:
                A, G, info = solved[t.name]
            else:  # K-FAC
                sums = first.kron[t.name]
                assert sums.g is not None
                A, G, info = sums.kfac_a, sums.g, None
            _finite(t.name, {"A": A, "G": G})
            block = KronBlock(t.name, t.param_shapes, A, G, t.transposed)
            if info is not None:
                block.info = info
        elif opts.structure is Structure.FULL:
            _finite(t.name, {"dense": first.exact[t.name]})
            block = DenseBlock(t.name, t.param_shapes, first.exact[t.name])
        else:
            _finite(t.name, {"diag": first.exact[t.name]})
            block = DiagBlock(t.name, t.param_shapes, first.exact[t.name])
        blocks[t.name] = block
    return blocks
