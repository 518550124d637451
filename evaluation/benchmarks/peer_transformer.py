"""A transformer text classifier: what ours and laplace-torch 0.3 can fit, in what time and memory.

Run (in the peer venv, which has laplace-torch but not our project installed)::

    PYTHONPATH=. .bench/venv/bin/python -m evaluation.benchmarks.peer_transformer --threads 1

Without laplace-torch importable it prints only our rows.

Model and data: :func:`evaluation.zoo.text_transformer` (token + position embeddings, a 2-layer
``nn.TransformerEncoder`` with ``nn.MultiheadAttention``, masked mean pooling, LayerNorm, Linear
head; 20,899 parameters at the defaults) trained with Adam (``--epochs``, weight decay 1e-4,
seeded) on :func:`evaluation.zoo.token_task` (``--train`` / ``--test`` sequences of up to 24
tokens, 3 classes).

Inputs: the zoo model is called as ``model(input_ids=..., attention_mask=...)``. laplace-torch
feeds a batch to the model as one positional argument (a tensor, or a whole dict for Hugging Face
models), so both sides get the same thin wrapper :class:`PackedInputs`, which takes a ``[B, 2, T]``
long tensor (ids, mask) and adds no parameters: same model object, same ``DataLoader``, same test
tensor. (Ours would also take the dict batches directly, as ``model(**x)``.)

Jobs, each on a fresh ``copy.deepcopy`` of the trained model (constructors outside the timings):

- ours: ``Laplace(model, structure=s, modules=m, prior_precision=τ).fit(loader)`` for ``s`` in
  kfoc / kfac / diag and ``m`` in all / last_layer (the fit includes the factors' eigh);
- theirs: ``Laplace(model, "classification", subset_of_weights=m, hessian_structure=h,
  prior_precision=τ, backend=b).fit(loader)`` for all: kron, diag, full and last_layer: kron,
  diag, with their default backend (CurvlinopsGGN); ``--peer-backends`` adds AsdlGGN and
  BackPackGGN rows for all: kron / diag.

Columns: ``covered`` is the number of parameters that get a posterior out of all trainable ones
(ours: the parameters in ``Curvature.param_names()``, see ``Curvature.coverage``; theirs:
``la.n_params``). ``fit s``: wall time of ``.fit``. ``fit MiB`` / ``GLM MiB``: peak resident set
during the call minus the resident set at its start (``VmHWM`` from ``/proc/self/status``, reset
through ``/proc/self/clear_refs`` after ``gc.collect()`` and ``malloc_trim(0)``; ``tracemalloc``
does not see torch's allocations; where the reset is not possible the delta of ``ru_maxrss`` is
printed, a lower bound). ``GLM s``: the GLM probit predictive over the test set in chunks of
``--batch`` points (``la.predict(x)`` / ``la(x, pred_type="glm", link_approx="probit")``;
laplace-torch forms the Jacobians of a whole call at once), with test accuracy and NLL. ``ratio``:
ours / theirs for fit, fit memory and GLM time, against their matching row (kron for kfoc and kfac,
diag for diag, same subset).

A job that raises is recorded as ``refused: <exception type>: <first line>`` (not a crash): our
``modules="all"`` raises while our library lacks ``nn.MultiheadAttention`` support. Before the
timed run each job is warmed up (and probed) on one batch (``full``: on one point); a job whose
probe extrapolates past ``--max-seconds`` or half the available memory is skipped with a note.

Prior: a fixed ``τ`` (default ``N · weight_decay``, the training prior on the summed likelihood;
both libraries sum the Fisher over the data, so ``τ`` means the same on both sides), or
``--prior marglik`` (one scalar ``τ`` each: ours ``method="marglik", per_module=False``; theirs
``method="marglik", prior_structure="scalar"``, its 100 Adam steps). Not laplace-torch's
gridsearch: in 0.3 its default ``RunningNLLMetric`` is never reset between grid points
(``laplace.utils.validate`` calls ``loss.compute()`` with no ``loss.reset()``), so each grid
point is scored on the running mean over all points so far and the search ends at an edge.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import importlib.metadata
import os
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import bayes_kfoc
from bayes_kfoc import Laplace as OurLaplace
from evaluation.benchmarks.timing import available_bytes
from evaluation.training import train_map
from evaluation.zoo import text_transformer, token_task

MiB = 2**20
PEER_KRON = {"kfoc": "kron", "kfac": "kron", "diag": "diag"}  # ours → their matching structure


class PackedInputs(nn.Module):
    """``[B, 2, T]`` long (ids, mask) → ``model(input_ids=..., attention_mask=...)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, z: Tensor) -> Tensor:
        return self.model(input_ids=z[:, 0], attention_mask=z[:, 1])


