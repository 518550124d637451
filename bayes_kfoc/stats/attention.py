"""``nn.MultiheadAttention`` with its projections exposed, so their statistics can be collected.

``nn.MultiheadAttention`` applies its input projections (``in_proj_weight``, or the separate
``q/k/v_proj_weight`` when ``kdim``/``vdim`` differ from ``embed_dim``) and its output projection
(``out_proj.weight``) inside ``F.multi_head_attention_forward``, where no module hook sees their
inputs or outputs. While statistics are collected, :func:`exposed_attention` replaces the
forward of every attention module of the model (on the instance, restored on exit) by
:func:`attention_forward`, which

1. applies the input projections itself, batch first, and reports each one's input ``a`` and
   output ``z`` (``docs/math.md``, "Attention");
2. runs PyTorch's own ``F.multi_head_attention_forward`` on the projected ``q, k, v`` with
   identity projections, so masks (``key_padding_mask``, ``attn_mask``, ``is_causal``),
   ``add_zero_attn``, dropout and head splitting are PyTorch's code, not a copy;
3. calls ``out_proj`` as a module, so the output projection is an ordinary ``nn.Linear`` target.

``bias_k``/``bias_v`` are appended here (as PyTorch does, with the masks padded by one key), so
their per-point gradients are visible too. The result equals the module's own forward up to
round-off (tested); it costs four extra ``E x E`` products per position (the identities).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

Record = Callable[[nn.MultiheadAttention, str, Tensor | None, Tensor, slice | None], None]
"""``record(module, what, a, z, cols)``: ``what`` is ``"in"`` (an input projection: inputs
``a [N, T, d]``, outputs ``z [N, T, len(cols)]``, the rows ``cols`` of the packed weight), or a
parameter name (``"q_proj_weight"``, ``"bias_k"``, ...: ``z`` is that parameter's contribution,
batch first, and ``a`` its input, or ``None`` for ``bias_k``/``bias_v``)."""


def _batch_first(x: Tensor, batch_first: bool) -> Tensor:
    return x if batch_first else x.transpose(0, 1)


def attention_forward(
    mha: nn.MultiheadAttention,
    record: Record,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``mha(query, key, value, ...)`` with the projections applied (and reported) here; same
    signature and result as ``nn.MultiheadAttention.forward``."""
    if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
        raise ValueError(
            f"bayes_kfoc: nn.MultiheadAttention got unbatched inputs (query {tuple(query.shape)}); "
            "a curvature fit needs batched [N, L, E] (batch_first) or [L, N, E] inputs."
        )
    if query.is_nested or key.is_nested or value.is_nested:
        raise ValueError(
            "bayes_kfoc: nn.MultiheadAttention got nested tensors. Build nn.TransformerEncoder "
            "with enable_nested_tensor=False (fits run with gradients, off the fast path)."
        )
    e, bf = mha.embed_dim, mha.batch_first
    self_attn, kv_same = query is key and key is value, key is value
    qb = _batch_first(query, bf)
    kb = qb if self_attn else _batch_first(key, bf)
    vb = kb if kv_same else _batch_first(value, bf)

    def project(x: Tensor, w: Tensor | None, b: Tensor | None, what: str, cols: slice) -> Tensor:
        assert w is not None
        z = F.linear(x, w, b)
        record(mha, what, x, z, cols)
        return z

    bias = mha.in_proj_bias
    if mha._qkv_same_embed_dim:
        w = mha.in_proj_weight
        if self_attn:
            q, k, v = project(qb, w, bias, "in", slice(0, 3 * e)).chunk(3, dim=-1)
        elif kv_same:
            q = project(qb, w[:e], None if bias is None else bias[:e], "in", slice(0, e))
            bkv = None if bias is None else bias[e:]
            k, v = project(kb, w[e:], bkv, "in", slice(e, 3 * e)).chunk(2, dim=-1)
        else:
            parts = [(qb, 0), (kb, 1), (vb, 2)]
            q, k, v = (
                project(
                    x,
                    w[i * e : (i + 1) * e],
                    None if bias is None else bias[i * e : (i + 1) * e],
                    "in",
                    slice(i * e, (i + 1) * e),
                )
                for x, i in parts
            )
    else:  # separate q/k/v weights: explicit per-point gradients (see targets.ATTENTION_GRADS)
        b = [None, None, None] if bias is None else list(bias.chunk(3))
        q = project(qb, mha.q_proj_weight, b[0], "q_proj_weight", slice(0, e))
        k = project(kb, mha.k_proj_weight, b[1], "k_proj_weight", slice(e, 2 * e))
        v = project(vb, mha.v_proj_weight, b[2], "v_proj_weight", slice(2 * e, 3 * e))
    n = q.shape[0]
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask,
        mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask",
        target_type=q.dtype,
    )
    attn_mask = F._canonical_mask(
        mask=attn_mask,
        mask_name="attn_mask",
        other_type=None,
        other_name="",
        target_type=q.dtype,
        check_other=False,
    )
    if mha.bias_k is not None and mha.bias_v is not None:  # one extra key, as PyTorch adds it
        zk, zv = mha.bias_k.expand(n, 1, e), mha.bias_v.expand(n, 1, e)
        record(mha, "bias_k", None, zk, None)
        record(mha, "bias_v", None, zv, None)
        k, v = torch.cat([k, zk], dim=1), torch.cat([v, zv], dim=1)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    eye = torch.eye(e, dtype=q.dtype, device=q.device)
    out, weights = F.multi_head_attention_forward(
        q.transpose(0, 1),
        k.transpose(0, 1),
        v.transpose(0, 1),
        e,
        mha.num_heads,
        None,
        None,
        None,
        None,
        mha.add_zero_attn,
        mha.dropout,
        eye,
        None,
        training=mha.training,
        key_padding_mask=key_padding_mask,
        need_weights=need_weights,
        attn_mask=attn_mask,
        use_separate_proj_weight=True,
        q_proj_weight=eye,
        k_proj_weight=eye,
        v_proj_weight=eye,
        average_attn_weights=average_attn_weights,
        is_causal=is_causal,
    )
    out = mha.out_proj(out.transpose(0, 1))  # [N, L, E]: out_proj is an ordinary Linear target
    return (out if bf else out.transpose(0, 1)), weights


