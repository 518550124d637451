"""Command line of the evaluation package: ``python -m evaluation study ...``.

Example (the README's main command, ``make demo``)::

    python -m evaluation study --dataset digits --model mlp \\
        --methods map,temp,diag,kfac,kfoc --seeds 3 --out reports/digits
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from evaluation.study.config import DEFAULT_TAU_RANGE, PARTS, StudyConfig, default_threads

__all__ = ["build_parser", "main"]

_EPILOG = """\
methods: map (softmax), temp (temperature scaling), diag / kfac / kfoc (bayes_kfoc Laplace; each
runs on all weights and, as <name>-ll, on the last layer; --subsets restricts that), and the
optional laplace-torch (its 'kron', only when laplace-torch is importable).

data: bundled sets need nothing; mnist / fashion_mnist / kmnist / cifar10 / svhn are read from
--data-dir (the files in <data-dir> or <data-dir>/<name>); file-based OOD sets (e.g. Fashion-MNIST
and KMNIST for mnist) are used when <data-dir>/<name> or a sibling folder exists.

output: <out>/results.json, report.md, study.json and figures/*.png, written atomically.
"""


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _tau_range(text: str) -> tuple[float, float, int]:
    parts = _csv(text)
    try:
        lo, hi = float(parts[0]), float(parts[1])
        n = int(parts[2]) if len(parts) > 2 else DEFAULT_TAU_RANGE[2]
        if len(parts) > 3:
            raise ValueError
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(
            f"expected LOWEST,HIGHEST[,POINTS] such as 1e-2,1e5,29; got {text!r}"
        ) from None
    return lo, hi, n


def _angles(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(a) for a in _csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integer degrees such as 0,30,60,90; got {text!r}"
        ) from None


def _epilog() -> str:
    from datasets import available_datasets, available_ood

    names = ", ".join(available_datasets())
    ood = ", ".join(available_ood())
    return _EPILOG + f"\ndata sets: {names}\nOOD sets:  {ood}\n"


def build_parser() -> argparse.ArgumentParser:
    """The ``evaluation`` argument parser (one subcommand: ``study``)."""
    parser = argparse.ArgumentParser(
        prog="python -m evaluation", description="bayes-kfoc evaluation tools."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "study",
        help="run the calibration study (MAP, temperature scaling, Laplace) and write a report",
        description="Train (or load) MAP networks per seed, fit each method, evaluate in "
        "distribution, under rotation shift and on OOD sets, and write a report.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--dataset",
        default="digits",
        help="in-distribution data set (default: digits; the list is below)",
    )
    p.add_argument("--model", default="mlp", help="mlp or cnn (default: mlp)")
    p.add_argument(
        "--methods",
        type=_csv,
        default=("map", "temp", "diag", "kfac", "kfoc"),
        help="comma-separated methods (default: map,temp,diag,kfac,kfoc)",
    )
    p.add_argument(
        "--subsets",
        type=_csv,
        default=("all", "last_layer"),
        help="subsets a base Laplace name expands to: all,last_layer (default: both)",
    )
    p.add_argument("--seeds", type=int, default=3, help="number of seeds 0..n-1 (default: 3)")
    p.add_argument(
        "--epochs", type=int, default=None, help="MAP epochs (default 100; 3 with --quick)"
    )
    p.add_argument(
        "--ood",
        type=_csv,
        default=None,
        help="comma-separated OOD sets (default: per data set; the list is below)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="report directory (default: reports/<dataset>[-<model>])",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="MAP checkpoint cache (default: <out>/../.cache)",
    )
    p.add_argument("--no-cache", action="store_true", help="neither read nor write MAP checkpoints")
    p.add_argument("--data-dir", type=Path, default=None, help="directory of local data files")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an --out holding a different study or other files (only files this "
        "tool wrote are ever replaced or removed)",
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny configuration for tests and smoke runs"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help=f"torch threads (default: the cores available, {default_threads()} here)",
    )
    g = p.add_argument_group("parts of the study and their size")
    g.add_argument(
        "--tau-range",
        type=_tau_range,
        default=DEFAULT_TAU_RANGE,
        metavar="LO,HI[,N]",
        help="prior-scale grid for the Laplace methods (τ_b = s·P_b/||θ_b||²): N log-spaced s "
        "from LO to HI "
        "(default: 1e-2,1e5,29), refined around the best",
    )
    g.add_argument(
        "--angles",
        type=_angles,
        default=None,
        help="rotation angles in degrees (default: 0,15,...,180; every 45 with --quick)",
    )
    for part, what in (
        ("shift", "the rotation shift"),
        ("ood", "OOD detection"),
        ("fidelity", "the Fisher-fidelity check"),
        ("sweep", "the matched-prior sweep comparing diag / K-FAC / K-FOC (seed 0)"),
    ):
        g.add_argument(f"--no-{part}", action="store_true", help=f"skip {what}")
    g.add_argument(
        "--shift-points",
        type=int,
        default=None,
        metavar="N",
        help="evaluate the rotation shift on a seeded subset of N test points (default: all)",
    )
    g.add_argument(
        "--ood-points",
        type=int,
        default=None,
        metavar="N",
        help="use seeded subsets of N points of each OOD set and of the test split (default: all)",
    )
    g.add_argument(
        "--fidelity-points",
        type=int,
        default=2000,
        metavar="N",
        help="training points per Fisher-fidelity subset (default 2000; all, once, if fewer)",
    )
    g.add_argument(
        "--fidelity-draws",
        type=int,
        default=3,
        metavar="K",
        help="random subsets for the fidelity error bar (default 3)",
    )
    p.add_argument(
        "--mi-samples", type=int, default=30, help="predictive samples for mutual information"
    )
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument(
        "--weight-decay", type=float, default=1e-4, help="Adam weight decay (default 1e-4)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="training batch size (default 64)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run; bad input exits with status 2 and a one-line error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from evaluation.study.errors import StudyError, StudyRunError
    from evaluation.study.runner import run_study

    epochs = args.epochs if args.epochs is not None else (3 if args.quick else 100)
    out = args.out or Path("reports") / (
        args.dataset if args.model == "mlp" else f"{args.dataset}-{args.model}"
    )
    config = StudyConfig(
        dataset=args.dataset,
        model=args.model,
        methods=args.methods,
        subsets=args.subsets,
        seeds=args.seeds,
        epochs=epochs,
        ood=args.ood,
        out=out,
        cache_dir=args.cache_dir,
        data_dir=args.data_dir,
        overwrite=args.overwrite,
        quick=args.quick,
        threads=args.threads if args.threads is not None else default_threads(),
        mi_samples=args.mi_samples,
        use_cache=not args.no_cache,
        progress=not args.no_progress,
        lr=args.lr,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        tau_range=args.tau_range,
        angles=args.angles,
        skip=tuple(part for part in PARTS if getattr(args, f"no_{part}")),
        shift_points=args.shift_points,
        ood_points=args.ood_points,
        fidelity_points=args.fidelity_points,
        fidelity_draws=args.fidelity_draws,
    )
    try:
        report = run_study(config)
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except StudyRunError as err:
        print(f"error during the study: {err}", file=sys.stderr)
        return 1
    print(f"report written to {report}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
