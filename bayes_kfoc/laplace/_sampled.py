"""The sampled linearised predictive: ``f_lin = f(θ*) + J δ`` with ``δ`` drawn from the posterior.

``δ_s ~ N(0, (F + τI)^{-1})`` is drawn block by block in each block's eigenbasis (the same
samplers as ``Laplace.sample``) and pushed through one forward-mode Jacobian-vector product
(``torch.func.jvp``, vectorised over the draws with ``vmap``): ``J δ_s`` are exact draws of the
linearised logits' deviation ``N(0, J Σ Jᵀ)``, at a cost of ``S`` JVPs per point whatever the
number of classes or the size of a convolution's Jacobian (``docs/math.md``, "Sampled linearised
predictive"). The primal ``f(θ*)`` is computed once per chunk (it is not batched under ``vmap``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap

from ..blocks import CurvatureBlock
from ..curvature import full_param_name
from ..stats.attention import unfused_attention
from ..stats.inputs import Inputs
from ..stats.output import logits_of
from ._posterior import sample_blocks


def parameter_names(name: str, block: CurvatureBlock) -> list[str]:
    """The full ``named_parameters`` names of a block's parameters, in block order."""
    return [full_param_name(name, p) for p in block.param_shapes]


def draw_tangents(
    blocks: dict[str, CurvatureBlock], tau: dict[str, Tensor], n: int, generator: Any
) -> dict[str, Tensor]:
    """``{parameter name: [n, *shape]}``: ``n`` posterior deviations ``δ`` of every block."""
    names = list(blocks)
    draws = sample_blocks(
        [blocks[k] for k in names], torch.stack([tau[k] for k in names]), n, generator
    )
    out: dict[str, Tensor] = {}
    for k, d in zip(names, draws, strict=True):
        block = blocks[k]
        shapes = [torch.Size(s) for s in block.param_shapes.values()]
        parts = torch.split(d, [s.numel() for s in shapes], dim=1)
        for full, part, shape in zip(parameter_names(k, block), parts, shapes, strict=True):
            out[full] = part.reshape(n, *shape)
    return out


def linearised_deviations(
    model: nn.Module, x: Inputs, tangents: dict[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """``f(θ*)`` ``[B, C]`` and ``J δ_s`` ``[S, B, C]`` for the ``S`` tangents, in one ``vmap``
    over the draws (the caller draws them in groups that fit the memory budget)."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    keys = list(tangents)
    primals = tuple(params[k] for k in keys)

    def f(*sub: Tensor) -> Tensor:
        p = {**params, **dict(zip(keys, sub, strict=True))}
        if isinstance(x, Mapping):  # model(**x)
            out = functional_call(model, (p, buffers), (), dict(x))
        else:
            out = functional_call(model, (p, buffers), (x,))
        return logits_of(model, out, "Laplace.predict")

    def one(*t: Tensor) -> tuple[Tensor, Tensor]:
        tangent = tuple(v.to(p.dtype) for v, p in zip(t, primals, strict=True))
        out = jvp(f, primals, tangent)
        return out[0], out[1]

    with torch.no_grad(), warnings.catch_warnings(), unfused_attention():
        warnings.filterwarnings("ignore", "There is a performance drop")
        draws = tuple(tangents[k] for k in keys)
        primal, dev = vmap(one, out_dims=(None, 0))(*draws)  # type: ignore[arg-type]
    return primal, dev
