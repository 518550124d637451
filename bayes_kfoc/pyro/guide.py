"""``LaplaceGuide``: a fitted :class:`~bayes_kfoc.Laplace` posterior as a Pyro ``AutoGuide``.

For every posterior block (one module) the guide samples **one auxiliary latent** from the
block's exact Gaussian posterior ``N(θ*_b, (F_b + τ_b I)^{-1})`` (``F_b`` the **summed** Fisher
block, ``τ_b`` the prior precision), and gives each model site of that module its value through
``Delta`` (log-density 0, so the ELBO's guide term is the block log-densities, exact):

- Kronecker blocks: a :class:`KroneckerMatrixNormal` with event shape ``(d_out, n)``, the matrix
  ``W̄ = [W b]`` (weight flattened to ``d_out x d_in``, bias as the **last column**); the
  ``weight`` site is ``W̄[..., :d_in]`` reshaped, the ``bias`` site ``W̄[..., d_in]``;
- diagonal blocks: ``Normal(θ*, (d + τ)^{-1/2}).to_event(1)`` over the module's parameters in
  ``parameters_to_vector`` order (weight row-major, then bias), split into the sites;
- dense blocks: ``MultivariateNormal(θ*, precision_matrix=F + τI)``, split the same way.

Model sites of parameters outside the Laplace subset are ``Delta`` at the MAP.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.initialization import init_to_sample
from pyro.nn import PyroModule
from torch import Tensor, nn

from ..laplace import PriorPrecision, prior_precision_vector
from ._functional import NetworkModel
from ._prototype import Observed, check_prototype, observed_site
from .posteriors import BlockPosterior, build_posteriors

if TYPE_CHECKING:
    from ..laplace import Laplace

__all__ = ["LaplaceGuide"]


class LaplaceGuide(AutoGuide):
    """A Pyro guide sampling the Laplace posterior of ``laplace`` for the sites of ``model``.

    Model site ``prefix + name`` is the parameter ``name`` of ``laplace.model`` (``prefix`` is
    ``""`` for :func:`~bayes_kfoc.pyro.bayesian_model`). The model is traced once, at
    construction, with ``example_args``; every latent site must be such a parameter, with the
    parameter's shape as its value shape and event shape (declare priors with
    ``.to_event(ndim)``), outside any plate; every parameter of a posterior block must be a
    latent site. Otherwise a ``ValueError`` names the site and the fix.

    The guide keeps everything it needs in buffers (``state_dict`` round-trips, ``.to(device)``
    moves it) and holds no reference to ``laplace``. It works with ``Predictive`` (sequential and
    ``parallel=True``), ``poutine.trace`` and ``Trace_ELBO``.

    Args:
        model: a Pyro model, e.g. ``bayesian_model(net, ...)`` or a user-written one.
        laplace: a fitted :class:`~bayes_kfoc.Laplace`.
        prefix: the model's site names are ``prefix + parameter name``.
        example_args: positional arguments for the one prototype trace. Default:
            ``(zeros(1, *input_shape), zeros(1, dtype=long))``, i.e. ``model(x, y)`` with the
            labels observed (so the likelihood site is not mistaken for a latent one).
        example_kwargs: keyword arguments for the prototype trace.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        laplace: Laplace,
        *,
        prefix: str = "",
        example_args: Sequence[Any] | None = None,
        example_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(model)
        self.prefix = prefix
        self.laplace: Laplace | None = None  # set by from_model; dropped when pickling
        posteriors, fixed = build_posteriors(laplace, prefix, self._latent_name)
        map_vector = laplace.map_vector.detach()
        self.register_buffer("map_reference", map_vector.new_zeros(0))
        self.posteriors = nn.ModuleList(posteriors)
        keys = {k: f"fixed{j}" for j, k in enumerate(laplace.layout.offsets)}
        for site, value in fixed:
            self.register_buffer(keys[site.param], value)
        self._observed: Observed | None = None  # the likelihood site; set by _setup_prototype
        self._all_fixed = tuple((site, keys[site.param]) for site, _ in fixed)
        self._fixed = self._all_fixed  # those that are model sites; set by _setup_prototype
        if example_args is None:
            p = map_vector
            example = laplace.example_input()  # a recorded training point (also dict inputs)
            example_args = (
                torch.zeros(1, *laplace.input_shape, dtype=p.dtype, device=p.device)
                if example is None
                else example,
                torch.zeros(1, dtype=torch.long, device=p.device),
            )
        self._setup_prototype(*example_args, **dict(example_kwargs or {}))

    # -- user-written Pyro models ---------------------------------------------------------------
    @classmethod
    def from_model(
        cls,
        model: Callable[..., Any],
        train_loader: Iterable[Any],
        *,
        net: PyroModule | None = None,
        map_params: Mapping[str, Tensor] | None = None,
        structure: str = "kfoc",
        subset: str | Sequence[str] = "all",
        prior_precision: PriorPrecision | None = None,
        obs_site: str | None = None,
        num_steps: int = 1000,
        lr: float = 1e-2,
        init_loc_fn: Callable[..., Any] = init_to_sample,
        seed: int = 0,
        progress: bool = False,
        **laplace_kwargs: Any,
    ) -> LaplaceGuide:
        """Fit a Laplace guide to a user-written Pyro BNN: MAP, curvature, guide.

        Supported models: ``model(x, y)`` whose only latent sites are
        :class:`pyro.nn.PyroSample` weights of one network, with zero-mean ``Normal`` priors over
        whole parameters (``.expand(shape).to_event(ndim)``) and one prior scale per module
        (modules may differ), and a ``Categorical`` likelihood. The network is either

        - a :class:`pyro.nn.PyroModule` attribute of the model mapping ``x`` to logits (TyXe
          layout; found automatically, or ``net=``), or
        - the model itself (Pyro's tutorial layout: ``self.fc1 = PyroModule[nn.Linear](...)``
          and ``forward(x, y=None)`` holding the plate): the logits are then read from the
          observed ``Categorical`` site (``obs_site``, default: the only observed site), so the
          forward may return anything.

        Ordinary ``nn.Parameter`` s of the network stay deterministic (outside the posterior).
        Other latent sites, non-Gaussian or non-zero mean priors, and scales that vary within a
        module raise errors naming the site.

        Steps: (1) the MAP: ``map_params`` (``{site_name: value}``), else ``AutoDelta`` + ``SVI``
        (``Trace_ELBO``, Adam with ``lr``), ``num_steps`` steps over ``train_loader`` (cycled),
        seeded, in a private parameter-store scope; (2) a :class:`~bayes_kfoc.Laplace`
        (``structure``; ``subset`` over the network's modules, ``"all"``: every module with
        PyroSample weights) on a deterministic copy of the network at the MAP, with the
        **model's own** prior precisions ``τ = 1/σ²`` (or ``prior_precision``: a scalar or
        ``{module: τ}``); (3) the guide, traced with the first batch; ``guide.laplace`` is the
        fitted posterior.

        The likelihood must be on the summed scale of the data ``train_loader`` yields, as the
        Laplace posterior's Fisher is summed: with mini-batches, declare the plate over the data
        set, ``pyro.plate("data", size=N, subsample_size=x.shape[0])``. A likelihood that counts
        one batch as anything but ``N`` points raises a ``ValueError`` (a ``UserWarning`` when
        ``map_params`` is given, as then only the model's ELBO is affected).

        For ``Predictive(parallel=True)`` and the GLM (linearised) predictive, use
        :meth:`network_model`: the user's own network (``nn.Linear``) does not broadcast over
        the particle dimension that vectorised sampling gives the weights.
        """
        from . import _user_model as um

        fit = um.fit_user_model(
            model,
            train_loader,
            net=net,
            map_params=map_params,
            structure=structure,
            subset=subset,
            prior_precision=prior_precision,
            obs_site=obs_site,
            num_steps=num_steps,
            lr=lr,
            init_loc_fn=init_loc_fn,
            seed=seed,
            progress=progress,
            laplace_kwargs=laplace_kwargs,
        )
        guide = cls(model, fit.laplace, prefix=fit.prefix, example_args=fit.example_args)
        guide.laplace = fit.laplace
        return guide

    # -- the prototype: coverage and shape checks -----------------------------------------------
    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        assert self.prototype_trace is not None
        block_sites = {s.name: s for b in self._posteriors() for s in b.sites}
        fixed_sites = {s.name: s for s, _ in self._all_fixed}
        seen = check_prototype(self.prototype_trace, block_sites, fixed_sites, self.prefix)
        self._fixed = tuple((s, key) for s, key in self._all_fixed if s.name in seen)
        self._observed = observed_site(self.prototype_trace)

    def _latent_name(self, module: str) -> str:
        return f"_{self._pyro_name}_latent[{module}]"

    # -- following the posterior ------------------------------------------------------------------
    @torch.no_grad()
    def update(self, laplace: Laplace | None = None) -> LaplaceGuide:
        """Re-read the posterior from ``laplace`` (default: ``guide.laplace``, set by
        :meth:`from_model`), in place: call it after ``la.optimize_prior_precision(...)`` or
        ``la.prior_precision = ...`` (or a refit with the same blocks), and the guide samples the
        new posterior. Buffers stay on the guide's device. Returns the guide.

        Raises a ``ValueError`` when the posterior's blocks or sites differ from the guide's
        (build a new guide then).
        """
        la = self._source(laplace, "update", "pass it: guide.update(la)")
        posteriors, fixed = build_posteriors(la, self.prefix, self._latent_name)
        ours = [(p.module, p.sites) for p in self._posteriors()]
        theirs = [(p.module, p.sites) for p in posteriors]
        if ours != theirs or [s for s, _ in fixed] != [s for s, _ in self._all_fixed]:
            raise ValueError(
                f"LaplaceGuide.update: the posterior's blocks {[m for m, _ in theirs]} (or their "
                f"sites) differ from the guide's {[m for m, _ in ours]}; build a new guide, "
                "LaplaceGuide(model, la)."
            )
        device = self.map_reference.device
        self.posteriors = nn.ModuleList(posteriors).to(device)
        for (_, key), (_, value) in zip(self._all_fixed, fixed, strict=True):
            getattr(self, key).copy_(value)
        if self.laplace is not None:
            self.laplace = la
        return self

    @torch.no_grad()
    def set_prior_precision(self, value: PriorPrecision) -> None:
        """Set the guide's ``τ`` per block (a scalar, one value per block in block order, or
        ``{module: τ}``); the curvature and the MAP stay. Only the guide changes: to keep a
        :class:`~bayes_kfoc.Laplace` in step, set ``la.prior_precision`` and call :meth:`update`.
        """
        modules = [p.module for p in self._posteriors()]
        tau = prior_precision_vector(value, modules, "LaplaceGuide.set_prior_precision")
        for p, t in zip(self._posteriors(), tau.tolist(), strict=True):
            p.set_damping(t)

    @property
    def prior_precision(self) -> dict[str, float]:
        """``{module: τ}``: the prior precision the guide samples with, per block."""
        return {p.module: float(p.damping) for p in self._posteriors()}

    def network_model(
        self, linearized: bool = False, *, laplace: Laplace | None = None
    ) -> NetworkModel:
        """A Pyro model of the posterior's network with this guide's weight sites.

        ``model(x, y=None)`` samples every posterior site (named as in the guide's model, prior
        ``N(0, 1/τ_b)`` with the guide's current ``τ``), evaluates the Laplace model
        ``laplace.model`` functionally (``torch.func.vmap`` over particle dims, so
        ``Predictive(parallel=True)`` works for any network) and observes
        ``Categorical(logits)`` at the guide's model's likelihood site, under its plate, with
        the same data-set scale; ``"logits"`` and ``"probs"`` are deterministic sites.
        Parameters outside the posterior stay at the MAP.

        ``linearized=True`` gives the GLM ``f(x, θ*) + J(x)(θ − θ*)`` (one ``torch.func.jvp``):
        ``Predictive(guide.network_model(linearized=True), guide=guide)`` samples the Laplace GLM
        predictive (``laplace.predict(x, link="mc")``).

        Args:
            linearized: linearise around the MAP.
            laplace: the posterior whose network to use (default: ``guide.laplace``).
        """
        la = self._source(laplace, "network_model", "pass laplace=la")
        modules = [p.module for p in self._posteriors()]
        if list(la.blocks) != modules:
            raise ValueError(
                f"LaplaceGuide.network_model: laplace's blocks {list(la.blocks)} are not the "
                f"guide's {modules}."
            )
        model = NetworkModel.for_guide(la.model, self._posteriors(), self._observed, linearized)
        return model.to(self.map_reference.device)

    def _source(self, laplace: Laplace | None, what: str, fix: str) -> Laplace:
        la = laplace if laplace is not None else self.laplace
        if la is None:
            raise ValueError(
                f"LaplaceGuide.{what}: this guide holds no posterior (built as "
                f"LaplaceGuide(model, la), or unpickled); {fix}."
            )
        return la

    # -- posterior pieces -----------------------------------------------------------------------
    def _posteriors(self) -> list[BlockPosterior]:
        """The block posteriors, in block order (typed view of ``self.posteriors``)."""
        return [p for p in self.posteriors if isinstance(p, BlockPosterior)]

    def _site_dtype(self) -> torch.dtype:
        """The dtype of the model's parameters (the MAP's), which the site values take."""
        return self.map_reference.dtype

    def get_posterior(self, *args: Any, **kwargs: Any) -> dict[str, dist.TorchDistribution]:
        """``{module_name: distribution}``: each block's posterior over its auxiliary latent.

        Event shapes: ``(d_out, n)`` for Kronecker blocks (``W̄``, bias as the last column),
        ``(P,)`` in ``parameters_to_vector`` order for diagonal and dense blocks.
        """
        return {b.module: b.distribution() for b in self._posteriors()}

    def latent_site_name(self, module: str) -> str:
        """The name of the auxiliary sample site of ``module``'s block."""
        for b in self._posteriors():
            if b.module == module:
                return b.latent
        raise KeyError(f"LaplaceGuide: no posterior block for module {module!r}.")

    def sample_latent(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Sample every block's auxiliary latent (``is_auxiliary``); ``{module_name: value}``."""
        return {
            b.module: pyro.sample(b.latent, b.distribution(), infer={"is_auxiliary": True})
            for b in self._posteriors()
        }

    # -- the guide ------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Sample the posterior: ``{site_name: value}`` for every weight site of the model."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        latents = self.sample_latent()
        result: dict[str, Tensor] = {}
        dtype = self._site_dtype()
        for b in self._posteriors():
            values = b.unpack(latents[b.module])
            for s in b.sites:
                result[s.name] = pyro.sample(
                    s.name, dist.Delta(values[s.name].to(dtype), event_dim=len(s.shape))
                )
        for s, key in self._fixed:
            result[s.name] = pyro.sample(
                s.name, dist.Delta(getattr(self, key), event_dim=len(s.shape))
            )
        return result

    @torch.no_grad()
    def median(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """``{site_name: θ*}``: the posterior median (= mean = mode) of every site, the MAP."""
        dtype = self._site_dtype()
        out: dict[str, Tensor] = {}
        for b in self._posteriors():
            for name, v in b.unpack(b.loc).items():
                out[name] = v.to(dtype).clone()
        for s, key in self._fixed:
            out[s.name] = getattr(self, key).clone()
        return out

    @torch.no_grad()
    def quantiles(
        self, quantiles: Sequence[float] | Tensor, *args: Any, **kwargs: Any
    ) -> dict[str, Tensor]:
        """``{site_name: [len(quantiles), *shape]}``: marginal Gaussian quantiles of every site.

        Sites outside the Laplace subset (Delta at the MAP) repeat the MAP.
        """
        dtype = self._site_dtype()
        out: dict[str, Tensor] = {}
        for b in self._posteriors():
            q = torch.as_tensor(quantiles, dtype=b.loc.dtype, device=b.loc.device)
            z = dist.Normal(torch.zeros_like(q), torch.ones_like(q)).icdf(q)
            values = b.loc + z.reshape(-1, *([1] * b.loc.ndim)) * b.variance().sqrt()
            for name, v in b.unpack(values).items():
                out[name] = v.to(dtype)
        for s, key in self._fixed:
            value = getattr(self, key)
            out[s.name] = value.expand(len(quantiles), *value.shape).clone()
        return out

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the model (as every AutoGuide) and without ``laplace``; unlike
        ``AutoGuide``, the pickled guide itself keeps its model."""
        model, master = self._model, self.master
        state = dict(super().__getstate__())
        self._model, self.master = model, master
        state["laplace"] = None
        return state
