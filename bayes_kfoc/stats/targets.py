"""Which modules carry curvature, and with which kind of statistics."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import nn

from ..options import StrEnum


class StatsKind(StrEnum):
    """Which per-point statistics a module's block is computed from (:attr:`Target.kind`).

    - ``linear``: ``nn.Linear`` (and registered transposed linears): Kronecker-capable, rank one
      per point or shared over positions;
    - ``conv2d``: ``nn.Conv2d`` with ``groups=1``: Kronecker-capable through the unfold;
    - ``attention``: ``nn.MultiheadAttention``'s packed in-projection: Kronecker over positions;
    - ``attention_grads``: its other parameters: explicit per-point gradients;
    - ``tied``: owns a tensor other modules share: whole-model per-point gradients;
    - ``generic``: anything else with trainable parameters: diagonal or dense only.
    """

    LINEAR = "linear"
    CONV2D = "conv2d"
    GENERIC = "generic"
    TIED = "tied"
    ATTENTION = "attention"
    ATTENTION_GRADS = "attention_grads"


LINEAR = StatsKind.LINEAR
CONV2D = StatsKind.CONV2D
GENERIC = StatsKind.GENERIC
TIED = StatsKind.TIED
ATTENTION = StatsKind.ATTENTION
ATTENTION_GRADS = StatsKind.ATTENTION_GRADS
KRONECKER = (LINEAR, CONV2D, ATTENTION)


class NotKronecker(Enum):
    """Why a module's block is not Kronecker-factored (stated in ``Curvature.coverage``)."""

    STRUCTURE = "the structure asks for the exact diagonal / dense block"
    NOT_A_MATRIX_LAYER = (
        "not a Linear/Conv2d-like layer (an embedding, a norm, or parameters used directly in "
        "a forward)"
    )
    FROZEN_PART = "part of its parameters are frozen"
    GROUPED_CONV = "a grouped (e.g. depthwise) convolution"
    OWN_FORWARD = "a Linear/Conv2d subclass with its own forward"
    TIED = "a tied weight: K-FAC has no form for it (K-FOC factors it when it is one matrix)"
    ATTENTION_PARTS = "attention parameters other than the packed in-projection"


@dataclass
class Target:
    """A module with trainable parameters of its own, and how its curvature is computed."""

    name: str
    module: nn.Module
    kind: StatsKind
    param_shapes: dict[str, torch.Size]
    note: str = ""
    local_names: list[str] = field(default_factory=list)
    transposed: bool = False  # a Linear whose weight is stored [d_in, d_out] (Conv1D)
    module_name: str | None = None  # the owning module's name, when not ``name`` (see below)

    @property
    def full_names(self) -> list[str]:
        """The model's names of the target's parameters. A parameter the model itself owns
        (a root-owned ``pos_embed``) is a target of its own, named by the parameter, with
        ``module_name`` ``""``."""
        owner = self.name if self.module_name is None else self.module_name
        return [f"{owner}.{k}" if owner else k for k in self.local_names]

    @property
    def kron_capable(self) -> bool:
        return self.kind in KRONECKER

    @property
    def tied_matrix(self) -> bool:
        """A tied tensor that is one weight matrix (``[d_out, d_in, ...]``): K-FOC gives it a
        Kronecker block from its exact per-direction gradients (``docs/math.md``, "Weight
        sharing"); K-FAC has no form for it (diagonal)."""
        shapes = list(self.param_shapes.values())
        return self.kind == TIED and len(shapes) == 1 and len(shapes[0]) >= 2

    @property
    def has_bias(self) -> bool:
        """A Kronecker target's second parameter is its bias (``bias``, ``in_proj_bias``)."""
        return len(self.param_shapes) == 2


TRANSPOSED_LINEAR: set[str] = {"Conv1D"}
"""Class names of layers computing ``y = x @ weight + bias`` with ``weight`` ``[d_in, d_out]``
(transformers' ``pytorch_utils.Conv1D``, GPT-2's projections), recognised without importing
their library; extend it with :func:`register_transposed_linear`. A class is taken for one only
when its weight is 2-D and its bias (if any) is ``[d_out]``, and the collector checks its output
against ``x @ weight + bias`` on the first batch."""


def register_transposed_linear(cls: type[nn.Module] | str) -> None:
    """Declare a layer class (or class name) that computes ``y = x @ weight + bias`` with
    ``weight`` ``[d_in, d_out]``: it then gets Kronecker blocks like ``nn.Linear``."""
    TRANSPOSED_LINEAR.add(cls if isinstance(cls, str) else cls.__name__)


