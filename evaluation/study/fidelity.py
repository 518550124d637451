"""Per-layer Fisher fidelity of the seed-0 MAP network (diag / K-FAC / K-FOC vs the exact block).

:func:`bayes_kfoc.diagnostics.fisher_fidelity` on a float64 copy of the network (as in
:mod:`evaluation.benchmarks.fisher_fidelity`), exact Fisher over the training split. Its cost is
quadratic in the number of points and each exact block has ``P²`` entries' worth of structure,
so it runs only for small problems: at most :data:`MAX_POINTS` training points and
:data:`MAX_LAYER_PARAMS` parameters per layer; otherwise it is skipped with a note.
"""

from __future__ import annotations

import copy
import time

from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayes_kfoc.diagnostics import fisher_fidelity
from datasets import Splits
from evaluation.structures import STRUCTURES

__all__ = ["MAX_LAYER_PARAMS", "MAX_POINTS", "fidelity_section"]

MAX_POINTS = 2000
MAX_LAYER_PARAMS = 20_000
QUICK_POINTS = 256


def fidelity_section(
    model: nn.Module, splits: Splits, *, quick: bool = False
) -> tuple[dict[str, object] | None, str | None]:
    """``(section, None)`` with the per-layer errors, or ``(None, note)`` when skipped.

    The section: ``{"n_points", "seconds", "layers": [{"module", "num_params", "fisher_norm",
    "errors": {structure: relative error}, "kfoc_certificate"?}]}``.
    """
    x, y = splits.train.tensors
    if quick:
        x, y = x[:QUICK_POINTS], y[:QUICK_POINTS]
    largest = max(
        (sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0
    )
    if len(x) > MAX_POINTS or largest > MAX_LAYER_PARAMS:
        return None, (
            f"Fisher fidelity skipped: it costs O(N²) and is meant for small nets; this one has "
            f"{len(x)} training points (limit {MAX_POINTS}) and a layer of {largest} parameters "
            f"(limit {MAX_LAYER_PARAMS})."
        )
    start = time.perf_counter()
    loader = DataLoader(TensorDataset(x.double(), y), batch_size=256)
    rows = fisher_fidelity(copy.deepcopy(model).double(), loader, "exact", STRUCTURES)
    layers = []
    for r in rows:
        layer: dict[str, object] = {
            "module": r.module,
            "num_params": r.num_params,
            "fisher_norm": r.fisher_norm,
            "errors": {s: float(r.errors[s]) for s in STRUCTURES},
        }
        if r.kfoc_certificate is not None:
            layer["kfoc_certificate"] = float(r.kfoc_certificate)
        layers.append(layer)
    section = {"n_points": len(x), "seconds": time.perf_counter() - start, "layers": layers}
    return section, None
