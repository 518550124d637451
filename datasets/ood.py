"""Out-of-distribution inputs: noise images, natural-image patches, held-out digit classes."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_sample_images

from datasets.digits import load_digits
from datasets.images import GRAY_WEIGHTS
from datasets.splits import Splits

__all__ = [
    "IN_CLASSES",
    "OUT_CLASSES",
    "gaussian_noise",
    "held_out_digits",
    "natural_patches",
    "uniform_noise",
]

IN_CLASSES: tuple[int, ...] = (0, 1, 2, 3, 4)
OUT_CLASSES: tuple[int, ...] = (5, 6, 7, 8, 9)


def uniform_noise(num_samples: int, shape: tuple[int, ...], *, seed: int = 0) -> torch.Tensor:
    """Independent U(0, 1) values.

    Args:
        num_samples: Number of samples N.
        shape: Shape of one sample (e.g. ``(64,)`` or ``(1, 8, 8)``).
        seed: Seed of a private `torch.Generator` (the global RNG is untouched).

    Returns:
        Float32 tensor ``[N, *shape]`` in ``[0, 1]``.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((num_samples, *shape), generator=generator)


def gaussian_noise(
    num_samples: int,
    shape: tuple[int, ...],
    *,
    seed: int = 0,
    mean: float = 0.5,
    std: float = 0.25,
) -> torch.Tensor:
    """Independent N(mean, std²) values clipped to ``[0, 1]``.

    Args:
        num_samples: Number of samples N.
        shape: Shape of one sample.
        seed: Seed of a private `torch.Generator`.
        mean: Mean before clipping.
        std: Standard deviation before clipping.

    Returns:
        Float32 tensor ``[N, *shape]`` in ``[0, 1]``.
    """
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((num_samples, *shape), generator=generator) * std + mean
    return noise.clamp_(0.0, 1.0)


def _source_images(channels: int) -> list[torch.Tensor]:
    """scikit-learn's bundled photographs as ``[C, H, W]`` float tensors in ``[0, 1]``."""
    if channels not in (1, 3):
        raise ValueError(f"natural patches support 1 or 3 channels, got {channels}")
    weights = np.asarray(GRAY_WEIGHTS, dtype=np.float32)
    out = []
    for image in load_sample_images().images:
        rgb = np.asarray(image, dtype=np.float32) / 255.0
        pixels = rgb @ weights if channels == 1 else rgb
        array = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
        out.append(torch.from_numpy(np.ascontiguousarray(array)))
    return out


def natural_patches(
    num_samples: int,
    image_shape: tuple[int, int, int],
    *,
    seed: int = 0,
    min_crop: int = 16,
    max_crop: int = 128,
) -> torch.Tensor:
    """Random crops of scikit-learn's bundled photographs, resized to `image_shape`.

    Each patch comes from one of the two sample images (``china.jpg``, ``flower.jpg``):
    grayscale (BT.601 luma) for one channel, RGB for three; a crop with random position and
    a random height in ``[min_crop, max_crop]`` (aspect ratio of the target) is resized with
    antialiased bilinear interpolation, then min-max scaled to span ``[0, 1]`` (constant
    patches become 0).

    Args:
        num_samples: Number of patches N.
        image_shape: ``(C, H, W)`` of the output, C in {1, 3}.
        seed: Seed of the crop positions and sizes.
        min_crop: Smallest crop height in source pixels.
        max_crop: Largest crop height in source pixels.

    Returns:
        Float32 tensor ``[N, C, H, W]`` in ``[0, 1]``.
    """
    channels, height, width = image_shape
    if not 1 <= min_crop <= max_crop:
        raise ValueError(f"need 1 <= min_crop <= max_crop, got {min_crop}, {max_crop}")
    sources = _source_images(channels)
    rng = np.random.default_rng(seed)
    patches = torch.empty((num_samples, channels, height, width), dtype=torch.float32)
    for i in range(num_samples):
        source = sources[int(rng.integers(len(sources)))]
        src_h, src_w = source.shape[-2:]
        crop_h = int(rng.integers(min_crop, min(max_crop, src_h) + 1))
        crop_w = max(1, min(src_w, round(crop_h * width / height)))
        top = int(rng.integers(src_h - crop_h + 1))
        left = int(rng.integers(src_w - crop_w + 1))
        crop = source[None, :, top : top + crop_h, left : left + crop_w]
        patch = F.interpolate(
            crop, size=(height, width), mode="bilinear", align_corners=False, antialias=True
        )[0]
        low, high = patch.min(), patch.max()
        scale = high - low
        patches[i] = (patch - low) / scale if scale > 0 else torch.zeros_like(patch)
    return patches.clamp_(0.0, 1.0)


def held_out_digits(*, seed: int = 0, flat: bool = True) -> tuple[Splits, torch.Tensor]:
    """The held-out-classes split of the digits: train on 0-4, OOD = test images of 5-9.

    Both parts come from one stratified split of all ten classes with the given seed, so
    the OOD images were never in any training or validation set.

    Args:
        seed: Seed of the split.
        flat: Input layout, as in `load_digits`.

    Returns:
        ``(splits, ood)``: the in-distribution splits of digits 0-4 (labels 0-4), named
        ``"digits04"``, and the test images of digits 5-9 shaped like their inputs.
    """
    splits = load_digits(seed=seed, flat=flat, classes=IN_CLASSES, name="digits04")
    held_out = load_digits(seed=seed, flat=flat, classes=OUT_CLASSES, name="digits59")
    images: torch.Tensor = held_out.test.tensors[0]
    return splits, images