def pack(x: dict[str, Tensor]) -> Tensor:
    return torch.stack([x["input_ids"], x["attention_mask"]], dim=1)


# -- memory -------------------------------------------------------------------------------------
def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the process's resident high-water mark (Linux ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_bytes("VmHWM") is not None


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back to the system
    except (OSError, AttributeError):
        pass


def measured(fn: Callable[[], Any]) -> tuple[Any, float, int]:
    """``(result, seconds, peak extra bytes)`` of one call of ``fn``."""
    _trim()
    if _reset_peak():
        base = _status_bytes("VmRSS") or 0
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
        return out, seconds, (_status_bytes("VmHWM") or 0) - base
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    return out, seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base


def memory_method() -> str:
    if _reset_peak():
        return "peak RSS (VmHWM, reset before each call) minus RSS at its start"
    return "ru_maxrss delta (a lower bound: the process high-water mark cannot be reset here)"


# -- jobs ---------------------------------------------------------------------------------------
@dataclass
class Job:
    side: str  # "ours" or "theirs"
    subset: str  # "all" or "last_layer"
    structure: str  # ours: kfoc/kfac/diag; theirs: kron/diag/full
    backend: str  # "" for ours
    build: Callable[[], Any]  # → an unfitted Laplace on a fresh model copy
    fit: Callable[[Any, DataLoader], Any]
    tune: Callable[[Any], float]  # installs the prior, returns the scalar τ used
    predict: Callable[[Any, Tensor], Tensor]
    covered: Callable[[Any], int]
    status: str = "ok"
    fit_s: list[float] = field(default_factory=list)
    glm_s: list[float] = field(default_factory=list)
    fit_bytes: int | None = None
    glm_bytes: int | None = None
    n_covered: int | None = None
    tau: float | None = None
    probs: Tensor | None = None

    @property
    def name(self) -> str:
        extra = f" ({self.backend})" if self.backend else ""
        return f"{self.side} {self.subset} {self.structure}{extra}"

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def ours_job(model: nn.Module, subset: str, structure: str, prior: str, tau0: float) -> Job:
    def build() -> OurLaplace:
        return OurLaplace(
            copy.deepcopy(model),
            structure=structure,
            modules=subset,
            prior_precision=tau0,
            progress=False,
        )

    def tune(la: OurLaplace) -> float:
        if prior == "marglik":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                la.optimize_prior_precision(method="marglik", per_module=False)
        return float(la.prior_precision.flatten()[0])

    def covered(la: OurLaplace) -> int:
        assert la.curvature is not None
        names = set(la.curvature.param_names())
        return sum(p.numel() for n, p in la.model.named_parameters() if n in names)

    return Job(
        "ours",
        subset,
        structure,
        "",
        build,
        fit=lambda la, loader: la.fit(loader),
        tune=tune,
        predict=lambda la, x: la.predict(x, link="probit"),
        covered=covered,
    )


