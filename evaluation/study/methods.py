"""The method registry: a name → a function that fits a predictor on a trained MAP network.

Every method returns a :class:`FittedMethod`: a ``predict(x) -> probs [B, C]`` callable, and for
Bayesian methods ``samples(x, n, seed) -> [n, B, C]`` probability samples (for mutual
information), the logits the energy and max-logit OOD scores read (see :class:`FittedMethod`),
with its fit / tuning times and chosen hyperparameters.

Names:

- ``map``: the network's softmax;
- ``temp``: temperature scaling, ``T`` by L-BFGS on the validation NLL
  (:mod:`evaluation.baselines.temperature`);
- ``diag``, ``kfac``, ``kfoc``: :class:`bayes_kfoc.Laplace` on all weights, and ``diag-ll``,
  ``kfac-ll``, ``kfoc-ll`` on the last layer. Each is fitted with the exact Fisher, its prior
  precision tuned by the library's default (``optimize_prior_precision(val_loader=...)``: a
  validation grid search on NLL), and predicts with the default GLM + probit;
- ``laplace-torch`` / ``laplace-torch-ll``: laplace-torch's ``kron`` on all weights / the last
  layer with the same tuning and predictive, only when ``laplace`` is importable (never required);
- ``marglik-kfoc``, ``marglik-kfac``, ``marglik-diag``, ``marglik-full``: a fresh network trained
  with :func:`bayes_kfoc.marglik_training` (prior learned by the evidence, no validation data;
  :mod:`evaluation.study.marglik`).

A base Laplace name given on the command line (``kfoc``) expands to both subsets; ``kfoc-ll``
alone asks for the last layer only.
"""

from __future__ import annotations

import importlib.util
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from bayes_kfoc import Laplace
from bayes_kfoc.stats import call_model
from datasets import Splits
from evaluation.baselines.temperature import TemperatureScaled
from evaluation.structures import STRUCTURES
from evaluation.study.marglik import MARGLIK_PREFIX, MARGLIK_STRUCTURES, run_marglik

__all__ = [
    "METHODS",
    "FitOptions",
    "FittedMethod",
    "MethodSpec",
    "StudyWarning",
    "expand_methods",
    "fit_method",
    "laplace_torch_available",
    "method_names",
]


PEER = "laplace-torch"
LL_SUFFIX = "-ll"
SUBSETS: tuple[str, ...] = ("all", "last_layer")
FIT_BATCH_SIZE = 256


class StudyWarning(UserWarning):
    """A fitted method is degenerate on this data (recorded in the report's notes)."""


class Predictor(Protocol):
    """Anything with ``predict(x) -> probs [B, C]``."""

    def predict(self, x: Tensor) -> Tensor: ...


SampleFn = Callable[[Tensor, int, int], Tensor]
"""``(x, n_samples, seed) -> [n_samples, B, C]`` probability samples."""


@dataclass
class FittedMethod:
    """A method fitted on one seed's MAP network.

    Attributes:
        name: Registry name (e.g. ``"kfoc-ll"``).
        predict: ``x -> probs [B, C]``.
        samples: ``(x, n, seed) -> [n, B, C]`` for Bayesian methods, ``None`` for point
            predictors (no mutual information).
        glm: ``x -> (mean [B, C], cov [B, C, C])`` of the linearised, tempered logits, for
            GLM-probit Laplace methods: ``predict`` is its probit and ``samples`` its Gaussian
            draws, so the evaluation computes it once per input and derives both (``None``
            otherwise).
        logits: ``x -> [B, C]``, the logits of the logit-based OOD scores (energy, max-logit):
            the network's logits for ``map``, divided by ``T`` for ``temp``, the GLM mean of
            laplace-torch (the MAP logits). For a method with ``glm`` the evaluation uses the
            GLM mean instead (the MAP logits divided by the method's temperature), and this is
            ``None``; ``None`` also where a method has no logits.
        posterior: The fitted :class:`bayes_kfoc.Laplace` of a bayes_kfoc method (the prior
            sweep re-evaluates it at other priors), ``None`` otherwise.
        convergence: K-FOC's solver record per block (``Curvature.convergence()``: iterations,
            residual, σ₁, converged, ...), JSON-ready; ``None`` for other methods.
        fit_seconds: Wall time of fitting (curvature / nothing).
        tune_seconds: Wall time of hyperparameter tuning (prior precision / temperature).
        hyperparameters: Chosen values (``prior_precision``, ``temperature``, ...), finite floats
            or lists of them.
        marglik: A marglik method's per-epoch trace (:func:`evaluation.study.marglik.trace_json`),
            ``None`` otherwise.
    """

    name: str
    predict: Callable[[Tensor], Tensor]
    samples: SampleFn | None
    glm: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None
    logits: Callable[[Tensor], Tensor] | None = None
    posterior: Laplace | None = field(default=None, repr=False)
    convergence: dict[str, dict[str, float | int | bool | str]] | None = None
    fit_seconds: float = 0.0
    tune_seconds: float = 0.0
    hyperparameters: dict[str, float | list[float]] = field(default_factory=dict)
    marglik: dict[str, Any] | None = None


