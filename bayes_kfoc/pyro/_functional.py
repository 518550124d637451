"""A network evaluated functionally at sampled weights, and the Pyro classifier model around it.

:class:`FunctionalNetwork` holds a private copy of the network whose parameters are buffers
holding the MAP ``θ*``, and evaluates ``f(x, θ)`` (or, linearised, ``f(x, θ*) + J(x)(θ − θ*)``
as one ``torch.func.jvp``, no Jacobian formed) with ``torch.func.functional_call``. Parameter
values with leading *particle* dimensions (``Predictive(parallel=True)``, vectorised ELBO
particles) are evaluated under ``torch.func.vmap``, so any network works, plain ``nn.Linear``
included, giving logits ``[*particles, B, C]``. Parameters not passed keep their MAP values.

:class:`ClassifierModel` is the Pyro model ``model(x, y=None)`` shared by
:class:`~bayes_kfoc.pyro.BayesianClassifier` and :class:`NetworkModel`: the likelihood
``Categorical(logits=f(x, θ))`` at site ``obs_site`` under ``pyro.plate(plate, ..., dim=-1)``, with
deterministic sites ``"logits"`` and ``"probs"`` (event shape ``[C]``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap

from ..stats.attention import unfused_attention
from ..stats.inputs import Inputs, batch_size, first_tensor
from ..stats.output import logits_of
from ._prototype import Observed
from .posteriors import BlockPosterior

PRIOR_BUFFER_SUFFIX = "_prior_precision"


def params_to_buffers(module: nn.Module) -> None:
    """Turn every parameter of ``module`` into a buffer of the same name (detached copy)."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                del m._parameters[name]
                m.register_buffer(name, p.detach().clone())


class FunctionalNetwork(nn.Module):
    """``f(x, θ)`` of ``net`` at values of the parameters ``names`` (the others stay at the MAP).

    Attributes:
        map_net: the private copy, parameters as buffers holding ``θ*``.
        param_names: the parameters that take sampled values, ``named_parameters`` names.
        param_shapes: their shapes.
        linearized: evaluate ``f(x, θ*) + J(x)(θ − θ*)`` instead of ``f(x, θ)``.
    """

    def __init__(self, net: nn.Module, names: Sequence[str], *, linearized: bool = False):
        super().__init__()
        shapes = {k: tuple(p.shape) for k, p in net.named_parameters()}
        unknown = sorted(set(names) - set(shapes))
        if unknown:
            raise ValueError(f"FunctionalNetwork: the network has no parameter(s) {unknown}.")
        self.param_names = list(names)
        self.param_shapes = {k: shapes[k] for k in self.param_names}
        self.linearized = bool(linearized)
        map_net = copy.deepcopy(net).eval()
        params_to_buffers(map_net)
        self.map_net = map_net

    def map_parameters(self) -> dict[str, Tensor]:
        """``{param_name: θ*}`` of the sampled parameters."""
        bufs = dict(self.map_net.named_buffers())
        return {k: bufs[k] for k in self.param_names}

    def _lead(self, name: str, value: Tensor) -> torch.Size:
        """The leading dims of one value, trailing singletons (the data plate's slot) dropped."""
        shape = self.param_shapes[name]
        if value.ndim < len(shape) or tuple(value.shape[value.ndim - len(shape) :]) != shape:
            raise ValueError(
                f"FunctionalNetwork: site {name!r} has a value of shape {tuple(value.shape)}, "
                f"but the parameter has shape {shape}."
            )
        lead = list(value.shape[: value.ndim - len(shape)])
        while lead and lead[-1] == 1:
            lead.pop()
        return torch.Size(lead)

    def particle_shape(self, params: Mapping[str, Tensor]) -> torch.Size:
        """The leading (particle) dims of the sampled parameters.

        ``Predictive(parallel=True)`` gives values ``[S, *shape]`` or ``[S, 1, *shape]`` and
        vectorised ELBO particles ``[P, 1, *shape]``; trailing singleton dims are the slot of the
        data plate (dim ``-1``) and are dropped, so the logits are ``[*particles, B, C]``.
        """
        leads = [self._lead(k, v) for k, v in params.items()]
        try:
            return torch.broadcast_shapes(*leads)
        except RuntimeError as err:
            raise ValueError(
                "FunctionalNetwork: sampled parameters have incompatible leading (particle) "
                f"shapes {sorted({tuple(s) for s in leads})}."
            ) from err

    def forward(self, params: Mapping[str, Tensor], x: Inputs) -> Tensor:
        """``[*particles, B, C]`` logits at ``params`` (``{param_name: [*particles, *shape]}``);
        a mapping ``x`` is passed as keywords, ``net(**x)``."""
        missing = sorted(set(self.param_names) - set(params))
        if missing:
            raise ValueError(f"FunctionalNetwork: no value for parameter(s) {missing}.")
        lead = self.particle_shape(params)
        theta_star = self.map_parameters()
        net = self.map_net

        def f(p: dict[str, Tensor]) -> Tensor:
            with pyro.validation_enabled(False):  # no data-dependent checks under vmap
                if isinstance(x, Mapping):
                    return logits_of(net, functional_call(net, p, (), dict(x)))
                return logits_of(net, functional_call(net, p, (x,)))

        def one(p: dict[str, Tensor]) -> Tensor:
            if not self.linearized:
                return f(p)
            tangent = {k: p[k] - theta_star[k] for k in self.param_names}
            out, dout = jvp(f, (theta_star,), (tangent,))[:2]
            return out + dout

        if not lead:
            with unfused_attention():  # no forward-mode rule for the fused CPU kernels
                return one({k: params[k].reshape(self.param_shapes[k]) for k in self.param_names})
        flat = {
            k: params[k]
            .reshape(*self._lead(k, params[k]), -1)
            .expand(*lead, -1)
            .reshape(-1, *self.param_shapes[k])
            for k in self.param_names
        }
        with unfused_attention():  # no vmap rules for the fused transformer path
            out = vmap(one)(flat)
        return out.reshape(*lead, *out.shape[1:])


