"""The GLM predictive and tuning at real size (issue 20), each ratio measured in one process.

Sections (``--sections``, default all; each runs in its own subprocess so that its peak memory is
its own):

- ``head``: a last-layer K-FOC posterior over a 512 → C head (a 128 → 512 ReLU trunk), the GLM
  probit predictive (closed form) against the network's forward over the same points, at
  ``C = 1,000`` and ``4,000``; at 4,000 also against the floor of the exact variance diagonal
  (``(Q_G²) s``: one ``[B, C] × [C, C]`` product in G's eigenbasis, timed alone);
- ``mlp``: an all-weights K-FAC MLP (64 → 256 → 256 → C): the GLM (``glm="auto"``, and the
  path it chose) at ``C = 10`` and ``C = 1,000``, their ratio, and the exact path at 1,000;
- ``resnet``: ResNet-18 (``evaluation.zoo_resnet``, full width, 3×32×32, 10 classes, all weights,
  ``--resnet-structure``, default ``kfac``: its Kronecker factors' float32 eigendecompositions
  are redone in float64 where they fail) over ``--resnet-points`` points: forward, GLM auto
  (and the path), exact and sampled;
- ``peer`` (only in the benchmark venv with laplace-torch 0.3, not in the default sections):
  laplace-torch's last-layer ``kron`` GLM probit at ``C = 1,000`` on the ``head`` model, fed in
  slices of 4 points, against our last-layer K-FAC on the same points (same prior precision);
- ``tune``: the same ResNet-18, ``optimize_prior_precision(val_loader=...)`` on
  ``--val-points`` points: time against one exact GLM pass over them, and the peak extra
  resident memory (``/proc/self/statm`` sampled every 20 ms from a thread).

Every line prints the load average next to it. The posterior's values do not change the cost
(fitted on random data). Run: ``python -m evaluation.benchmarks.glm_scale [--sections head,mlp]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bayes_kfoc import Laplace
from bayes_kfoc.laplace import _glm_pass as glm_pass
from bayes_kfoc.laplace._glm import BlockVariance, block_variance
from bayes_kfoc.stats.kron import KronStats, SharedStats
from evaluation.benchmarks.timing import median_time

MiB = 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Peak resident set size above the level at entry, sampled from a thread."""

    def __enter__(self) -> PeakRss:
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def extra_mib(self) -> float:
        return (self.peak - self.base) / MiB


def _load() -> str:
    return "load " + "/".join(f"{v:.2f}" for v in os.getloadavg())


def _forward(model: nn.Module, x: torch.Tensor, chunk: int = 256) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            for xb in x.split(chunk):
                model(xb)

    return run


def head(points: int, repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in (1000, 4000):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(128, 512), nn.ReLU(), nn.Linear(512, c)).eval()
        xf = torch.randn(512, 128)
        yf = torch.randint(0, c, (512,))
        la = Laplace(model, modules="last_layer", fisher="mc", progress=False)
        la.fit([(xf[i : i + 128], yf[i : i + 128]) for i in range(0, 512, 128)])
        la.prior_precision = 1.0
        x = torch.randn(points, 128)
        t_fwd, _ = median_time(_forward(model, x), repeats, warmup=True)
        with PeakRss() as mem:
            t_glm, _ = median_time(lambda la=la, x=x: la.predict(x), repeats, warmup=True)
        plan = la.last_glm
        assert plan is not None
        block = la.blocks["2"]
        _, _, _, qg = block.eigh()  # type: ignore[attr-defined]
        s = torch.rand(min(points, plan.chunk_size), c)
        q2 = qg.square()

        def floor(s: torch.Tensor = s, q2: torch.Tensor = q2) -> None:
            for _ in range(0, points, s.shape[0]):
                s @ q2.T

        t_floor, _ = median_time(floor, repeats, warmup=True)
        out[str(c)] = {
            "forward_s": t_fwd,
            "glm_s": t_glm,
            "glm_per_forward": t_glm / t_fwd,
            "floor_s": t_floor,
            "glm_per_floor": t_glm / t_floor,
            "ms_per_point": 1e3 * t_glm / points,
            "closed_form": list(plan.closed_form),
            "peak_extra_mib": mem.extra_mib,
            "load": _load(),
        }
    return out