@dataclass(frozen=True)
class FitOptions:
    """Settings every method may read.

    Attributes:
        tau_grid: Prior scales ``s`` searched on the validation NLL (Laplace methods: the
            scaled prior ``τ_b = s · P_b / ||θ*_b||²``, expanded past the ends when the best
            scale is there); ``None`` for the library's default grid.
        seed, epochs, lr, batch_size: the MAP's training settings, which the marglik methods
            repeat for their own network.
    """

    tau_grid: tuple[float, ...] | None = None
    seed: int = 0
    epochs: int = 100
    lr: float = 1e-3
    batch_size: int = 64


FitFn = Callable[[nn.Module, Splits, FitOptions], FittedMethod]


@dataclass(frozen=True)
class MethodSpec:
    """One registry entry.

    Attributes:
        name: Registry name.
        description: One line for the report.
        fit: ``(model, splits, options) -> FittedMethod``.
        bayesian: Whether the method has predictive samples (mutual information).
        optional: Whether it depends on a package that may be absent (laplace-torch).
    """

    name: str
    description: str
    fit: FitFn
    bayesian: bool
    optional: bool = False


def _loader(data: torch.utils.data.Dataset, batch_size: int = FIT_BATCH_SIZE) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def _fit_map(model: nn.Module, splits: Splits, options: FitOptions) -> FittedMethod:
    @torch.no_grad()
    def logits(x: Tensor) -> Tensor:
        return call_model(model, x)

    def predict(x: Tensor) -> Tensor:
        return torch.softmax(logits(x), dim=-1)

    return FittedMethod("map", predict, None, logits=logits)


def _fit_temperature(model: nn.Module, splits: Splits, options: FitOptions) -> FittedMethod:
    x_val, y_val = splits.val.tensors
    start = time.perf_counter()
    scaled = TemperatureScaled.fit(model, x_val, y_val)
    with torch.no_grad():
        perfect = bool((call_model(model, x_val).argmax(1) == y_val).all())
    if perfect:
        warnings.warn(
            "the validation split is classified without error, so its NLL keeps falling as "
            "T → 0 and temperature scaling sharpens the predictive arbitrarily (ill-posed here)",
            StudyWarning,
            stacklevel=2,
        )

    @torch.no_grad()
    def logits(x: Tensor) -> Tensor:
        return call_model(model, x) / scaled.temperature

    return FittedMethod(
        "temp",
        scaled.predict,
        None,
        logits=logits,
        tune_seconds=time.perf_counter() - start,
        hyperparameters={"temperature": scaled.temperature},
    )


def _plain(value: object) -> float | int | bool | str:
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Tensor) and value.numel() == 1:
        return _plain(value.item())
    return str(value)


def _convergence(la: Laplace) -> dict[str, dict[str, float | int | bool | str]] | None:
    """K-FOC's per-block solver record, JSON-ready (``None`` when there is none)."""
    if la.curvature is None:
        return None
    record = la.curvature.convergence()
    if not record:
        return None
    return {block: {k: _plain(v) for k, v in info.items()} for block, info in record.items()}


