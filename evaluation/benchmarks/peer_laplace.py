"""Our curvature fits against laplace-torch 0.3's fits: same models, same loaders, one process.

Run (in the benchmark venv, which has laplace-torch but not our project installed)::

    PYTHONPATH=. .bench/venv/bin/python -m evaluation.benchmarks.peer_laplace \\
        --problems digits,wide --repeats 3

Problems (reused from :mod:`evaluation.benchmarks.curvature_speed`): ``digits`` (the seeded MAP
MLP 64-128-128-10 on the digits train split) and ``wide`` (MLP 784-1024-1024-10 on 10,000 random
inputs); both at batch 256, and both sides fit on the very same ``DataLoader``.

Ours: ``fit_curvature(model, loader, s, fisher="exact", modules=m, progress=False)`` for
``s`` in kfac / kfoc / diag and ``m`` in all / last_layer (default options otherwise, so our time
includes the determinism re-run of the first batch). ``+eig`` adds ``block.eigh()`` on every
Kronecker block after the fit.

Theirs: ``Laplace(copy.deepcopy(model), "classification", subset_of_weights=m,
hessian_structure=s).fit(loader)`` with the default backend (CurvlinopsGGN in 0.3: a
``curvlinops.KFACLinearOperator`` with the type-2 Fisher built per mini-batch for ``kron``;
per-sample ``torch.func.jacrev`` Jacobians for ``diag``). The model copy and the ``Laplace``
constructor are outside the timed region; ``.fit`` is timed (for last-layer it includes finding
the last layer).

Does their fit include the eigendecomposition? Yes, for kron. ``KronLaplace.fit`` (inherited by
``KronLLLaplace``) ends with ``self.H = self.H_facs.decompose(damping=self.damping)``, which runs
``torch.linalg.eigh`` (``laplace.utils.symeig``) on every Kronecker factor, the bias blocks'
factors included. Like with like, therefore:

- ``kfac+eig`` / ``kfoc+eig`` rows: our fit + ``eigh`` vs their whole ``fit``;
- ``kfac`` / ``kfoc`` rows: our fit vs their ``fit`` minus ``H_facs.decompose()`` timed separately
  right after each of their fits (the same call their fit ends with);
- ``diag`` rows: fit vs fit (no decomposition on either side).

Each repeat round runs every job once, alternating ours and theirs (interleaved), after one
warm-up round; the table shows medians of ``--repeats`` rounds. Their all-weights diag builds
``[batch, classes, params]`` Jacobians; it is skipped when that would not fit in memory or when a
one-batch probe extrapolates past ``--max-peer-seconds``.

Sanity check: the factors of both fits are compared (relative Frobenius difference). laplace
stores per parameter tensor ``[F0, F1]`` for a weight (``F0 = Σ_n G_n`` output side, ``F1`` =
mean ``a a^T`` without a bias column) and ``[F0b]`` for a bias; our weight-weight block is
``G ⊗ A[:-1, :-1]`` and our bias-bias block ``G · A[-1, -1]`` (our weight-bias cross terms have no
counterpart there).
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.metadata
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from bayes_kfoc import fit_curvature
from bayes_kfoc.blocks import DiagBlock, KronBlock
from evaluation.benchmarks.curvature_speed import PROBLEMS
from evaluation.benchmarks.timing import available_bytes

TARGETS = {"kfac": 1.0, "kfoc": 1.5}  # ours / their kron


def _import_laplace() -> Any:
    try:
        from laplace import Laplace
    except ImportError as e:
        raise SystemExit(
            f"peer_laplace: laplace-torch is not importable in {sys.executable} ({e}); "
            "run it in the benchmark venv, see BENCHMARKS.md."
        ) from e
    return Laplace


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


@dataclass
class Job:
    side: str  # "ours" or "theirs"
    subset: str  # "all" or "last_layer"
    structure: str  # ours: kfac/kfoc/diag; theirs: kron/diag
    run: Callable[[], tuple[dict[str, float], Any]]
    probe: Callable[[DataLoader], tuple[dict[str, float], Any]] | None = None
    times: dict[str, list[float]] = field(default_factory=dict)
    result: Any = None
    skipped: str | None = None

    def record(self, times: dict[str, float]) -> None:
        for k, v in times.items():
            self.times.setdefault(k, []).append(v)

    def median(self, *keys: str) -> float:
        runs = zip(*(self.times[k] for k in keys))
        return statistics.median(sum(r) for r in runs)


def ours_job(model: nn.Module, loader: DataLoader, subset: str, structure: str) -> Job:
    def run() -> tuple[dict[str, float], Any]:
        gc.collect()
        t0 = time.perf_counter()
        curv = fit_curvature(
            model, loader, structure, fisher="exact", modules=subset, progress=False
        )
        t1 = time.perf_counter()
        for block in curv.blocks.values():
            if isinstance(block, KronBlock):
                block.eigh()
        t2 = time.perf_counter()
        return {"fit": t1 - t0, "eig": t2 - t1}, curv

    return Job("ours", subset, structure, run)


def theirs_job(
    laplace_cls: Any, model: nn.Module, loader: DataLoader, subset: str, structure: str
) -> Job:
    def run(loader: DataLoader = loader) -> tuple[dict[str, float], Any]:
        la = laplace_cls(
            copy.deepcopy(model),
            "classification",
            subset_of_weights=subset,
            hessian_structure=structure,
        )
        gc.collect()
        t0 = time.perf_counter()
        la.fit(loader)
        times = {"fit": time.perf_counter() - t0}
        if structure == "kron":
            t1 = time.perf_counter()
            la.H_facs.decompose(damping=la.damping)
            times["decompose"] = time.perf_counter() - t1
        return times, la

    return Job("theirs", subset, structure, run, probe=run)


def _peer_diag_guard(job: Job, model: nn.Module, loader: DataLoader, max_seconds: float) -> None:
    """Skip their diag if its per-sample Jacobians cannot fit or a one-batch probe is too slow."""
    x, _ = next(iter(loader))
    with torch.no_grad():
        classes = int(model(x[:1]).shape[-1])
    params = (
        sum(p.numel() for p in model.parameters())
        if job.subset == "all"
        else sum(p.numel() for p in _last_linear(model).parameters())
    )
    js = x.shape[0] * classes * params * x.element_size()
    avail = available_bytes()
    if avail is not None and 2 * js > avail:  # Js plus at least one same-size temporary
        job.skipped = (
            f"their {job.subset} diag skipped: its torch.func Jacobians [{x.shape[0]}, {classes}, "
            f"{params}] alone take {js / 2**30:.1f} GiB per batch (plus jacrev temporaries), "
            f"{avail / 2**30:.1f} GiB available"
        )
        return
    probe_loader = DataLoader(Subset(loader.dataset, range(x.shape[0])), batch_size=x.shape[0])
    assert job.probe is not None
    times, _ = job.probe(probe_loader)
    estimate = times["fit"] * len(loader)
    if estimate > max_seconds:
        job.skipped = (
            f"their {job.subset} diag skipped: a one-batch probe took {times['fit']:.1f} s, "
            f"~{estimate:.0f} s per fit over {len(loader)} batches (> {max_seconds:.0f} s)"
        )


def _last_linear(model: nn.Module) -> nn.Module:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def _rel(ours: Tensor, theirs: Tensor) -> float:
    ours, theirs = ours.double(), theirs.double()
    return float(torch.linalg.norm(ours - theirs) / torch.linalg.norm(theirs))


def _kron_rel(G: Tensor, A: Tensor, F0: Tensor, F1: Tensor) -> float:
    """``‖G⊗A − F0⊗F1‖_F / ‖F0⊗F1‖_F`` in float64, without forming the products when large.

    ``G⊗A − F0⊗F1 = dG⊗A + F0⊗dA`` (``dG = G − F0``, ``dA = A − F1``), so its squared norm is
    ``‖dG‖²‖A‖² + ‖F0‖²‖dA‖² + 2 tr(dGᵀF0) tr(Aᵀ dA)``: every term is of the difference's order,
    hence no cancellation.
    """
    G, A, F0, F1 = (t.double() for t in (G, A, F0, F1))
    if G.numel() * A.numel() <= 2**24:
        return _rel(torch.kron(G, A), torch.kron(F0, F1))
    dG, dA = G - F0, A - F1
    sq = (
        dG.square().sum() * A.square().sum()
        + F0.square().sum() * dA.square().sum()
        + 2 * (dG * F0).sum() * (A * dA).sum()
    )
    return float(sq.clamp(min=0).sqrt() / (torch.linalg.norm(F0) * torch.linalg.norm(F1)))


def _linear_blocks(curv: Any, model: nn.Module, subset: str) -> list[tuple[str, Any]]:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if subset == "last_layer":
        names = names[-1:]
    return [(n, curv.blocks[n]) for n in names]


def sanity(jobs: list[Job], model: nn.Module) -> list[str]:
    """Relative Frobenius differences between our and their factors (and diagonals)."""
    lines = []
    done = {(j.side, j.subset, j.structure): j.result for j in jobs if j.result is not None}
    for subset in ("last_layer", "all"):
        curv, la = done.get(("ours", subset, "kfac")), done.get(("theirs", subset, "kron"))
        if curv is not None and la is not None:
            kfacs = list(la.H_facs.kfacs)
            for name, block in _linear_blocks(curv, model, subset):
                assert isinstance(block, KronBlock)
                F0, F1 = kfacs.pop(0)
                A_w = block.A[:-1, :-1] if block.bias else block.A
                w = _kron_rel(block.G, A_w, F0, F1)
                line = (
                    f"  {subset:<10} {name:>4} kfac vs kron: weight block G⊗A[:-1,:-1] {w:.1e} "
                    f"(G vs F0 {_rel(block.G, F0):.1e}, A_w vs F1 {_rel(A_w, F1):.1e})"
                )
                if block.bias:
                    (F0b,) = kfacs.pop(0)
                    line += f", bias block G·A[-1,-1] {_rel(block.G * block.A[-1, -1], F0b):.1e}"
                lines.append(line)
        curv, la = done.get(("ours", subset, "diag")), done.get(("theirs", subset, "diag"))
        if curv is not None and la is not None:
            values = []
            for block in curv.blocks.values():
                assert isinstance(block, DiagBlock)
                values.append(block.values.flatten())
            lines.append(f"  {subset:<10} diag vs diag: {_rel(torch.cat(values), la.H):.1e}")
    return lines


def run_problem(name: str, laplace_cls: Any, repeats: int, max_seconds: float) -> None:
    model, loader = PROBLEMS[name]()
    jobs: list[Job] = []
    for subset in ("all", "last_layer"):
        jobs += [
            ours_job(model, loader, subset, "kfac"),
            theirs_job(laplace_cls, model, loader, subset, "kron"),
            ours_job(model, loader, subset, "kfoc"),
            ours_job(model, loader, subset, "diag"),
            theirs_job(laplace_cls, model, loader, subset, "diag"),
        ]
    for job in jobs:
        if job.side == "theirs" and job.structure == "diag":
            _peer_diag_guard(job, model, loader, max_seconds)
            if job.skipped:
                print(f"  [{name}] {job.skipped}", file=sys.stderr, flush=True)

    active = [j for j in jobs if not j.skipped]
    for rnd in range(repeats + 1):  # round 0 is the warm-up
        for job in active:
            if job.skipped:
                continue
            times, result = job.run()
            if rnd == 0:
                if job.side == "theirs" and times["fit"] > max_seconds:
                    job.skipped = (
                        f"their {job.subset} {job.structure} dropped after the warm-up fit took "
                        f"{times['fit']:.0f} s (> {max_seconds:.0f} s)"
                    )
                    print(f"  [{name}] {job.skipped}", file=sys.stderr, flush=True)
                continue
            job.record(times)
            job.result = result
        print(f"  [{name}] round {rnd}/{repeats} done", file=sys.stderr, flush=True)

    def get(side: str, subset: str, structure: str) -> Job | None:
        for j in jobs:
            if (j.side, j.subset, j.structure) == (side, subset, structure) and not j.skipped:
                return j
        return None

    header = (
        f"{'problem':<8}{'subset':<12}{'ours':<10}{'theirs':<26}{'ours s':>9}{'theirs s':>10}"
        f"{'ratio':>8}  target"
    )
    print(header)
    print("-" * len(header))
    for subset in ("all", "last_layer"):
        kron = get("theirs", subset, "kron")
        rows: list[tuple[str, str, float | None, float | None, str]] = []
        for s in ("kfac", "kfoc"):
            ours = get("ours", subset, s)
            t_ours = ours.median("fit") if ours else None
            t_ours_eig = ours.median("fit", "eig") if ours else None
            t_fit = kron.median("fit") if kron else None
            t_noeig = (
                statistics.median(f - d for f, d in zip(kron.times["fit"], kron.times["decompose"]))
                if kron
                else None
            )
            target = f"≤ {TARGETS[s]:.1f}×"
            rows.append((s, "kron fit − decompose", t_ours, t_noeig, target))
            rows.append((f"{s}+eig", "kron fit (incl. eigh)", t_ours_eig, t_fit, target))
        ours, theirs = get("ours", subset, "diag"), get("theirs", subset, "diag")
        rows.append(
            (
                "diag",
                "diag fit" if theirs else "diag fit (skipped)",
                ours.median("fit") if ours else None,
                theirs.median("fit") if theirs else None,
                "",
            )
        )
        for o, t, to, tt, target in rows:
            ratio = to / tt if to is not None and tt else None
            verdict = ""
            if target and ratio is not None:
                limit = TARGETS[o.split("+")[0]]
                verdict = f"{target} their kron: {'ok' if ratio <= limit else 'MISSED'}"
            print(
                f"{name:<8}{subset:<12}{o:<10}{t:<26}"
                f"{_fmt(to, '.3f'):>9}{_fmt(tt, '.3f'):>10}"
                f"{_fmt(ratio, '.2f' if ratio is None or ratio >= 0.1 else '.1e'):>8}  {verdict}"
            )
        if kron:
            f, d = kron.median("fit"), kron.median("decompose")
            print(
                f"{'':<20}(their {subset} kron fit {f:.3f} s, of which H_facs.decompose "
                f"{d:.3f} s = {100 * d / f:.0f}%)"
            )
    for j in jobs:
        if j.skipped:
            print(f"{'':<20}note: {j.skipped}")
    print(f"{'':<20}(load average after {name}: {_load()})")
    lines = sanity(jobs, model)
    if lines:
        print(f"sanity ({name}, float32, relative Frobenius difference ours vs theirs):")
        print("\n".join(lines))
    print()


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--problems", default="digits,wide")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--max-peer-seconds",
        type=float,
        default=180.0,
        help="skip a laplace-torch fit estimated (or measured in the warm-up) to take longer",
    )
    args = parser.parse_args()
    laplace_cls = _import_laplace()
    problems = args.problems.split(",")
    unknown = [p for p in problems if p not in PROBLEMS]
    if unknown:
        parser.error(f"unknown problem(s) {unknown}; valid: {', '.join(PROBLEMS)}")
    print(
        f"torch {torch.__version__}, laplace-torch {_version('laplace-torch')}, curvlinops "
        f"{_version('curvlinops-for-pytorch')}, threads {torch.get_num_threads()}, "
        f"python {sys.version.split()[0]}, load average {_load()}"
    )
    print(
        f"median of {args.repeats} interleaved rounds after 1 warm-up round; ratio = ours / theirs;"
        " fisher exact (type-2), summed over data on both sides"
    )
    print()
    for name in problems:
        run_problem(name, laplace_cls, args.repeats, args.max_peer_seconds)


if __name__ == "__main__":
    main()