def mlp(points: int, repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in (10, 1000):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, c)
        ).eval()
        xf, yf = torch.randn(512, 64), torch.randint(0, c, (512,))
        la = Laplace(model, structure="kfac", fisher="mc", progress=False)
        la.fit([(xf[i : i + 128], yf[i : i + 128]) for i in range(0, 512, 128)])
        la.prior_precision = 1.0
        x = torch.randn(points, 64)
        gen = torch.Generator().manual_seed(0)
        t_fwd, _ = median_time(_forward(model, x), repeats, warmup=True)
        t_auto, _ = median_time(
            lambda la=la, x=x, gen=gen: la.predict(x, generator=gen), repeats, warmup=True
        )
        plan = la.last_glm
        assert plan is not None
        row = {
            "forward_s": t_fwd,
            "glm_auto_s": t_auto,
            "path": plan.path.value,
            "closed_form": list(plan.closed_form),
            "load": _load(),
        }
        if c == 1000:
            t_s32, _ = median_time(
                lambda la=la, x=x, gen=gen: la.predict(x, generator=gen, n_samples=32), repeats
            )
            row["glm_sampled_S32_s"] = t_s32
            few = x[: max(points // 16, 8)]
            t_exact, _ = median_time(lambda la=la, x=few: la.predict(x, glm="exact"), 1)
            row["exact_s_per_point"] = t_exact / len(few)
        out[str(c)] = row
    out["ratio_1000_over_10"] = out["1000"]["glm_auto_s"] / out["10"]["glm_auto_s"]
    out["ratio_1000_S32_over_10"] = out["1000"]["glm_sampled_S32_s"] / out["10"]["glm_auto_s"]
    return out


STRUCTURE = os.environ.get("GLM_SCALE_RESNET_STRUCTURE", "kfac")


def _resnet(points: int) -> tuple[Laplace, nn.Module]:
    from evaluation.zoo_resnet import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=10).eval()
    xf, yf = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    la = Laplace(model, structure=STRUCTURE, progress=False).fit(
        [(xf[:8], yf[:8]), (xf[8:], yf[8:])]
    )
    la.prior_precision = 1.0
    return la, model


def resnet(points: int, samples: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    la, model = _resnet(points)
    fit_s = time.perf_counter() - t0
    x = torch.randn(points, 3, 32, 32)
    t_fwd, _ = median_time(_forward(model, x), 3, warmup=True)
    out: dict[str, Any] = {"fit_s": fit_s, "forward_s": t_fwd, "points": points}
    gen = torch.Generator().manual_seed(0)
    factored = SharedStats.rotated_grads
    for name, kw in (
        ("auto", {}),
        ("exact", {"glm": "exact"}),
        ("sampled", {"glm": "sampled"}),
        (f"sampled_S{samples}", {"glm": "sampled", "n_samples": samples}),
        ("exact_formed_rotation", {"glm": "exact"}),  # the exact path as it was before
        ("exact_again", {"glm": "exact"}),  # and as it is now, after it (drift check)
    ):
        if name == "exact_again":
            SharedStats.rotated_grads = factored  # type: ignore[method-assign]
            glm_pass.block_variance = block_variance
        if name == "exact_formed_rotation":  # before: every M formed, then rotated (reference)
            SharedStats.rotated_grads = KronStats.rotated_grads  # type: ignore[method-assign]
            glm_pass.block_variance = lambda st, block, tau: BlockVariance(st, block)(tau)
        with PeakRss() as mem:
            t, _ = median_time(lambda kw=kw: la.predict(x, generator=gen, **kw), 1)
        plan = la.last_glm
        assert plan is not None
        out[name] = {
            "s": t,
            "per_forward": t / t_fwd,
            "path": plan.path.value,
            "samples": plan.samples,
            "chunk": plan.chunk_size,
            "peak_extra_mib": mem.extra_mib,
            "load": _load(),
        }
    SharedStats.rotated_grads = factored  # type: ignore[method-assign]
    glm_pass.block_variance = block_variance
    out["exact_speedup_over_before"] = out["exact_formed_rotation"]["s"] / out["exact"]["s"]
    return out


def tune(points: int) -> dict[str, Any]:
    la, _ = _resnet(points)
    xv, yv = torch.randn(points, 3, 32, 32), torch.randint(0, 10, (points,))
    with PeakRss() as glm_mem:
        t_glm, _ = median_time(lambda: la.predict(xv, glm="exact"), 1)
    with PeakRss() as mem:
        t0 = time.perf_counter()
        la.optimize_prior_precision(
            val_loader=[(xv[i : i + 32], yv[i : i + 32]) for i in range(0, points, 32)]
        )
        t_tune = time.perf_counter() - t0
    assert la.tuning is not None
    return {
        "points": points,
        "glm_exact_s": t_glm,
        "glm_peak_extra_mib": glm_mem.extra_mib,
        "tune_s": t_tune,
        "tune_per_glm": t_tune / t_glm,
        "tune_peak_extra_mib": mem.extra_mib,
        "scales_scored": len(la.tuning.scores),
        "scale": la.tuning.scale,
        "load": _load(),
    }


def peer(points: int, fit_points: int = 16) -> dict[str, Any]:
    """laplace-torch 0.3 ``last_layer`` / ``kron`` on the ``head`` section's C = 1,000 model, the
    GLM probit predictive fed in slices of 4 points (in one call it asks for the whole
    ``[B, C, P]`` Jacobian), against ours on the same points in the same process."""
    from torch.utils.data import DataLoader, TensorDataset

    try:
        from laplace import Laplace as PeerLaplace
    except ImportError as e:  # not in the benchmark venv
        return {"error": f"laplace-torch is not importable: {e}"}
    c = 1000
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 512), nn.ReLU(), nn.Linear(512, c)).eval()
    xf, yf = torch.randn(512, 128), torch.randint(0, c, (512,))
    x = torch.randn(points, 128)
    theirs = PeerLaplace(
        model, "classification", subset_of_weights="last_layer", hessian_structure="kron"
    )
    t0 = time.perf_counter()  # batches of 1: its fit holds a [B, C, P] Jacobian (OOM at 128)
    theirs.fit(DataLoader(TensorDataset(xf[:fit_points], yf[:fit_points]), batch_size=1))
    fit_theirs = time.perf_counter() - t0
    t0 = time.perf_counter()
    with PeakRss() as mem_theirs:
        p_theirs = torch.cat(
            [theirs(xb, pred_type="glm", link_approx="probit") for xb in x.split(4)]
        )
    t_theirs = time.perf_counter() - t0
    ours = Laplace(model, structure="kfac", modules="last_layer", progress=False)
    t0 = time.perf_counter()
    ours.fit([(xf[:fit_points], yf[:fit_points])])
    fit_ours = time.perf_counter() - t0
    ours.prior_precision = float(theirs.prior_precision)
    with PeakRss() as mem_ours:
        t_ours, p_ours = median_time(lambda: ours.predict(x), 3, warmup=True)
    return {
        "points": points,
        "theirs_ms_per_point": 1e3 * t_theirs / points,
        "ours_ms_per_point": 1e3 * t_ours / points,
        "speedup": t_theirs / t_ours,
        "theirs_fit_s": fit_theirs,
        "ours_fit_s": fit_ours,
        "theirs_peak_extra_mib": mem_theirs.extra_mib,
        "ours_peak_extra_mib": mem_ours.extra_mib,
        "max_abs_prob_diff": float((p_theirs - p_ours).abs().max()),
        "load": _load(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sections", default="head,mlp,resnet,tune")
    parser.add_argument("--points", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resnet-points", type=int, default=8)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--val-points", type=int, default=64)
    parser.add_argument("--peer-points", type=int, default=16)
    parser.add_argument("--resnet-structure", default="kfac", help="ResNet-18's posterior")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["GLM_SCALE_RESNET_STRUCTURE"] = args.resnet_structure  # read by the workers
    if args.worker is not None:
        torch.set_num_threads(int(os.environ.get("GLM_SCALE_THREADS", torch.get_num_threads())))
        jobs: dict[str, Callable[[], dict[str, Any]]] = {
            "head": lambda: head(args.points, args.repeats),
            "mlp": lambda: mlp(args.points, args.repeats),
            "resnet": lambda: resnet(args.resnet_points, args.samples),
            "tune": lambda: tune(args.val_points),
            "peer": lambda: peer(args.peer_points),
        }
        print(json.dumps(jobs[args.worker]()))
        return
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {_load()}")
    for section in args.sections.split(","):
        cmd = [sys.executable, "-m", "evaluation.benchmarks.glm_scale", *sys.argv[1:]]
        cmd += ["--worker", section]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            print(f"\n[{section}] failed:\n{res.stderr[-3000:]}")
            continue
        print(f"\n[{section}]")
        print(json.dumps(json.loads(res.stdout.strip().splitlines()[-1]), indent=1))


if __name__ == "__main__":
    main()
