"""The prior precisions of :func:`~bayes_kfoc.pyro.bayesian_model`, one per parameter.

The per-block spellings of ``τ`` (a scalar, a tensor in a Laplace posterior's block order, a
``{module: τ}`` dict) go through :func:`bayes_kfoc.laplace.prior_precision_vector`, the one
normaliser; on top of it ``bayesian_model`` accepts parameter names as dict keys (a parameter
name beats its module's name) and a default for parameters no spelling covers.

A per-block tensor needs ``laplace=``: the block order is the posterior's **forward-call** order,
which the network alone does not determine (a root module owning a parameter is called first but
finishes last), so without the posterior it is refused rather than guessed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..laplace import PriorPrecision, prior_precision_vector

if TYPE_CHECKING:
    from ..laplace import Laplace

WHAT = "bayesian_model: prior_precision"


def owner(name: str) -> tuple[str, str]:
    """``(module_name, attribute)`` of a parameter name (the root module is ``""``)."""
    module, _, param = name.rpartition(".")
    return module, param


def _validated(value: Mapping[str, float], keys: list[str]) -> dict[str, float]:
    tau = prior_precision_vector({k: value[k] for k in keys}, keys, WHAT)
    return dict(zip(keys, tau.tolist(), strict=True))


def resolve_prior_precision(
    net: nn.Module,
    prior_precision: PriorPrecision | None,
    laplace: Laplace | None = None,
    default: float | None = None,
) -> dict[str, float]:
    """``{param_name: τ}`` for every trainable parameter of ``net`` (frozen ones,
    ``requires_grad=False``, stay fixed); see :func:`bayesian_model`."""
    names = [k for k, p in net.named_parameters() if p.requires_grad]
    if default is not None and not (math.isfinite(default) and default > 0):
        raise ValueError(
            f"bayesian_model: default_prior_precision must be positive and finite, got {default}."
        )
    if prior_precision is None:  # the posterior's τ, or τ = 1 without a posterior
        prior_precision = 1.0 if laplace is None else laplace.prior_precision
    by_module: dict[str, float] = {}
    by_param: dict[str, float] = {}
    if isinstance(prior_precision, Mapping):
        modules = {owner(k)[0] for k in names}
        unknown = sorted(set(prior_precision) - set(names) - modules)
        if unknown:
            raise ValueError(
                f"{WHAT} names {unknown}, which are neither parameters nor modules with "
                f"parameters of the network; parameters are {names}."
            )
        by_param = _validated(prior_precision, [k for k in prior_precision if k in names])
        by_module = _validated(prior_precision, [k for k in prior_precision if k not in names])
    else:
        tau = torch.as_tensor(prior_precision, dtype=torch.float64).detach().flatten()
        per_block = (
            laplace is not None
            and isinstance(prior_precision, Tensor)
            and tau.numel() == len(laplace.blocks)
        )
        if tau.numel() == 1 and not per_block:
            scalar = float(prior_precision_vector(tau, ["all"], WHAT)[0])
            by_param = dict.fromkeys(names, scalar)
        elif laplace is None:
            raise ValueError(
                f"{WHAT} is a tensor of {tau.numel()} values, one per posterior block, but no "
                "laplace= is given: the block order is the Laplace posterior's forward-call "
                "order, which the network alone does not determine. Pass laplace=la with "
                "la.prior_precision, or a dict {module: τ} (e.g. la.prior_precision_dict())."
            )
        else:
            blocks = list(laplace.blocks)
            by_module = dict(
                zip(blocks, prior_precision_vector(tau, blocks, WHAT).tolist(), strict=True)
            )
    out: dict[str, float] = {}
    missing = []
    for k in names:
        # a block of a parameter the model itself owns is named by the parameter
        tau_k = by_param.get(k, by_module.get(owner(k)[0], by_module.get(k, default)))
        if tau_k is None:
            missing.append(k)
        else:
            out[k] = tau_k
    if missing:
        raise ValueError(
            f"bayesian_model: no prior precision for parameter(s) {missing} (outside the Laplace "
            "subset or the dict). Pass default_prior_precision=... for them, or name them in a "
            "dict."
        )
    return out
