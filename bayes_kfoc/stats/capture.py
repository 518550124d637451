"""What the collector's hooks capture, and the backward pass that turns it into directions:
Conv2d's unfold, the check of a transposed Linear (``Conv1D``), the check that a batch-free
output handed on expanded leaves the logits unchanged, and the output gradients for every
direction at once."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batch import call_model
from .inputs import Inputs
from .kron import KronStats, SharedStats


@dataclass
class Capture:
    """One call of a module, recorded by the collector's forward hook.

    Attributes:
        z: the module's output (its gradients are the call's directions), expanded along a new
            batch dimension when every point shares it (``shape``).
        version: ``z._version`` when recorded (an output changed in place afterwards is refused).
        bd: the batch dimension of the input (Linear) or output (generic modules): ``0`` or
            ``1``; ``None`` until an ambiguous shape is resolved (``batch_dim``).
        x: a Linear's input, detached.
        a: a Conv2d's unfolded input, or an attention projection's input (batch first).
        args, kwargs: a generic module's inputs (for its per-point vector-Jacobian products).
        what, cols: an attention projection's role (``"in"``, a projection's name, ``"bias_k"``
            / ``"bias_v"``) and its rows in a packed weight.
        shape: the output's own shape when it had no batch dimension (handed on expanded).
        fold: the module folds ``k`` rows per point into its batch dimension (``[k·N, ...]``).
    """

    z: Tensor
    version: int
    bd: int | None = 0
    x: Tensor | None = None
    a: Tensor | None = None
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    what: str = ""
    cols: slice | None = None
    shape: torch.Size | None = None
    fold: bool = False


def conv_unfold(module: nn.Conv2d, x: Tensor) -> Tensor:
    if x.ndim != 4:
        raise ValueError(
            f"fit_curvature: Conv2d input must be batched [N, C, H, W], got {tuple(x.shape)}."
        )
    pad = list(module._reversed_padding_repeated_twice)
    if any(pad):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pad, mode=mode)
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)
    return cols.transpose(1, 2)  # [N, T, C_in·kh·kw]


def check_transposed_linear(name: str, module: nn.Module, x: Tensor, out: Tensor) -> None:
    """A layer taken for ``y = x @ W + b`` (``W`` ``[d_in, d_out]``, :data:`TRANSPOSED_LINEAR`)
    must compute exactly that: checked on its first call, or a ``TypeError`` naming the fix."""
    w = module.get_parameter("weight")
    b = getattr(module, "bias", None)
    with torch.no_grad():
        ref = x.to(w.dtype) @ w
        ref = ref + b if isinstance(b, Tensor) else ref
        ok = ref.shape == out.shape and torch.allclose(
            ref, out.detach(), rtol=1e-4, atol=1e-5 * float(ref.abs().max().clamp(min=1))
        )
    if not ok:
        raise TypeError(
            f"fit_curvature: module {name!r} ({type(module).__name__}) is registered as a "
            "layer computing x @ weight + bias (weight [d_in, d_out]), but its output differs. "
            "Remove its class from bayes_kfoc.stats.targets.TRANSPOSED_LINEAR, or exclude it "
            "with exclude=[...]."
        )


def output_grads(
    logits: Tensor, zs: list[Tensor], cot: Tensor, batched: bool
) -> tuple[list[Tensor | None], bool]:
    """``[V, *z.shape]`` gradients of ``⟨cot_v, logits⟩`` at each captured output ``z``
    (``None`` where unused): one batched backward (``is_grads_batched``) while ``batched``, or
    one backward per direction once some op has no vmap rule; and whether to batch next time."""
    if cot.shape[0] == 1:  # one direction: a plain backward pass, no vmap
        grads = torch.autograd.grad(logits, zs, cot[0], retain_graph=True, allow_unused=True)
        return [None if g is None else g.unsqueeze(0) for g in grads], batched
    if batched:
        try:
            with warnings.catch_warnings():  # e.g. attention's vmap fallback: still exact
                warnings.filterwarnings("ignore", "There is a performance drop")
                out = torch.autograd.grad(
                    logits, zs, cot, retain_graph=True, allow_unused=True, is_grads_batched=True
                )
                return list(out), True
        except RuntimeError:
            batched = False  # some op lacks a vmap rule: loop over directions
    per_v = [
        torch.autograd.grad(logits, zs, cot[v], retain_graph=True, allow_unused=True)
        for v in range(cot.shape[0])
    ]
    return [
        None if per_v[0][i] is None else torch.stack([g[i] for g in per_v]) for i in range(len(zs))
    ], batched


def batch_major(logits: Tensor, z: Tensor, cot: Tensor, g: Tensor, n: int) -> bool:
    """Whether a module whose input folds the batch (``[k·N, ...]``, window attention) folds it
    batch-major: point ``n`` owns rows ``n·k … n·k + k − 1``. Checked by one more backward with
    point ``n``'s direction ``cot`` scaled by ``n + 1``: the gradient ``g`` at ``z`` must scale
    row-block by row-block alike."""
    w = torch.arange(1, n + 1, dtype=cot.dtype, device=cot.device)
    (gw,) = torch.autograd.grad(logits, [z], cot * w[:, None], retain_graph=True)
    k = z.shape[0] // n
    ref = g.reshape(n, k, -1) * w[:, None, None]
    tol = 1e-6 * float(ref.abs().max().clamp(min=1e-30))
    return torch.allclose(gw.reshape(n, k, -1).to(ref.dtype), ref, rtol=1e-5, atol=tol)


def fold_error(names: list[str], n: int) -> ValueError:
    """One error for every module whose folded batch is not batch-major, naming the outermost
    module around them all (their common ancestor) to exclude."""
    parts = [m.split(".") for m in names]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    outer = ".".join(common[: len(parts[0]) - 1] if len(names) == 1 else common)
    return ValueError(
        f"fit_curvature: module(s) {sorted(names)} get their inputs with the batch of {n} points "
        "folded into dimension 0, but not batch-major (point n owning a contiguous block of "
        "rows), so their per-point statistics cannot be told apart. Exclude the module that "
        f"folds the batch: exclude=[{outer!r}] (the outermost module around them)."
    )


MASK_KEY = "attention_mask"
"""The input key whose ``[N, T]`` tensor (1 real, 0 padding) marks the padding the model masks out
(the Hugging Face convention); K-FAC counts only the positions it marks real."""

PAD_ATTR = "_bayes_kfoc_padding"
"""The model attribute holding the function set by :func:`set_padding_mask`."""


def set_padding_mask(model: nn.Module, mask: Callable[[Inputs], Tensor]) -> nn.Module:
    """Declare where ``model``'s inputs mark padding: ``mask(x)`` returns ``[N, T]``, nonzero at
    real positions and zero at the padding the model masks out (for inputs that are not a
    mapping with an ``attention_mask``). K-FAC then counts only the real positions of every
    module whose positions are the sequence's. Returns ``model``."""
    object.__setattr__(model, PAD_ATTR, mask)
    return model


