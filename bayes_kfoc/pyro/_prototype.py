"""What :class:`~bayes_kfoc.pyro.LaplaceGuide` checks in its model's prototype trace.

Every latent site must be a parameter of the Laplace model (site ``prefix + name``), with the
parameter's shape as value shape **and** event shape (priors declared with ``.to_event(ndim)``),
outside any plate; every parameter of a posterior block must be a latent site. The one observed
site, if there is one, is the likelihood that :meth:`LaplaceGuide.network_model` reproduces.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pyro.poutine import Trace
from pyro.poutine.util import site_is_subsample

from .posteriors import Site


@dataclass(frozen=True)
class Observed:
    """The model's likelihood site: its name, its (first) plate, the number of points one batch
    counts as, and whether that differs from the batch (a subsampled plate)."""

    name: str
    plate: str
    num_data: int
    scaled: bool


def check_prototype(
    trace: Trace, block_sites: Mapping[str, Site], fixed_sites: Mapping[str, Site], prefix: str
) -> set[str]:
    """Raise a ``ValueError`` naming the site and the fix unless the model's latent sites are
    exactly the posterior's parameters (plus some of the fixed ones); returns the latent sites."""
    seen = set()
    for name, node in trace.iter_stochastic_nodes():
        site: Any = node
        spec = block_sites.get(name) or fixed_sites.get(name)
        if spec is None:
            known = sorted(block_sites)[:12]
            raise ValueError(
                f"LaplaceGuide: the model's latent site {name!r} is not covered by the "
                f"posterior (its sites are {known}{'...' if len(block_sites) > 12 else ''}, "
                f"named prefix={prefix!r} + parameter name). Only network weights can "
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
    return seen


def observed_site(trace: Trace) -> Observed | None:
    """The only observed (non-subsample) sample site of ``trace``; ``None`` if not exactly one."""
    nodes: dict[str, Any] = trace.nodes
    observed = [
        (name, site)
        for name, site in nodes.items()
        if site["type"] == "sample" and site["is_observed"] and not site_is_subsample(site)
    ]
    if len(observed) != 1:
        return None
    name, site = observed[0]
    plates = [f.name for f in site["cond_indep_stack"]]
    scale = float(site["scale"])
    counted = scale * (site["value"].shape[0] if site["value"].ndim else 1)
    return Observed(name, plates[0] if plates else "data", round(counted), scale != 1.0)