def _laplace_fit(structure: str, subset: str) -> FitFn:
    name = structure + (LL_SUFFIX if subset == "last_layer" else "")

    def fit(model: nn.Module, splits: Splits, options: FitOptions) -> FittedMethod:
        start = time.perf_counter()
        la = Laplace(model, structure=structure, modules=subset, progress=False)
        la.fit(_loader(splits.train))
        fitted = time.perf_counter()
        la.optimize_prior_precision(val_loader=_loader(splits.val), grid=options.tau_grid)
        tuned = time.perf_counter()
        tau = [float(t) for t in la.prior_precision.flatten()]
        tuning = la.tuning
        if (
            tuning is not None
            and tuning.at_edge
            and tuning.grid
            and tuning.scale == tuning.grid[-1]
        ):
            warnings.warn(
                f"the prior scale chosen on the validation NLL is the largest searched "
                f"(s = {tuning.scale:g}): the validation split prefers the MAP (with temperature "
                f"T = {la.temperature:.3g}), and the posterior adds almost no variance",
                StudyWarning,
                stacklevel=2,
            )

        def samples(x: Tensor, n: int, seed: int) -> Tensor:
            gen = torch.Generator(la.device).manual_seed(seed)
            return la.predictive_samples(x, n_samples=n, generator=gen)

        hyperparameters: dict[str, float | list[float]] = {
            "prior_precision": math.exp(sum(math.log(t) for t in tau) / len(tau)),
            "prior_precision_per_block": tau,
            "temperature": float(la.temperature),
            "num_params": float(la.num_params),
        }
        if tuning is not None and tuning.scale is not None:  # absent for the evidence
            hyperparameters["prior_scale"] = float(tuning.scale)

        return FittedMethod(
            name,
            la.predict,
            samples,
            glm=la.glm_distribution,
            posterior=la,
            convergence=_convergence(la),
            fit_seconds=fitted - start,
            tune_seconds=tuned - fitted,
            hyperparameters=hyperparameters,
        )

    return fit


def _peer_fit(subset: str) -> FitFn:
    def fit(model: nn.Module, splits: Splits, options: FitOptions) -> FittedMethod:
        from evaluation.study.laplace_torch import fit_laplace_torch

        name = PEER + (LL_SUFFIX if subset == "last_layer" else "")
        peer = fit_laplace_torch(model, _loader(splits.train), _loader(splits.val), subset)

        @torch.no_grad()
        def logits(x: Tensor) -> Tensor:  # the GLM mean: the MAP logits (no temperature)
            return call_model(model, x)

        return FittedMethod(
            name,
            peer.predict,
            peer.samples,
            logits=logits,
            fit_seconds=peer.fit_seconds,
            tune_seconds=peer.tune_seconds,
            hyperparameters={"prior_precision": peer.prior_precision},
        )

    return fit


def _marglik_fit(structure: str) -> FitFn:
    def fit(model: nn.Module, splits: Splits, options: FitOptions) -> FittedMethod:
        run = run_marglik(
            model,
            splits.train,
            structure,
            epochs=options.epochs,
            lr=options.lr,
            batch_size=options.batch_size,
            seed=options.seed,
        )
        la = run.laplace

        def samples(x: Tensor, n: int, seed: int) -> Tensor:
            gen = torch.Generator(la.device).manual_seed(seed)
            return la.predictive_samples(x, n_samples=n, generator=gen)

        tau = [float(t) for t in la.prior_precision.flatten()]
        fit_s = sum(run.trace["fit_seconds"])
        hyper_s = sum(run.trace["hyper_seconds"])
        return FittedMethod(
            MARGLIK_PREFIX + structure,
            la.predict,
            samples,
            glm=la.glm_distribution,
            posterior=la,
            convergence=_convergence(la),
            fit_seconds=run.seconds - hyper_s,  # training, with its curvature fits
            tune_seconds=hyper_s,
            hyperparameters={
                "prior_precision": math.exp(sum(math.log(t) for t in tau) / len(tau)),
                "prior_precision_per_block": tau,
                "temperature": 1.0,
                "num_params": float(la.num_params),
                "curvature_seconds": fit_s,
            },
            marglik=run.trace,
        )

    return fit