def padding_mask(model: nn.Module, x: Inputs) -> Tensor | None:
    """The ``[N, T]`` padding mask of ``x``: from :func:`set_padding_mask`, else a mapping's
    :data:`MASK_KEY`, else ``None`` (every position counts)."""
    fn = model.__dict__.get(PAD_ATTR)
    if fn is not None:
        m = fn(x)
    elif isinstance(x, Tensor):
        return None
    else:
        m = x.get(MASK_KEY)
    return m.detach() if isinstance(m, Tensor) and m.ndim == 2 else None


def live_positions(mask: Tensor | None, a: Tensor, cap: Capture) -> Tensor | None:
    """The mask's ``[N, T]`` rows for a call whose positions ``a`` ``[N, T, n]`` are the
    sequence's (same ``N`` and ``T``, batch not folded), in ``a``'s dtype; else ``None``."""
    if mask is None or cap.fold or a.ndim != 3 or tuple(a.shape[:2]) != tuple(mask.shape):
        return None
    return mask.to(device=a.device, dtype=a.dtype).ne(0).to(a.dtype)


def with_live(st: KronStats, live: list[Tensor | None], a_parts: list[Tensor]) -> None:
    """Attach the live positions of every call (all live where a call has no mask) to a
    :class:`SharedStats`, when any call has a mask."""
    if isinstance(st, SharedStats) and any(m is not None for m in live):
        st.live = torch.cat(
            [
                a.new_ones(a.shape[:2]) if m is None else m
                for m, a in zip(live, a_parts, strict=True)
            ],
            dim=1,
        )


def expansion_changes_logits(model: nn.Module, x: Inputs, logits: Tensor) -> bool:
    """Whether ``logits``, computed with batch-free outputs handed on expanded along the batch,
    differ from the model's own (an expansion must be only a broadcast the model would have made
    itself)."""
    with torch.no_grad():
        plain = call_model(model, x, "fit_curvature")
    if plain.shape == logits.shape and torch.allclose(
        plain, logits.detach(), rtol=1e-4, atol=1e-5 * float(plain.abs().max().clamp(min=1))
    ):
        return False
    return True