def is_transposed_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a registered ``y = x @ W + b`` layer with fitting shapes."""
    if type(module).__name__ not in TRANSPOSED_LINEAR:
        return False
    w, b = getattr(module, "weight", None), getattr(module, "bias", None)
    if not isinstance(w, nn.Parameter) or w.ndim != 2:
        return False
    return b is None or (isinstance(b, torch.Tensor) and b.shape == w.shape[1:])


def why_not_kronecker(t: Target) -> NotKronecker:
    """The reason ``t``'s block is not Kronecker: its kind, its class, or the structure."""
    m = t.module
    if t.kind == TIED:
        return NotKronecker.TIED
    if t.kind == ATTENTION_GRADS:
        return NotKronecker.ATTENTION_PARTS
    if t.kron_capable:
        return NotKronecker.STRUCTURE
    if isinstance(m, nn.Linear | nn.Conv2d) or is_transposed_linear(m):
        if any(not p.requires_grad for p in m.parameters(recurse=False)):
            return NotKronecker.FROZEN_PART
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            return NotKronecker.GROUPED_CONV
        return NotKronecker.OWN_FORWARD
    return NotKronecker.NOT_A_MATRIX_LAYER


def own_trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    return {k: p for k, p in module.named_parameters(recurse=False) if p.requires_grad}


def classify(module: nn.Module) -> tuple[StatsKind, str]:
    """The statistics kind of a module, and a note when a Kronecker-like layer falls back."""
    params = own_trainable(module)
    frozen_any = any(not p.requires_grad for p in module.parameters(recurse=False))
    if isinstance(module, nn.MultiheadAttention):
        packed = module._qkv_same_embed_dim and module.bias_k is None and not frozen_any
        if packed and "in_proj_weight" in params:
            return ATTENTION, ""
        why = (
            "separate q/k/v projection weights (kdim/vdim != embed_dim)"
            if not module._qkv_same_embed_dim
            else "bias_k/bias_v"
            if module.bias_k is not None
            else "part of its parameters are frozen"
        )
        return ATTENTION_GRADS, f"{why}: exact per-parameter (diagonal/dense) block"
    linear_like = isinstance(module, nn.Linear) or is_transposed_linear(module)
    if (linear_like or isinstance(module, nn.Conv2d)) and frozen_any:
        return GENERIC, "part of its parameters are frozen: per-parameter (diagonal/dense) block"
    for base in (nn.Linear, nn.Conv2d):
        if isinstance(module, base) and not keeps_forward(module, base):
            return GENERIC, (
                f"{type(module).__name__} overrides {base.__name__}.forward: exact per-parameter "
                "(diagonal/dense) block, not Kronecker"
            )
    if linear_like and set(params) <= {"weight", "bias"} and "weight" in params:
        return LINEAR, ""
    if isinstance(module, nn.Conv2d) and set(params) <= {"weight", "bias"}:
        if module.groups != 1:
            return GENERIC, f"Conv2d with groups={module.groups}: diagonal block, not Kronecker"
        return CONV2D, ""
    return GENERIC, ""


def keeps_forward(module: nn.Module, base: type[nn.Module]) -> bool:
    """Whether ``module`` computes what ``base`` computes: the class keeps ``base.forward``
    (and, for a convolution, ``_conv_forward``) and the instance does not replace it."""
    cls = type(module)
    same = cls.forward is base.forward and "forward" not in vars(module)
    if base is nn.Conv2d:
        same = same and cls._conv_forward is nn.Conv2d._conv_forward  # type: ignore[attr-defined]
    return same


