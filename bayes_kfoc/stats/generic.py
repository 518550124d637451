"""Per-point, per-direction parameter gradients of an arbitrary module, via ``torch.func``.

Used for modules outside Linear/Conv2d (BatchNorm, LayerNorm, Embedding, grouped convolutions,
custom modules): their diagonal (or dense) Fisher block needs ``∂⟨δ_{n,v}, out_n⟩/∂θ`` per point
``n`` and direction ``v``. The module is re-run on single points with ``functional_call`` and
``vmap``, which is exact when the module treats points independently (every module in eval mode).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from ..blocks import CurvatureBlock
from .attention import unfused_attention
from .kron import grads_quad
from .output import logits_of
from .targets import keeps_forward

if TYPE_CHECKING:
    from .capture import Capture


def _norm_grads(module: nn.Module, x: Tensor, cot: Tensor, names: list[str]) -> Tensor | None:
    """Closed-form per-point gradients of eval-mode BatchNorm and of LayerNorm (``None`` else).

    Both compute ``γ ⊙ x̂ + β``, so ``∂/∂γ = Σ δ ⊙ x̂`` and ``∂/∂β = Σ δ`` over the dimensions
    the parameter is shared across (``cot``: ``[V, N, *out]``).
    """
    v, n = cot.shape[0], cot.shape[1]
    if not _computes_base(module):
        return None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.training or module.running_mean is None or module.running_var is None:
            return None
        shape = (1, -1) + (1,) * (x.ndim - 2)
        xhat = (x - module.running_mean.view(shape)) * torch.rsqrt(
            module.running_var.view(shape) + module.eps
        )
        reduce_dims = tuple(range(3, cot.ndim))  # over [V, N, C, *spatial]: the spatial dims
    elif isinstance(module, nn.LayerNorm):
        k = len(module.normalized_shape)
        dims = tuple(range(x.ndim - k, x.ndim))
        mean = x.mean(dim=dims, keepdim=True)
        var = x.var(dim=dims, unbiased=False, keepdim=True)
        xhat = (x - mean) * torch.rsqrt(var + module.eps)
        reduce_dims = tuple(range(2, cot.ndim - k))  # dims between N and the normalised shape
    else:
        return None

    def total(t: Tensor) -> Tensor:  # note: sum(dim=()) would reduce every dimension
        return t.sum(dim=reduce_dims) if reduce_dims else t

    grads = {"weight": total(cot * xhat.unsqueeze(0)), "bias": total(cot)}
    if set(names) - set(grads):
        return None
    return torch.cat([grads[k].reshape(v, n, -1) for k in names], dim=-1)


def _computes_base(module: nn.Module) -> bool:
    """Whether ``module`` computes what its norm base class computes: a closed form keyed by
    the class describes a subclass only when the subclass keeps the base class's ``forward``
    (a channels-first LayerNorm that permutes around ``F.layer_norm`` does not; it takes the
    exact generic path)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return keeps_forward(module, nn.modules.batchnorm._BatchNorm)
    if isinstance(module, nn.LayerNorm):
        return keeps_forward(module, nn.LayerNorm)
    return False


