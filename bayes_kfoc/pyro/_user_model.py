"""Helpers for user-written Pyro BNNs (``LaplaceGuide.from_model``).

Supported model shape (TyXe-style): the network is a :class:`pyro.nn.PyroModule` inside the model
(found automatically, or passed as ``net=``) whose weights are :class:`pyro.nn.PyroSample` sites
with **zero-mean Normal** priors over the whole parameter (``.expand(shape).to_event(ndim)``), one
prior scale per module (weight and bias of a module share it; modules may differ); the network
maps ``x`` to logits; the likelihood is observed. Network parameters that are not PyroSample
(ordinary ``nn.Parameter``) stay deterministic. Anything else latent raises a clear error.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from typing import Any

import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.nn import PyroModule
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn
from torch.distributions import Independent, Normal

_PLAIN_CLASSES: dict[type, type] = {}


def first_batch(loader: Iterable[Any]) -> tuple[Tensor, Tensor]:
    for batch in loader:
        if not isinstance(batch, list | tuple) or len(batch) != 2:
            raise TypeError("LaplaceGuide.from_model: train_loader must yield (x, y) pairs.")
        return batch[0], batch[1]
    raise ValueError("LaplaceGuide.from_model: train_loader is empty.")


def latent_sites(model: Any, *args: Any) -> dict[str, dict[str, Any]]:
    """The model's unobserved, non-subsample sample sites from one blocked trace."""
    trace = poutine.block(poutine.trace(model).get_trace)(*args)
    return {
        name: site for name, site in trace.iter_stochastic_nodes() if not site_is_subsample(site)
    }


def sample_names(net: PyroModule) -> dict[str, tuple[str, str]]:
    """``{relative_param_name: (module_name, attr)}`` for every PyroSample attribute of ``net``."""
    out = {}
    for mod_name, m in net.named_modules():
        for attr in getattr(m, "_pyro_samples", {}):
            out[f"{mod_name}.{attr}" if mod_name else attr] = (mod_name, attr)
    return out


def find_network(model: Any, sites: Iterable[str]) -> PyroModule:
    """The shallowest sub-PyroModule of ``model`` whose PyroSample attributes cover every latent
    site (``named_modules`` is pre-order, so the first match)."""
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
    if best is None:
        raise ValueError(
            f"LaplaceGuide.from_model: no sub-PyroModule of the model holds all latent sites "
            f"{sites[:8]} as PyroSample weights. Latent sites must be weights of one network "
            "(a PyroModule attribute of the model mapping x to logits); pass net=... if the "
            "network is not a submodule."
        )
    return best


def site_prefix(net: PyroModule) -> str:
    name = net._pyro_name
    return f"{name}." if name else ""


def gaussian_precision(name: str, site: Mapping[str, Any]) -> float:
    """``τ = 1/σ²`` of a zero-mean Normal prior with one scale; errors name the site otherwise."""
    fn = site["fn"]
    base = fn
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


def deterministic_network(net: PyroModule, values: Mapping[str, Tensor]) -> nn.Module:
    """A copy of ``net`` with every PyroSample weight an ``nn.Parameter`` set to ``values``.

    The copy's modules keep their classes' ``forward`` but lose Pyro's attribute magic, so calling
    it has no Pyro side effects (no ``pyro.param``/``pyro.sample`` statements).
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
    return plain.eval()


def module_precisions(
    prefix: str, sites: Mapping[str, Mapping[str, Any]], names: Mapping[str, tuple[str, str]]
) -> dict[str, float]:
    """``{module_name: τ}`` from the sites' priors; a module's sites must share ``τ``."""
    per_module: dict[str, dict[str, float]] = {}
    for site_name, site in sites.items():
        module, _ = names[site_name[len(prefix) :]]
        per_module.setdefault(module, {})[site_name] = gaussian_precision(site_name, site)
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
