"""Saving and loading a fitted posterior: plain tensors and Python values only.

The state holds the module names, parameter shapes, block kinds and tensors, the prior, the MAP,
the fit's data size and log-likelihood, the structure, Fisher type and version. It is read with
``torch.load(weights_only=True)`` (nothing is unpickled), written atomically (a temporary file
in the same folder, flushed and ``fsync``-ed, then renamed over the target), and carries a
SHA-256 checksum of its tensors that :func:`read_state` verifies.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector

from .._version import __version__
from ..blocks import CurvatureBlock, DenseBlock, DiagBlock, KronBlock
from ..curvature import Curvature, FitInfo
from ..options import BlockKind, FisherType, Structure
from ._layout import architecture, check_architecture

FORMAT = "bayes_kfoc.Laplace"

_BLOCK_TYPES: dict[str, type[CurvatureBlock]] = {
    BlockKind.KRON.value: KronBlock,
    BlockKind.DIAG.value: DiagBlock,
    BlockKind.FULL.value: DenseBlock,
}


def blocks_state(blocks: dict[str, CurvatureBlock]) -> dict[str, Any]:
    """``{module: {kind, param_shapes, tensors}}`` for every block (tensors detached, as is)."""
    return {
        k: {
            "kind": b.kind.value,
            "param_shapes": {p: list(s) for p, s in b.param_shapes.items()},
            "tensors": {t: v.detach() for t, v in b.tensors().items()},
        }
        for k, b in blocks.items()
    }


def blocks_from_state(spec: dict[str, Any], device: torch.device) -> dict[str, CurvatureBlock]:
    """The blocks of a saved state, on ``device`` (in their saved dtype)."""
    blocks: dict[str, CurvatureBlock] = {}
    for name, b in spec.items():
        if b["kind"] not in _BLOCK_TYPES:
            raise ValueError(
                f"Laplace.load: block {name!r} has unknown kind {b['kind']!r}; valid kinds are "
                f"{sorted(_BLOCK_TYPES)}."
            )
        shapes = {k: torch.Size(v) for k, v in b["param_shapes"].items()}
        tensors = {k: v.to(device) for k, v in b["tensors"].items()}
        blocks[name] = _BLOCK_TYPES[b["kind"]](name, shapes, **tensors)
    return blocks


def _tensors(obj: Any, prefix: str = "") -> list[tuple[str, Tensor]]:
    """Every tensor in a nested state, with its path, in a deterministic order."""
    if isinstance(obj, Tensor):
        return [(prefix, obj)]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors(obj[k], f"{prefix}/{k}")]
    if isinstance(obj, list | tuple):
        return [t for i, v in enumerate(obj) for t in _tensors(v, f"{prefix}/{i}")]
    return []


def checksum(state: dict[str, Any]) -> str:
    """SHA-256 over every tensor's path, dtype, shape and bytes (the checksum entry excluded)."""
    h = hashlib.sha256()
    for path, t in _tensors({k: v for k, v in state.items() if k != "checksum"}):
        c = t.detach().cpu().contiguous()
        h.update(f"{path}|{c.dtype}|{tuple(c.shape)}|".encode())
        h.update(c.reshape(-1).view(torch.uint8).numpy().tobytes() if c.numel() else b"")
    return h.hexdigest()


def write_state(state: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` ``state`` (with its checksum) to ``path`` atomically."""
    target = Path(path)
    state = {**state, "checksum": checksum(state)}
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_state(path: str | Path) -> dict[str, Any]:
    """Read a saved posterior (``weights_only=True``) and verify its format and checksum."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError) as err:
        raise ValueError(
            f"Laplace.load: {str(path)!r} is not a readable bayes_kfoc posterior ({err})."
        ) from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"Laplace.load: {str(path)!r} is not a bayes_kfoc Laplace state.")
    saved = state.get("checksum")
    if saved is not None and saved != checksum(state):
        raise ValueError(
            f"Laplace.load: {str(path)!r} is corrupted (its checksum does not match its "
            "contents); re-save the posterior from the fitted model."
        )
    return state


def posterior_state(
    likelihood: str,
    structure: str,
    fisher: str,
    modules: str | list[str],
    model: nn.Module,
    curv: Curvature,
    tau: Tensor,
    map_vector: Tensor,
    temperature: float = 1.0,
) -> dict[str, Any]:
    """The state of a fitted posterior (``Laplace.state_dict``)."""
    return {
        "format": FORMAT,
        "version": __version__,
        "likelihood": likelihood,
        "structure": str(structure),
        "fisher": str(fisher),
        "subset": modules,
        "mode": curv.mode,
        "coverage": dict(curv.coverage),
        "architecture": [[k, list(s)] for k, s in architecture(model)],
        "blocks": blocks_state(curv.blocks),
        "prior_precision": tau.detach().cpu(),
        "temperature": float(temperature),
        "map_vector": map_vector.detach().cpu(),
        "num_data": curv.num_data,
        "log_likelihood": curv.info.log_likelihood,
        "input_shape": list(curv.info.input_shape),
    }


def posterior_from_state(
    state: dict[str, Any], model: nn.Module, check_weights: bool
) -> tuple[Curvature, Tensor]:
    """The curvature and MAP of a saved state, checked against ``model``: the architecture must
    match, and (``check_weights``) the model's weights the saved MAP."""
    if state.get("format") != FORMAT:
        raise ValueError("Laplace.load_state_dict: not a bayes_kfoc Laplace state.")
    saved = [(k, tuple(s)) for k, s in state["architecture"]]
    check_architecture(saved, model, "Laplace.load", "Load it onto the model it was fitted on.")
    map_vector: Tensor = state["map_vector"]
    current = parameters_to_vector(model.parameters()).detach().cpu()
    if check_weights and not torch.allclose(current, map_vector.to(current.dtype)):
        raise ValueError(
            "Laplace.load: the model's weights differ from the posterior's MAP; load the "
            "trained weights first, or pass check_weights=False."
        )
    blocks = blocks_from_state(state["blocks"], next(model.parameters()).device)
    info = FitInfo(
        log_likelihood=float(state["log_likelihood"]),
        input_shape=tuple(state["input_shape"]),
        base_seed=None,
    )
    curv = Curvature(
        blocks,
        Structure.parse(state["structure"], "Laplace.load: structure"),
        FisherType.parse(state["fisher"], "Laplace.load: fisher"),
        int(state["num_data"]),
        str(state.get("mode", "loaded")),
        dict(state.get("coverage", {})),
        info,
    )
    return curv, map_vector
