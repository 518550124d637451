"""Shared fixtures: devices (CUDA when available), tiny problems, loaders."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # reference.py and cases.py

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Every device test runs on CPU, and on CUDA where one is present."""
    return torch.device(request.param)
