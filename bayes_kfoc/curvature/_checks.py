"""Up-front checks on the model: train mode, determinism, memory."""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from ..stats.inputs import Inputs, call_model

_STOCHASTIC = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)


def check_train_mode(model: nn.Module) -> None:
    """Raise when a module would make the forward pass stochastic or stateful."""
    culprits = [
        f"{name} ({type(m).__name__})"
        for name, m in model.named_modules()
        if isinstance(m, _STOCHASTIC) and m.training
    ]
    if culprits:
        raise RuntimeError(
            f"fit_curvature: the model is in train mode with {', '.join(culprits[:5])}; dropout "
            "and batch-norm statistics make the Fisher ill-defined. Call model.eval() first."
        )


def snapshot_buffers(model: nn.Module) -> dict[str, Tensor]:
    return {k: b.detach().clone() for k, b in model.named_buffers()}


def check_determinism(
    model: nn.Module, x: Inputs, first_out: Tensor, buffers: dict[str, Tensor]
) -> None:
    """Re-run one batch; raise (restoring buffers) if outputs or buffers changed."""
    with torch.no_grad():
        second = call_model(model, x)
    changed = [k for k, b in model.named_buffers() if not torch.equal(b, buffers[k])]
    if changed:
        with torch.no_grad():
            for k, b in model.named_buffers():
                b.copy_(buffers[k])
        raise RuntimeError(
            f"fit_curvature: the forward pass changed buffers {changed[:5]} (restored); a module "
            "updates state in the forward pass. Call model.eval() first."
        )
    if not torch.allclose(first_out, second, rtol=1e-4, atol=1e-6, equal_nan=True):
        diff = (first_out - second).abs().max().item()
        raise RuntimeError(
            f"fit_curvature: two forward passes on the same batch differ (max |Δ| = {diff:.3e}); "
            "the model is stochastic (dropout or sampling in forward?). Call model.eval(), or "
            "pass check_determinism=False if the difference is expected round-off."
        )


def default_memory_budget(device: torch.device) -> int:
    """Half of the free CUDA memory, or a quarter of the host's available memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free // 2)
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES")
        size = os.sysconf("SC_PAGE_SIZE")
        return int(pages * size // 4)
    except (ValueError, OSError, AttributeError):
        return 2**31


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"
