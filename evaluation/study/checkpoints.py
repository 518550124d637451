"""MAP networks per seed: train, or load a cached ``state_dict`` with ``weights_only=True``.

The cache key holds everything that changes the trained weights: data set, model, seed, epochs,
and a short hash of the training hyperparameters, the architecture (parameter names and shapes)
and the *content* of the training split (:func:`~evaluation.study.digest.tensor_digest` of its
inputs and labels), so other data (half the training set, shuffled labels, another copy in
``--data-dir``) always means a newly trained network. Files are written atomically (temporary
file + ``os.replace``); a cached file that does not load into the architecture is ignored and
retrained, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from datasets import Splits
from evaluation.models import build_model
from evaluation.study.config import StudyConfig
from evaluation.study.digest import tensor_digest
from evaluation.study.progress import Progress
from evaluation.training import train_map

__all__ = ["MapModel", "checkpoint_path", "get_map_model"]


@dataclass
class MapModel:
    """A seed's trained MAP network and how it was obtained."""

    model: nn.Module
    seconds: float
    cached: bool
    path: Path | None


def _training_hash(model: nn.Module, config: StudyConfig, splits: Splits) -> str:
    spec = {
        "params": [[k, list(v.shape)] for k, v in model.state_dict().items()],
        "train_data": tensor_digest(splits.train.tensors),
        "lr": config.lr,
        "weight_decay": config.weight_decay,
        "batch_size": config.batch_size,
    }
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:10]


def checkpoint_path(config: StudyConfig, seed: int, model: nn.Module, splits: Splits) -> Path:
    """``<cache>/<dataset>-<model>-seed<s>-ep<epochs>-<hash>.pt`` (hash: see the module doc)."""
    name = (
        f"{config.dataset}-{config.model}-seed{seed}-ep{config.epochs}-"
        f"{_training_hash(model, config, splits)}.pt"
    )
    return config.checkpoint_dir / name


def _fresh_model(config: StudyConfig, splits: Splits, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(config.model, splits.input_shape, splits.num_classes)


def _save_atomic(state: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def get_map_model(
    config: StudyConfig, splits: Splits, seed: int, progress: Progress | None = None
) -> MapModel:
    """The MAP network of ``seed``: loaded from the cache when possible, else trained.

    Training: ``torch.manual_seed(seed)`` before building the model, then
    :func:`evaluation.training.train_map` with the config's hyperparameters and ``seed``.
    """
    model = _fresh_model(config, splits, seed)
    path = checkpoint_path(config, seed, model, splits) if config.use_cache else None
    if path is not None and path.is_file():
        start = time.perf_counter()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state, strict=True)
            return MapModel(model.eval(), time.perf_counter() - start, True, path)
        except Exception as err:  # any unreadable or mismatched file: retrain
            warnings.warn(
                f"ignoring unusable MAP checkpoint '{path}' ({err}); retraining.", stacklevel=2
            )
            model = _fresh_model(config, splits, seed)
    start = time.perf_counter()
    show = progress or Progress(False)
    every = max(1, config.epochs // 10)

    def on_epoch(epoch: int, epochs: int) -> None:
        if not show.tty and (epoch % every == 0 or epoch == epochs):
            show.line(f"seed {seed}: MAP training, epoch {epoch}/{epochs}")

    show.line(
        f"seed {seed}: training the MAP {config.model} ({config.epochs} epochs, "
        f"{len(splits.train)} points)"
    )
    train_map(
        model,
        splits.train,
        epochs=config.epochs,
        lr=config.lr,
        weight_decay=config.weight_decay,
        batch_size=config.batch_size,
        seed=seed,
        progress=show.enabled and show.tty,
        on_epoch=on_epoch,
    )
    seconds = time.perf_counter() - start
    if path is not None:
        _save_atomic({k: v.detach().clone() for k, v in model.state_dict().items()}, path)
    return MapModel(model.eval(), seconds, False, path)
