"""The one place that takes the logits out of whatever a model's forward returns.

Models return a tensor ``[N, C]``, or, as Hugging Face models do, an output object: a
``ModelOutput`` (an ordered mapping whose fields are also attributes), a plain mapping, or a
tuple (``return_dict=False``) whose first item is the logits. Every call of a user's model in the
library (fit, tuning, predict, the Pyro model and guide, the whole-model per-point gradients)
goes through :func:`logits_of`, so they all read the same tensor:

- a tensor is the logits;
- otherwise the field :attr:`LogitsField.key` (default ``"logits"``), looked up as a mapping key
  and then as an attribute;
- otherwise the first item of a tuple or list, when it is a tensor.

A model whose logits sit elsewhere (``start_logits``, a nested output) names them once with
:func:`set_logits`, which records a :class:`LogitsField` on the model object itself: the module
names stay the model's own (no wrapper), and every copy of the model (``copy.deepcopy``) keeps it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

ATTR = "_bayes_kfoc_logits"
"""The model attribute that holds its :class:`LogitsField` (set by :func:`set_logits`)."""


@dataclass(frozen=True)
class LogitsField:
    """Where a model's output keeps its logits: a field ``key`` (mapping key or attribute), or
    ``select(output) -> Tensor`` when given (it takes precedence)."""

    key: str = "logits"
    select: Callable[[Any], Tensor] | None = None

    def describe(self) -> str:
        return "a selector function" if self.select is not None else f"the field {self.key!r}"


DEFAULT = LogitsField()


def set_logits(model: nn.Module, field: str | Callable[[Any], Tensor]) -> nn.Module:
    """Name where ``model``'s output keeps the logits, for every call the library makes.

    ``field`` is a key/attribute name (``"start_logits"``), or a function of the output that
    returns the logits tensor ``[N, C]``. Returns ``model`` itself (unchanged otherwise).
    """
    spec = LogitsField(select=field) if callable(field) else LogitsField(key=field)
    object.__setattr__(model, ATTR, spec)
    return model


def field_of(model: nn.Module) -> LogitsField:
    spec = model.__dict__.get(ATTR)
    return spec if isinstance(spec, LogitsField) else DEFAULT


def logits_of(model: nn.Module, out: Any, what: str = "bayes_kfoc") -> Tensor:
    """The logits in ``out``, the value ``model``'s forward returned (see the module docstring);
    a ``TypeError`` naming the output's type, its fields and the fix otherwise."""
    if isinstance(out, Tensor):
        return out
    spec = field_of(model)
    if spec.select is not None:
        picked = spec.select(out)
        if isinstance(picked, Tensor):
            return picked
        raise TypeError(
            f"{what}: the logits selector set with set_logits returned {type(picked).__name__} "
            f"for an output of type {type(out).__name__}; it must return the logits tensor [N, C]."
        )
    if isinstance(out, Mapping) and isinstance(out.get(spec.key), Tensor):
        return out[spec.key]
    if isinstance(getattr(out, spec.key, None), Tensor):
        return getattr(out, spec.key)
    if isinstance(out, tuple | list) and out and isinstance(out[0], Tensor):
        return out[0]
    fields = list(out.keys()) if isinstance(out, Mapping) else None
    raise TypeError(
        f"{what}: the model ({type(model).__name__}) returns {type(out).__name__}"
        + (f" with fields {fields}" if fields is not None else "")
        + f", and {spec.describe()} holds no tensor. Return the logits tensor [N, C], an output "
        "with a 'logits' field, or a tuple whose first item is the logits; or name the field "
        "once with bayes_kfoc.set_logits(model, 'field') or set_logits(model, lambda out: ...)."
    )
