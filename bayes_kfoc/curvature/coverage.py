"""How every trainable parameter of a model is covered by a fit (nothing dropped silently)."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

from torch import nn

from ..blocks import CurvatureBlock
from ..stats import Target
from ..stats.targets import why_not_kronecker

_KIND = {"kron": "Kronecker", "diag": "diagonal", "full": "dense"}


def full_param_name(block: str, local: str) -> str:
    """The ``named_parameters`` name of parameter ``local`` of block ``block``: ``block.local``,
    or ``local`` alone for the root module's block (``""``) and for a root-owned parameter,
    whose block is named by the parameter itself."""
    return f"{block}.{local}" if block and block != local else local


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


NOTE = "; eigendecomposition: "  # where a block's decomposition note starts in its coverage


def note_decompositions(
    coverage: MutableMapping[str, str], blocks: Mapping[str, CurvatureBlock]
) -> None:
    """Append to each parameter's coverage how its block's factors were decomposed, where any
    needed a fallback (float64 or jitter); replaces an earlier note (idempotent)."""
    for k, b in blocks.items():
        fallbacks = {f: d for f, d in b.decompositions.items() if d.fallback}
        for p in b.param_shapes:
            full = full_param_name(k, p)
            if full not in coverage:
                continue
            base = coverage[full].split(NOTE)[0]
            if fallbacks:
                parts = ", ".join(f"{f}: {d.describe()}" for f, d in fallbacks.items())
                base = f"{base}{NOTE}{parts}"
            coverage[full] = base
