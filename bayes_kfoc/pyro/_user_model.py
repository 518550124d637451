"""``LaplaceGuide.from_model``'s pipeline: a user-written Pyro BNN to a fitted Laplace posterior.

Steps (:func:`fit_user_model`):

1. trace ``model(x, y)`` on the first batch: the latent sites (each must be a PyroSample weight of
   the network, see :mod:`._user_network` for the two supported layouts) and the likelihood site,
   whose scale must make one batch stand for the whole loader (:func:`check_likelihood_scale`);
2. the MAP: given ``map_params`` (``{site_name: value}``) or ``AutoDelta`` + ``SVI``
   (``Trace_ELBO``, Adam), seeded, in a private parameter-store scope;
3. the curvature: a :class:`~bayes_kfoc.Laplace` on a deterministic copy of the network at the
   MAP, with the model's own prior precisions ``τ = 1/σ²`` (or the user's ``prior_precision``,
   normalised by :func:`bayes_kfoc.laplace.prior_precision_vector`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.optim
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDelta
from pyro.nn import PyroModule
from torch import Tensor

from ..laplace import Laplace, PriorPrecision, prior_precision_vector
from . import _user_network as un

WHAT = "LaplaceGuide.from_model"


@dataclass(frozen=True)
class UserFit:
    """What the guide needs from the pipeline: the fitted posterior over the network's
    parameters, the site-name prefix (``site = prefix + parameter name``) and the first batch
    ``(x, y)`` to trace the model with."""

    laplace: Laplace
    prefix: str
    example_args: tuple[Tensor, Tensor]


def dataset_size(loader: Iterable[Any]) -> int:
    """The number of points ``loader`` yields per epoch (its sampler's or data set's length,
    else counted)."""
    for attr in ("sampler", "dataset"):
        obj = getattr(loader, attr, None)
        if obj is not None and hasattr(obj, "__len__"):
            return len(obj)
    return sum(int(batch[0].shape[0]) for batch in loader)


def check_likelihood_scale(
    obs: un.ObservedSite | None, loader: Iterable[Any], fits_map: bool
) -> None:
    """Refuse (when the MAP is fitted here) or warn about a likelihood whose batch does not
    stand for the whole data set: the Laplace Fisher is **summed** over all ``N`` points."""
    if obs is None:
        return
    n = dataset_size(loader)
    counted = obs.scale * obs.batch
    if math.isclose(counted, n, rel_tol=1e-6):
        return
    plate = obs.plates[0] if obs.plates else "data"
    msg = (
        f"{WHAT}: the likelihood site {obs.name!r} on a batch of {obs.batch} points counts as "
        f"{counted:g} points (scale {obs.scale:g}), but train_loader covers {n}; a plate over "
        "the batch alone (pyro.plate(name, x.shape[0])) weights the prior "
        f"{n / counted:.3g} times too strongly and mis-scales the MAP, while the Laplace Fisher "
        f"is summed over all {n} points. Declare the plate over the data set: "
        f"pyro.plate({plate!r}, size={n}, subsample_size=x.shape[0]) (or subsample=...), or "
        "use a full-batch loader."
    )
    if fits_map:
        raise ValueError(msg)
    warnings.warn(f"{msg} (map_params is given: only the model's ELBO is affected.)", stacklevel=4)


def _module_taus(
    prior_precision: PriorPrecision | None,
    taus: dict[str, float],
    blocks: Sequence[str],
) -> torch.Tensor:
    """``τ`` per block: the model's priors' ``1/σ²``, or the user's spelling (scalar, dict)."""
    what = f"{WHAT}: prior_precision"
    if prior_precision is None:
        unknown = sorted(set(blocks) - set(taus))
        if unknown:
            raise ValueError(
                f"{WHAT}: no prior precision for posterior module(s) {unknown}; their parameters "
                "must be PyroSample weights (or name them in prior_precision)."
            )
        return prior_precision_vector({k: taus[k] for k in blocks}, blocks, what)
    if isinstance(prior_precision, Mapping):
        unknown = sorted(set(prior_precision) - set(taus) - set(blocks))
        if unknown:
            raise ValueError(
                f"{what} names {unknown}, which are not modules with PyroSample weights "
                f"({sorted(taus)})."
            )
        prior_precision = {k: v for k, v in prior_precision.items() if k in blocks}
    return prior_precision_vector(prior_precision, blocks, what)


