"""scikit-learn's bundled wine and breast-cancer tables as seeded, stratified splits."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from sklearn.datasets import load_breast_cancer, load_wine
from sklearn.utils import Bunch

from datasets.splits import Splits, make_dataset, stratified_split

__all__ = ["TABULAR_LOADERS", "load_tabular"]

TABULAR_LOADERS: dict[str, Callable[[], Bunch]] = {
    "wine": load_wine,
    "breast_cancer": load_breast_cancer,
}


def load_tabular(name: str, *, seed: int = 0) -> Splits:
    """Load a bundled tabular data set split 60/20/20 and standardised.

    Every feature is standardised with the mean and standard deviation of the training split
    only (constant features are left centred, not divided by zero).

    Args:
        name: ``"wine"`` or ``"breast_cancer"``.
        seed: Seed of the stratified split.

    Returns:
        The splits with float32 inputs ``[N, D]`` and int64 labels.

    Raises:
        ValueError: If `name` is not a bundled tabular data set.
    """
    if name not in TABULAR_LOADERS:
        raise ValueError(f"unknown tabular data set {name!r}; valid: {sorted(TABULAR_LOADERS)}")
    bunch = TABULAR_LOADERS[name]()
    features = np.asarray(bunch.data, dtype=np.float64)
    labels = np.asarray(bunch.target, dtype=np.int64)
    train, val, test = stratified_split(labels, seed)
    mean = features[train].mean(axis=0)
    std = features[train].std(axis=0)
    std[std == 0.0] = 1.0
    scaled = (features - mean) / std
    return Splits(
        train=make_dataset(scaled[train], labels[train]),
        val=make_dataset(scaled[val], labels[val]),
        test=make_dataset(scaled[test], labels[test]),
        num_classes=int(labels.max()) + 1,
        input_shape=(features.shape[1],),
        name=name,
        image_shape=None,
    )
