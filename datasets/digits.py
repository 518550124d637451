"""scikit-learn's bundled 8x8 handwritten digits as seeded, stratified splits."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.datasets import load_digits as _sklearn_load_digits

from datasets.splits import Splits, make_dataset, stratified_split

__all__ = ["DIGITS_IMAGE_SHAPE", "load_digits"]

DIGITS_IMAGE_SHAPE: tuple[int, int, int] = (1, 8, 8)


def load_digits(
    *, seed: int = 0, flat: bool = True, classes: Sequence[int] | None = None, name: str = "digits"
) -> Splits:
    """Load the digits data set split 60/20/20 into train/val/test.

    The split is made on all ten classes (stratified, seeded) and then restricted to
    `classes`, so ``classes=(0, 1, 2, 3, 4)`` and ``classes=(5, 6, 7, 8, 9)`` with the same
    seed partition one common split: their test sets are disjoint from every training set.

    Args:
        seed: Seed of the split.
        flat: ``True`` gives inputs ``[N, 64]`` (MLPs); ``False`` gives ``[N, 1, 8, 8]`` (CNNs).
        classes: Optional subset of the digits 0-9 to keep; labels are remapped to
            ``0..k-1`` in the order given.
        name: Name recorded in the returned `Splits`.

    Returns:
        The splits; pixels are float32 in ``[0, 1]`` (raw value / 16), labels int64.

    Raises:
        ValueError: If `classes` is empty, repeats a class or names a class outside 0-9.
    """
    bunch = _sklearn_load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0
    labels = np.asarray(bunch.target, dtype=np.int64)
    kept = tuple(range(10)) if classes is None else tuple(int(c) for c in classes)
    if not kept or len(set(kept)) != len(kept) or any(c < 0 or c > 9 for c in kept):
        raise ValueError(f"classes must be distinct digits in 0..9, got {classes!r}")
    remap = np.full(10, -1, dtype=np.int64)
    remap[list(kept)] = np.arange(len(kept))

    shape = (64,) if flat else DIGITS_IMAGE_SHAPE
    parts = []
    for idx in stratified_split(labels, seed):
        idx = idx[remap[labels[idx]] >= 0]
        parts.append(make_dataset(images[idx].reshape(len(idx), *shape), remap[labels[idx]]))
    return Splits(
        train=parts[0],
        val=parts[1],
        test=parts[2],
        num_classes=len(kept),
        input_shape=shape,
        name=name,
        image_shape=DIGITS_IMAGE_SHAPE,
    )
