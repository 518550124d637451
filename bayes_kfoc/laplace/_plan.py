"""How a GLM pass runs: which blocks take the closed form, exact or sampled, and the chunk size.

One forward pass on a single point (no gradients) records, for every block's module, how often
it is called, its output size and whether its output *is* the model's logits (a last layer, whose
Jacobian with respect to its own output is the identity). From that:

- the **closed-form** blocks (:mod:`._head`): Kronecker or diagonal blocks of a Linear layer
  called once, whose output tensor is the logits;
- a **cost model** in multiply-adds per point for the other blocks: the exact path needs ``C``
  vector-Jacobian products (``2F`` each, ``F`` the blocks' forward cost) plus the rotation of
  each block's per-class Jacobian into its eigenbasis; the sampled path ``S`` forward-mode JVPs
  (``2F`` each) plus the draws, amortised over a chunk;
- the **chunk size** from ``memory_budget``: the exact path holds ``C`` output directions per
  module and the rotated Jacobians per point, the sampled path ``S`` tangents per activation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..blocks import CurvatureBlock, DenseBlock, KronBlock
from ..curvature import default_memory_budget, human_bytes
from ..options import GlmPath
from ..stats import LINEAR, StatsKind, call_model
from ..stats.inputs import Inputs, split_inputs
from ._head import has_closed_form

DEFAULT_BUDGET = 2 * 2**30  # bytes: the predictive's default memory_budget (capped by free RAM)
AUTO_MARGIN = 4  # glm="auto" samples only when the cost model says 4x cheaper than exact
WORKSPACE = 3  # copies of the per-point Jacobian terms alive at once (gradients, rotated, squared)


def budget_bytes(memory_budget: int | None, device: torch.device) -> int:
    """The predictive's memory budget: the user's, else :data:`DEFAULT_BUDGET` (at most the
    default fit budget: half the free CUDA memory, or a quarter of the available RAM)."""
    if memory_budget is not None:
        if memory_budget <= 0:
            raise ValueError(f"Laplace: memory_budget must be positive bytes, got {memory_budget}.")
        return int(memory_budget)
    return min(DEFAULT_BUDGET, default_memory_budget(device))


@dataclass(frozen=True)
class ModuleProbe:
    """One block's module at one point: calls per forward, output numbers, is it the logits."""

    calls: int
    out_numel: int
    is_logits: bool
    in_ndim: int


@dataclass(frozen=True)
class GlmPlan:
    """How a GLM pass ran (``Laplace.last_glm``) or will run.

    Attributes:
        path: ``exact`` or ``sampled`` (never ``auto``): how the non-closed-form blocks are done.
        closed_form: the blocks done in closed form (last layers), block order.
        num_classes: ``C``.
        chunk_size: points per chunk.
        samples: ``S``, the JVPs per point of the sampled path.
        exact_cost, sampled_cost: the cost model's multiply-adds per point of either path.
        exact_bytes: bytes one point needs on the exact path (Jacobian statistics and terms).
        group: draws pushed through the JVP at once on the sampled path (their tangents, one
            parameter vector each, use at most a quarter of the budget).
        terms_bytes: bytes of all blocks' τ-independent variance terms per point (what tuning
            keeps per point when they fit the budget).
    """

    path: GlmPath
    closed_form: tuple[str, ...]
    num_classes: int
    chunk_size: int
    samples: int
    exact_cost: float
    sampled_cost: float
    exact_bytes: int
    group: int = 1
    terms_bytes: int = 0


def probe_modules(
    model: torch.nn.Module, modules: Mapping[str, torch.nn.Module], x: Inputs
) -> tuple[dict[str, ModuleProbe], int]:
    """Each module's :class:`ModuleProbe` at the first point of ``x``, and ``C``."""
    seen: dict[str, dict[str, Any]] = {k: {"calls": 0, "numel": 0} for k in modules}

    def make(name: str) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], out: Any) -> None:
            rec = seen[name]
            rec["calls"] += 1
            first = out if isinstance(out, Tensor) else next(iter(out), None)
            rec["numel"] += first.numel() if isinstance(first, Tensor) else 0
            rec["out"] = out
            rec["version"] = out._version if isinstance(out, Tensor) else None
            a = args[0] if args else None
            rec["in_ndim"] = a.ndim if isinstance(a, Tensor) else -1

        return hook

    handles = [m.register_forward_hook(make(k)) for k, m in modules.items()]
    try:
        with torch.inference_mode(False), torch.no_grad():  # normal tensors: version counters
            logits = call_model(model, split_inputs(x, 1)[0], "Laplace.predict")
    finally:
        for h in handles:
            h.remove()
    out = {  # the very tensor returned, not modified in place afterwards (e.g. out.mul_(2))
        k: ModuleProbe(
            r["calls"],
            r["numel"],
            r.get("out") is logits and r.get("version") == logits._version,
            r.get("in_ndim", -1),
        )
        for k, r in seen.items()
    }
    return out, int(logits.shape[-1])


