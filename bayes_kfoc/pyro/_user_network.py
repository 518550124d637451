"""The network inside a user-written Pyro BNN: its sites, priors and a deterministic copy.

Two layouts are supported (``LaplaceGuide.from_model``):

- **TyXe layout**: the network is a :class:`pyro.nn.PyroModule` attribute of the model (found
  automatically, or passed as ``net=``) that maps ``x`` to logits;
- **tutorial layout** (Pyro's BNN tutorials): the layers are attributes of the model itself, whose
  ``forward(x, y=None)`` holds the plate and the observed site. The logits are then read from the
  observed site: the deterministic copy's ``forward(x)`` runs the model's ``forward(x, None)``
  with every Pyro effect blocked and returns the ``logits`` of the ``Categorical`` distribution
  at that site. These are normalised log-probabilities ``log_softmax(f)``: the same softmax, the
  same Fisher and the same Monte-Carlo GLM predictive as the raw logits ``f`` (the GLM logit
  draws differ by a common shift per draw); only the probit link of the GLM predictive, which is
  not shift-invariant, differs slightly (``link="mc"`` is exact).

In both, the weights are :class:`pyro.nn.PyroSample` sites with **zero-mean Normal** priors over
the whole parameter (``.expand(shape).to_event(ndim)``), one prior scale per module (weight and
bias of a module share it; modules may differ). Network parameters that are not PyroSample
(ordinary ``nn.Parameter``) stay deterministic. Anything else latent raises a clear error.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.nn import PyroModule
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, Normal

_PLAIN_CLASSES: dict[type, type] = {}
_LOGITS_CLASSES: dict[tuple[type, str], type] = {}


@dataclass(frozen=True)
class LatentSite:
    """An unobserved sample site of the model's prototype trace: its value's shape, dtype and
    device, and its prior."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    prior: Distribution


@dataclass(frozen=True)
class ObservedSite:
    """The model's likelihood site on one batch of ``batch`` points; ``scale`` is the product of
    its plates' subsampling scales (``N / B`` for ``pyro.plate("data", N, subsample_size=B)``)."""

    name: str
    scale: float
    batch: int
    plates: tuple[str, ...]


def first_batch(loader: Iterable[Any]) -> tuple[Tensor, Tensor]:
    for batch in loader:
        if not isinstance(batch, list | tuple) or len(batch) != 2:
            raise TypeError("LaplaceGuide.from_model: train_loader must yield (x, y) pairs.")
        return batch[0], batch[1]
    raise ValueError("LaplaceGuide.from_model: train_loader is empty.")


def trace_sites(
    model: Any, x: Tensor, y: Tensor, obs_site: str | None = None
) -> tuple[dict[str, LatentSite], ObservedSite | None]:
    """The model's latent sites and its likelihood site, from one blocked trace of ``model(x, y)``.

    The likelihood site is ``obs_site`` or the only observed sample site (``None`` when there is
    none, or several and ``obs_site`` is not given).
    """
    trace = poutine.block(poutine.trace(model).get_trace)(x, y)
    latent: dict[str, LatentSite] = {}
    observed = {}
    for name, site in trace.iter_stochastic_nodes():
        if site_is_subsample(site):
            continue
        value = site["value"]
        latent[name] = LatentSite(name, tuple(value.shape), value.dtype, value.device, site["fn"])
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and site["is_observed"] and not site_is_subsample(site):
            observed[name] = site
    if obs_site is not None and obs_site not in observed:
        raise ValueError(
            f"LaplaceGuide.from_model: obs_site={obs_site!r} is not an observed site of the model "
            f"(observed: {sorted(observed)}), traced as model(x, y) on the first batch."
        )
    name = (
        obs_site if obs_site is not None else next(iter(observed)) if len(observed) == 1 else None
    )
    if name is None:
        return latent, None
    site = observed[name]
    scale = float(site["scale"])
    plates = tuple(f.name for f in site["cond_indep_stack"])
    return latent, ObservedSite(name, scale, int(x.shape[0]), plates)


def sample_names(net: PyroModule) -> dict[str, tuple[str, str]]:
    """``{relative_param_name: (module_name, attr)}`` for every PyroSample attribute of ``net``."""
    out = {}
    for mod_name, m in net.named_modules():
        for attr in getattr(m, "_pyro_samples", {}):
            out[f"{mod_name}.{attr}" if mod_name else attr] = (mod_name, attr)
    return out