def fit_user_model(
    model: Callable[..., Any],
    train_loader: Iterable[Any],
    *,
    net: PyroModule | None,
    map_params: Mapping[str, Tensor] | None,
    structure: str,
    subset: str | Sequence[str],
    prior_precision: PriorPrecision | None,
    obs_site: str | None,
    num_steps: int,
    lr: float,
    init_loc_fn: Callable[..., Any],
    seed: int,
    progress: bool,
    laplace_kwargs: Mapping[str, Any],
) -> UserFit:
    """The pipeline of :meth:`LaplaceGuide.from_model` (see its docs for the arguments)."""
    x0, y0 = un.first_batch(train_loader)
    sites, obs = un.trace_sites(model, x0, y0, obs_site)
    if not sites:
        raise ValueError(f"{WHAT}: the model has no latent sites.")
    net = net if net is not None else un.find_network(model, sites)
    tutorial = net is model
    if tutorial and obs is None:
        raise ValueError(
            f"{WHAT}: the model is the network (its layers are its own attributes), so the "
            "logits are read from its observed Categorical site, but model(x, y) has "
            f"{'none' if obs_site is None else 'several'}; pass obs_site=<its name>."
        )
    check_likelihood_scale(obs, train_loader, fits_map=map_params is None)
    prefix = un.site_prefix(net)
    names = un.sample_names(net)
    for name in sites:
        if not name.startswith(prefix) or name[len(prefix) :] not in names:
            raise ValueError(
                f"{WHAT}: latent site {name!r} is not a PyroSample weight of the network (sites "
                f"{sorted(prefix + k for k in names)[:8]}); only network weights can be latent. "
                "Observe it, or make it a deterministic parameter."
            )
    taus = un.module_precisions(prefix, sites, names)
    if map_params is None:
        map_params = _svi_map(model, train_loader, num_steps, lr, init_loc_fn, seed, x0)
    missing = sorted(set(sites) - set(map_params))
    if missing:
        raise ValueError(f"{WHAT}: map_params lacks site(s) {missing}.")
    values = {}
    for name, site in sites.items():
        v = torch.as_tensor(map_params[name]).detach()
        if tuple(v.shape) != site.shape:
            raise ValueError(
                f"{WHAT}: map_params[{name!r}] has shape {tuple(v.shape)}, the site {site.shape}."
            )
        values[name[len(prefix) :]] = v.to(dtype=site.dtype, device=site.device)
    plain = un.deterministic_network(net, values, obs.name if tutorial and obs else None)
    modules = list(dict.fromkeys(m for m, _ in names.values()))
    la = Laplace(
        plain,
        structure=structure,
        modules=modules if subset == "all" else subset,
        progress=progress,
        **laplace_kwargs,
    )
    la.fit(train_loader)
    la.prior_precision = _module_taus(prior_precision, taus, list(la.blocks))
    return UserFit(la, prefix, (x0, y0))


def _svi_map(
    model: Callable[..., Any],
    loader: Iterable[Any],
    num_steps: int,
    lr: float,
    init_loc_fn: Callable[..., Any],
    seed: int,
    x0: Tensor,
) -> dict[str, Tensor]:
    """MAP site values by ``AutoDelta`` + ``SVI``, seeded, in a private parameter-store scope."""
    devices = [x0.device.index or 0] if x0.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), pyro.get_param_store().scope():
        torch.manual_seed(seed)
        delta = AutoDelta(model, init_loc_fn=init_loc_fn)
        svi = SVI(model, delta, pyro.optim.Adam({"lr": lr}), Trace_ELBO())  # type: ignore[attr-defined]
        batches = _epochs(loader)
        last: tuple[Any, Any] | None = None
        for _, (x, y) in zip(range(num_steps), batches):
            loss = svi.step(x, y)
            if not math.isfinite(loss):
                raise FloatingPointError(f"{WHAT}: the MAP's SVI loss is {loss}; lower lr={lr}.")
            last = (x, y)
        if last is None:
            last = next(iter(loader))
        return {k: v.detach().clone() for k, v in delta.median(*last).items()}


def _epochs(loader: Iterable[Any]) -> Iterator[Any]:
    """Re-iterate ``loader`` epoch after epoch (a fresh shuffle each time)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            return
