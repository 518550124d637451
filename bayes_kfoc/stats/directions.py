"""Fisher directions at the logits: the rows of a square root of each per-point Fisher.

With ``p = softmax(f)`` and ``V`` directions per point, ``B = Σ_v δ_v δ_v^T`` at the logits is
(see ``docs/math.md``, "Fisher directions"):

- ``exact``: ``δ_c = √p_c (e_c − p)`` gives ``Σ_c δ_c δ_c^T = diag(p) − p p^T``. These ``C`` rows
  are dependent (``Σ_c √p_c δ_c = 0``), so they are rotated by the Householder reflection ``H``
  with ``H e_C = −√p`` (orthogonal, so ``Σ δ δ^T`` is unchanged) and the last rotated row, which is
  zero, is dropped: ``V = C − 1`` (a tenth fewer backward directions and statistics for ten
  classes);
- ``mc``: ``δ_s = (e_{ŷ_s} − p) / √S`` with ``ŷ_s ~ p``, ``V = S = mc_samples`` (averaged, not
  summed, over the samples);
- ``empirical``: ``δ = e_y − p`` for the observed label, ``V = 1``.

``δ`` is the gradient of ``log p`` (up to sign, which the outer product removes).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..options import FisherType


def logit_directions(
    logits: Tensor,
    targets: Tensor,
    fisher: FisherType,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Directions ``[V, N, C]`` at the logits for the chosen Fisher type (``logits`` detached)."""
    logits = logits.detach()
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(
            f"logit_directions: logits must be [N, C] with C >= 2 classes, got "
            f"{tuple(logits.shape)}; one logit has a constant softmax and a zero Fisher."
        )
    probs = torch.softmax(logits, dim=-1)
    c = probs.shape[1]
    if fisher is FisherType.EXACT:
        eye = torch.eye(c, dtype=probs.dtype, device=probs.device)
        root = probs.sqrt()
        # [N, C, C]: row c of point n is √p_c (e_c − p).
        rows = root.unsqueeze(-1) * (eye - probs.unsqueeze(1))
        # Householder H = I − 2wwᵀ, w = (e_C + √p)/||e_C + √p||, ||e_C + √p||² = 2(1 + √p_C) ≥ 2.
        w = root.clone()
        w[:, -1] += 1.0
        w = w / (2.0 * (1.0 + root[:, -1:])).sqrt()
        rotated = rows - 2.0 * w.unsqueeze(-1) * (w.unsqueeze(1) @ rows)  # H · rows
        return rotated[:, :-1].transpose(0, 1)  # [C − 1, N, C]; the dropped row is H·(√p-comb.) = 0
    if fisher is FisherType.MC:
        samples = torch.multinomial(probs, mc_samples, replacement=True, generator=generator)
        onehot = torch.nn.functional.one_hot(samples.T, c).to(probs.dtype)  # [S, N, C]
        return (onehot - probs.unsqueeze(0)) / math.sqrt(mc_samples)
    onehot = torch.nn.functional.one_hot(targets, c).to(probs.dtype)
    return (onehot - probs).unsqueeze(0)


def num_directions(fisher: FisherType, num_classes: int, mc_samples: int) -> int:
    if fisher is FisherType.EXACT:
        return num_classes - 1
    if fisher is FisherType.MC:
        return mc_samples
    return 1
