"""Per-layer Fisher fidelity of the seed-0 MAP network (diag / K-FAC / K-FOC vs the exact block),
estimated on random subsets of the training points, with an error bar.

:func:`bayes_kfoc.diagnostics.fisher_fidelity` (matrix-free: ``‖F‖_F`` from Gram products of
the per-point statistics, never a dense block) on a float64 copy of the network, exact Fisher,
over ``draws`` seeded random subsets of ``points`` training points each (all points, once, when
the split is no larger). Its cost is quadratic in the points of one subset and independent of
the size of the training split and of the layers, so it runs at MNIST size. The section reports,
per layer and structure, the mean and sample standard deviation of the relative error over the
subsets: the fidelity of each structure fitted to a data set of ``points`` points like these,
and how much it varies between such data sets. (It is not the error on the whole training split;
with more points per subset the errors of the Kronecker structures typically grow.)
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayes_kfoc.diagnostics import fisher_fidelity
from datasets import Splits
from evaluation.structures import STRUCTURES

__all__ = ["fidelity_section", "module_label"]

BATCH = 256


def module_label(model: nn.Module, name: str) -> str:
    """``"0: Linear 784→128"``, ``"3: Conv2d 8→16, 3×3"``: the module's name and what it is."""
    m = dict(model.named_modules()).get(name)
    if isinstance(m, nn.Linear):
        return f"{name}: Linear {m.in_features}→{m.out_features}"
    if isinstance(m, nn.Conv2d):
        k = "×".join(map(str, m.kernel_size))
        return f"{name}: Conv2d {m.in_channels}→{m.out_channels}, {k}"
    return f"{name}: {type(m).__name__}" if m is not None else name


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fidelity_section(
    model: nn.Module,
    splits: Splits,
    *,
    points: int = 2000,
    draws: int = 3,
    seed: int = 0,
    step: Callable[[str], None] | None = None,
) -> tuple[dict[str, object] | None, str | None]:
    """``(section, None)`` with the per-layer errors, or ``(None, note)`` when it cannot run.

    The section: ``{"n_points", "n_train", "draws", "seconds", "layers": [{"module", "label",
    "num_params", "fisher_norm", "errors": {structure: mean}, "errors_sd": {structure: sd},
    "kfoc_certificate"?}]}``.
    """
    x, y = splits.train.tensors
    n = min(points, len(x))
    draws = 1 if n == len(x) else draws
    gen = torch.Generator().manual_seed(20_011 + seed)
    net = copy.deepcopy(model).double()
    start = time.perf_counter()
    per_draw = []
    for d in range(draws):
        if step is not None:
            step(f"Fisher fidelity: subset {d + 1}/{draws} of {n} training points")
        idx = torch.randperm(len(x), generator=gen)[:n] if n < len(x) else torch.arange(len(x))
        loader = DataLoader(TensorDataset(x[idx].double(), y[idx]), batch_size=BATCH)
        try:
            per_draw.append(fisher_fidelity(net, loader, "exact", STRUCTURES))
        except (ValueError, RuntimeError) as err:  # e.g. memory for a huge layer: say so
            return None, f"Fisher fidelity not computed: {err}"
    layers = []
    for i, row in enumerate(per_draw[0]):
        rows = [rs[i] for rs in per_draw]
        stats = {s: _mean_sd([float(r.errors[s]) for r in rows]) for s in STRUCTURES}
        layer: dict[str, object] = {
            "module": row.module,
            "label": module_label(model, row.module),
            "num_params": row.num_params,
            "fisher_norm": statistics.fmean(r.fisher_norm for r in rows),
            "errors": {s: m for s, (m, _) in stats.items()},
            "errors_sd": {s: sd for s, (_, sd) in stats.items()},
        }
        certs = [r.kfoc_certificate for r in rows if r.kfoc_certificate is not None]
        if certs:
            layer["kfoc_certificate"] = statistics.fmean(certs)
        layers.append(layer)
    section = {
        "n_points": n,
        "n_train": len(x),
        "draws": draws,
        "seconds": time.perf_counter() - start,
        "layers": layers,
    }
    return section, None
