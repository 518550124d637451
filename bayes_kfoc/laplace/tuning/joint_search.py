"""Tuning the prior scale and the predictive temperature on validation data.

The prior is ``τ_b = s · base_b`` (``base_b = P_b / ||θ*_b||²`` for the scaled prior, ``1`` for
the global one) and the GLM probit predictive is tempered, ``softmax(μ / sqrt(T² + π/8 · σ²))``
(the logits divided by ``T``). For every scale ``s`` on a log grid the best ``T ∈ [1, T_max]``
is found by golden-section search on the validation metric (default NLL); the grid expands
while the best scale is at one of its ends (until a plateau, or hard limits), is refined
between the best point's neighbours, and the one-standard-error rule then takes the smallest
scale (the most posterior variance) whose validation NLL is within one paired standard error of
the best. ``τ → ∞`` with ``T`` free is temperature scaling and ``T = 1`` is the untempered
posterior, so on validation data the result cannot lose to either.

``T ≥ 1``: the MAP is never sharpened (on a validation split with few or no errors ``T < 1``
over-sharpens). The Jacobian-side work is done once when it fits the memory budget (then every
``(s, T)`` costs one contraction per block in its eigenbasis and a softmax), else in bounded
memory: the first pass evaluates the initial grid and the scales of the first expansion on
either side (each expansion that runs evaluates the next one's too), and
the refinement costs one more pass (:class:`.scale_variances.ScaleVariances`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ...options import PriorKind, TuneMethod
from .grid import REFINE_POINTS, STEP, check_grid, default_log10_grid
from .result import Metric, TuningResult
from .scale_variances import ScaleVariances, key

LIMITS = (-8.0, 14.0)  # log10 s the expansion never passes
EXPAND = 2.0  # decades added per expansion
PLATEAU = 1e-5  # a metric change below this over the last expansion ends it
T_MAX = 100.0
T_EDGE = 0.99  # a tuned T above T_EDGE · T_MAX is at the range's end
GOLDEN_ITERS = 40
LOOK_AHEAD = 1  # expansions per side whose scales a streamed first pass evaluates up front


def _log_probs(logits: Tensor, var: Tensor, temperature: float) -> Tensor:
    return torch.log_softmax(logits / torch.sqrt(temperature**2 + math.pi / 8 * var), dim=-1)


def _golden(f: Callable[[float], float], lo: float, hi: float) -> tuple[float, float]:
    """Minimum of a unimodal ``f`` on ``[lo, hi]`` (golden section); ``(x, f(x))``, with the
    interval ends compared too."""
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(GOLDEN_ITERS):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    x, fx = (c, fc) if fc <= fd else (d, fd)
    for end in (lo, hi):
        fe = f(end)
        if fe < fx:
            x, fx = end, fe
    return x, fx


def expansions(lo: float, hi: float, rounds: int = LOOK_AHEAD) -> list[float]:
    """The scales the first ``rounds`` expansions of :func:`search` can reach from the range
    ``[lo, hi]`` on either side (its own arithmetic), for :meth:`ScaleVariances.prepare`'s
    look-ahead."""
    out = []
    h, low = hi, lo
    for _ in range(rounds):
        if h < LIMITS[1]:
            new = [h + STEP * k for k in range(1, int(EXPAND / STEP) + 1)]
            out += new
            h = max(key(u) for u in new)
        if low > LIMITS[0]:
            new = [low - STEP * k for k in range(1, int(EXPAND / STEP) + 1)]
            out += new
            low = min(key(u) for u in new)
    return out


def search(
    val: ScaleVariances,
    base: Tensor,
    *,
    grid: Sequence[float] | Tensor | None = None,
    temperature: bool = True,
    metric: Metric | None = None,
    one_se: bool = True,
    expand: bool = True,
    prior: PriorKind = PriorKind.SCALED,
) -> TuningResult:
    """The joint search of the module docstring; ``grid`` holds scales ``s`` (default
    :data:`.grid.DEFAULT_GRID`), ``metric(probs, labels)`` replaces the NLL (then no
    one-standard-error rule)."""
    if grid is None:
        start = default_log10_grid()
    else:
        start = check_grid(grid).log10()
    starts = start.tolist()
    val.prepare(starts, expansions(min(starts), max(starts)) if expand else ())
    labels, base = val.labels, base.to(val.logits.device)
    scores: dict[float, float] = {}
    temps: dict[float, float] = {}
    pointwise: dict[float, Tensor] = {}

    def evaluate(u: float) -> float:
        u = round(u, 10)
        if u in scores:
            return scores[u]
        var = val.take(u)

        def value(log_t: float) -> float:
            lp = _log_probs(val.logits, var, math.exp(log_t))
            if metric is None:
                return float(-lp.gather(1, labels[:, None]).mean())
            out = metric(lp.exp(), labels)
            return math.inf if math.isnan(out) else out

        if temperature:
            log_t, best = _golden(value, 0.0, math.log(T_MAX))
        else:
            log_t, best = 0.0, value(0.0)
        scores[u], temps[u] = best, math.exp(log_t)
        if metric is None:
            lp = _log_probs(val.logits, var, temps[u])
            pointwise[u] = -lp.gather(1, labels[:, None]).squeeze(1)
        return best

    for u in start.tolist():
        evaluate(u)
    if not any(math.isfinite(v) for v in scores.values()):
        raise ValueError(
            "Laplace.optimize_prior_precision: the metric is NaN or infinite at every scale; "
            "check the metric and the validation labels."
        )
    lo, hi = min(scores), max(scores)
    while expand:
        best = min(scores, key=scores.__getitem__)
        if best == hi and hi < LIMITS[1]:
            new, up = [hi + STEP * k for k in range(1, int(EXPAND / STEP) + 1)], True
        elif best == lo and lo > LIMITS[0]:
            new, up = [lo - STEP * k for k in range(1, int(EXPAND / STEP) + 1)], False
        else:
            break
        before = scores[best]
        edge = key(max(new)) if up else key(min(new))
        step = STEP if up else -STEP
        nxt = [edge + step * k for k in range(1, int(EXPAND / STEP) + 1)]  # the next expansion's
        val.prepare(new, nxt if LIMITS[0] < edge < LIMITS[1] else ())
        for u in new:
            evaluate(u)
        lo, hi = min(scores), max(scores)
        if abs(min(scores.values()) - before) < PLATEAU:
            break  # a plateau (towards τ → ∞: temperature scaling of the MAP)
    us = sorted(scores)
    best = min(us, key=scores.__getitem__)
    i = us.index(best)
    if len(us) > 2:
        a, b = us[max(i - 1, 0)], us[min(i + 1, len(us) - 1)]
        refine = torch.linspace(a, b, REFINE_POINTS + 2)[1:-1].tolist()
        val.prepare([u for u in refine if key(u) not in scores])
        for u in refine:
            evaluate(u)
    us = sorted(scores)
    best = min(us, key=scores.__getitem__)
    chosen = best
    if one_se and metric is None:
        for u in reversed([v for v in us if v < best]):  # contiguous, towards more variance
            d = pointwise[u] - pointwise[best]
            se = float(d.std() / math.sqrt(d.numel())) if d.numel() > 1 else 0.0
            if float(d.mean()) > se:
                break
            chosen = u
    at_edge = chosen in (us[0], us[-1])
    if at_edge:
        where = "upper" if chosen == us[-1] else "lower"
        warnings.warn(
            f"Laplace.optimize_prior_precision: the chosen prior scale (s = {10.0**chosen:.3g}) "
            f"is at the {where} end of the searched range [{10.0 ** us[0]:.3g}, "
            f"{10.0 ** us[-1]:.3g}]"
            + (
                "; the validation data favour the MAP (with temperature T = "
                f"{temps[chosen]:.3g}): the posterior adds almost no variance."
                if where == "upper"
                else "; pass a wider grid."
            ),
            stacklevel=4,
        )
    t_edge = temperature and temps[chosen] >= T_MAX * T_EDGE
    if t_edge:
        warnings.warn(
            f"Laplace.optimize_prior_precision: the tuned temperature (T = {temps[chosen]:.3g}) "
            f"is at the upper end of its range [1, {T_MAX:g}]: the validation data favour a "
            "nearly uniform predictive (the model is barely better than chance on them). Check "
            "the model's accuracy on the validation data, or pass temperature=False.",
            stacklevel=4,
        )
    at_edge = at_edge or t_edge
    tau = (10.0**chosen * base).double()
    return TuningResult(
        TuneMethod.GRIDSEARCH,
        tau,
        {10.0**u: scores[u] for u in us},
        at_edge,
        temperature=temps[chosen],
        prior=prior,
        scale=10.0**chosen,
        temperatures={10.0**u: temps[u] for u in us},
    )
