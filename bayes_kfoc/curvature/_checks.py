"""Up-front checks on the model: train mode, determinism, memory."""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from ..stats import call_model
from ..stats.inputs import Inputs

_STOCHASTIC = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)


def check_train_mode(
    model: nn.Module,
    what: str = "fit_curvature",
    why: str = "dropout and batch-norm statistics make the Fisher ill-defined",
) -> None:
    """Raise when a module would make the forward pass stochastic or stateful (``what``: the
    caller, ``why``: what it would break)."""
    culprits = [
        f"{name} ({type(m).__name__})"
        for name, m in model.named_modules()
        if isinstance(m, _STOCHASTIC) and m.training
    ]
    if culprits:
        raise RuntimeError(
            f"{what}: the model is in train mode with {', '.join(culprits[:5])}; {why}. Call "
            "model.eval() first."
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


def _fix_for(module: nn.Module) -> str:
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        return (
            f"Embedding(max_norm={module.max_norm}) renormalises the rows it looks up in place "
            "in every forward pass: renormalise every row once and set max_norm=None for the fit "
            "(with torch.no_grad(): emb.weight.copy_(torch.renorm(emb.weight, "
            f"{module.norm_type}, 0, emb.max_norm)); emb.max_norm = None)"
        )
    return "move the update out of forward(), or exclude the module"


class ModelGuard:
    """A fit never changes the user's model: parameters and buffers are copied before the first
    forward pass, and :meth:`check` restores them and raises if a forward pass changed them.

    Values are compared (a change through ``.data`` moves no version counter). Memory: one copy
    of the parameters and buffers.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        tensors = [*model.named_parameters(), *model.named_buffers()]
        self.saved = {k: (t, t.detach().clone()) for k, t in tensors}

    def changed(self) -> list[str]:
        return [k for k, (t, copy) in self.saved.items() if not torch.equal(t.detach(), copy)]

    def check(self, cause: BaseException | None = None) -> None:
        """Restore and raise (from ``cause``, if the fit already failed) when anything changed."""
        changed = self.changed()
        if not changed:
            return
        with torch.no_grad():
            for k in changed:
                t, copy = self.saved[k]
                t.copy_(copy)
        modules = dict(self.model.named_modules())
        owner = changed[0].rpartition(".")[0]
        module = modules[owner]
        err = RuntimeError(
            f"fit_curvature: the forward pass changed {changed[:5]} in place (restored); module "
            f"{owner!r} ({type(module).__name__}) updates its own tensors, so the fit would "
            f"change the model and its Fisher is not that of fixed weights. Fix: "
            f"{_fix_for(module)}."
        )
        if cause is not None:
            raise err from cause
        raise err