def find_network(model: Any, sites: Iterable[str]) -> PyroModule:
    """The shallowest sub-PyroModule of ``model`` whose PyroSample attributes cover every latent
    site (``named_modules`` is pre-order, so the first match; TyXe layout), else the model itself
    when it is a PyroModule that does (tutorial layout)."""
    sites = sorted(sites)
    if not isinstance(model, nn.Module):
        raise TypeError(
            "LaplaceGuide.from_model: the model is not an nn.Module, so its network cannot be "
            "found; pass net=<the PyroModule network>."
        )
    best: PyroModule | None = None
    for m in model.modules():
        if not isinstance(m, PyroModule) or m is model:
            continue
        prefix = site_prefix(m)
        names = {prefix + k for k in sample_names(m)}
        if names and set(sites) <= names:
            best = m
            break
    if best is None and isinstance(model, PyroModule) and set(sites) <= set(sample_names(model)):
        best = model
    if best is None:
        raise ValueError(
            f"LaplaceGuide.from_model: neither the model nor a sub-PyroModule of it holds all "
            f"latent sites {sites[:8]} as PyroSample weights. Latent sites must be weights of "
            "one network: the model itself, or a PyroModule attribute of it mapping x to "
            "logits; pass net=... if the network is elsewhere."
        )
    return best


def site_prefix(net: PyroModule) -> str:
    name = net._pyro_name
    return f"{name}." if name else ""


def gaussian_precision(site: LatentSite) -> float:
    """``τ = 1/σ²`` of a zero-mean Normal prior with one scale; errors name the site otherwise."""
    name = site.name
    base = site.prior
    while isinstance(base, Independent | dist.torch_distribution.ExpandedDistribution):
        base = base.base_dist
    if not isinstance(base, Normal):
        raise TypeError(
            f"LaplaceGuide.from_model: site {name!r} has a {type(base).__name__} prior; only "
            "zero-mean Normal priors (PyroSample(Normal(0, s).expand(shape).to_event(ndim))) "
            "are supported, as the Laplace posterior's prior is N(0, 1/τ)."
        )
    loc, scale = base.loc, base.scale
    if bool((loc != 0).any()):
        raise ValueError(
            f"LaplaceGuide.from_model: site {name!r} has a Normal prior with a non-zero mean; "
            "the Laplace prior is centred at zero."
        )
    s = scale.detach().flatten()
    if s.numel() > 1 and not torch.allclose(s, s[:1].expand_as(s), rtol=1e-6):
        raise ValueError(
            f"LaplaceGuide.from_model: site {name!r} has a Normal prior whose scale varies "
            "within the parameter; one scale per module is supported."
        )
    return float(s[0].double() ** -2)


def _plain_class(cls: type) -> type:
    """A subclass of ``cls`` with ``nn.Module``'s attribute access: no Pyro effects."""
    if cls not in _PLAIN_CLASSES:
        ns = {
            "__getattr__": nn.Module.__getattr__,
            "__setattr__": nn.Module.__setattr__,
            "__delattr__": nn.Module.__delattr__,
            "__call__": nn.Module.__call__,
            "__module__": __name__,
        }
        _PLAIN_CLASSES[cls] = type(cls)(f"Deterministic{cls.__name__}", (cls,), ns)
    return _PLAIN_CLASSES[cls]


class _ObservedLogits(Messenger):
    """Records the distribution at site ``site`` without sampling it; subsample sites take the
    first indices (no random draw)."""

    def __init__(self, site: str) -> None:
        super().__init__()
        self.site = site
        self.fn: Distribution | None = None

    def _pyro_sample(self, msg: Any) -> None:
        fn = msg["fn"]
        if isinstance(fn, _Subsample) and msg["value"] is None:
            n = fn.size if fn.subsample_size is None else fn.subsample_size
            msg["value"] = torch.arange(n, device=fn.device)
        elif msg["name"] == self.site:
            self.fn = fn
            msg["value"] = torch.zeros(fn.batch_shape, dtype=torch.long, device=_device(fn))


def _device(fn: Distribution) -> torch.device:
    base = _base(fn)
    return base.logits.device if isinstance(base, dist.Categorical) else torch.device("cpu")