def attention_modules(model: nn.Module) -> list[nn.MultiheadAttention]:
    return [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]


@contextmanager
def exposed_attention(
    model: nn.Module, record: Record, only: set[int] | None = None
) -> Iterator[None]:
    """Within the context every ``nn.MultiheadAttention`` of ``model`` (those whose ``id`` is in
    ``only``, when given) runs :func:`attention_forward` with ``record`` (see the module
    docstring)."""
    mods = [m for m in attention_modules(model) if only is None or id(m) in only]
    for m in mods:
        if "forward" in m.__dict__:
            raise TypeError(
                f"bayes_kfoc: an nn.MultiheadAttention of {type(model).__name__} has its forward "
                "replaced on the instance; curvature needs the class's forward. Remove the "
                "override (or wrap the module in a subclass) and fit again."
            )

    def bound(m: nn.MultiheadAttention) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
            return attention_forward(m, record, *args, **kwargs)

        return forward

    try:
        for m in mods:
            m.forward = bound(m)  # type: ignore[method-assign]
        yield
    finally:
        for m in mods:
            m.__dict__.pop("forward", None)


@contextmanager
def unfused_attention() -> Iterator[None]:
    """PyTorch's fused attention fast path (``torch.backends.mha``) off within the context, and
    ``scaled_dot_product_attention`` on its plain (math) kernel: the nested tensors and fused
    kernels have no ``vmap`` rules and (the CPU flash kernel) no forward-mode derivative, so a
    model evaluated under ``torch.func.vmap`` or ``jvp`` (weight samples, Pyro particles, the
    linearised network) must take the plain path."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)