def per_sample_param_grads(
    module: nn.Module,
    names: list[str],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    cotangents: Tensor,
    module_name: str,
    batch_dim: int = 0,
    keys: list[str] | None = None,
    model_output: bool = False,
) -> Tensor:
    """``[V, N, P]`` gradients of ``⟨cotangent, module(x_n)⟩`` w.r.t. the module's own parameters.

    ``cotangents`` is ``[V, *out]`` with the ``N`` points in dimension ``batch_dim`` of ``out``
    (1 for a sequence-first module, ``[L, N, ...]``; the arguments of size ``N`` there are split
    along it too); ``P`` follows ``names`` (``named_parameters`` order). With ``module`` the
    whole model and dotted ``names`` these are the gradients of a tied tensor over every use
    (``functional_call`` keeps the ties). With ``keys`` the arguments are passed as those
    keywords (a model called as ``model(**inputs)``); with ``model_output`` the module is the
    user's model and its logits are taken from its output (:func:`~.output.logits_of`).
    """
    bd = batch_dim
    num = cotangents.shape[1 + bd]
    if len(args) == 1 and isinstance(args[0], Tensor) and not kwargs and keys is None:
        x0, c0 = args[0], cotangents
        if bd == 1:  # norm layers act on trailing dimensions only: any layout is batch first
            x0, c0 = x0.transpose(0, 1), c0.transpose(1, 2)
        fast = _norm_grads(module, x0, c0, names)
        if fast is not None:
            return fast
    params = {k: module.get_parameter(k).detach() for k in names}  # dotted names too
    in_dims = tuple(
        bd if isinstance(x, Tensor) and x.ndim > bd and x.shape[bd] == num else None for x in args
    )

    def forward_one(p: dict[str, Tensor], *xs: Any) -> Tensor:
        batched = tuple(
            x.unsqueeze(bd) if d is not None else x for x, d in zip(xs, in_dims, strict=True)
        )
        if keys is None:
            out = functional_call(module, p, batched, kwargs)
        else:
            out = functional_call(
                module, p, (), {**dict(zip(keys, batched, strict=True)), **kwargs}
            )
        if model_output:
            out = logits_of(module, out, "fit_curvature")
        if not isinstance(out, Tensor):
            raise TypeError(
                f"fit_curvature: module {module_name!r} returns {type(out).__name__}, not a "
                "tensor; only single-tensor outputs are supported. Exclude it with exclude=[...]."
            )
        return out.squeeze(bd)

    def grad_one(xs: tuple[Any, ...], cot: Tensor) -> dict[str, Tensor]:
        pullback = vjp(lambda p: forward_one(p, *xs), params)[1]
        grads: dict[str, Tensor] = pullback(cot)[0]
        return grads

    def by_point() -> Tensor:
        return point_loop_grads(
            module, names, args, kwargs, cotangents, module_name, bd, keys, model_output
        )

    if any(_batched(v, bd, num) for v in kwargs.values()):
        return by_point()  # batched keyword arguments (a model called as model(**x)): a loop
    over_v = vmap(grad_one, in_dims=(None, 0))
    over_n = vmap(over_v, in_dims=(in_dims, 1 + bd), out_dims=1)
    try:
        # torch.func still differentiates; nothing else records a graph. An op without a vmap
        # rule (e.g. CPU attention) falls back to a loop: slower, the same result.
        with torch.no_grad(), warnings.catch_warnings(), unfused_attention():
            warnings.filterwarnings("ignore", "There is a performance drop")
            grads = over_n(args, cotangents)
    except RuntimeError:
        # e.g. data-dependent control flow (a padding mask's .all()): one ordinary forward and
        # backward per point instead, exact and slower
        return by_point()
    v = cotangents.shape[0]
    return torch.cat([grads[k].reshape(v, num, -1) for k in names], dim=-1).detach()


def _batched(x: Any, bd: int, num: int) -> bool:
    return isinstance(x, Tensor) and x.ndim > bd and x.shape[bd] == num


