"""Weight-sampling predictive: the network evaluated at sampled parameter vectors, vectorised."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap


def logits_at(model: nn.Module, thetas: Tensor, x: Tensor, chunk: int = 32) -> Tensor:
    """``[S, B, C]`` logits of ``model`` at each full parameter vector ``thetas[s]``.

    Uses ``torch.func.functional_call`` under ``vmap`` over chunks of samples (no
    ``load_state_dict`` loop); buffers are shared.
    """
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    buffers = dict(model.named_buffers())

    def forward(theta: Tensor, xb: Tensor) -> Tensor:
        parts = torch.split(theta, sizes)
        params = {k: v.view(s) for k, v, s in zip(names, parts, shapes, strict=True)}
        return functional_call(model, (params, buffers), (xb,))

    outs = []
    batched = vmap(forward, in_dims=(0, None))
    with torch.no_grad():
        for start in range(0, thetas.shape[0], chunk):
            outs.append(batched(thetas[start : start + chunk], x))
    return torch.cat(outs)
