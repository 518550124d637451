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

from ..laplace import PriorPrecision
from .posteriors import BlockPosterior, Site, block_posterior

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
        if not laplace.fitted:
            raise RuntimeError("LaplaceGuide: call laplace.fit(train_loader) first.")
        self.prefix = prefix
        self.laplace: Laplace | None = None  # set by from_model; dropped when pickling
        map_vector = laplace.map_vector.detach()
        self.register_buffer("map_reference", map_vector.new_zeros(0))
        offsets = laplace.layout.offsets
        shapes = {k: tuple(p.shape) for k, p in laplace.model.named_parameters()}
        posteriors: list[BlockPosterior] = []
        covered: set[str] = set()
        taus = laplace.prior_precision
        for (module, block), tau in zip(laplace.blocks.items(), taus, strict=True):
            full = [f"{module}.{p}" if module else p for p in block.param_shapes]
            sites = tuple(Site(prefix + k, k, shapes[k]) for k in full)
            covered.update(full)
            theta = map_vector[laplace.layout.block_index[module]]
            latent = f"_{self._pyro_name}_latent[{module}]"
            posteriors.append(block_posterior(module, latent, sites, block, theta, tau))
        self.posteriors = nn.ModuleList(posteriors)
        fixed = []
        for j, (k, shape) in enumerate(shapes.items()):
            if k in covered:
                continue
            a, b = offsets[k]
            self.register_buffer(f"fixed{j}", map_vector[a:b].reshape(shape).clone())
            fixed.append((Site(prefix + k, k, shape), f"fixed{j}"))
        self._all_fixed = tuple(fixed)
        self._fixed = self._all_fixed  # those that are model sites; set by _setup_prototype
        if example_args is None:
            p = map_vector
            example_args = (
                torch.zeros(1, *laplace.input_shape, dtype=p.dtype, device=p.device),
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

        Steps:

        1. the MAP: ``map_params`` (``{site_name: value}``) if given, else ``AutoDelta`` + ``SVI``
           (``Trace_ELBO``, Adam with ``lr``) for ``num_steps`` steps over ``train_loader``
           (cycled), seeded, in a private parameter-store scope;
        2. the curvature: a :class:`~bayes_kfoc.Laplace` (``structure``, ``subset`` over the
           network's modules; ``"all"`` means every module with PyroSample weights) on a
           deterministic copy of the network at the MAP, with the **model's own** prior
           precisions ``τ = 1/σ²`` (or ``prior_precision``: a scalar or ``{module: τ}``);
        3. the guide, traced with the first batch; the fitted posterior is ``guide.laplace``.

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
        seen = set()
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            spec = block_sites.get(name) or fixed_sites.get(name)
            if spec is None:
                known = sorted(block_sites)[:12]
                raise ValueError(
                    f"LaplaceGuide: the model's latent site {name!r} is not covered by the "
                    f"posterior (its sites are {known}{'...' if len(block_sites) > 12 else ''}, "
                    f"named prefix={self.prefix!r} + parameter name). Only network weights can "
                    "be latent: make other sites observed (pass the labels in example_args if "
                    "this is the likelihood), or fit the Laplace posterior on the network whose "
                    "parameters these sites are."
                )
            value_shape = tuple(site["value"].shape)
            event_shape = tuple(site["fn"].event_shape)
            if value_shape != spec.shape or event_shape != spec.shape:
                raise ValueError(
                    f"LaplaceGuide: site {name!r} has value shape {value_shape} and event shape "
                    f"{event_shape}, but the posterior's parameter {spec.param!r} has shape "
                    f"{spec.shape}. Declare the prior over the whole parameter, e.g. "
                    f"Normal(0, s).expand({list(spec.shape)}).to_event({len(spec.shape)})."
                )
            if site["cond_indep_stack"]:
                plates = [f.name for f in site["cond_indep_stack"]]
                raise ValueError(
                    f"LaplaceGuide: site {name!r} is inside plate(s) {plates}; network weights "
                    "must be global sites, outside plates."
                )
            seen.add(name)
        missing = sorted(set(block_sites) - seen)
        if missing:
            raise ValueError(
                f"LaplaceGuide: the posterior has parameter site(s) {missing} that are not latent "
                "sites of the model. Make those parameters PyroSample sites, or fit the Laplace "
                "posterior on a subset without them."
            )
        self._fixed = tuple((s, key) for s, key in self._all_fixed if s.name in seen)

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
