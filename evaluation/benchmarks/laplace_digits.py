"""Laplace on digits: calibration, fit time and prediction throughput, ours against laplace-torch.

Seeded MAP MLP 64-128-128-10 on scikit-learn digits (60/20/20 split). For diag, K-FAC and K-FOC,
on all weights and on the last layer, with the library's default tuning (validation grid search
on NLL, GLM-probit predictive), the script prints test accuracy, NLL, ECE, fit and tuning time.

When ``laplace`` (laplace-torch 0.3) is importable, the same runs are made with it on the same MAP
and loaders, in the same process, with its post-hoc marglik tuning (its documented default) and
with its validation grid search; and the prediction throughput of both libraries is compared on
the test set: GLM-probit, and Monte-Carlo with 100 weight samples (laplace-torch ``nn``), median of
``--repeats`` timings, after a warm-up.

Run (ours only): ``python -m evaluation.benchmarks.laplace_digits``
Run (with laplace-torch, in the benchmark venv, see BENCHMARKS.md):
``PYTHONPATH=. .bench/venv/bin/python -m evaluation.benchmarks.laplace_digits``
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import time
from typing import Any

import torch
from torch.utils.data import DataLoader

from bayes_kfoc import Laplace
from bayes_kfoc.laplace.predictive import logits_at
from datasets import load_dataset
from evaluation.benchmarks.timing import median_time
from evaluation.metrics import accuracy, ece, nll
from evaluation.models import mlp
from evaluation.training import train_map

try:  # optional peer, never a dependency
    import laplace as peer
except ImportError:  # pragma: no cover - depends on the environment
    peer = None


def mc_floor(la: Laplace, x: torch.Tensor, repeats: int, n: int = 100) -> float:
    """Seconds for ``n`` vmapped forward passes at the MAP plus ``n·P`` standard normal draws.

    Every weight-sampling predictive with ``n`` samples pays at least these two (the draws, and
    the network at ``n`` parameter vectors), whatever its sampler.
    """
    thetas = la.map_vector.unsqueeze(0).expand(n, -1)
    t_fwd, _ = median_time(lambda: logits_at(la.model, thetas, x), repeats, warmup=True)
    t_rng, _ = median_time(lambda: torch.randn(n, la.num_params), repeats, warmup=True)
    return t_fwd + t_rng


def ece_difference(
    probs: torch.Tensor, probs_map: torch.Tensor, labels: torch.Tensor, n: int = 500
) -> tuple[float, float, float]:
    """``(5%, observed, 95%)`` of ``ECE(probs) − ECE(probs_map)`` over bootstrap test sets."""
    p, q = probs.detach().double(), probs_map.detach().double()
    gen = torch.Generator().manual_seed(0)
    diffs = []
    for _ in range(n):
        i = torch.randint(0, len(labels), (len(labels),), generator=gen)
        diffs.append(ece(p[i], labels[i]) - ece(q[i], labels[i]))
    d = torch.tensor(diffs)
    return float(d.quantile(0.05)), ece(p, labels) - ece(q, labels), float(d.quantile(0.95))


def row(name: str, probs: torch.Tensor, labels: torch.Tensor, extra: str = "") -> None:
    p = probs.detach().double()
    p = p / p.sum(-1, keepdim=True)
    print(
        f"{name:<34}{accuracy(p, labels):>7.3f}{nll(p, labels):>8.3f}{ece(p, labels):>8.3f}  "
        + extra
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--peer-tuning",
        default="marglik,gridsearch",
        help="laplace-torch tunings to run (its gridsearch takes minutes: its GLM is slow)",
    )
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    splits = load_dataset("digits", seed=args.seed)
    model = train_map(mlp(64, 10), splits.train, epochs=args.epochs, seed=args.seed)
    train = DataLoader(splits.train, batch_size=128)
    val = DataLoader(splits.val, batch_size=512)
    xt, yt = splits.test.tensors
    version = importlib.metadata.version("laplace-torch") if peer else "not importable"
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, laplace-torch {version}")
    print(f"{'method':<34}{'acc':>7}{'NLL':>8}{'ECE':>8}  details")
    with torch.no_grad():
        p_map = torch.softmax(model(xt), -1)
    row("MAP", p_map, yt)

    ours: dict[str, Laplace] = {}
    for subset in ["all", "last_layer"]:
        for structure in ["diag", "kfac", "kfoc"]:
            la = Laplace(model, structure=structure, modules=subset, progress=False)
            t_fit, _ = median_time(lambda la=la: la.fit(train), 3, warmup=True)
            t0 = time.perf_counter()
            la.optimize_prior_precision(val_loader=val)
            t_tune = time.perf_counter() - t0
            tau = la.prior_precision[0].item()
            row(
                f"ours {structure} {subset}",
                la.predict(xt),
                yt,
                f"fit {t_fit:.3f}s tune {t_tune:.2f}s tau {tau:.3g}",
            )
            ours[f"{structure}-{subset}"] = la

    for key in ["kfoc-all", "kfoc-last_layer"]:
        lo, mid, hi = ece_difference(ours[key].predict(xt), p_map, yt)
        print(
            f"ECE({key}) − ECE(MAP) = {mid:+.4f}, 90% bootstrap interval [{lo:+.4f}, {hi:+.4f}] "
            "(500 resamples of the test set, seed 0)"
        )

    if peer is None:
        print("\nlaplace-torch is not importable here: peer rows and throughput ratios skipped.")
        return
    theirs: dict[str, Any] = {}
    for subset in ["all", "last_layer"]:
        for structure in ["diag", "kron"]:
            for tuning in args.peer_tuning.split(","):
                net = copy.deepcopy(model)
                lt = peer.Laplace(
                    net, "classification", subset_of_weights=subset, hessian_structure=structure
                )
                t0 = time.perf_counter()
                lt.fit(train)
                t_fit = time.perf_counter() - t0
                if tuning == "marglik":
                    lt.optimize_prior_precision(method="marglik")
                else:
                    lt.optimize_prior_precision(
                        method="gridsearch", val_loader=val, pred_type="glm", link_approx="probit"
                    )
                tau = float(torch.as_tensor(lt.prior_precision).flatten()[0])
                probs = lt(xt, pred_type="glm", link_approx="probit")
                row(
                    f"laplace-torch {structure} {subset} {tuning}",
                    probs,
                    yt,
                    f"fit {t_fit:.3f}s tau {tau:.3g}",
                )
                theirs[f"{structure}-{subset}"] = lt  # the last tuning run is timed below

    print(f"\nprediction throughput on {len(xt)} test points (median of {args.repeats}):")
    print(f"{'posterior':<22}{'predictive':<14}{'ours s':>9}{'theirs s':>10}{'speed-up':>10}")
    pairs = [
        ("kfoc-all", "kron-all"),
        ("kfac-all", "kron-all"),
        ("kfac-last_layer", "kron-last_layer"),
    ]
    for ours_key, their_key in pairs:
        la, lt = ours[ours_key], theirs[their_key]
        for label, fo, ft in [
            (
                "glm-probit",
                lambda la=la: la.predict(xt),
                lambda lt=lt: lt(xt, pred_type="glm", link_approx="probit"),
            ),
            (
                "mc-100",
                lambda la=la: la.predict(xt, method="mc", n_samples=100),
                lambda lt=lt: lt(xt, pred_type="nn", link_approx="mc", n_samples=100),
            ),
        ]:
            t_o, _ = median_time(fo, args.repeats, warmup=True)
            t_t, _ = median_time(ft, args.repeats, warmup=True)
            print(
                f"{ours_key + ' / ' + their_key:<22}{label:<14}{t_o:>9.4f}{t_t:>10.4f}"
                f"{t_t / t_o:>9.1f}x"
            )
            if label == "mc-100" and ours_key.endswith("-all"):
                floor = mc_floor(la, xt, args.repeats)
                print(
                    f"{'':<22}{'mc-100 floor':<14}{floor:>9.4f}{'':>10}{t_t / floor:>9.1f}x  "
                    "(100 forward passes at the MAP, vmapped, + 100·P normal draws: the least "
                    "any weight-sampling MC-100 costs here)"
                )


if __name__ == "__main__":
    main()