def tied(model: nn.Module) -> dict[int, list[str]]:
    """``{id(p): [full names]}`` of the trainable tensors owned by more than one module object
    (tied weights); the first name is the one ``named_parameters`` lists (the tensor's *home*)."""
    names: dict[int, list[str]] = {}
    holders: dict[int, set[int]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in own_trainable(module).items():
            full = f"{mname}.{pname}" if mname else pname
            if full not in names.setdefault(id(p), []):
                names[id(p)].append(full)
            holders.setdefault(id(p), set()).add(id(module))
    home = {id(p): k for k, p in model.named_parameters()}
    out: dict[int, list[str]] = {}
    for key, every in names.items():
        if len(holders[key]) > 1:
            out[key] = [home[key]] + [f for f in every if f != home[key]]
    return out


def _kind(
    name: str, module: nn.Module, ties: dict[int, list[str]], only: str | None = None
) -> tuple[StatsKind, str, dict[str, nn.Parameter]]:
    """The statistics kind, note and own parameters of one module (of its parameter ``only``),
    tied weights resolved: a shared tensor belongs to its home module only (a whole-model
    ``TIED`` block there)."""
    prefix = f"{name}." if name else ""
    params: dict[str, nn.Parameter] = {}
    kind: StatsKind | None = None
    notes: list[str] = []
    for k, p in own_trainable(module).items():
        if only is not None and k != only:
            continue
        if id(p) not in ties:
            params[k] = p
        elif ties[id(p)][0] == prefix + k:
            params[k], kind = p, TIED
            others = ", ".join(repr(o) for o in ties[id(p)][1:])
            notes.append(
                f"{k!r} is tied to {others}: exact per-point gradients over every use "
                "(torch.func over the whole model); a Kronecker block under K-FOC when it is "
                "the module's one weight matrix, else diagonal or dense"
            )
        else:
            kind = kind or GENERIC
            notes.append(f"{k!r} is tied to {ties[id(p)][0]!r} and covered by that block")
    if kind is None:
        kind, note = classify(module)
        notes = [note] if note else []
    return kind, "; ".join(notes), params


def owners(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that own trainable parameters directly, by name (a tied tensor counts for its
    home module only, see :func:`tied`)."""
    ties = tied(model)
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        own = _kind(name, module, ties)
        if name == "" and own[0] == GENERIC and own[2]:
            for k in own[2]:  # the model's own parameters: a target each, named by it
                out[k] = module
        elif own[2]:
            out[name] = module
    return out


def _kind_of(model: nn.Module, name: str, ties: dict[int, list[str]]) -> StatsKind:
    mname, module, only = _resolve(model, name)
    return _kind(mname, module, ties, only)[0]


def _resolve(model: nn.Module, name: str) -> tuple[str, nn.Module, str | None]:
    """``(module name, module, parameter)`` of a target name: a module's, or a parameter the
    model itself owns (then the module is the model and the parameter is that one)."""
    modules = dict(model.named_modules())
    if name in modules:
        return name, modules[name], None
    if name in own_trainable(model):
        return "", model, name
    raise ValueError(f"module {name!r} does not exist in {type(model).__name__}.")


def _expand(
    names: Iterable[str], model: nn.Module, owned: dict[str, nn.Module], what: str
) -> list[str]:
    all_modules = dict(model.named_modules())
    result: list[str] = []
    for n in names:
        if n in owned and n not in all_modules:  # a parameter the model itself owns
            result.extend([n] if n not in result else [])
            continue
        if n not in all_modules:
            close = ", ".join(sorted(owned)[:20])
            raise ValueError(
                f"fit_curvature: {what} names module {n!r}, which does not exist in "
                f"{type(model).__name__}. Modules with trainable parameters: {close}."
            )
        prefix = f"{n}." if n else ""
        hits = [o for o in owned if o == n or o.startswith(prefix)]
        if not hits:
            raise ValueError(
                f"fit_curvature: {what} names module {n!r}, which has no trainable parameters."
            )
        result.extend(h for h in hits if h not in result)
    return result


def select(
    model: nn.Module,
    modules: str | Sequence[str],
    exclude: Sequence[str],
    call_order: Sequence[str],
) -> tuple[list[Target], dict[str, str]]:
    """Resolve ``modules`` / ``exclude`` into targets (in call order) and a reason per skip.

    ``call_order`` lists the parameter-owning modules in the order of the first forward pass.
    """
    owned = owners(model)
    ties = tied(model)
    if not owned:
        raise ValueError(
            f"fit_curvature: {type(model).__name__} has no trainable parameters; nothing to fit."
        )
    called = set(call_order)
    skipped: dict[str, str] = {}
    if isinstance(modules, str):
        if modules == "all":
            chosen = list(owned)
        elif modules == "last_layer":
            if not call_order:
                raise ValueError("fit_curvature: no module with trainable parameters was called.")
            kron = [c for c in call_order if _kind_of(model, c, ties) in KRONECKER]
            chosen = [(kron or list(call_order))[-1]]
        else:
            raise ValueError(
                f"fit_curvature: unknown modules={modules!r}; valid values are 'all', "
                "'last_layer', or a list of module names."
            )
        for o in owned:
            if o not in chosen:
                skipped[o] = f"not selected (modules={modules!r})"
    else:
        chosen = _expand(list(modules), model, owned, "modules")
        for o in owned:
            if o not in chosen:
                skipped[o] = "not selected (modules list)"
    for o in _expand(list(exclude), model, owned, "exclude") if exclude else []:
        if o in chosen:
            chosen.remove(o)
        skipped[o] = "excluded by the user"
    if not chosen:
        raise ValueError("fit_curvature: every module was excluded; nothing to fit.")
    # a tied home module may itself be unused: its tensor's other owners were called
    missing = [c for c in chosen if c not in called and _kind_of(model, c, ties) != TIED]
    if missing:
        raise ValueError(
            f"fit_curvature: module(s) {missing} own trainable parameters but were not called in "
            "the forward pass, so their Fisher is zero. Exclude them with exclude=[...]."
        )
    order = [c for c in call_order if c in chosen] + [c for c in chosen if c not in called]
    return targets_for(model, order), skipped


def targets_for(model: nn.Module, names: Sequence[str]) -> list[Target]:
    """Targets for already-resolved module names (e.g. the blocks of a fitted curvature)."""
    ties = tied(model)
    out = []
    for name in names:
        mname, module, only = _resolve(model, name)
        kind, note, params = _kind(mname, module, ties, only)
        out.append(
            Target(
                name,
                module,
                kind,
                {k: p.shape for k, p in params.items()},
                note,
                list(params),
                kind == LINEAR and is_transposed_linear(module),
                mname if only is not None else None,
            )
        )
    return out
