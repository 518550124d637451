"""One registry of tiny float64 test problems: model builder, data, and readable ids."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


class SkipNet(nn.Module):
    """A non-Sequential model with a skip connection, a LayerNorm and a bare parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.block = nn.Sequential(nn.Tanh(), nn.Linear(5, 5), nn.Tanh())
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 3)
        self.scale = nn.Parameter(torch.tensor(1.3))

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        h = h + self.block(h)
        return self.scale * self.head(self.norm(h))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(3, 2, 2, dilation=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.tanh(self.bn(self.conv2(h)))
        return self.fc(h.flatten(1))


@dataclass
class Case:
    id: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    num_classes: int = 3
    num_data: int = 11

    def make(self, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
        torch.manual_seed(seed)
        model = self.build().double().eval()
        if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 1.5)
        x = torch.randn(self.num_data, *self.input_shape, dtype=torch.float64)
        y = torch.randint(0, self.num_classes, (self.num_data,))
        return model, x, y


CASES = [
    Case("mlp-tanh-bias", lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), (4,)),
    Case(
        "mlp-relu-nobias",
        lambda: nn.Sequential(
            nn.Linear(4, 5, bias=False), nn.ReLU(inplace=True), nn.Linear(5, 3, bias=False)
        ),
        (4,),
    ),
    Case("cnn-stride-pad-dilation", SmallCNN, (2, 5, 5)),
    Case("skip-connection", SkipNet, (4,)),
]
CASE_IDS = [c.id for c in CASES]
