"""A ResNet faithful to torchvision's ``resnet18`` / ``resnet34``, without depending on torchvision.

torchvision's PyPI wheel for torch 2.13 is a CUDA build whose operators do not load on the CPU
torch, so the zoo rebuilds its ResNet here, module for module and name for name:

- ``conv1`` (7x7, stride 2, padding 3, no bias) → ``bn1`` → ``relu`` (``inplace=True``) →
  ``maxpool`` (3x3, stride 2, padding 1);
- ``layer1`` … ``layer4`` of :class:`BasicBlock` (two 3x3 convolutions with BatchNorm, in-place
  ReLU, ``out += identity``), the first block of ``layer2`` … ``layer4`` with stride 2 and a
  ``downsample = Sequential(conv1x1(stride=2), BatchNorm2d)``;
- ``avgpool`` (``AdaptiveAvgPool2d((1, 1))``) → ``torch.flatten(x, 1)`` → ``fc``;
- torchvision's initialisation: Kaiming-normal (fan-out, ReLU) convolutions, BatchNorm weights 1
  and biases 0, PyTorch's default Linear.

``resnet18(num_classes=10)`` has the 11.2 M parameters of
``torchvision.models.resnet18(weights=None, num_classes=10)``; ``width`` scales every stage
(torchvision's is 64) so that a test can build the same architecture small enough for CI.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["BasicBlock", "ResNet", "resnet18", "resnet34"]


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock`` (expansion 1)."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ``ResNet`` with :class:`BasicBlock` s; ``layers`` blocks per stage."""

    def __init__(
        self,
        layers: tuple[int, int, int, int] = (2, 2, 2, 2),
        num_classes: int = 1000,
        width: int = 64,
        in_channels: int = 3,
    ):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes)
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet18(num_classes: int = 1000, width: int = 64, in_channels: int = 3) -> ResNet:
    """torchvision's ``resnet18(weights=None, num_classes=num_classes)`` at ``width=64``."""
    return ResNet((2, 2, 2, 2), num_classes, width, in_channels)


def resnet34(num_classes: int = 1000, width: int = 64, in_channels: int = 3) -> ResNet:
    """torchvision's ``resnet34(weights=None, num_classes=num_classes)`` at ``width=64``."""
    return ResNet((3, 4, 6, 3), num_classes, width, in_channels)