def _take(x: Inputs, idx: Tensor) -> Inputs:
    if isinstance(x, Tensor):
        return x[idx]
    return {k: v[idx] if isinstance(v, Tensor) else v for k, v in x.items()}


class ClassifierModel(nn.Module):
    """A Pyro classifier ``model(x, y=None)`` over sampled weights (see the module docs).

    Subclasses define :meth:`sample_parameters` (one ``pyro.sample`` per random parameter).

    Attributes:
        functional: the :class:`FunctionalNetwork` evaluating the logits.
        num_data: the data set size when ``x`` is a mini-batch (likelihood scale ``N/B``).
        subsample_size: draw a random subsample of this size of ``x`` in every call.
        obs_site, plate: the names of the likelihood site and of the data plate.
    """

    def __init__(
        self,
        functional: FunctionalNetwork,
        *,
        num_data: int | None = None,
        subsample_size: int | None = None,
        obs_site: str = "obs",
        plate: str = "data",
        what: str = "bayesian_model",
    ) -> None:
        super().__init__()
        if num_data is not None and subsample_size is not None:
            raise ValueError(
                f"{what}: pass num_data (x is a mini-batch of a data set of that size) or "
                "subsample_size (subsample x in every call), not both."
            )
        self.functional = functional
        self.num_data = num_data
        self.subsample_size = subsample_size
        self.obs_site = obs_site
        self.plate = plate

    @property
    def param_names(self) -> list[str]:
        return self.functional.param_names

    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return self.functional.param_shapes

    @property
    def linearized(self) -> bool:
        return self.functional.linearized

    @property
    def map_net(self) -> nn.Module:
        return self.functional.map_net

    def map_parameters(self) -> dict[str, Tensor]:
        """``{param_name: θ*}``: the MAP the model was built at (and linearised around)."""
        return self.functional.map_parameters()

    def sample_parameters(self) -> dict[str, Tensor]:
        """One ``pyro.sample`` per random parameter, ``{param_name: value}``."""
        raise NotImplementedError

    def logits(self, params: Mapping[str, Tensor], x: Inputs) -> Tensor:
        """``[*particles, B, C]`` logits at parameter values with optional leading particle dims.

        Non-linearised: ``f(x, θ)``. Linearised: ``f(x, θ*) + J(x)(θ − θ*)`` via ``jvp``.
        """
        return self.functional(params, x)

    def forward(self, x: Inputs, y: Tensor | None = None) -> Tensor:
        """The generative model; returns the logits ``[*particles, B, C]`` of the (sub)batch
        (``x`` a tensor, or a mapping of keyword inputs whose tensors share the batch size)."""
        params = self.sample_parameters()
        n = batch_size(x)
        device = first_tensor(x).device
        if self.subsample_size is not None:
            plate = pyro.plate(self.plate, n, subsample_size=self.subsample_size, dim=-1)
        elif self.num_data is not None:
            subsample = torch.arange(n, device=device)
            plate = pyro.plate(self.plate, self.num_data, subsample=subsample, dim=-1)
        else:
            plate = pyro.plate(self.plate, n, dim=-1)
        # Without subsampling the logits are computed outside the plate: a network that opens a
        # plate of the same name itself (the tutorial layout's model) must not nest it in ours.
        logits = self.logits(params, x) if self.subsample_size is None else None
        with plate as idx:
            if logits is None:
                assert idx is not None
                x = _take(x, idx.to(device))
                y = None if y is None else y[idx.to(y.device)]
                logits = self.logits(params, x)
            pyro.deterministic("logits", logits, event_dim=1)
            pyro.deterministic("probs", torch.softmax(logits, dim=-1), event_dim=1)
            pyro.sample(self.obs_site, dist.Categorical(logits=logits), obs=y)
        return logits