def point_loop_grads(
    module: nn.Module,
    names: list[str],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    cotangents: Tensor,
    module_name: str,
    bd: int = 0,
    keys: list[str] | None = None,
    model_output: bool = False,
) -> Tensor:
    """:func:`per_sample_param_grads` by one ordinary forward and backward per point (every
    tensor argument and keyword of size ``N`` in dimension ``bd`` cut to that point): no
    ``torch.func`` transform, so any Python control flow is fine. Exact when the module treats
    points independently (eval mode); ``N`` times the work of one pass."""
    v, num = cotangents.shape[0], cotangents.shape[1 + bd]
    params = [module.get_parameter(k) for k in names]
    own = not module_name or module_name in names  # parameters the model itself owns
    what = f"the model's own parameters {names}" if own else f"module {module_name!r}"

    def cut(x: Any, i: int) -> Any:
        return x.narrow(bd, i, 1) if _batched(x, bd, num) else x

    rows = []
    for i in range(num):
        xs = tuple(cut(a, i) for a in args)
        kw = {k: cut(a, i) for k, a in kwargs.items()}
        try:
            with torch.enable_grad(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", "There is a performance drop")
                out = (
                    module(**dict(zip(keys, xs, strict=True)), **kw) if keys else module(*xs, **kw)
                )
                if model_output:
                    out = logits_of(module, out, "fit_curvature")
                if not isinstance(out, Tensor):
                    raise TypeError(f"the module returns {type(out).__name__}, not a tensor")
                raw = _batched_grads(out, params, cotangents.narrow(1 + bd, i, 1))
        except (RuntimeError, TypeError) as err:
            raise RuntimeError(
                f"fit_curvature: per-point gradients of {what} ({type(module).__name__}) failed, "
                f"under torch.func.vmap and point by point ({err}). Fixes: exclude it "
                "with exclude=[...]; keep the model in eval mode so points are independent; give "
                "every input the batch first (e.g. position_ids [N, T] in the input mapping)."
            ) from err
        grads = [p.new_zeros((v, p.numel())) if g is None else g for p, g in zip(params, raw)]
        rows.append(torch.cat([g.reshape(v, -1) for g in grads], dim=-1))
    return torch.stack(rows, dim=1).detach()


def _batched_grads(out: Tensor, params: Sequence[Tensor], cot: Tensor) -> list[Tensor | None]:
    """``[V, *p.shape]`` gradients of ``⟨cot_v, out⟩`` (``None`` for an unused parameter)."""
    per_v = [torch.autograd.grad(out, params, c, retain_graph=True, allow_unused=True) for c in cot]
    return [
        None if per_v[0][j] is None else torch.stack([g[j] for g in per_v])
        for j in range(len(params))
    ]


def shared_output_grads(
    module: nn.Module,
    names: list[str],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    cotangents: Tensor,
    shape: torch.Size,
    module_name: str,
) -> Tensor:
    """``[V, N, P]`` per-point gradients of a module whose output (of ``shape``) has no batch
    dimension and was handed on expanded along the batch: ``cotangents`` ``[V, N, *out]`` are
    each point's own gradients at its copy, so one ``vjp`` of the module's single call, mapped
    over the ``V·N`` cotangents, gives them (exact; the model itself is never re-run)."""
    v, n = cotangents.shape[0], cotangents.shape[1]
    params = {k: module.get_parameter(k).detach() for k in names}

    def forward(p: dict[str, Tensor]) -> Tensor:
        out = functional_call(module, p, args, kwargs)
        if not isinstance(out, Tensor):
            raise TypeError(f"module {module_name!r} returns {type(out).__name__}, not a tensor")
        return out

    with torch.enable_grad():
        pullback = vjp(forward, params)[1]
    cot = cotangents.reshape(v * n, *shape)
    try:
        with torch.no_grad():
            grads = vmap(pullback)(cot)[0]
    except RuntimeError:  # an op without a vmap rule: one pullback per cotangent, the same
        parts = [pullback(c)[0] for c in cot]
        grads = {k: torch.stack([p[k] for p in parts]) for k in names}
    return torch.cat([grads[k].reshape(v, n, -1) for k in names], dim=-1).detach()


def attention_grads(t: Any, calls: list[tuple[Capture, Tensor]]) -> Tensor:
    """``[V, N, P]`` per-point gradients of an attention module's own parameters (``t``'s
    ``local_names`` order) from its recorded projections (``attention.Record``): a projection
    weight's gradient is ``Σ_t δ_t a_tᵀ`` (its rows ``cols`` of a packed weight), a bias's
    ``Σ_t δ_t``, and ``bias_k``/``bias_v``'s the direction at the key they add."""
    v, n = calls[0][1].shape[0], calls[0][1].shape[1]
    parts: dict[str, Tensor] = {
        k: calls[0][1].new_zeros((v, n, *shape)) for k, shape in t.param_shapes.items()
    }
    for cap, g in calls:
        what, cols = cap.what, cap.cols
        if what in ("bias_k", "bias_v"):
            if what in parts:
                parts[what] += g.sum(dim=2).reshape(parts[what].shape)
            continue
        weight = "in_proj_weight" if what == "in" else what
        if weight in parts:
            assert cap.a is not None
            m = torch.einsum("vnto,nti->vnoi", g, cap.a.to(g.dtype))
            if weight == "in_proj_weight":
                parts[weight][:, :, cols] += m
            else:
                parts[weight] += m
        if "in_proj_bias" in parts:
            parts["in_proj_bias"][:, :, cols] += g.sum(dim=2)
    return torch.cat([parts[k].reshape(v, n, -1) for k in t.local_names], dim=-1)


class GradStats:
    """Per-direction parameter gradients ``[V, N, P]`` of a generic module (diag/dense blocks),
    with the same consumer interface as :class:`~bayes_kfoc.stats.KronStats`."""

    def __init__(self, g: Tensor):
        self.g = g
        self.V, self.num_points = g.shape[0], g.shape[1]

    @property
    def nbytes(self) -> int:
        return self.g.numel() * self.g.element_size()

    def diag(self) -> Tensor:
        return self.g.square().sum(dim=(0, 1))

    def grads(self) -> Tensor:
        """``[V·N, P]`` in ``parameters_to_vector`` order of the module's own parameters."""
        return self.g.reshape(-1, self.g.shape[-1])

    def quad(
        self,
        block: CurvatureBlock,
        power: float = 1.0,
        damping: float | Tensor = 0.0,
        diagonal: bool = False,
    ) -> Tensor:
        """``g_{n,v}^T (K + δI)^p g_{n,w}`` per point (see ``KronStats.quad``)."""
        return grads_quad(self.grads(), self.num_points, block, power, damping, diagonal)

    def inner(self, block: CurvatureBlock) -> Tensor:
        return self.quad(block, diagonal=True).sum()

    def gram_cross(self, other: GradStats) -> Tensor:
        return (self.grads() @ other.grads().T).square().sum()
