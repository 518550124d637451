"""``Laplace``: a post-hoc Laplace approximation of a trained classifier with K-FOC, K-FAC,
diagonal or dense curvature blocks.

The posterior over the selected parameters is ``N(θ*, P^{-1})`` with the block-diagonal
precision ``P_b = F_b + τ_b I``: ``F_b`` the **summed** Fisher block of module ``b`` (from
:func:`bayes_kfoc.fit_curvature`) and ``τ_b`` the prior precision of an isotropic Gaussian prior at
zero. Parameters outside ``modules`` stay at the MAP. Every power of ``P_b`` (sampling, variances,
log-determinants) goes through the eigendecomposition of its factors, with exact damping.

A ``Laplace`` holds a :class:`~bayes_kfoc.Curvature` (on the model's device, in ``eig_dtype``), the
prior and the predictive temperature; tuning is in :mod:`.tuning`, prediction in
:mod:`.predictive`, persistence in :mod:`.serialization`. Samples follow ``parameters_to_vector``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector

from ..blocks import CurvatureBlock
from ..curvature import Curvature, fit_curvature
from ..options import FisherType, GlmPath, Link, PredMethod, Structure
from ..stats import Target, targets_for
from ..stats.inputs import Batches, Inputs, inputs_to, split_inputs
from . import predictive, serialization
from ._guard import check_model, fingerprints
from ._layout import Layout
from ._plan import GlmPlan
from ._posterior import log_evidence
from ._recorder import TRAIN_SAMPLE, Recorder
from .glm_terms import GlmTerms, glm_terms
from .predictive import PosteriorView
from .prior import (
    PriorPrecision,
    check_prior_precision,
    prior_precision_vector,
    scaled_prior_base,
)
from .tuning import Metric, TuningResult, optimize_prior


def _old_positional(what: str, args: tuple[Any, ...], order: tuple[str, ...]) -> dict[str, Any]:
    """Arguments passed by position in a predictive's old order, by name (deprecated: the
    predictives take everything after ``x`` by keyword, in one order)."""
    if len(args) > len(order):
        raise TypeError(
            f"{what}: takes at most {len(order)} arguments after x ({', '.join(order)}), got "
            f"{len(args)}; pass them by keyword."
        )
    names = ", ".join(f"{k}=" for k in order[: len(args)])
    warnings.warn(
        f"{what}: positional arguments after x are deprecated; pass {names} by keyword.",
        DeprecationWarning,
        stacklevel=3,
    )
    return dict(zip(order, args, strict=False))


class Laplace:
    """A Laplace approximation of a trained classifier (laplace-torch's user-facing flow).

    Args:
        model: the trained classifier (logits ``[N, C]``), in eval mode; it is not modified.
        likelihood: ``"classification"`` (softmax / categorical); the only one supported.
        structure: ``"kfoc"`` (default), ``"kfac"``, ``"diag"`` or ``"full"``.
        fisher: ``"exact"``, ``"mc"`` or ``"empirical"`` (see :func:`fit_curvature`).
        subset: deprecated spelling of ``modules`` (a ``DeprecationWarning``; it will be
            removed). Pass ``modules=`` by keyword.
        prior_precision: ``τ``; a scalar, one value per module (dict by module name, or a tensor
            in block order).
        eig_dtype: dtype of the posterior's eigendecompositions (e.g. ``torch.float64`` for
            float32 models); default: the model's dtype, float32 for float16 / bfloat16 models.
            A factor that fails to converge in it is redone in float64 (``curvature.report()``).
        modules: ``"all"`` (default), ``"last_layer"`` or module names: only these are random
            (as in :func:`fit_curvature`; laplace-torch's ``subset_of_weights``).
        chunk_size: at most this many points per chunk in predictions and tuning.
        memory_budget: bytes for the fit's cached statistics and each predictive / tuning chunk
            (default: the fit's; 2 GiB for chunks); too small for one point: ``MemoryError``.
        fit_kwargs: forwarded to :func:`fit_curvature` (``mc_samples``, ``seed``, ``tol``, ...).

    .. warning:: The curvature is the Fisher **summed** over the training set; ``τ`` acts on that
       scale (a model trained with weight decay ``λ`` on a mean loss has ``τ = N·λ``).
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str = "classification",
        structure: str = "kfoc",
        fisher: str = "exact",
        subset: str | Sequence[str] | None = None,
        prior_precision: PriorPrecision = 1.0,
        *,
        modules: str | Sequence[str] | None = None,
        eig_dtype: torch.dtype | None = None,
        chunk_size: int = 256,
        memory_budget: int | None = None,
        progress: bool = True,
        **fit_kwargs: Any,
    ):
        if likelihood != "classification":
            raise ValueError(
                f"Laplace: likelihood={likelihood!r} is not supported; only 'classification' "
                "(softmax logits with integer labels) is."
            )
        if subset is not None:
            warnings.warn(
                "Laplace: subset= is deprecated and will be removed; pass modules= (the same "
                "values: 'all', 'last_layer' or module names).",
                DeprecationWarning,
                stacklevel=2,
            )
            if modules is not None:
                raise ValueError("Laplace: pass modules= only (subset= is its deprecated alias).")
        chosen = modules if modules is not None else subset if subset is not None else "all"
        self.model = model
        self.likelihood = likelihood
        self.structure = Structure.parse(structure, "Laplace: structure")
        self.fisher = FisherType.parse(fisher, "Laplace: fisher")
        self.modules: str | list[str] = chosen if isinstance(chosen, str) else list(chosen)
        self.eig_dtype = eig_dtype
        self.chunk_size = chunk_size
        self.memory_budget = memory_budget
        self.progress = progress
        self.fit_kwargs = fit_kwargs
        fit_kwargs.setdefault("memory_budget", memory_budget)  # None: the fit's own default
        self.last_glm: GlmPlan | None = None  # how the latest GLM pass ran (which path)
        self._prior_init = prior_precision
        if not isinstance(prior_precision, dict):
            check_prior_precision(torch.as_tensor(prior_precision, dtype=torch.float64))
        self.curvature: Curvature | None = None
        self.tuning: TuningResult | None = None
        self.temperature = 1.0  # the predictive's logits are divided by it (tuned with τ)
        self._tau: Tensor | None = None
        self._train_sample: Batches | None = None
        self._mc_checked: tuple[tuple[float, ...], float] | None = None

    @property
    def subset(self) -> str | list[str]:
        """Deprecated alias of :attr:`modules` (a ``DeprecationWarning``)."""
        warnings.warn(
            "Laplace.subset is deprecated and will be removed; read Laplace.modules.",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.modules

    # -- fitting --------------------------------------------------------------------------------
    @property
    def fitted(self) -> bool:
        return self.curvature is not None

    def _require_fit(self, what: str) -> Curvature:
        if self.curvature is None:
            raise RuntimeError(f"Laplace.{what}: call fit(train_loader) first.")
        return self.curvature

    @torch.inference_mode(False)  # e.g. inside Lightning's test loop
    def fit(self, train_loader: Iterable[Any]) -> Laplace:
        """Fit the curvature over every batch of ``train_loader`` (``(x, y)`` pairs).

        The first :data:`TRAIN_SAMPLE` points the fit sees are kept (on the CPU) for tuning
        without validation data (``optimize_prior_precision(method="consistency")``).
        """
        recorder = Recorder(train_loader, TRAIN_SAMPLE)
        curv = fit_curvature(
            self.model,
            recorder,
            self.structure,
            self.fisher,
            self.modules,
            progress=self.progress,
            **self.fit_kwargs,
        )
        self._install(curv)
        self._train_sample = recorder.sample()
        self.prior_precision = self._prior_init
        return self

    def _install(self, curv: Curvature) -> None:
        p = next(self.model.parameters())
        self.device = p.device
        half = p.dtype in (torch.float16, torch.bfloat16)  # no eigh / cholesky in half types
        curv = curv.to(self.device, self.eig_dtype or (torch.float32 if half else p.dtype))
        curv.decompose()  # once, up front (fallbacks noted in coverage); raises on a non-PSD factor
        self.curvature = curv
        self.tuning = None
        self.temperature = 1.0
        self.layout = Layout.build(
            self.model, {k: list(b.param_shapes) for k, b in curv.blocks.items()}, self.device
        )
        self.map_vector = parameters_to_vector(self.model.parameters()).detach().clone()
        self._weights = fingerprints(self.model)  # predictions check the model still has them
        self._targets: list[Target] = targets_for(self.model, list(curv.blocks))

    @property
    def blocks(self) -> dict[str, CurvatureBlock]:
        """The posterior's curvature blocks by module name, in block (forward-call) order."""
        return {} if self.curvature is None else self.curvature.blocks

    def example_input(self) -> Inputs | None:
        """The first training point ``fit`` recorded (a batch of one; ``None`` when loaded)."""
        if not self._train_sample:
            return None
        return inputs_to(split_inputs(self._train_sample[0][0], 1)[0], self.device)

    @property
    def num_data(self) -> int:
        return self._require_fit("num_data").num_data

    @property
    def log_likelihood(self) -> float:
        """``Σ_n log p(y_n | x_n, θ*)`` over the training data (the evidence's data term)."""
        return self._require_fit("log_likelihood").info.log_likelihood

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._require_fit("input_shape").info.input_shape

    @property
    def num_params(self) -> int:
        """Number of random (``modules``) parameters."""
        return sum(b.num_params for b in self.blocks.values())

    @property
    def mean(self) -> Tensor:
        """``θ*`` of the random parameters, block after block."""
        self._require_fit("mean")
        return torch.cat([self.map_vector[i] for i in self.layout.block_index.values()])

    # -- prior precision ------------------------------------------------------------------------
    @property
    def prior_precision(self) -> Tensor:
        """``τ`` per block (block order), float64."""
        self._require_fit("prior_precision")
        assert self._tau is not None
        return self._tau

    @prior_precision.setter
    def prior_precision(self, value: PriorPrecision) -> None:
        self._require_fit("prior_precision")
        self._tau = prior_precision_vector(value, list(self.blocks)).to(self.device)

    def prior_precision_dict(self) -> dict[str, float]:
        return {k: float(t) for k, t in zip(self.blocks, self.prior_precision, strict=True)}

    def _block_sq_norms(self) -> Tensor:
        return torch.stack(
            [self.map_vector[i].double().square().sum() for i in self.layout.block_index.values()]
        )

    def scaled_prior_base(self) -> Tensor:
        """``P_b / ||θ*_b||²`` per block (block order, float64): the scaled prior of scale ``s``
        is ``τ_b = s · base_b`` (``optimize_prior_precision(prior="scaled")``)."""
        self._require_fit("scaled_prior_base")
        sizes = torch.tensor([b.num_params for b in self.blocks.values()], dtype=torch.float64)
        return scaled_prior_base(self._block_sq_norms().cpu(), sizes)

    def log_marginal_likelihood(self, prior_precision: Tensor | float | None = None) -> Tensor:
        """The Laplace evidence ``log p(D|θ*) − ½Σ τ_b||θ_b||² + ½Σ P_b log τ_b − ½ log det P``.

        Differentiable in ``prior_precision`` (scalar or one value per block; default: current).
        """
        self._require_fit("log_marginal_likelihood")
        given = self.prior_precision if prior_precision is None else prior_precision
        tau = torch.as_tensor(given, dtype=torch.float64, device=self.device)
        tau = tau.expand(len(self.blocks)) if tau.numel() == 1 else tau.flatten()
        check_prior_precision(tau.detach())
        blocks = list(self.blocks.values())
        return log_evidence(blocks, tau, self._block_sq_norms(), self.log_likelihood)

    def optimize_prior_precision(
        self,
        method: str | None = None,
        *,
        val_loader: Iterable[Any] | None = None,
        train_loader: Iterable[Any] | None = None,
        prior: str = "scaled",
        temperature: bool = True,
        grid: Sequence[float] | Tensor | None = None,
        metric: Metric | None = None,
        one_se: bool = True,
        per_module: bool = True,
        pred_method: str = "glm",
        link: str = "probit",
        n_samples: int = 100,
    ) -> Tensor:
        """Tune the prior (and the predictive temperature), install them, and return ``τ`` (one
        value per block); the full outcome is :attr:`tuning` (a
        :class:`~bayes_kfoc.laplace.TuningResult`).

        The prior is ``τ_b = s · P_b / ||θ*_b||²`` (``prior="scaled"``, the default: one scale
        ``s`` over blocks whose base precision makes the prior's mean squared weight that of the
        MAP, equivariant to the arbitrary scale of normalised weights) or ``τ_b = s``
        (``prior="global"``).

        - ``"gridsearch"`` (the default when ``val_loader`` is given): for the GLM probit
          predictive, ``s`` on a log grid (``grid``, default
          :data:`~bayes_kfoc.laplace.tuning.DEFAULT_GRID`, expanded while the best scale is at an
          end, then refined) jointly with the predictive temperature ``T ≥ 1``
          (``temperature=True``; logits divided by ``T``) minimising the validation NLL (or
          ``metric(probs, labels)``); the one-standard-error rule (``one_se``) then takes the
          smallest scale within one paired standard error of the best. Contains the MAP and
          temperature scaling (``s → ∞``) as special cases. Other predictives search ``s`` alone on
          ``grid`` with ``T = 1``.
        - ``"consistency"`` (the default without ``val_loader``): the largest posterior whose
          drop of the training log-likelihood stays as the Laplace approximation predicts, on
          up to 1,000 training points recorded by :meth:`fit` (or from ``train_loader``);
          ``T = 1``. See :mod:`bayes_kfoc.laplace.tuning.consistency`.
        - ``"marglik"``: maximise :meth:`log_marginal_likelihood` exactly, per module
          (``per_module=True``) or one shared τ; ``T = 1``.
          Post-hoc marglik on *all* weights is underconfident (README, "Defaults and why").
        """
        self._require_fit("optimize_prior_precision")
        result = optimize_prior(
            self.view(),
            self._block_sq_norms(),
            self.num_data,
            self._train_sample,
            method=method,
            per_module=per_module,
            val_loader=val_loader,
            train_loader=train_loader,
            prior=prior,
            temperature=temperature,
            grid=grid,
            metric=metric,
            pred_method=pred_method,
            link=link,
            n_samples=n_samples,
            one_se=one_se,
        )
        self.prior_precision = result.prior_precision
        self.temperature = result.temperature
        self.tuning = result
        return self.prior_precision

    # -- sampling and prediction ------------------------------------------------------------------
    def view(
        self, prior_precision: Tensor | None = None, glm: str | GlmPath = GlmPath.AUTO
    ) -> PosteriorView:
        """The fitted posterior as a :class:`~bayes_kfoc.laplace.predictive.PosteriorView`
        (at the current ``τ``, or at ``prior_precision``: one value per block; GLM on the
        ``glm`` path); raises if the model left eval mode or its weights changed since the fit."""
        self._require_fit("view")
        check_model(self.model, self._weights, "Laplace")
        tau = self.prior_precision if prior_precision is None else prior_precision
        return PosteriorView(
            model=self.model,
            blocks=self.blocks,
            tau=tau.to(self.device),
            map_vector=self.map_vector,
            layout=self.layout,
            targets=self._targets,
            input_shape=self.input_shape,
            chunk_size=self.chunk_size,
            temperature=self.temperature,
            memory_budget=self.memory_budget,
            glm=GlmPath.parse(glm, "Laplace: glm"),
            report=self._record_glm,
        )

    def _record_glm(self, plan: GlmPlan) -> None:  # which GLM path ran, for the user
        self.last_glm = plan

    def sample(self, n_samples: int = 100, generator: torch.Generator | None = None) -> Tensor:
        """``[n, P]`` full parameter vectors (``parameters_to_vector`` order) from the posterior:
        random parameters are ``θ* + P_b^{-1/2} ε``, all others stay at the MAP."""
        return predictive.sample(self.view(), n_samples, generator)

    def glm_terms(self, x: Tensor | Mapping[str, Any]) -> GlmTerms:
        """The GLM probit predictive at ``x`` for any prior and temperature: one exact Jacobian
        pass now, then one contraction per block for each prior (:class:`GlmTerms`:
        ``.probs(prior_precision=... | scale=..., temperature=...)``, ``.variances(...)``).
        Memory: every point's terms are kept; call it on chunks of points that fit."""
        return glm_terms(self.view(glm=GlmPath.EXACT), x, self.scaled_prior_base())

    def glm_distribution(self, x: Tensor | Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """Mean ``[B, C]`` and covariance ``[B, C, C]`` of the linearised logits at ``x``."""
        return predictive.glm_distribution(self.view(), x)

    def predictive_samples(
        self,
        x: Tensor | Mapping[str, Any],  # a mapping is passed as model(**x)
        *old: Any,
        method: str = "glm",
        n_samples: int = 100,
        generator: torch.Generator | None = None,
        glm: str = "auto",
    ) -> Tensor:
        """``[n, B, C]`` probability samples: GLM logit draws (``glm`` as in :meth:`predict`),
        or the network at sampled weights.

        Everything after ``x`` is keyword-only, as in :meth:`predict`. The old positional form
        ``predictive_samples(x, n_samples, method, generator, glm)`` still works, with a
        ``DeprecationWarning``.
        """
        if old:
            given = _old_positional(
                "Laplace.predictive_samples", old, ("n_samples", "method", "generator", "glm")
            )
            method = given.get("method", method)
            n_samples = given.get("n_samples", n_samples)
            generator = given.get("generator", generator)
            glm = given.get("glm", glm)
        view = self.view(glm=glm)
        m = PredMethod.parse(method, "Laplace.predictive_samples: method")
        self._check_sampling(m, view)
        return predictive.predictive_samples(view, x, m, n_samples, generator)

    def _check_sampling(self, m: PredMethod, view: PosteriorView) -> None:
        """Once per prior: warn when weight sampling collapses on the recorded training points."""
        if m is not PredMethod.MC or self._train_sample is None:
            return
        key = (tuple(self.prior_precision.tolist()), self.temperature)
        if self._mc_checked != key:
            self._mc_checked = key
            predictive.warn_if_sampling_collapses(view, self._train_sample)

    def predict(
        self,
        x: Tensor | Mapping[str, Any],  # a mapping is passed as model(**x)
        *old: Any,
        method: str = "glm",
        link: str = "probit",
        n_samples: int = 100,
        generator: torch.Generator | None = None,
        glm: str = "auto",
    ) -> Tensor:
        """Predictive class probabilities ``[B, C]``.

        ``method="glm"`` (default) linearises the network around ``θ*``: ``link="probit"``
        (default, closed form) or ``link="mc"`` (``n_samples`` logit draws). ``method="mc"``
        averages the softmax of the network at ``n_samples`` sampled weight vectors.
        ``glm``: ``"auto"``, ``"exact"`` or ``"sampled"`` (:class:`~bayes_kfoc.options.GlmPath`).
        Everything after ``x`` is keyword-only (the old positional form works, with a
        ``DeprecationWarning``).
        """
        if old:
            given = _old_positional(
                "Laplace.predict", old, ("method", "link", "n_samples", "generator", "glm")
            )
            method = given.get("method", method)
            link = given.get("link", link)
            n_samples = given.get("n_samples", n_samples)
            generator = given.get("generator", generator)
            glm = given.get("glm", glm)
        view = self.view(glm=glm)
        m = PredMethod.parse(method, "Laplace.predict: method")
        lk = Link.parse(link, "Laplace.predict: link")
        self._check_sampling(m, view)
        return predictive.predict(view, x, m, lk, n_samples, generator)

    __call__ = predict

    # -- persistence ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild the posterior, as tensors and plain Python values."""
        curv = self._require_fit("state_dict")
        return serialization.posterior_state(
            self.likelihood,
            self.structure,
            self.fisher,
            self.modules,
            self.model,
            curv,
            self.prior_precision,
            self.map_vector,
            self.temperature,
        )

    @torch.inference_mode(False)
    def load_state_dict(self, state: dict[str, Any], check_weights: bool = True) -> Laplace:
        """Restore a posterior; the architecture must match, the model's weights the MAP."""
        curv, map_vector = serialization.posterior_from_state(state, self.model, check_weights)
        self.likelihood = state["likelihood"]
        self.structure, self.fisher = curv.structure, curv.fisher
        self.modules = state["subset"]
        self.eig_dtype = next(iter(curv.blocks.values())).dtype
        self._install(curv)
        self.map_vector = map_vector.to(self.device, self.map_vector.dtype)
        self.prior_precision = state["prior_precision"]
        self.temperature = float(state.get("temperature", 1.0))
        return self

    def save(self, path: str | Path) -> None:
        """Write :meth:`state_dict` atomically, with a checksum (see :mod:`.serialization`)."""
        serialization.write_state(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | Path, model: nn.Module, check_weights: bool = True) -> Laplace:
        """Read a saved posterior (``torch.load(weights_only=True)``, checksum verified) onto
        ``model``."""
        state = serialization.read_state(path)
        la = cls(
            model,
            likelihood=state["likelihood"],
            structure=state["structure"],
            fisher=state["fisher"],
            modules=state["subset"],  # the file format's key (kept: saved files stay readable)
            progress=False,
        )
        return la.load_state_dict(state, check_weights=check_weights)

    def __repr__(self) -> str:
        status = f"{len(self.blocks)} blocks, {self.num_params} params" if self.fitted else "unfit"
        return f"Laplace(structure='{self.structure}', fisher='{self.fisher}', {status})"