def _base(fn: Any) -> Any:
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn


def observed_logits(module: nn.Module, forward: Any, x: Tensor, site: str) -> Tensor:
    """``[B, C]`` logits of the ``Categorical`` at ``site`` when ``forward(module, x, None)`` runs
    with every Pyro effect blocked."""
    catcher = _ObservedLogits(site)
    with poutine.block(), catcher:
        forward(module, x, None)
    if catcher.fn is None:
        raise ValueError(
            f"LaplaceGuide.from_model: model(x, None) did not reach the observed site {site!r}; "
            "the likelihood site must be sampled on every call (obs=y)."
        )
    base = _base(catcher.fn)
    if not isinstance(base, dist.Categorical):
        raise TypeError(
            f"LaplaceGuide.from_model: the observed site {site!r} has a {type(base).__name__} "
            "likelihood; the Laplace posterior supports classification, "
            "pyro.sample(name, Categorical(logits=...), obs=y)."
        )
    logits = base.logits
    if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
        raise ValueError(
            f"LaplaceGuide.from_model: the observed site {site!r} has logits of shape "
            f"{tuple(logits.shape)} for a batch of {x.shape[0]} inputs; it must be [B, C] over "
            "the whole batch (no subsampling of x inside the model for the Laplace fit)."
        )
    return logits


def _logits_class(cls: type[nn.Module], site: str) -> type:
    """:func:`_plain_class` of ``cls`` whose ``forward(x)`` is :func:`observed_logits`."""
    if (cls, site) not in _LOGITS_CLASSES:

        def forward(self: nn.Module, x: Tensor) -> Tensor:
            return observed_logits(self, cls.forward, x, site)

        plain = _plain_class(cls)
        ns = {"forward": forward, "__module__": __name__}
        _LOGITS_CLASSES[cls, site] = type(plain)(f"Logits{cls.__name__}", (plain,), ns)
    return _LOGITS_CLASSES[cls, site]


def deterministic_network(
    net: PyroModule, values: Mapping[str, Tensor], logits_site: str | None = None
) -> nn.Module:
    """A copy of ``net`` with every PyroSample weight an ``nn.Parameter`` set to ``values``.

    The copy's modules keep their classes' ``forward`` but lose Pyro's attribute magic, so calling
    it has no Pyro side effects (no ``pyro.param``/``pyro.sample`` statements). With
    ``logits_site`` (the tutorial layout: ``net`` is the model) the root's ``forward(x)`` returns
    the logits at that observed site (:func:`observed_logits`).
    """
    plain = copy.deepcopy(net)
    for mod_name, m in plain.named_modules():
        if isinstance(m, PyroModule) and m._pyro_params:
            names = [f"{mod_name}.{k}" if mod_name else k for k in m._pyro_params]
            raise ValueError(
                f"LaplaceGuide.from_model: the network has PyroParam attribute(s) {names}; only "
                "PyroSample weights and ordinary parameters are supported."
            )
        for attr in list(getattr(m, "_pyro_samples", {})):
            full = f"{mod_name}.{attr}" if mod_name else attr
            del m._pyro_samples[attr]
            nn.Module.register_parameter(m, attr, nn.Parameter(values[full].detach().clone()))
    for m in plain.modules():
        if isinstance(m, PyroModule):
            m.__class__ = _plain_class(type(m))
    if logits_site is not None:
        plain.__class__ = _logits_class(type(net), logits_site)
    return plain.eval()


def module_precisions(
    prefix: str, sites: Mapping[str, LatentSite], names: Mapping[str, tuple[str, str]]
) -> dict[str, float]:
    """``{module_name: τ}`` from the sites' priors; a module's sites must share ``τ``."""
    per_module: dict[str, dict[str, float]] = {}
    for site_name, site in sites.items():
        module, _ = names[site_name[len(prefix) :]]
        per_module.setdefault(module, {})[site_name] = gaussian_precision(site)
    out = {}
    for module, taus in per_module.items():
        values = list(taus.values())
        if not all(math.isclose(v, values[0], rel_tol=1e-6) for v in values):
            raise ValueError(
                f"LaplaceGuide.from_model: module {module!r} has sites with different prior "
                f"precisions {taus}; a Laplace block has one prior precision per module. Give "
                "the module's weight and bias the same prior scale."
            )
        out[module] = values[0]
    return out
