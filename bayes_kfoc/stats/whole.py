"""Statistics from whole-model per-point gradients: for a module owning a tied tensor (every use
counts), an output that cannot be expanded along the batch, or a module whose output folds the
batch. The model is differentiated with respect to the module's own parameters, point by point
(``torch.func.vmap``, or ordinary passes where it cannot trace the model)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..blocks.kron import vec_to_mat
from .generic import GradStats, per_sample_param_grads
from .inputs import Inputs
from .kron import GradientStats, KronStats
from .targets import LINEAR, Target


def whole_model_stats(
    model: nn.Module, t: Target, x: Inputs, cot: Tensor, stats_dtype: torch.dtype | None
) -> KronStats | GradStats:
    """``t``'s statistics from per-point gradients of the whole model at ``x`` along the logit
    directions ``cot`` ``[V, N, C]``: a Linear's per-direction ``M̄ = [∂W ∂b]`` (Kronecker under
    K-FOC), a tied weight matrix's ``M``, or explicit gradients (diagonal / dense)."""
    full = t.full_names
    if isinstance(x, Tensor):
        grads = per_sample_param_grads(model, full, (x,), {}, cot, t.name, model_output=True)
    else:
        keys = [k for k, v in x.items() if isinstance(v, Tensor)]
        rest = {k: v for k, v in x.items() if not isinstance(v, Tensor)}
        grads = per_sample_param_grads(
            model,
            full,
            tuple(x[k] for k in keys),
            rest,
            cot,
            t.name,
            keys=keys,
            model_output=True,
        )
    grads = grads.to(stats_dtype or grads.dtype)
    if t.kind == LINEAR:
        w = t.param_shapes[t.local_names[0]]
        d_out, d_in = (w[1], w[0]) if t.transposed else (w[0], w[1])
        m = vec_to_mat(grads, d_out, d_in, t.has_bias, t.transposed)
        st = GradientStats(m.reshape(-1, d_out, m.shape[-1]), grads.shape[1], t.has_bias)
        st.transposed = t.transposed
        return st
    if t.tied_matrix:  # one weight matrix: its per-direction gradients M (K-FOC can use them)
        shape = next(iter(t.param_shapes.values()))
        m = grads.reshape(-1, shape[0], math.prod(shape[1:]))
        return GradientStats(m, grads.shape[1], False)
    return GradStats(grads)
