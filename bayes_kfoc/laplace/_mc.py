"""Weight-sampling predictive: the network evaluated at sampled parameter vectors, vectorised."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ..stats import call_model
from ..stats.attention import unfused_attention
from ..stats.inputs import Inputs
from ..stats.output import logits_of


def head_features(model: nn.Module, head: nn.Module, x: Inputs) -> Tensor | None:
    """The input of ``head`` at ``x`` when ``head``'s output *is* the model's output, else None.

    Then only ``head`` depends on the random parameters, and the rest of the network runs once.
    """
    seen: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        seen["calls"] = seen.get("calls", 0) + 1
        seen["input"], seen["output"] = args, out

    handle = head.register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = call_model(model, x)
    finally:
        handle.remove()
    args = seen.get("input", ())
    if seen.get("calls") != 1 or seen["output"] is not logits or len(args) != 1:
        return None
    return args[0] if isinstance(args[0], Tensor) else None


def head_logits(
    head: nn.Module, names: list[str], shapes: list[torch.Size], block_draws: Tensor, feats: Tensor
) -> Tensor:
    """``[S, B, C]``: ``head`` at each sampled vector of its own parameters (block order)."""
    sizes = [int(torch.Size(s).numel()) for s in shapes]

    def forward(theta: Tensor) -> Tensor:
        parts = torch.split(theta, sizes)
        params = {k: v.view(s) for k, v, s in zip(names, parts, shapes, strict=True)}
        return functional_call(head, params, (feats,))

    with torch.no_grad():
        return vmap(forward)(block_draws)


def logits_at(model: nn.Module, thetas: Tensor, x: Inputs, chunk: int = 32) -> Tensor:
    """``[S, B, C]`` logits of ``model`` at each full parameter vector ``thetas[s]``.

    Uses ``torch.func.functional_call`` under ``vmap`` over chunks of samples (no
    ``load_state_dict`` loop); buffers are shared.
    """
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    buffers = dict(model.named_buffers())

    def forward(theta: Tensor, xb: Inputs) -> Tensor:
        parts = torch.split(theta, sizes)
        params = {k: v.view(s) for k, v, s in zip(names, parts, shapes, strict=True)}
        if isinstance(xb, Mapping):  # model(**x)
            return logits_of(model, functional_call(model, (params, buffers), (), dict(xb)))
        return logits_of(model, functional_call(model, (params, buffers), (xb,)))

    outs = []
    batched = vmap(forward, in_dims=(0, None))
    with torch.no_grad(), warnings.catch_warnings(), unfused_attention():
        # e.g. attention without a vmap rule: the fallback is slower, the result the same
        warnings.filterwarnings("ignore", "There is a performance drop")
        for start in range(0, thetas.shape[0], chunk):
            outs.append(batched(thetas[start : start + chunk], x))
    return torch.cat(outs)