def theirs_job(
    laplace_cls: Any,
    backend_cls: Any,
    model: nn.Module,
    subset: str,
    structure: str,
    prior: str,
    tau0: float,
) -> Job:
    def build() -> Any:
        return laplace_cls(
            copy.deepcopy(model),
            "classification",
            subset_of_weights=subset,
            hessian_structure=structure,
            prior_precision=tau0,
            backend=backend_cls,
        )

    def tune(la: Any) -> float:
        if prior == "marglik":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                la.optimize_prior_precision(
                    pred_type="glm",
                    method="marglik",
                    prior_structure="scalar",
                    link_approx="probit",
                )
        return float(torch.as_tensor(la.prior_precision).flatten()[0])

    def predict(la: Any, x: Tensor) -> Tensor:
        return la(x, pred_type="glm", link_approx="probit")

    return Job(
        "theirs",
        subset,
        structure,
        backend_cls.__name__,
        build,
        fit=lambda la, loader: la.fit(loader),
        tune=tune,
        predict=predict,
        covered=lambda la: int(la.n_params),
    )


def probe(job: Job, loader: DataLoader, x_test: Tensor, n_params: int, max_seconds: float) -> None:
    """Warm-up and feasibility check on a small loader; sets ``job.status`` if it fails."""
    full = job.structure == "full"
    avail = available_bytes()
    if full and avail is not None and 3 * 4 * n_params**2 > avail / 2:
        job.status = (
            f"skipped: a dense [{n_params}, {n_params}] precision with its inverse and "
            f"an identity takes {3 * 4 * n_params**2 / 2**30:.1f} GiB, "
            f"{avail / 2**30:.1f} GiB available"
        )
        return
    batch = loader.batch_size or 1
    points = 1 if full else min(batch, len(loader.dataset))  # type: ignore[arg-type]
    small = DataLoader(Subset(loader.dataset, range(points)), batch_size=points)
    try:
        la = job.build()
        _, seconds, peak = measured(lambda: job.fit(la, small))
        job.tune(la)
        _, _, glm_peak = measured(lambda: job.predict(la, x_test[:8]))
    except Exception as e:  # a refusal, recorded rather than raised
        job.status = f"refused: {_first_line(e)}"
        return
    n = len(loader.dataset)  # type: ignore[arg-type]
    est_s, est_b = seconds * n / points, peak * batch / points
    est_glm = glm_peak * batch / 8
    if est_s > max_seconds:
        job.status = (
            f"skipped: a probe on {points} point(s) took {seconds:.1f} s, "
            f"~{est_s:.0f} s for {n} points (> --max-seconds {max_seconds:.0f})"
        )
    elif avail is not None and est_b > avail / 2:
        job.status = (
            f"skipped: a probe on {points} point(s) peaked at {peak / MiB:.0f} MiB, "
            f"~{est_b / 2**30:.1f} GiB per batch of {batch}, {avail / 2**30:.1f} GiB available"
        )
    elif avail is not None and est_glm > avail / 2:
        job.status = (
            f"skipped: its GLM predictive on 8 points peaked at {glm_peak / MiB:.0f} MiB, "
            f"~{est_glm / 2**30:.1f} GiB per batch of {batch}, {avail / 2**30:.1f} GiB available"
        )


def run_job(job: Job, loader: DataLoader, x_test: Tensor, batch: int) -> None:
    try:
        la = job.build()
        _, fit_s, fit_b = measured(lambda: job.fit(la, loader))
        tau = job.tune(la)
        probs, glm_s, glm_b = measured(
            lambda: torch.cat([job.predict(la, x) for x in x_test.split(batch)])
        )
    except Exception as e:
        job.status = f"refused: {_first_line(e)}"
        return
    job.fit_s.append(fit_s)
    job.glm_s.append(glm_s)
    if job.fit_bytes is None:  # memory of the first timed run
        job.fit_bytes, job.glm_bytes = fit_b, glm_b
    job.n_covered, job.tau, job.probs = job.covered(la), tau, probs.detach()


# -- report -------------------------------------------------------------------------------------
def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or not b:
        return "—"
    r = a / b
    return f"{r:.2f}" if r >= 0.01 else f"{r:.1e}"