def plan_glm(
    blocks: dict[str, CurvatureBlock],
    kinds: dict[str, StatsKind],
    probes: dict[str, ModuleProbe],
    num_classes: int,
    *,
    requested: GlmPath,
    samples: int,
    chunk_size: int,
    budget: int,
    model_itemsize: int,
    what: str = "Laplace.predict",
) -> GlmPlan:
    """The plan of the module docstring; raises when one point exceeds the budget on the path
    the user asked for."""
    c = num_classes
    closed = tuple(
        k
        for k, b in blocks.items()
        if has_closed_form(b)
        and kinds.get(k) == LINEAR
        and probes[k].calls == 1
        and probes[k].is_logits
        and probes[k].in_ndim == 2
    )
    flops = rotate = 0.0
    directions = workspace = terms = act_bytes = draw = tangent_bytes = 0.0
    for k, b in blocks.items():
        if k in closed:
            continue
        p = probes[k]
        item = torch.finfo(b.dtype).bits // 8
        out = max(p.out_numel, 1)
        if isinstance(b, KronBlock):
            o, n = b.d_out, b.d_in + int(b.bias)
            positions = max(out // o, 1)
            flops += positions * o * b.d_in
            if positions == 1:  # rank-one: (d Q_G)² per class, (a Q_A)² once
                rotate += o * o + n * n / c
                kept = (c * o + n) * item
            else:  # shared weights, per class: the cheapest of Q_Gᵀ M_c Q_A with M_c formed,
                # the rotated position factors multiplied (SharedStats.rotated_grads), and the
                # inputs' position kernel (_glm.block_variance)
                t = positions
                formed = t * o * n + o * o * n + o * n * n
                factored = t * o * o + t * n * n / c + t * o * n
                kernel = t * t * o * n / c + t * t * o
                rotate += min(formed, factored, kernel)
                kept = c * o * n * item
            draw += o * n + o * o * n + o * n * n  # E, then Q_G E Q_Aᵀ
        else:  # explicit per-point gradients: Σ_t δ_t ā_tᵀ over a shared weight, then (Qᵀg)²
            shape = torch.Size(next(iter(b.param_shapes.values()), ()))
            d_out = int(shape[0]) if len(shape) else 1
            positions = max(out // max(d_out, 1), 1)
            flops += positions * b.num_params
            rotate += positions * b.num_params if positions > 1 else 0
            rotate += b.num_params * (b.num_params if isinstance(b, DenseBlock) else 1)
            kept = c * b.num_params * item
            draw += b.num_params * (b.num_params if isinstance(b, DenseBlock) else 1) + b.num_params
        terms += kept  # the block's τ-independent terms per point
        workspace = max(workspace, WORKSPACE * kept)  # one block's terms are made at a time
        directions += c * out * model_itemsize  # the backpropagated directions
        act_bytes += WORKSPACE * out * model_itemsize  # per draw and point
        tangent_bytes += 2 * b.num_params * max(item, model_itemsize)  # per draw
    # the sampled path draws `group` tangents at a time (a quarter of the budget at most)
    group = int(min(samples, max(1, budget // (4 * max(tangent_bytes, 1)))))
    sampled_bytes = group * act_bytes + samples * c * model_itemsize
    exact_bytes = workspace + directions
    exact_cost = c * (2 * flops + rotate) if flops else 0.0
    sampled_cost = samples * (2 * flops + draw / max(chunk_size, 1)) if flops else 0.0
    if requested is GlmPath.AUTO:  # the Monte-Carlo path only when clearly cheaper
        cheaper = AUTO_MARGIN * sampled_cost < exact_cost
        path = GlmPath.SAMPLED if cheaper or exact_bytes > budget else GlmPath.EXACT
    else:
        path = requested
    per_point = exact_bytes if path is GlmPath.EXACT else sampled_bytes
    per_point += 4 * c * 8  # logits, variances, probabilities
    room = budget if path is GlmPath.EXACT else budget - group * tangent_bytes
    if per_point > room:
        raise MemoryError(
            f"{what}: one point needs about {human_bytes(per_point)} on the {path.value} GLM path "
            f"({c} classes), over the memory_budget of {human_bytes(budget)}. Raise it "
            "(Laplace(..., memory_budget=bytes)), "
            + (
                "use glm='sampled' (memory independent of the classes) "
                if path is GlmPath.EXACT
                else "use fewer n_samples "
            )
            + "or a smaller posterior (modules='last_layer')."
        )
    chunk = int(max(1, min(chunk_size, room // max(int(per_point), 1))))
    return GlmPlan(
        path,
        closed,
        c,
        chunk,
        samples,
        exact_cost,
        sampled_cost,
        int(exact_bytes),
        group,
        int(terms),
    )
