"""How every trainable parameter of a model is covered by a fit (nothing dropped silently)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from ..blocks import CurvatureBlock
from ..stats import Target
from ..stats.targets import why_not_kronecker

_KIND = {"kron": "Kronecker", "diag": "diagonal", "full": "dense"}


def coverage(
    model: nn.Module,
    blocks: Mapping[str, CurvatureBlock],
    targets: list[Target],
    skipped: Mapping[str, str],
) -> dict[str, str]:
    """``{parameter_name: how it is covered}`` for every parameter of ``model``."""
    notes = {t.name: t.note for t in targets}
    for t in targets:  # every block that is not Kronecker says why (a typed reason)
        if t.name in blocks and blocks[t.name].kind.value != "kron":
            why = f"not Kronecker: {why_not_kronecker(t).value}"
            notes[t.name] = f"{notes[t.name]}; {why}" if notes[t.name] else why
    owner_of: dict[str, str] = {}
    for mname, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            owner_of.setdefault(f"{mname}.{pname}" if mname else pname, mname)
    out: dict[str, str] = {}
    for full, p in model.named_parameters():
        owner = owner_of[full]
        if owner == "" and (full in blocks or full in skipped):  # the root's: its own block
            owner = full
        if not p.requires_grad:
            out[full] = "frozen (requires_grad=False): not part of the curvature"
        elif owner in blocks:
            extra = f"; {notes[owner]}" if notes.get(owner) else ""
            out[full] = f"{_KIND[blocks[owner].kind]} block {owner!r}{extra}"
        else:
            out[full] = skipped.get(owner, "not covered")
    return out