class NetworkModel(ClassifierModel):
    """A :class:`ClassifierModel` with explicitly named weight sites: ``sites[name] = param``,
    prior ``N(0, 1/τ)`` over the whole parameter (``.to_event``), ``τ`` in the buffer
    ``prior_precisions`` (site order). Built by :meth:`LaplaceGuide.network_model`."""

    prior_precisions: Tensor

    def __init__(
        self,
        net: nn.Module,
        sites: Mapping[str, str],
        prior_precision: Mapping[str, float],
        *,
        linearized: bool = False,
        num_data: int | None = None,
        obs_site: str = "obs",
        plate: str = "data",
    ) -> None:
        functional = FunctionalNetwork(net, list(sites.values()), linearized=linearized)
        super().__init__(
            functional, num_data=num_data, obs_site=obs_site, plate=plate, what="network_model"
        )
        self.sites = dict(sites)
        ref = functional.map_parameters()
        taus = [
            torch.tensor(float(prior_precision[s]), dtype=ref[p].dtype) for s, p in sites.items()
        ]
        self.register_buffer("prior_precisions", torch.stack(taus).to(next(iter(ref.values()))))

    @classmethod
    def for_guide(
        cls,
        net: nn.Module,
        posteriors: Sequence[BlockPosterior],
        observed: Observed | None,
        linearized: bool,
    ) -> NetworkModel:
        """The model of :meth:`LaplaceGuide.network_model`: the posteriors' sites with their
        current ``τ``, the likelihood named, plated and scaled as ``observed`` (default:
        ``"obs"`` in plate ``"data"``, unscaled)."""
        sites = {s.name: s.param for p in posteriors for s in p.sites}
        taus = {s.name: float(p.damping) for p in posteriors for s in p.sites}
        obs = observed or Observed("obs", "data", 0, scaled=False)
        return cls(
            net,
            sites,
            taus,
            linearized=linearized,
            num_data=obs.num_data if obs.scaled else None,
            obs_site=obs.name,
            plate=obs.plate,
        )

    def sample_parameters(self) -> dict[str, Tensor]:
        out = {}
        for tau, (site, param) in zip(self.prior_precisions, self.sites.items(), strict=True):
            shape = self.param_shapes[param]
            scale = tau.rsqrt()
            prior = dist.Normal(torch.zeros_like(scale), scale).expand(shape).to_event(len(shape))
            out[param] = pyro.sample(site, prior)
        return out
