"""Our K-FOC against curvlinops' ``KFOCLinearOperator``: same batch, same factors, one process.

Run (curvlinops' K-FOC exists only on its GitHub main branch, not in the 3.0.1 release; see
``.bench/README.txt`` for the throwaway venv that has it)::

    PYTHONPATH=. .bench/venv-clmain/bin/python -m evaluation.benchmarks.peer_kfoc \\
        --threads 1

(about 10 minutes on 2 cores: nearly all of it is curvlinops at N = 8 and 16, float32 and 64).

What is compared
    An MLP ``in-width-width-classes`` (default 784-512-512-10, tanh, seeded random weights), one
    batch of ``--batch`` (default 512) seeded random inputs and labels, exact (type-2) Fisher.
    Both sides fit the Frobenius-optimal ``G ⊗ A`` of each Linear layer's Fisher block with the
    bias as the last homogeneous coordinate of ``A`` (``separate_weight_and_bias=False`` on their
    side).

    - Ours: ``fit_curvature(model, [(x, y)], "kfoc", fisher="exact", mode="cached",
      check_determinism=False)``: power iteration on the Van Loan–Pitsianis rearrangement through
      the rank-one structure of Linear-layer gradients (no per-sample gradient tensors), warm
      started from K-FAC. The timed call includes the forward/backward pass and the K-FAC sums.
    - Theirs: ``KFOCLinearOperator(model, CrossEntropyLoss(reduction="sum"), params, [(x, y)],
      fisher_type=FisherType.TYPE2, separate_weight_and_bias=False, check_deterministic=False)``:
      per-sample gradients ``P [V, N, d_out, d_in]`` per layer, then scipy ARPACK ``svds(k=1)`` on
      the rearranged operator ``M ↦ Σ P M Pᵀ`` (an einsum over ``P``). The timed call is the
      constructor, which computes every factor. When curvlinops (main) cannot be imported, or
      with ``--peer reimpl``, a re-implementation of that formulation inside this script is used
      instead (per-sample-gradient einsum + ``scipy.sparse.linalg.svds`` on the same rearranged
      operator) and the output says so.

Scaling
    Our Fisher is **summed** over the batch. curvlinops' scale follows the loss reduction:
    ``reduction="sum"`` (the default here) gives the summed Fisher; ``--reduction mean`` gives
    ``1/N`` of it, and the script then multiplies their Kronecker product by ``N`` before
    comparing.

Factor difference
    Per layer ``||G₁⊗A₁ − G₂⊗A₂||_F / ||G₂⊗A₂||_F`` (1 = ours, 2 = theirs), without forming the
    product. Both pairs are first put into one gauge (SVD factors have a joint sign and a free
    scale split): positive trace, ``||A|| = ||G||``. Then, with ``ΔG = G₁ − G₂``,
    ``ΔA = A₁ − A₂`` and ``G₁⊗A₁ − G₂⊗A₂ = ΔG⊗A₁ + G₂⊗ΔA``,
    ``||·||² = ||ΔG||²||A₁||² + ||G₂||²||ΔA||² + 2⟨ΔG, G₂⟩⟨A₁, ΔA⟩``, which has no cancellation
    between large terms (the expansion ``||K₁||² + ||K₂||² − 2⟨G₁,G₂⟩⟨A₁,A₂⟩`` would bottom out
    at ~1e-8 in float64). Everything is evaluated in float64. The float64 fits are the accuracy
    check (``≤ --rtol``, default 1e-5); float32 differences are reported too.

Timing
    Both in this process, CPU, ``torch.get_num_threads()`` threads, float32; one warm-up call each
    (theirs on a 2-point batch, since one of their calls can take many minutes), then the median
    of ``--repeats`` calls for ours and ``--peer-repeats`` for theirs. The speed-up is
    ``median(theirs) / median(ours)``.

    Their cost per ARPACK operator application is ``2·V·N·d_out·d_in·(d_out + d_in)`` flops per
    layer and their memory ``V·N·d_out·d_in`` floats per layer (8 GB in float32 for the 785→512
    layer at N = 512, V = 10); ours is ``O(N(d_in² + V d_out²))`` per iteration. On a small
    shared CPU their fit at the full batch can take hours, so ``--peer-batch k1,k2,...`` runs
    theirs (and ours, for a matched comparison and the factor check) on the first ``k`` points of
    the same batch; their time at ``--batch`` is then *extrapolated* and labelled as such:
    proportionally in ``N`` from the largest ``k`` (their per-step cost and memory are exactly
    linear in ``N``; the ARPACK step count is assumed unchanged; this ignores their fixed costs
    and so overestimates), and, with two or more ``k``, by a least-squares fit
    ``t = a + b·N`` (fixed cost plus per-point cost). The float64 factor check uses the smallest
    ``k``. ``--peer-batch`` equal to ``--batch`` measures everything directly.

    On an oversubscribed machine (load above the core count), torch's default of one thread per
    core makes small fits wait on each other's OpenMP barriers; ``--threads 1`` gives steadier
    numbers for both sides.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch
from torch import Tensor, nn

from bayes_kfoc import fit_curvature
from evaluation.benchmarks.timing import median_time
from evaluation.models import mlp

Pair = tuple[Tensor, Tensor]  # (G, A): output factor, input factor (bias last)


# -- problem ----------------------------------------------------------------------------------
def make_problem(
    in_features: int, width: int, classes: int, batch: int, seed: int
) -> tuple[nn.Sequential, Tensor, Tensor]:
    """Seeded MLP ``in-width-width-classes`` (tanh) in eval mode, inputs and labels."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = mlp(in_features, classes, hidden=(width, width), activation=nn.Tanh).eval()
    x = torch.randn(batch, in_features, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    return model, x, y


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


# -- ours -------------------------------------------------------------------------------------
def ours(model: nn.Module, x: Tensor, y: Tensor, tol: float, max_iter: int) -> list[Pair]:
    curv = fit_curvature(
        model,
        [(x, y)],
        "kfoc",
        fisher="exact",
        mode="cached",
        tol=tol,
        max_iter=max_iter,
        progress=False,
        check_determinism=False,
    )
    return [(curv.blocks[n].G, curv.blocks[n].A) for n in linear_names(model)]


# -- theirs: curvlinops main ------------------------------------------------------------------
def curvlinops_version() -> str | None:
    """``curvlinops-for-pytorch`` version when its ``KFOCLinearOperator`` imports, else None."""
    try:
        import importlib.metadata

        from curvlinops import KFOCLinearOperator  # noqa: F401
    except ImportError:
        return None
    return importlib.metadata.version("curvlinops-for-pytorch")


def theirs_curvlinops(model: nn.Module, x: Tensor, y: Tensor, reduction: str) -> list[Pair]:
    from curvlinops import FisherType, KFOCLinearOperator

    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    op = KFOCLinearOperator(
        model,
        nn.CrossEntropyLoss(reduction=reduction),
        params,
        [(x, y)],
        fisher_type=FisherType.TYPE2,
        separate_weight_and_bias=False,
        check_deterministic=False,
    )
    _, blocks, _ = op  # P @ K @ PT; K is block diagonal, one block per parameter group
    # parameter groups follow the model's parameter order, i.e. the Linear layers' order
    return [(b[0], b[1]) for b in blocks]


# -- theirs: re-implementation of the same formulation ----------------------------------------
def _directions_and_inputs(model: nn.Sequential, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Per layer: inputs with a column of ones ``[N, n]`` and type-2 directions ``[V, N, o]``.

    The directions back-propagate the columns of the softmax-Hessian square root
    ``diag(√p) − p √pᵀ`` (column c is ``√p_c (e_c − p)``) to each Linear layer's output.
    """
    inputs, outputs = [], []
    h = x
    for m in model:
        if isinstance(m, nn.Linear):
            inputs.append(torch.cat([h, torch.ones_like(h[:, :1])], dim=1).detach())
            h = m(h)
            outputs.append(h)
        else:
            h = m(h)
    p = torch.softmax(h, dim=1).detach()
    sq = p.sqrt()
    eye = torch.eye(p.shape[1], dtype=p.dtype)
    root = sq.unsqueeze(1) * eye - p.unsqueeze(2) * sq.unsqueeze(1)  # [N, C(out), C(v)]
    dirs: list[list[Tensor]] = [[] for _ in outputs]
    for c in range(p.shape[1]):
        gs = torch.autograd.grad(h, outputs, grad_outputs=root[:, :, c], retain_graph=True)
        for i, g in enumerate(gs):
            dirs[i].append(g)
    return inputs, [torch.stack(d) for d in dirs]


def _svd_rank_one(psg: Tensor) -> Pair:
    """Top singular pair of ``R: vec(M) ↦ vec(Σ P M Pᵀ)`` via ARPACK, as ``(S₁, S₂)``."""
    from scipy.sparse.linalg import LinearOperator, svds

    _, _, o, n = psg.shape
    dt = psg.dtype

    def matvec(v: np.ndarray) -> np.ndarray:
        m = torch.as_tensor(np.ascontiguousarray(v).reshape(n, n), dtype=dt)
        return torch.einsum("vnoi,ij,vnpj->op", psg, m, psg).reshape(-1).numpy()

    def rmatvec(u: np.ndarray) -> np.ndarray:
        m = torch.as_tensor(np.ascontiguousarray(u).reshape(o, o), dtype=dt)
        return torch.einsum("vnoi,op,vnpj->ij", psg, m, psg).reshape(-1).numpy()

    npdt = np.float64 if dt == torch.float64 else np.float32
    op = LinearOperator((o * o, n * n), matvec=matvec, rmatvec=rmatvec, dtype=npdt)
    u, s, vt = svds(op, k=1)
    scale = math.sqrt(float(s[0]))
    s1 = torch.as_tensor(u[:, 0].copy(), dtype=dt).reshape(o, o) * scale
    s2 = torch.as_tensor(vt[0].copy(), dtype=dt).reshape(n, n) * scale
    return s1, s2


def theirs_reimpl(model: nn.Module, x: Tensor, y: Tensor, reduction: str) -> list[Pair]:
    """curvlinops' formulation: per-sample gradients ``P [V, N, o, n]`` + ARPACK per layer."""
    del y  # the type-2 Fisher does not use the labels
    assert isinstance(model, nn.Sequential)
    inputs, dirs = _directions_and_inputs(model, x)
    scale = 1.0 if reduction == "sum" else 1.0 / math.sqrt(x.shape[0])
    out = []
    for a, d in zip(inputs, dirs):
        psg = torch.einsum("vno,ni->vnoi", d * scale, a)
        out.append(_svd_rank_one(psg))
        del psg
    return out


# -- comparison -------------------------------------------------------------------------------
def _gauge(G: Tensor, A: Tensor, factor: float = 1.0) -> Pair:
    """float64 ``(G, A)`` with positive trace and ``||G|| = ||A||``; product times ``factor``."""
    G, A = G.double(), A.double()
    if float(G.trace()) < 0:
        G, A = -G, -A
    ng, na = torch.linalg.matrix_norm(G), torch.linalg.matrix_norm(A)
    if float(ng) == 0 or float(na) == 0:
        return G, A
    r = math.sqrt(float(ng * na) * factor)
    return G / ng * r, A / na * r


def kron_rel_diff(ours: Pair, theirs: Pair, their_scale: float = 1.0) -> float:
    """``||G₁⊗A₁ − G₂⊗A₂||_F / ||G₂⊗A₂||_F`` without forming either product."""
    G1, A1 = _gauge(*ours)
    G2, A2 = _gauge(*theirs, factor=their_scale)
    dG, dA = G1 - G2, A1 - A2
    sq = (
        dG.square().sum() * A1.square().sum()
        + G2.square().sum() * dA.square().sum()
        + 2 * (dG * G2).sum() * (A1 * dA).sum()
    )
    ref = G2.square().sum() * A2.square().sum()
    return math.sqrt(max(float(sq), 0.0) / float(ref))


# -- timing -----------------------------------------------------------------------------------
def peer_cost(in_features: int, width: int, classes: int, batch: int, itemsize: int) -> str:
    """Their per-step flops and largest per-sample-gradient tensor, from the shapes."""
    dims = [(width, in_features + 1), (width, width + 1), (classes, width + 1)]
    flops = sum(2 * classes * batch * o * n * (o + n) for o, n in dims)
    big = max(classes * batch * o * n for o, n in dims) * itemsize
    return f"{flops / 1e12:.2f} TFLOP per operator application, largest P {big / 2**30:.1f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--in-features", type=int, default=784)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=512, help="our batch (one batch)")
    parser.add_argument(
        "--peer-batch",
        type=lambda t: [int(v) for v in t.split(",") if v],
        default=[8, 16],
        help="comma list of point counts k (first k of the batch) for their fits and the factor "
        "check (default 8,16); their time at --batch is extrapolated unless k equals --batch",
    )
    parser.add_argument("--peer", choices=["auto", "curvlinops", "reimpl"], default="auto")
    parser.add_argument("--reduction", choices=["sum", "mean"], default="sum")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of ours")
    parser.add_argument("--peer-repeats", type=int, default=1, help="timed calls of theirs")
    parser.add_argument("--tol", type=float, default=1e-6, help="our tol in the float32 fits")
    parser.add_argument("--tol64", type=float, default=1e-12, help="our tol in float64 fits")
    parser.add_argument("--max-iter", type=int, default=500)
    parser.add_argument("--rtol", type=float, default=1e-5, help="float64 factor-check bound")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-float32-peer", action="store_true", help="accuracy check only")
    parser.add_argument("--skip-float64", action="store_true", help="timing only")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's choice)"
    )
    args = parser.parse_args()
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be an integer >= 1, got {args.threads}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    ks = sorted(set(args.peer_batch))
    if not ks or not all(1 <= k <= args.batch for k in ks):
        parser.error("--peer-batch values must be in [1, --batch]")

    version = curvlinops_version() if args.peer != "reimpl" else None
    if args.peer == "curvlinops" and version is None:
        sys.exit("curvlinops with KFOCLinearOperator is not importable; use --peer reimpl.")
    if version is not None:
        theirs, their_name = theirs_curvlinops, f"curvlinops {version} KFOCLinearOperator"
    else:
        theirs, their_name = theirs_reimpl, "re-implementation (per-sample einsum + ARPACK svds)"
        if args.peer == "auto":
            print("NOTE: curvlinops' KFOCLinearOperator is not importable (it is on curvlinops'")
            print("      GitHub main only); using this script's re-implementation instead.")
    k0 = ks[0]
    their_scale = float(k0) if args.reduction == "mean" else 1.0

    arch = f"{args.in_features}-{args.width}-{args.width}-{args.classes}"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; load average")
    print(f"  {os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} cores at start")
    print(f"theirs: {their_name}")
    print(f"MLP {arch} tanh, exact (type-2) Fisher, one batch of {args.batch}, reduction=")
    print(f"  {args.reduction!r} on their side (ours: summed Fisher)")
    print(f"their cost at N={args.batch} (float32): ", end="")
    print(peer_cost(args.in_features, args.width, args.classes, args.batch, 4))

    model, x, y = make_problem(args.in_features, args.width, args.classes, args.batch, args.seed)
    names = linear_names(model)
    ok = True

    # 1. accuracy check in float64 on the smallest peer batch
    diffs64, t64 = [math.nan] * len(names), math.nan
    if not args.skip_float64:
        m64, xs64, ys = model.double(), x[:k0].double(), y[:k0]
        ours64 = ours(m64, xs64, ys, args.tol64, args.max_iter)
        t0 = time.perf_counter()
        theirs64 = theirs(m64, xs64, ys, args.reduction)
        t64 = time.perf_counter() - t0
        diffs64 = [kron_rel_diff(a, b, their_scale) for a, b in zip(ours64, theirs64)]
        ok = all(d <= args.rtol for d in diffs64)
        model = model.float()

    # 2. timing in float32
    def run_ours(n: int) -> list[Pair]:
        return ours(model, x[:n], y[:n], args.tol, args.max_iter)

    def run_theirs(n: int) -> list[Pair]:
        return theirs(model, x[:n], y[:n], args.reduction)

    run_ours(args.batch)  # warm-up
    t_ours, _ = median_time(lambda: run_ours(args.batch), args.repeats)
    rows = []  # (k, ours s, theirs s, float32 diffs)
    if not args.skip_float32_peer:
        run_theirs(min(2, args.batch))  # warm-up (tracing, threads)
    for k in ks:
        t_o, ours32 = median_time(lambda k=k: run_ours(k), args.repeats)
        t_t, diffs32 = math.nan, [math.nan] * len(names)
        if not args.skip_float32_peer:
            t_t, theirs32 = median_time(lambda k=k: run_theirs(k), args.peer_repeats)
            scale = float(k) if args.reduction == "mean" else 1.0
            diffs32 = [kron_rel_diff(a, b, scale) for a, b in zip(ours32, theirs32)]
        rows.append((k, t_o, t_t, diffs32))

    print()
    print("factor check: ||K_ours - K_theirs||_F / ||K_theirs||_F per layer (K = G ⊗ A, bias in")
    print(f"A); float64 on the first {k0} points, float32 on the first k points")
    head = "".join(f"{f'f32 k={k}':>12}" for k in ks)
    print(f"{'layer':<8}{'G':>6}{'A':>6}{f'f64 k={k0}':>12}{head}")
    for i, n in enumerate(names):
        m = model.get_submodule(n)
        assert isinstance(m, nn.Linear)
        d32 = "".join(f"{r[3][i]:>12.2e}" for r in rows)
        print(f"{n:<8}{m.out_features:>6}{m.in_features + 1:>6}{diffs64[i]:>12.2e}{d32}")
    if not args.skip_float64:
        verdict = "PASS" if ok else "FAIL"
        print(f"float64 max {max(diffs64):.2e} <= {args.rtol:.0e}: {verdict}")
        print(f"(their float64 fit on {k0} points: {t64:.1f} s)")
    print()
    print(f"float32 fit time, median (ours of {args.repeats}, theirs of {args.peer_repeats})")
    print(f"{'N':>6}{'ours s':>11}{'theirs s':>12}{'speed-up':>11}")
    if args.skip_float32_peer:
        print(f"{args.batch:>6}{t_ours:>11.4f}{'-':>12}{'-':>11}")
    else:
        for k, t_o, t_t, _ in rows:
            if k != args.batch:
                print(f"{k:>6}{t_o:>11.4f}{t_t:>12.2f}{t_t / t_o:>10.0f}x  (measured)")
        full = [r for r in rows if r[0] == args.batch]
        if full:
            t_t = full[0][2]
            print(f"{args.batch:>6}{t_ours:>11.4f}{t_t:>12.2f}{t_t / t_ours:>10.0f}x  (measured)")
        else:
            k, _, t_t, _ = rows[-1]
            t_prop = t_t * args.batch / k
            print(
                f"{args.batch:>6}{t_ours:>11.4f}{t_prop:>12.1f}{t_prop / t_ours:>10.0f}x  "
                f"(theirs extrapolated: t({k}) * {args.batch}/{k})"
            )
            if len(rows) >= 2:
                b, a = np.polyfit([r[0] for r in rows], [r[2] for r in rows], 1)
                t_aff = a + b * args.batch
                print(
                    f"{args.batch:>6}{t_ours:>11.4f}{t_aff:>12.1f}{t_aff / t_ours:>10.0f}x  "
                    f"(theirs extrapolated: {a:.1f} s + {b:.2f} s/point fit to k = {ks})"
                )
    print(f"load average {os.getloadavg()[0]:.1f} (1 min) at the end")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