def report(jobs: list[Job], y_test: Tensor, total: int) -> None:
    def peer(job: Job) -> Job | None:
        for j in jobs:
            if (
                j.side == "theirs"
                and j.ok
                and j.backend == "CurvlinopsGGN"
                and j.subset == job.subset
                and j.structure == PEER_KRON.get(job.structure)
            ):
                return j
        return None

    notes: dict[str, str] = {}  # a refusal's or skip's text → its footnote mark
    for j in jobs:
        if not j.ok and j.status not in notes:
            notes[j.status] = f"[{chr(ord('a') + len(notes))}]"
    print(
        "| side | subset | structure | status | covered | fit s | fit MiB | GLM s | GLM MiB "
        "| acc | NLL | τ | ratio fit / MiB / GLM |"
    )
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for j in jobs:
        structure = j.structure + (f" ({j.backend})" if j.backend else "")
        if not j.ok:
            status = f"{j.status.split(':')[0]} {notes[j.status]}"
            print(f"| {j.side} | {j.subset} | {structure} | {status} " + "| " * 9 + "|")
            continue
        assert j.probs is not None
        fit_s, glm_s = statistics.median(j.fit_s), statistics.median(j.glm_s)
        acc = float((j.probs.argmax(-1) == y_test).float().mean())
        nll = float(-j.probs.gather(1, y_test[:, None]).clamp_min(1e-12).log().mean())
        fit_mib = (j.fit_bytes or 0) / MiB
        glm_mib = (j.glm_bytes or 0) / MiB
        ratio = ""
        p = peer(j) if j.side == "ours" else None
        if p is not None:
            ratio = " / ".join(
                (
                    _ratio(fit_s, statistics.median(p.fit_s)),
                    _ratio(j.fit_bytes, p.fit_bytes),
                    _ratio(glm_s, statistics.median(p.glm_s)),
                )
            )
            ratio += f" (vs their {p.structure})"
        elif j.side == "ours":
            ran = any(k.side == "theirs" for k in jobs)
            ratio = "— (their match refused)" if ran else "— (no peer run)"
        print(
            f"| {j.side} | {j.subset} | {structure} | ok | {j.n_covered:,} / {total:,} "
            f"| {fit_s:.3f} | {fit_mib:.0f} | {glm_s:.3f} | {glm_mib:.0f} | {acc:.3f} "
            f"| {nll:.3f} | {_fmt(j.tau, '.3g')} | {ratio} |"
        )
    if notes:
        print()
    for text, mark in notes.items():
        print(f"{mark} {text}")
    lines = []
    for j in jobs:
        p = peer(j) if j.side == "ours" and j.ok and j.structure != "kfoc" else None
        if p is not None and j.probs is not None and p.probs is not None:
            d = float((j.probs - p.probs).abs().max())
            lines.append(f"  {j.subset:<10} ours {j.structure} vs their {p.structure}: {d:.1e}")
    if lines:
        print("\nsanity: max |Δp| between ours and theirs on the test set (same τ with a fixed")
        print(
            "prior; diag vs diag: the same exact diagonal GGN; their kron splits weight and bias):"
        )
        print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", type=int, default=1024)
    parser.add_argument("--test", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per job (median)")
    parser.add_argument("--prior", choices=["fixed", "marglik"], default="fixed")
    parser.add_argument(
        "--prior-precision", type=float, default=None, help="fixed τ (default N·weight_decay)"
    )
    parser.add_argument(
        "--peer-backends",
        default="curvlinops,asdl,backpack",
        help="laplace-torch backends for the all-weights kron/diag rows (curvlinops always runs)",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=600.0,
        help="skip a fit whose one-batch probe extrapolates past this",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        from laplace import Laplace as TheirLaplace
        from laplace.curvature import AsdlGGN, BackPackGGN, CurvlinopsGGN
    except ImportError as e:
        TheirLaplace = None
        print(f"laplace-torch not importable in {sys.executable} ({e}): our rows only\n")

    print(
        f"torch {torch.__version__}, laplace-torch {_version('laplace-torch')}, curvlinops "
        f"{_version('curvlinops-for-pytorch')}, backpack {_version('backpack-for-pytorch')}, "
        f"asdfghjkl {_version('asdfghjkl')}, bayes-kfoc {bayes_kfoc.__version__}, "
        f"python {sys.version.split()[0]}"
    )
    print(
        f"threads {torch.get_num_threads()}, MHA fast path "
        f"{'on' if torch.backends.mha.get_fastpath_enabled() else 'off'}, "
        f"load average at start {_load()}"
    )

    x, y = token_task(args.train + args.test, seed=args.seed)
    xs = pack(x)
    train = TensorDataset(xs[: args.train], y[: args.train])
    x_test, y_test = xs[args.train :], y[args.train :]
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model: nn.Module = PackedInputs(text_transformer(50, 3))
    model = train_map(
        model, train, epochs=args.epochs, weight_decay=args.weight_decay, seed=args.seed
    )
    train_s = time.perf_counter() - t0
    with torch.no_grad():
        p_map = torch.softmax(model(x_test), -1)
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tau0 = (
        args.prior_precision if args.prior_precision is not None else args.train * args.weight_decay
    )
    print(
        f"text_transformer (vocab 50, dim 32, 2 layers, 4 heads, ff 64): {total:,} parameters, "
        f"{args.epochs} epochs of Adam in {train_s:.1f} s; {args.train} train / {args.test} test "
        f"sequences, batch {args.batch}; MAP test acc "
        f"{float((p_map.argmax(-1) == y_test).float().mean()):.3f}, NLL "
        f"{float(-p_map.gather(1, y_test[:, None]).log().mean()):.3f}"
    )
    prior = f"fixed τ = {tau0:.3g}" if args.prior == "fixed" else f"marglik from τ = {tau0:.3g}"
    print(
        f"prior: {prior}; memory: {memory_method()}; median of {args.repeats} timed run(s) "
        "after a one-batch warm-up\n"
    )

    loader = DataLoader(train, batch_size=args.batch)
    jobs: list[Job] = []
    for subset in ("all", "last_layer"):
        for s in ("kfoc", "kfac", "diag"):
            jobs.append(ours_job(model, subset, s, args.prior, tau0))
    if TheirLaplace is not None:
        backends = {"curvlinops": CurvlinopsGGN, "asdl": AsdlGGN, "backpack": BackPackGGN}
        extra = [b for b in args.peer_backends.split(",") if b and b != "curvlinops"]
        unknown = [b for b in extra if b not in backends]
        if unknown:
            parser.error(f"unknown --peer-backends {unknown}; valid: {', '.join(backends)}")
        plan = [("all", h, CurvlinopsGGN) for h in ("kron", "diag", "full")]
        plan += [("all", h, backends[b]) for b in extra for h in ("kron", "diag")]
        plan += [("last_layer", h, CurvlinopsGGN) for h in ("kron", "diag")]
        for subset, h, backend in plan:
            jobs.append(theirs_job(TheirLaplace, backend, model, subset, h, args.prior, tau0))

    for job in jobs:
        probe(job, loader, x_test, total, args.max_seconds)
        print(f"  probe {job.name}: {job.status} (load {_load()})", file=sys.stderr, flush=True)
    for rnd in range(args.repeats):
        for job in jobs:
            if job.ok:
                run_job(job, loader, x_test, args.batch)
                took = f"{job.fit_s[-1]:.2f} s" if job.ok else job.status
                print(
                    f"  round {rnd + 1}/{args.repeats} {job.name}: {took} (load {_load()})",
                    file=sys.stderr,
                    flush=True,
                )

    report(jobs, y_test, total)
    print(f"\nload average at end {_load()}")


if __name__ == "__main__":
    main()
