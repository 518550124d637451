"""Peak host memory of the GLM predictive and of a cached K-FOC fit, measured, against the
library's own accounting.

Run::

    .venv/bin/python -m evaluation.benchmarks.memory            # every case (minutes)
    .venv/bin/python -m evaluation.benchmarks.memory --quick    # 10 cases, about 1 minute

What is measured, and how
    Every case runs in a fresh Python subprocess (this script with ``--worker``), CPU, float32,
    one thread. The worker builds a seeded MLP ``32-H-C`` (tanh, eval mode) and seeded Gaussian
    data, runs the measured call once on 4 points (warm-up: kernels, lazy imports), reads its
    resident set (``/proc/self/statm``), runs the call, and reports ``ru_maxrss`` (the process's
    high-water resident set, ``resource.getrusage``) minus that: the extra memory the call
    needed at its peak, every tensor torch allocated included (``tracemalloc`` does not see
    torch).

    - ``glm``: a last-layer K-FOC ``Laplace`` (``chunk_size=256``) and one call on ``B`` points
      of ``predict(link="probit")``, ``predict(link="mc", n_samples=S)`` or
      ``glm_distribution``. ``model`` is what the call must hold at least: one chunk's Jacobian
      statistics (``min(B, 256)·C·(C + H + 1)`` numbers: ``e_c`` directions at the last layer's
      ``C`` outputs, and its inputs) plus the result (``B·C`` probabilities, or ``B·C`` means and
      the ``B·C²`` covariance), in float32. A ratio that stays flat as ``B`` grows is memory
      bounded by ``chunk_size``.
    - ``fit``: ``fit_curvature(model, loader, "kfoc", mode="cached")`` over ``N`` points in
      batches of ``b``; ``estimate`` is ``curv.info["peak_bytes_estimate"]``.

    The table prints ``measured / model`` (``glm``) and ``measured / estimate`` (``fit``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from typing import Any

MiB = 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(case: dict[str, Any]) -> dict[str, Any]:
    import torch
    from torch import nn

    from bayes_kfoc import Laplace, fit_curvature

    torch.set_num_threads(1)
    torch.manual_seed(0)
    c, h = case["classes"], case["hidden"]
    model = nn.Sequential(nn.Linear(32, h), nn.Tanh(), nn.Linear(h, c)).eval()
    if case["kind"] == "fit":
        n, b = case["points"], case["batch"]
        x, y = torch.randn(n, 32), torch.randint(0, c, (n,))
        loader = [(x[i : i + b], y[i : i + b]) for i in range(0, n, b)]
        fit_curvature(model, [(x[:4], y[:4])], progress=False, max_iter=2)
        base = _rss()
        curv = fit_curvature(
            model, loader, progress=False, mode="cached", memory_budget=2**40, max_iter=5
        )
        measured = _peak() - base
        return {"measured": measured, "reference": curv.info["peak_bytes_estimate"]}
    train = [(torch.randn(256, 32), torch.randint(0, c, (256,)))]
    la = Laplace(model, modules="last_layer", progress=False).fit(train)
    x = torch.randn(case["batch"], 32)
    call = {
        "probit": lambda z: la.predict(z, link="probit"),
        "mc": lambda z: la.predict(z, link="mc", n_samples=case["samples"]),
        "distribution": lambda z: la.glm_distribution(z),
    }[case["call"]]
    call(x[:4])
    base = _rss()
    out = call(x)
    measured = _peak() - base
    chunk = min(case["batch"], la.chunk_size) * c * (c + h + 1) * 4  # one chunk's Jacobians
    outs = out if isinstance(out, tuple) else (out,)
    size = chunk + sum(t.numel() * t.element_size() for t in outs)
    return {"measured": measured, "reference": size}


def cases(quick: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for c in [200] if quick else [10, 100, 300, 1000]:
        for b in [256, 2048, 8192] if quick else [256, 1024, 4096]:
            # link="mc" and the covariance eigendecompose [C, C] per point: C <= 300 only
            for call in ("probit", "mc", "distribution") if c <= 300 else ("probit",):
                if call == "distribution" and b * c * c * 4 > 2**30:
                    continue  # the full covariance alone would be over 1 GiB
                case = {"kind": "glm", "call": call, "classes": c, "hidden": 64, "batch": b}
                out.append({**case, "samples": 32})
    fits = [(1000, 64, 256, 64), (400, 64, 256, 64), (100, 256, 2048, 256), (10, 512, 4096, 1024)]
    for c, b, n, h in fits[1:3] if quick else fits:
        out.append({"kind": "fit", "classes": c, "batch": b, "points": n, "hidden": h})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    with open("/proc/loadavg") as f:
        print(f"load average before: {f.read().strip()}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print(f"{'case':<46} {'measured':>10} {'model/est.':>10} {'ratio':>6}", flush=True)
    for case in cases(args.quick):
        proc = subprocess.run(
            [sys.executable, "-m", "evaluation.benchmarks.memory", "--worker", json.dumps(case)],
            capture_output=True, text=True, env=env, check=True,
        )  # fmt: skip
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        if case["kind"] == "fit":
            name = f"fit C={case['classes']} b={case['batch']} N={case['points']}"
            name += f" H={case['hidden']}"
        else:
            name = f"glm {case['call']} C={case['classes']} B={case['batch']}"
        ratio = res["measured"] / res["reference"]
        print(
            f"{name:<46} {res['measured'] / MiB:>8.0f}Mi {res['reference'] / MiB:>8.1f}Mi "
            f"{ratio:>6.2f}",
            flush=True,
        )
    with open("/proc/loadavg") as f:
        print(f"load average after: {f.read().strip()}")


if __name__ == "__main__":
    main()