def _build_registry() -> dict[str, MethodSpec]:
    reg = {
        "map": MethodSpec("map", "MAP network, softmax of the logits", _fit_map, False),
        "temp": MethodSpec(
            "temp", "temperature scaling (L-BFGS on the validation NLL)", _fit_temperature, False
        ),
    }
    words = {"all": "all weights", "last_layer": "last layer"}
    for s in STRUCTURES:
        for subset in SUBSETS:
            name = s + (LL_SUFFIX if subset == "last_layer" else "")
            reg[name] = MethodSpec(
                name,
                f"bayes_kfoc Laplace, {s} curvature, {words[subset]}; τ by validation grid "
                "search (NLL), GLM probit predictive",
                _laplace_fit(s, subset),
                True,
            )
    for subset in SUBSETS:
        name = PEER + (LL_SUFFIX if subset == "last_layer" else "")
        reg[name] = MethodSpec(
            name,
            f"laplace-torch kron, {words[subset]}; τ by validation grid search, GLM probit",
            _peer_fit(subset),
            True,
            optional=True,
        )
    for s in MARGLIK_STRUCTURES:
        reg[MARGLIK_PREFIX + s] = MethodSpec(
            MARGLIK_PREFIX + s,
            f"a fresh network trained by bayes_kfoc.marglik_training, {s} curvature; τ per "
            "module learned by the Laplace evidence (no validation data), GLM probit, T = 1",
            _marglik_fit(s),
            True,
        )
    return reg


METHODS: dict[str, MethodSpec] = _build_registry()
"""Every method name → its :class:`MethodSpec`, in report order."""

BASE_NAMES: tuple[str, ...] = ("map", "temp", *STRUCTURES, PEER)
"""Names that may be given without a subset suffix."""


def method_names() -> tuple[str, ...]:
    """Every name ``--methods`` accepts (base names expand to both subsets)."""
    names = list(BASE_NAMES)
    names += [n for n in METHODS if n not in names]
    return tuple(names)


def laplace_torch_available() -> bool:
    """Whether laplace-torch (module ``laplace``) is importable."""
    return importlib.util.find_spec("laplace") is not None


def expand_methods(requested: Iterable[str], subsets: Sequence[str] = SUBSETS) -> tuple[str, ...]:
    """Registry names for the requested ones, in registry order, without duplicates.

    A Laplace base name (``kfoc``, ``laplace-torch``) becomes one entry per subset in
    ``subsets`` (``kfoc`` for ``"all"``, ``kfoc-ll`` for ``"last_layer"``).

    Raises:
        ValueError: On an unknown name or subset (the message lists the valid ones).
    """
    bad_subsets = [s for s in subsets if s not in SUBSETS]
    if bad_subsets or not subsets:
        raise ValueError(
            f"unknown subset(s) {bad_subsets or list(subsets)}; valid subsets: {', '.join(SUBSETS)}"
        )
    wanted: set[str] = set()
    for r in requested:
        if r in ("map", "temp") or (r.startswith(MARGLIK_PREFIX) and r in METHODS):
            wanted.add(r)
        elif r.endswith(LL_SUFFIX) and r in METHODS:
            wanted.add(r)
        elif r in (*STRUCTURES, PEER):
            wanted.update(r + (LL_SUFFIX if s == "last_layer" else "") for s in subsets)
        else:
            raise ValueError(
                f"unknown method {r!r}; valid methods: {', '.join(method_names())} (a base "
                "Laplace name such as 'kfoc' runs on all weights and on the last layer)"
            )
    return tuple(n for n in METHODS if n in wanted)


def fit_method(
    name: str, model: nn.Module, splits: Splits, options: FitOptions | None = None
) -> FittedMethod:
    """Fit the method ``name`` on ``model`` (the seed's MAP network) with ``splits``."""
    return METHODS[name].fit(model, splits, options or FitOptions())
