"""Adapt image tensors to another data set's input shape (channels, size, flattening)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["GRAY_WEIGHTS", "match_image_shape"]

GRAY_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights used to turn RGB into grayscale."""


def _match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Convert ``[N, C, H, W]`` images to `channels` channels (gray <-> RGB only)."""
    have = images.shape[1]
    if have == channels:
        return images
    if have == 3 and channels == 1:
        weights = torch.tensor(GRAY_WEIGHTS, dtype=images.dtype, device=images.device)
        return (images * weights.view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    if have == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    raise ValueError(f"cannot convert images with {have} channel(s) to {channels} channel(s)")


def match_image_shape(
    images: torch.Tensor, image_shape: tuple[int, int, int], *, flat: bool
) -> torch.Tensor:
    """Convert images to the shape another data set's model expects.

    Channels are converted RGB -> gray (BT.601 luma) or gray -> RGB (repeat), the spatial
    size is changed with antialiased bilinear resizing, and the result is flattened when
    `flat` is set. Values stay in the range of the input (``[0, 1]`` for our images).

    Args:
        images: Float images ``[N, C, H, W]``.
        image_shape: Target ``(C, H, W)``.
        flat: Whether to return ``[N, C*H*W]`` instead of ``[N, C, H, W]``.

    Returns:
        The converted float32 images.
    """
    if images.dim() != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(images.shape)}")
    channels, height, width = image_shape
    out = _match_channels(images.to(torch.float32), channels)
    if tuple(out.shape[-2:]) != (height, width):
        out = F.interpolate(
            out, size=(height, width), mode="bilinear", align_corners=False, antialias=True
        ).clamp_(0.0, 1.0)
    return out.reshape(out.shape[0], -1) if flat else out
