"""The study's model zoo: an MLP and a small LeNet-style CNN, built by name."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from torch import nn

MODELS = ("mlp", "cnn")


def mlp(
    in_features: int,
    num_classes: int,
    hidden: Sequence[int] = (128, 128),
    activation: type[nn.Module] = nn.Tanh,
) -> nn.Sequential:
    """``in → hidden… → num_classes`` with ``activation`` between Linear layers."""
    layers: list[nn.Module] = []
    sizes = [in_features, *hidden]
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), activation()]
    layers.append(nn.Linear(sizes[-1], num_classes))
    return nn.Sequential(*layers)


def small_cnn(in_channels: int, image_size: int, num_classes: int) -> nn.Sequential:
    """A LeNet-style CNN: two 3x3 convolutions (8 and 16 channels), max-pool, two Linear layers."""
    side = image_size // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * side * side, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def build_model(name: str, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """``"mlp"`` for flat inputs ``[D]`` or ``"cnn"`` for images ``[C, H, W]``."""
    if name == "mlp":
        d = 1
        for s in input_shape:
            d *= int(s)
        return (
            nn.Sequential(nn.Flatten(), *mlp(d, num_classes))
            if len(input_shape) > 1
            else mlp(d, num_classes)
        )
    if name == "cnn":
        if len(input_shape) != 3:
            raise ValueError(f"model 'cnn' needs image inputs [C, H, W], got {tuple(input_shape)}.")
        return small_cnn(int(input_shape[0]), int(input_shape[1]), num_classes)
    raise ValueError(f"unknown model {name!r}; valid models are {', '.join(MODELS)}.")
