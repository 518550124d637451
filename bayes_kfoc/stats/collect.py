"""Forward/backward over one batch with module hooks: inputs and output directions per module.

One :class:`Collector` feeds every consumer: the curvature fit (Fisher directions), the GLM
predictive (Jacobian directions ``e_c``) and the diagnostics, each through :data:`Stats`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..options import FisherType
from .attention import attention_modules, exposed_attention
from .batch import call_model, check_label_range
from .batch_dim import FOLDED, SHARED, BatchDims, expand_batch
from .capture import (
    Capture,
    batch_major,
    check_transposed_linear,
    conv_unfold,
    expansion_changes_logits,
    fold_error,
    live_positions,
    output_grads,
    padding_mask,
    with_live,
)
from .directions import logit_directions
from .generic import GradStats, attention_grads, per_sample_param_grads, shared_output_grads
from .inputs import Inputs, batch_size
from .kron import KronStats, kron_stats
from .output import logits_of
from .targets import ATTENTION, ATTENTION_GRADS, CONV2D, GENERIC, LINEAR, TIED, Target
from .whole import whole_model_stats

ONE_LOGIT = (
    "bayes_kfoc: the model returns logits [N, 1]: a softmax over one logit is constant, so its "
    "Fisher is zero. For a binary classifier with one logit f, return two logits, "
    "torch.cat([torch.zeros_like(f), f], dim=1) or torch.cat([-f, f], dim=1) / 2 (the softmax of "
    "either is [1 - sigmoid(f), sigmoid(f)]), with labels 0/1."
)

Stats = KronStats | GradStats
"""The statistics of one module for one batch: Kronecker-capable, or explicit gradients."""

_RECORDED = (ATTENTION, ATTENTION_GRADS)  # reported by the exposed attention, not by a hook


class Collector:
    """Registers forward hooks on the target modules and turns one batch into statistics.

    The output of each target is captured for ``torch.autograd.grad``; if a later in-place
    operation (e.g. ``ReLU(inplace=True)``) modifies it, the batch is re-run with the outputs
    cloned, so the directions are always taken at the module's true output.

    Args:
        model, targets: the model and the modules whose statistics are collected.
        fisher: the Fisher type :meth:`batch` uses (``None``: a collector for
            :meth:`jacobians` only, e.g. the GLM predictive).
        mc_samples: labels sampled per point for ``fisher="mc"``.
        stats_dtype: accumulate the statistics in this dtype (default: the model's).
    """

    def __init__(
        self,
        model: nn.Module,
        targets: Sequence[Target],
        fisher: FisherType | None = None,
        mc_samples: int = 1,
        stats_dtype: torch.dtype | None = None,
    ):
        self.model = model
        self.targets = list(targets)
        self.fisher = fisher
        self.mc_samples = mc_samples
        self.stats_dtype = stats_dtype
        self.clone_outputs = False
        self.batched_grads = True
        self._dims = BatchDims()
        self._expanded: set[str] = set()
        self._whole: set[str] = set()  # targets on whole-model per-point gradients
        self._folds_checked: set[str] = set()
        self._checked = False
        self._verified: set[str] = set()
        self._n = 0
        self._mask: Tensor | None = None
        self._active: set[str] = set()
        self._cap: dict[str, list[Capture]] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> Collector:
        self._attention = {id(t.module): t for t in self.targets if t.kind in _RECORDED}
        # expose the attention modules whose projections are targets (out_proj is a Linear);
        # all of them when a block may need whole-model gradients (tied, or a shared output)
        outs = {id(t.module) for t in self.targets}
        whole = any(t.kind in (TIED, GENERIC) for t in self.targets)
        exposed = set(self._attention) | {
            id(m) for m in attention_modules(self.model) if whole or id(m.out_proj) in outs
        }
        self._exposed = exposed_attention(self.model, self._record, exposed)
        self._exposed.__enter__()
        for t in self.targets:
            if t.kind in (TIED, *_RECORDED):  # whole-model gradients / recorded, no hook
                continue
            self._handles.append(
                t.module.register_forward_hook(self._make_hook(t), with_kwargs=True)
            )
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._exposed.__exit__(*exc)

    def _record(
        self, module: nn.Module, what: str, a: Tensor | None, z: Tensor, cols: slice | None
    ) -> None:
        """An attention projection's input and output (``attention.Record``), batch first."""
        t = self._attention.get(id(module))
        if t is None or t.name not in self._active:
            return
        cap = Capture(z, z._version, what=what, cols=cols, a=None if a is None else a.detach())
        self._cap.setdefault(t.name, []).append(cap)

    def _make_hook(self, t: Target) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
            if t.name not in self._active or t.name in self._whole:
                return None
            root = module is self.model
            if root:  # the model's own parameters: its output is the model output
                out = logits_of(self.model, out, "fit_curvature")
            if not isinstance(out, Tensor):
                raise TypeError(
                    f"fit_curvature: module {t.name!r} returns {type(out).__name__}; a module with "
                    "a curvature block must return one tensor. Exclude it with exclude=[...]."
                )
            cap = Capture(out, out._version)
            x = args[0] if args else kwargs.get("input")
            if t.kind == LINEAR:
                if not isinstance(x, Tensor) or x.ndim < 1:
                    shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                    raise ValueError(
                        f"fit_curvature: Linear module {t.name!r} got an input of shape {shape}; "
                        "it needs batched inputs [N, ..., d_in]. Exclude it with exclude=[...]."
                    )
                cap.x = x.detach()
                cap.bd = self._dims.decide(t.name, x.shape, self._n, "input", True, True)
                if t.transposed and t.name not in self._verified:
                    check_transposed_linear(t.name, module, cap.x, out)
                    self._verified.add(t.name)
            elif t.kind == CONV2D:
                assert isinstance(module, nn.Conv2d) and isinstance(x, Tensor)
                cap.a = conv_unfold(module, x.detach())
            else:
                cap.args = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
                cap.kwargs = kwargs
                cap.bd = self._dims.decide(t.name, out.shape, self._n, "output", True, True)
                if cap.bd == FOLDED:  # a folded output: whole-model per-point gradients
                    self._whole.add(t.name)
                    return None
            if cap.bd == FOLDED:  # [k·N, ..., d_in]: point n's rows as its positions
                cap.bd, cap.fold = 0, True
            if cap.bd == SHARED:
                # an output every point shares (a position embedding of arange(T), a Linear on a
                # parameter): handed on expanded along a new batch dimension, so the ordinary
                # backward gives each point its own output gradient (docs/math.md, "Outputs
                # without a batch dimension")
                cap.shape = out.shape
                out = expand_batch(out, self._n)
                cap.z, cap.version, cap.bd = out, out._version, 0
                if t.kind == LINEAR:
                    assert cap.x is not None
                    cap.x = expand_batch(cap.x, self._n)
                self._expanded.add(t.name)
            # a module called k times per forward (weight sharing): every call is kept, and its
            # statistics sum over the calls (docs/math.md, "Weight sharing")
            self._cap.setdefault(t.name, []).append(cap)
            if cap.shape is not None:
                return out
            return out.clone() if self.clone_outputs and not root else None

        return hook

    def _forward(self, x: Inputs, names: set[str]) -> Tensor:
        self._cap = {}
        self._active = names
        self._n = batch_size(x)
        self._mask = padding_mask(self.model, x)
        broken = False
        try:
            with torch.enable_grad():
                logits = call_model(self.model, x, "bayes_kfoc")
        except RuntimeError:
            if not self._expanded - self._whole:
                raise
            broken = True
        finally:
            self._active = set()
        if not broken and self._expanded and not self._checked:
            self._checked = True
            broken = expansion_changes_logits(self.model, x, logits)
        if broken:
            # an expanded output the model uses other than by broadcasting (e.g. added to a
            # folded batch): those modules take whole-model per-point gradients instead
            self._whole |= self._expanded
            self._expanded = set()
            self._checked = False
            return self._forward(x, names)
        unsure = {k for k, caps in self._cap.items() for c in caps if c.bd is None}
        if unsure:  # a module whose input is [N, N, ...]: one pass on N - 1 points decides
            by_name = {t.name: t for t in self.targets}
            self._dims.resolve(
                self.model,
                x,
                self._n,
                {k: by_name[k].module for k in unsure},
                {k for k in unsure if by_name[k].kind == GENERIC},
            )
            for k in unsure:
                for c in self._cap[k]:
                    c.bd = self._dims.known[k]
        return logits

    def batch(
        self,
        x: Inputs,
        y: Tensor,
        generator: torch.Generator | None,
        names: set[str] | None = None,
    ) -> tuple[dict[str, Stats], Tensor]:
        """Fisher statistics of the targets in ``names`` (default: all), and the logits."""
        fisher = self.fisher
        if fisher is None:
            raise ValueError("Collector.batch: this collector has no Fisher type; pass fisher=.")

        def directions(logits: Tensor) -> Tensor:
            check_label_range(y, logits.shape[1], "fit_curvature")
            return logit_directions(logits, y, fisher, self.mc_samples, generator)

        return self._run(x, names, directions)

    def jacobians(
        self, x: Inputs, names: set[str] | None = None
    ) -> tuple[dict[str, Stats], Tensor]:
        """Per-point Jacobians of the logits (directions ``e_c``, ``V = C``) and the logits."""

        def directions(logits: Tensor) -> Tensor:
            c = logits.shape[1]
            eye = torch.eye(c, dtype=logits.dtype, device=logits.device)
            return eye.unsqueeze(1).expand(c, logits.shape[0], c)

        return self._run(x, names, directions)

    def _run(
        self, x: Inputs, names: set[str] | None, directions: Callable[[Tensor], Tensor]
    ) -> tuple[dict[str, Stats], Tensor]:
        names = {t.name for t in self.targets} if names is None else names
        logits = self._forward(x, names)
        if not self.clone_outputs and any(
            c.z._version != c.version for caps in self._cap.values() for c in caps
        ):
            self.clone_outputs = True  # an in-place op modified a captured output: redo cloned
            logits = self._forward(x, names)
        if not isinstance(logits, Tensor) or logits.ndim != 2:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(
                f"fit_curvature: the model must return logits of shape [N, C]; got {shape}."
            )
        if logits.shape[1] < 2:
            raise ValueError(ONE_LOGIT)
        if not bool(torch.isfinite(logits).all()):
            raise FloatingPointError("fit_curvature: the model's outputs (logits) contain NaN/Inf.")
        cot = directions(logits.detach())
        whole = {t.name for t in self.targets if t.kind == TIED} | self._whole
        active = [t for t in self.targets if t.name in names and t.name not in whole]
        missing = [t.name for t in active if t.name not in self._cap]
        if missing:
            raise RuntimeError(
                f"fit_curvature: module(s) {missing} were not called in this batch's forward "
                "pass; every module with a block must be called for every batch."
            )
        calls = [(t, c) for t in active for c in self._cap[t.name]]
        grads, self.batched_grads = (
            output_grads(logits, [c.z for _, c in calls], cot, self.batched_grads)
            if calls
            else ([], self.batched_grads)
        )
        finite = [torch.isfinite(g).all() for g in grads if g is not None]
        if finite and not bool(torch.stack(finite).all()):  # one host sync per batch
            bad = next(
                t.name
                for (t, _), g in zip(calls, grads, strict=True)
                if g is not None and not bool(torch.isfinite(g).all())
            )
            raise FloatingPointError(
                f"fit_curvature: the backpropagated directions at module {bad!r} contain NaN/Inf."
            )
        folded = [
            (t, c, g)
            for (t, c), g in zip(calls, grads, strict=True)
            if c.fold and g is not None and t.name not in self._folds_checked
        ]
        misfolded = [  # once per module: point n owns rows n·k … n·k + k − 1
            tf.name
            for tf, cf, gf in folded
            if gf is not None and not batch_major(logits, cf.z, cot[0], gf[0], self._n)
        ]
        if misfolded:
            raise fold_error(misfolded, self._n)
        self._folds_checked.update(tf.name for tf, _, _ in folded)
        per_module: dict[str, list[tuple[Capture, Tensor]]] = {}
        for (t, cap), g in zip(calls, grads, strict=True):
            if g is None:
                g = torch.zeros((cot.shape[0], *cap.z.shape), dtype=cot.dtype, device=cot.device)
            per_module.setdefault(t.name, []).append((cap, g.detach()))
        out: dict[str, Stats] = {t.name: self._stats(t, per_module[t.name]) for t in active}
        for t in self.targets:  # a tied tensor, a folded or unexpandable output: whole model
            if t.name in whole and t.name in names:
                out[t.name] = self._tied_stats(t, x, cot)
        self._cap = {}
        return out, logits.detach()

    def _tied_stats(self, t: Target, x: Inputs, cot: Tensor) -> Stats:
        return whole_model_stats(self.model, t, x, cot, self.stats_dtype)

    def _stats(self, t: Target, calls: list[tuple[Capture, Tensor]]) -> Stats:
        """One module's statistics, summed over its calls in the forward pass: explicit gradients
        add up, and a Kronecker module's calls are stacked as extra positions ``T``, which makes
        ``M = Σ_calls Σ_t δ ā^T`` (``docs/math.md``, "Weight sharing")."""
        if t.kind == GENERIC:
            total: Tensor | None = None
            for cap, g in calls:
                if cap.shape is not None:  # an expanded shared output: one vjp for every point
                    grads = shared_output_grads(
                        t.module, t.local_names, cap.args, cap.kwargs, g, cap.shape, t.name
                    )
                else:
                    grads = per_sample_param_grads(
                        t.module,
                        t.local_names,
                        cap.args,
                        cap.kwargs,
                        g,
                        t.name,
                        cap.bd or 0,  # resolved by now (None only before the extra pass)
                        model_output=t.module is self.model,
                    )
                total = grads if total is None else total + grads
            assert total is not None
            return GradStats(total.to(self.stats_dtype or total.dtype))
        if t.kind == ATTENTION_GRADS:
            g = attention_grads(t, [(c, self._wide(g)) for c, g in calls])
            return GradStats(g)
        a_parts, d_parts, live = [], [], []
        for cap, g in calls:
            a, g = self._positions(t, cap, g)
            live.append(live_positions(self._mask, a, cap))
            if t.has_bias:
                a = torch.cat([a, a.new_ones((*a.shape[:-1], 1))], dim=-1)
            a_parts.append(a)
            d_parts.append(g)
        if len(calls) == 1:
            st = kron_stats(a_parts[0], d_parts[0], t.has_bias)
        else:
            st = kron_stats(torch.cat(a_parts, dim=1), torch.cat(d_parts, dim=2), t.has_bias)
        st.transposed = t.transposed
        with_live(st, live, a_parts)
        return st

    def _wide(self, x: Tensor) -> Tensor:
        """``x`` in the statistics' dtype (a wider one than the model's, when asked for)."""
        return x if self.stats_dtype is None else x.to(self.stats_dtype)

    def _positions(self, t: Target, cap: Capture, g: Tensor) -> tuple[Tensor, Tensor]:
        """A Kronecker call's inputs ``[N, T, d_in]`` and directions ``[V, N, T, d_out]``, batch
        first (a sequence-first Linear is transposed; an attention projection's rows ``cols``
        of the packed weight are padded with zeros to the whole weight)."""
        v = g.shape[0]
        if t.kind == CONV2D:
            n = g.shape[1]
            d = g.reshape(v, n, g.shape[2], -1).transpose(2, 3)  # [V, N, T, C_out]
            assert cap.a is not None
            return self._wide(cap.a), self._wide(d)
        x = cap.a if t.kind == ATTENTION else cap.x
        assert x is not None
        if cap.bd == 1:  # [L, N, ...] -> [N, L, ...]
            x, g = x.transpose(0, 1), g.transpose(1, 2)
        n = self._n if cap.fold else x.shape[0]  # a folded batch: k·N rows, N points
        a = x.reshape(n, -1, x.shape[-1])
        d = g.reshape(v, n, -1, g.shape[-1])
        cols = cap.cols
        rows = t.param_shapes[t.local_names[0]][0]
        if cols is not None and d.shape[-1] != rows:
            full = d.new_zeros((*d.shape[:-1], rows))
            full[..., cols] = d
            d = full
        return self._wide(a), self._wide(d)
