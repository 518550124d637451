"""Rotation shift: rotate images by an angle with bilinear interpolation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["rotate", "rotation_angles"]


def rotation_angles(step: int = 15, maximum: int = 180) -> tuple[int, ...]:
    """Angles of the rotation-shift benchmark.

    Args:
        step: Spacing of the angles in degrees.
        maximum: Largest angle in degrees (included when it is a multiple of `step`).

    Returns:
        ``(0, 15, 30, ..., 180)`` by default.
    """
    return tuple(range(0, maximum + 1, step))


def _as_images(
    images: torch.Tensor, image_shape: tuple[int, ...] | None
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Reshape `images` to ``[N, C, H, W]`` and return it with the original shape."""
    original = tuple(images.shape)
    if images.dim() == 4:
        return images, original
    if images.dim() == 2 and image_shape is not None:
        chw = tuple(image_shape) if len(image_shape) == 3 else (1, *image_shape)
        if len(chw) != 3 or math.prod(chw) != images.shape[1]:
            raise ValueError(
                f"image_shape {image_shape} does not match flat inputs of width {images.shape[1]}"
            )
        return images.reshape(images.shape[0], *chw), original
    raise ValueError(
        "rotate expects images [N, C, H, W], or flat images [N, H*W] together with "
        f"image_shape; got shape {original} and image_shape={image_shape}"
    )


def rotate(
    images: torch.Tensor, angle_degrees: float, *, image_shape: tuple[int, ...] | None = None
) -> torch.Tensor:
    """Rotate images counter-clockwise (as displayed) about their centre.

    Uses `F.affine_grid` + `F.grid_sample` with bilinear interpolation, zeros padding and
    ``align_corners=False``; pixel centres are symmetric about the image centre, so multiples
    of 90° on square images reproduce `torch.rot90` (up to float rounding). The operation is
    deterministic. Rotation is isotropic in pixel units for non-square images too.

    Args:
        images: ``[N, C, H, W]`` images, or flat ``[N, C*H*W]`` inputs with `image_shape`.
        angle_degrees: Rotation angle in degrees; positive is counter-clockwise, matching
            ``torch.rot90(x, 1, dims=(-2, -1))`` at 90°.
        image_shape: ``(H, W)`` or ``(C, H, W)`` of flat inputs; ignored for 4-D inputs.

    Returns:
        Rotated images with the same shape as `images` and a floating dtype (integer inputs
        are converted to float32).
    """
    batch, original = _as_images(images, image_shape)
    if not batch.is_floating_point():
        batch = batch.to(torch.float32)
    n, _, h, w = batch.shape
    radians = math.radians(angle_degrees)
    cos, sin = math.cos(radians), math.sin(radians)
    cos = 0.0 if abs(cos) < 1e-12 else cos
    sin = 0.0 if abs(sin) < 1e-12 else sin
    # Output pixel (x, y) samples input pixel R(-angle) (x, y) in pixel units (y points down),
    # rescaled into affine_grid's normalised [-1, 1] coordinates per axis.
    theta = torch.tensor(
        [[cos, -sin * h / w, 0.0], [sin * w / h, cos, 0.0]], dtype=batch.dtype, device=batch.device
    )
    grid = F.affine_grid(theta.expand(n, 2, 3), list(batch.shape), align_corners=False)
    rotated = F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return rotated.reshape(original)
