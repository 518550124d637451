"""One GLM pass over inputs, chunk by chunk, as a :class:`._plan.GlmPlan` says.

Every chunk carries the MAP logits and the τ-independent material of each block:

- closed-form (last-layer) blocks: their input features, as :class:`._head.HeadVariance`
  (captured by a forward hook; no direction is back-propagated into them);
- exact path: the other blocks' Jacobian statistics from the :class:`~bayes_kfoc.stats.Collector`;
- sampled path: ``J δ_s`` of the other blocks' posterior draws, by forward-mode JVPs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..options import GlmPath
from ..stats import Collector, Stats, call_model
from ..stats.inputs import Inputs, batch_size, split_inputs
from ._glm import BlockVariance, block_variance
from ._head import HeadVariance
from ._plan import GlmPlan, budget_bytes, plan_glm, probe_modules
from ._sampled import draw_tangents, linearised_deviations

if TYPE_CHECKING:
    from .predictive import PosteriorView


@dataclass
class GlmChunk:
    """One chunk of points: MAP logits ``[B, C]`` and each block's τ-independent terms."""

    logits: Tensor
    heads: dict[str, HeadVariance]
    stats: dict[str, Stats] | None = None  # exact path: the other blocks' Jacobian statistics
    deviations: Tensor | None = None  # sampled path: J δ_s of the other blocks, [S, B, C]
    blocks: Mapping[str, Any] | None = None

    def names(self) -> list[str]:
        """The blocks with variance terms in this chunk (closed form or Jacobian statistics)."""
        return [*self.heads, *(self.stats or {})]

    def term(self, name: str) -> Any:
        """Block ``name``'s τ-independent terms: ``term(τ) -> [B, C]``, ``term.many(τs)``."""
        if name in self.heads:
            return self.heads[name]
        assert self.stats is not None and self.blocks is not None
        return BlockVariance(self.stats[name], self.blocks[name])

    def terms(self) -> dict[str, Any]:
        """``{block: term}`` of every block at once (memory: all blocks' terms)."""
        return {k: self.term(k) for k in self.names()}

    def variance(self, tau: Mapping[str, Tensor]) -> Tensor:
        """``[B, C]`` variances of the linearised logits at ``τ`` (by block name); one block's
        terms alive at a time."""
        var: Tensor | None = None
        for k in self.names():
            if k in self.heads:
                v = self.heads[k](tau[k])
            else:
                assert self.stats is not None and self.blocks is not None
                v = block_variance(self.stats[k], self.blocks[k], tau[k])
            var = v if var is None else var + v
        if self.deviations is not None:
            v = self.deviations.square().mean(0)
            var = v if var is None else var + v
        return self.logits.new_zeros(self.logits.shape) if var is None else var

    def covariance(self, tau: Mapping[str, Tensor]) -> Tensor | None:
        """``[B, C, C]``: the closed-form blocks' covariance (``None`` without any)."""
        cov: Tensor | None = None
        for k, head in self.heads.items():
            c = head.covariance(tau[k])
            cov = c if cov is None else cov + c
        return cov


def glm_plan(
    view: PosteriorView, x: Inputs, samples: int, path: GlmPath, what: str = "Laplace.predict"
) -> GlmPlan:
    """The :class:`GlmPlan` for ``x`` (one forward pass on its first point)."""
    modules = {t.name: t.module for t in view.targets}
    kinds = {t.name: t.kind for t in view.targets}
    probes, c = probe_modules(view.model, modules, x)
    item = next(view.model.parameters()).element_size()
    return plan_glm(
        view.blocks,
        kinds,
        probes,
        c,
        requested=path,
        samples=samples,
        chunk_size=view.chunk_size,
        budget=budget_bytes(view.memory_budget, view.device),
        model_itemsize=item,
        what=what,
    )


@contextmanager
def captured_inputs(
    modules: dict[str, nn.Module], points: list[int]
) -> Iterator[dict[str, Tensor]]:
    """``{name: input}`` of each module's latest call on a batch of ``points[0]`` points."""
    seen: dict[str, Tensor] = {}

    def make(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            a = args[0] if args else None
            if isinstance(a, Tensor) and a.shape[0] == points[0]:
                seen[name] = a.detach()

        return hook

    handles = [m.register_forward_hook(make(k)) for k, m in modules.items()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def glm_chunks(
    view: PosteriorView,
    x: Inputs,
    plan: GlmPlan,
    generator: torch.Generator | None,
    samples: int | None = None,
) -> Iterator[GlmChunk]:
    """The chunks of the module docstring (``samples`` draws per point on the sampled path,
    default ``plan.samples``)."""
    closed = set(plan.closed_form)
    head_modules = {t.name: t.module for t in view.targets if t.name in closed}
    transposed = {t.name: t.transposed for t in view.targets if t.name in closed}
    others = [t for t in view.targets if t.name in view.blocks and t.name not in closed]
    size = [0]
    with captured_inputs(head_modules, size) as feats:

        def heads() -> dict[str, HeadVariance]:
            missing = [k for k in head_modules if k not in feats]
            if missing:
                raise RuntimeError(f"Laplace.predict: module(s) {missing} were not called.")
            return {k: HeadVariance(feats[k], view.blocks[k], transposed[k]) for k in head_modules}

        chunks = split_inputs(x, plan.chunk_size)
        if others and plan.path is GlmPath.EXACT:
            with Collector(view.model, others) as col:
                for xb in chunks:
                    size[0] = batch_size(xb)
                    feats.clear()
                    with torch.inference_mode(False):  # e.g. inside Lightning's test loop
                        stats, logits = col.jacobians(xb)
                    yield GlmChunk(logits, heads(), stats, None, view.blocks)
            return
        sub = {t.name: view.blocks[t.name] for t in others}
        tau = view.tau_of
        for i, xb in enumerate(chunks):
            size[0] = batch_size(xb)
            feats.clear()
            deviations = None
            with torch.inference_mode(False):
                if sub:
                    n = plan.samples if samples is None else samples
                    parts = []
                    try:
                        for start in range(0, n, plan.group):  # `group` tangents at a time
                            k = min(plan.group, n - start)
                            tangents = draw_tangents(sub, tau, k, generator)
                            logits, dev = linearised_deviations(view.model, xb, tangents)
                            parts.append(dev)
                            del tangents
                    except NotImplementedError as err:  # an op without forward-mode AD
                        if i or view.glm is not GlmPath.AUTO:
                            raise NotImplementedError(
                                f"Laplace.predict: glm='sampled' needs forward-mode AD, which an "
                                f"operation of this model lacks ({str(err).splitlines()[0]}); "
                                "use glm='exact'."
                            ) from err
                        # planned afresh: the exact path's own chunk size and memory check
                        exact = glm_plan(view, x, plan.samples, GlmPath.EXACT)
                        if view.report is not None:
                            view.report(exact)
                        yield from glm_chunks(view, x, exact, generator, samples)
                        return
                    deviations = torch.cat(parts)
                if head_modules or not sub:
                    with torch.no_grad():
                        logits = call_model(view.model, xb, "Laplace.predict")
            yield GlmChunk(logits.detach(), heads(), None, deviations, view.blocks)
