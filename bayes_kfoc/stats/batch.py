"""Loader batches and inputs, validated: shapes, dtypes, labels and inference tensors.

Every check names the caller, the shape or dtype it saw, and the fix (``docs/bad_inputs.md``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .inputs import Inputs, batch_size, check_mapping, inputs_to
from .output import logits_of

_DTYPE_ERROR = re.compile(r"dtype|scalar type|not implemented for|Byte|Long|Int|Bool|Char|Short")


def normal_tensor(t: Tensor) -> Tensor:
    """``t``, cloned when it is an inference tensor (made under ``torch.inference_mode()``), so
    that autograd can record it; call inside ``torch.inference_mode(False)``."""
    return t.clone() if t.is_inference() else t


def as_labels(y: Tensor, what: str) -> Tensor:
    """Integer class labels of any width (``bool``, ``uint8``, ``int32``, ...) as ``torch.long``.

    Raises ``TypeError`` for floating or complex targets (regression, or one-hot / soft labels).
    The range against the number of classes is checked by :func:`check_label_range`: a cast of a
    ``uint64`` label beyond ``2**63`` wraps to a negative value, which that check reports.
    """
    if y.is_floating_point() or y.is_complex():
        raise TypeError(
            f"{what}: targets are {y.dtype}, which looks like regression or soft / one-hot "
            "labels; a classification likelihood needs integer class labels [N] (e.g. "
            "y.argmax(-1) for one-hot rows, or y.long() for whole-number floats)."
        )
    return y if y.dtype == torch.long else y.to(torch.long)


def check_label_range(y: Tensor, num_classes: int, what: str) -> None:
    """Raise ``ValueError`` unless every label lies in ``[0, num_classes)``."""
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"{what}: targets must lie in [0, {num_classes}) for a model with {num_classes} "
            f"logits; got values in [{int(y.min())}, {int(y.max())}]. Map the labels to "
            "0..C-1, or give the model one logit per class."
        )


def unpack_batch(batch: Any, device: torch.device, dtype: torch.dtype) -> tuple[Inputs, Tensor]:
    """Validate a loader batch ``(x, y)`` and move it to the model's device.

    Labels of any integer width become ``torch.long``; inference tensors are cloned (see
    :func:`normal_tensor`).
    """
    if not isinstance(batch, list | tuple) or len(batch) != 2:
        raise TypeError(
            "fit_curvature: the loader must yield (inputs, targets) pairs; got "
            f"{type(batch).__name__}"
            + (f" of length {len(batch)}" if hasattr(batch, "__len__") else "")
            + ". Wrap the dataset so it returns (x, y)."
        )
    x, y = batch
    if isinstance(x, Mapping) and isinstance(y, Tensor):  # model(**x): dict inputs
        check_mapping(x, "fit_curvature")
        y = as_labels(y, "fit_curvature")
        if y.ndim != 1 or y.shape[0] != batch_size(x):
            raise ValueError(
                f"fit_curvature: targets must have shape [N] matching the inputs' batch size "
                f"{batch_size(x)}; got targets {tuple(y.shape)}."
            )
        return inputs_to(x, device), normal_tensor(y.to(device, non_blocking=True))
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError("fit_curvature: inputs and targets must be tensors (or a mapping of them).")
    if x.is_floating_point() and x.dtype != dtype:
        raise TypeError(
            f"fit_curvature: inputs are {x.dtype} but the model's parameters are {dtype}; cast "
            f"the data (x.to({dtype})) or the model (model.to({x.dtype}))."
        )
    y = as_labels(y, "fit_curvature")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"fit_curvature: targets must have shape [N] matching inputs [N, ...]; got targets "
            f"{tuple(y.shape)} and inputs {tuple(x.shape)}."
        )
    x = normal_tensor(x.to(device, non_blocking=True))
    y = normal_tensor(y.to(device, non_blocking=True))
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise FloatingPointError("fit_curvature: the inputs contain NaN or Inf.")
    return x, y


def call_model(model: nn.Module, x: Inputs, what: str = "bayes_kfoc") -> Tensor:
    """The logits of ``model(**x)`` for a mapping, else of ``model(x)`` (taken from an output
    object by :func:`~bayes_kfoc.stats.output.logits_of`); a dtype error on non-floating inputs
    to a floating model (e.g. ``uint8`` images) becomes a ``TypeError`` that names the cast."""
    if isinstance(x, Mapping):
        return logits_of(model, model(**x), what)
    try:
        return logits_of(model, model(x), what)
    except (RuntimeError, NotImplementedError) as err:
        p = next(model.parameters(), None)
        if x.is_floating_point() or p is None or not p.is_floating_point():
            raise
        if not _DTYPE_ERROR.search(str(err)):
            raise
        raise TypeError(
            f"{what}: the model failed on inputs of dtype {x.dtype} (shape {tuple(x.shape)}) "
            f"with a dtype error ({str(err).splitlines()[0]}); its parameters are {p.dtype}. "
            f"Cast the inputs, e.g. x.to({p.dtype}) (and divide uint8 images by 255)."
        ) from err
