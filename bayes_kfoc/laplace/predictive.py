"""Predictions and samples of a fitted posterior: the GLM (linearised) predictive with the probit
or MC link, and the network at sampled weights.

Everything here is a function of a :class:`PosteriorView` (blocks, ``τ``, MAP, layout), so the
grid search can score another ``τ`` without touching the posterior.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..blocks import CurvatureBlock
from ..options import GlmPath, Link, PredMethod
from ..stats import Collector, Target, call_model, normal_tensor
from ..stats.inputs import Batches, Inputs, check_mapping, inputs_to, split_inputs
from ._glm import Chunk, glm_moments, probit, sample_logits
from ._glm_pass import GlmChunk, glm_chunks, glm_plan
from ._guard import check_num_samples
from ._layout import Layout
from ._mc import head_features, head_logits, logits_at
from ._plan import GlmPlan
from ._posterior import sample_blocks

__all__ = [
    "PosteriorView",
    "check_inputs",
    "glm_distribution",
    "glm_mean_variance",
    "glm_probability_samples",
    "head_features",
    "iter_jacobians",
    "jacobians",
    "linearised_samples",
    "logits_at",
    "predict",
    "predictive_samples",
    "probit",
    "sample",
    "sample_logits",
]


@dataclass(frozen=True)
class PosteriorView:
    """What the predictive needs of a fitted posterior ``N(θ*, (F + τI)^{-1})``.

    Attributes:
        model: the network (evaluated at ``θ*``, or functionally at samples).
        blocks: curvature blocks by module name (block order).
        tau: ``τ`` per block (block order).
        map_vector: ``θ*`` in ``parameters_to_vector`` order.
        layout: where each block's parameters sit in ``map_vector``.
        targets: the blocks' modules (for the Jacobian collector).
        input_shape: the shape of one input the posterior was fitted on.
        chunk_size: points per chunk of Jacobians (at most; ``memory_budget`` may lower it).
        temperature: ``T``; every predictive divides the logits by it.
        memory_budget: bytes a GLM chunk may use (``None``: the default of
            :func:`._plan.budget_bytes`).
        glm: how the GLM predictive treats blocks without a closed form (:class:`GlmPath`).
        report: called with the :class:`GlmPlan` of every GLM pass (which path ran).
    """

    model: nn.Module
    blocks: dict[str, CurvatureBlock]
    tau: Tensor
    map_vector: Tensor
    layout: Layout
    targets: list[Target]
    input_shape: tuple[int, ...]
    chunk_size: int
    temperature: float = 1.0
    memory_budget: int | None = None
    glm: GlmPath = GlmPath.AUTO
    report: Callable[[GlmPlan], None] | None = None

    def with_tau(self, tau: Tensor) -> PosteriorView:
        return dataclasses.replace(self, tau=tau)

    @property
    def tau_of(self) -> dict[str, Tensor]:
        """``τ`` by block name."""
        return dict(zip(self.blocks, self.tau, strict=True))

    @property
    def device(self) -> torch.device:
        return self.map_vector.device


def check_inputs(view: PosteriorView, x: Inputs) -> Inputs:
    """``x`` on the posterior's device; raises unless it is a batch of inputs like the fitted
    ones: the same number of dimensions and, for floating-point inputs, the same trailing
    (feature) size. The other sizes (the sequence length ``T`` of ``[N, T, d]``, or of integer
    token ids ``[N, T]``) may differ from the fit's. A mapping is passed as ``model(**x)``
    (its tensor values must share the batch size)."""
    if isinstance(x, Mapping):
        check_mapping(x, "Laplace.predict")
        return inputs_to(x, view.device)
    if not isinstance(x, Tensor):
        raise TypeError(f"Laplace.predict: x must be a tensor, got {type(x).__name__}.")
    fitted = view.input_shape
    features = bool(fitted) and x.is_floating_point()
    if x.ndim != len(fitted) + 1 or (features and x.shape[-1] != fitted[-1]):
        raise ValueError(
            f"Laplace.predict: inputs have shape {tuple(x.shape)}, but the model was fitted "
            f"on inputs [N, {', '.join(map(str, fitted))}]; the number of dimensions and the last "
            "(feature) size must match (other sizes, e.g. a sequence length, may differ)."
        )
    x = x.to(view.device)
    if x.is_inference():  # made under torch.inference_mode(): autograd cannot record it
        with torch.inference_mode(False):
            x = normal_tensor(x)
    # e.g. uint8 images: a clear error, up front (int64 token ids are an embedding's inputs)
    if not x.is_floating_point() and x.dtype != torch.long and x.shape[0]:
        with torch.no_grad():
            call_model(view.model, x[:1], "Laplace.predict")
    return x


def iter_jacobians(view: PosteriorView, x: Inputs) -> Iterator[Chunk]:
    """Jacobian statistics and MAP logits at ``x``, one chunk of ``chunk_size`` points at a
    time (independent of ``τ``)."""
    x = check_inputs(view, x)
    with Collector(view.model, view.targets) as col:
        for xb in split_inputs(x, view.chunk_size):
            with torch.inference_mode(False):  # e.g. inside Lightning's test loop
                chunk = col.jacobians(xb)
            yield chunk


def jacobians(view: PosteriorView, x: Inputs) -> list[Chunk]:
    """Every chunk of :func:`iter_jacobians` (for reuse across ``τ``)."""
    return list(iter_jacobians(view, x))


def _plan(view: PosteriorView, x: Inputs, samples: int, path: GlmPath | None = None) -> GlmPlan:
    plan = glm_plan(view, x, samples, view.glm if path is None else path)
    if view.report is not None:
        view.report(plan)
    return plan


def glm_mean_variance(
    view: PosteriorView, x: Inputs, samples: int = 100, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Mean and variances ``[B, C]`` of the linearised logits ``f(x)`` (untempered), chunk by
    chunk: memory bounded by ``memory_budget``. Last layers take the closed form; the other
    blocks the exact or sampled path (``view.glm``; ``samples`` JVPs per point when sampled, the
    variance then the draws' mean square ``mean_s (J δ_s)²``, unbiased as ``E[J δ] = 0``)."""
    x = check_inputs(view, x)
    plan = _plan(view, x, samples)
    means, variances = [], []
    for chunk in glm_chunks(view, x, plan, generator):
        var = chunk.variance(view.tau_of)
        means.append(chunk.logits.to(var.dtype))
        variances.append(var)
    return torch.cat(means), torch.cat(variances)


def _covariance(view: PosteriorView, chunk: GlmChunk) -> tuple[Tensor, Tensor]:
    """Mean ``[B, C]`` and exact covariance ``[B, C, C]`` of one chunk's linearised logits."""
    cov = chunk.covariance(view.tau_of)
    mean = chunk.logits
    if chunk.stats is not None:
        names = list(chunk.stats)
        blocks = {k: view.blocks[k] for k in names}
        tau = torch.stack([view.tau_of[k] for k in names])
        mean, rest = glm_moments([(chunk.stats, chunk.logits)], blocks, tau)
        cov = rest if cov is None else cov + rest
    if cov is None:  # no random block reaches the logits
        c = mean.shape[1]
        cov = mean.new_zeros((mean.shape[0], c, c))
    return mean.to(cov.dtype), cov


def glm_distribution(view: PosteriorView, x: Inputs) -> tuple[Tensor, Tensor]:
    """Mean ``[B, C]`` and covariance ``[B, C, C]`` of the linearised, tempered logits
    ``f(x) / T`` at ``x`` (exact: last layers in closed form, the other blocks by Jacobians).

    Memory: the full covariance, ``B·C²`` numbers (8 GB in float64 for 1,000 points and 1,000
    classes); the predictives themselves go chunk by chunk (:func:`glm_mean_variance`,
    :func:`glm_probability_samples`).
    """
    x = check_inputs(view, x)
    plan = _plan(view, x, 1, GlmPath.EXACT)
    parts = [_covariance(view, chunk) for chunk in glm_chunks(view, x, plan, None)]
    mean = torch.cat([m for m, _ in parts])
    cov = torch.cat([c for _, c in parts])
    t = view.temperature
    return (mean, cov) if t == 1.0 else (mean / t, cov / t**2)


def linearised_samples(
    view: PosteriorView,
    x: Inputs,
    n: int,
    generator: torch.Generator | None,
    temperature: float = 1.0,
) -> Iterator[Tensor]:
    """``[n, b, C]`` draws of the linearised logits ``(f(θ*) + J δ) / temperature``, one chunk
    at a time. Exact path: ``N(f, J Σ Jᵀ)`` through the eigendecomposition of the chunk's whole
    covariance (the last layers' closed-form covariance included), as ``glm_distribution``
    gives it; a last-layer-only posterior draws ``Q_G (√s ⊙ ε)`` directly (no ``C × C``
    matrix); sampled path: ``J δ_s`` by JVPs, plus the last layers' direct draws."""
    n = check_num_samples(n, "Laplace.predict")
    x = check_inputs(view, x)
    plan = _plan(view, x, n)
    t = temperature
    for chunk in glm_chunks(view, x, plan, generator, n):
        if chunk.stats is not None:
            mean, cov = _covariance(view, chunk)
            if t != 1.0:  # the tempered logits f / T, as glm_distribution returns them
                mean, cov = mean / t, cov / t**2
            yield sample_logits(mean, cov, n, generator)
            continue
        draws: Tensor | None = chunk.deviations
        for k, head in chunk.heads.items():
            d = head.sample(view.tau_of[k], n, generator)
            draws = d if draws is None else draws + d.to(draws.dtype)
        mean = chunk.logits if draws is None else chunk.logits.to(draws.dtype)
        f = mean.expand(n, *mean.shape) if draws is None else mean + draws
        yield f if t == 1.0 else f / t


def glm_probability_samples(
    view: PosteriorView, x: Inputs, n: int, generator: torch.Generator | None
) -> Iterator[Tensor]:
    """``[n, b, C]`` softmax probabilities of GLM draws of the tempered logits ``f / T``, one
    chunk at a time (:func:`linearised_samples`): memory bounded by ``memory_budget``."""
    for f in linearised_samples(view, x, n, generator, view.temperature):
        yield torch.softmax(f, dim=-1)


def sample(view: PosteriorView, n: int, generator: torch.Generator | None) -> Tensor:
    """``[n, P]`` full parameter vectors: ``θ* + P_b^{-1/2} ε`` on the blocks, MAP elsewhere."""
    n = check_num_samples(n, "Laplace.sample")
    draws = sample_blocks(list(view.blocks.values()), view.tau, n, generator)
    thetas = view.map_vector.unsqueeze(0).repeat(n, 1)
    for name, d in zip(view.blocks, draws, strict=True):
        view.layout.scatter_add_(name, thetas, d.to(thetas.dtype))
    return thetas


def predictive_samples(
    view: PosteriorView, x: Inputs, method: PredMethod, n: int, generator: torch.Generator | None
) -> Tensor:
    """``[n, B, C]`` probabilities of the tempered logits ``f / T``: GLM logit draws, or the
    network at sampled weights (a
    single-block posterior whose module produces the logits runs the deterministic trunk
    once). Memory: the output, ``n·B·C`` numbers; the GLM draws go chunk by chunk."""
    n = check_num_samples(n, "Laplace.predictive_samples")
    if method is PredMethod.GLM:
        return torch.cat(list(glm_probability_samples(view, x, n, generator)), dim=1)
    x = check_inputs(view, x)
    if len(view.blocks) == 1:  # e.g. last layer: run the deterministic trunk once
        (name, block), target = next(iter(view.blocks.items())), view.targets[0]
        feats = head_features(view.model, target.module, x)
        if feats is not None:
            (draw,) = sample_blocks([block], view.tau, n, generator)
            mean = view.map_vector[view.layout.block_index[name]]
            shapes = list(block.param_shapes.values())
            logits = head_logits(
                target.module, list(block.param_shapes), shapes, mean + draw.to(mean.dtype), feats
            )
            return torch.softmax(logits / view.temperature, dim=-1)
    logits = logits_at(view.model, sample(view, n, generator), x)
    return torch.softmax(logits / view.temperature, dim=-1)


def predict(
    view: PosteriorView,
    x: Inputs,
    method: PredMethod,
    link: Link,
    n: int,
    generator: torch.Generator | None,
) -> Tensor:
    """Predictive class probabilities ``[B, C]`` (GLM probit in closed form, else MC; the GLM
    draws are averaged chunk by chunk, so memory is bounded by ``chunk_size``)."""
    if method is PredMethod.GLM and link is Link.PROBIT:
        return probit(*glm_mean_variance(view, x, n, generator), view.temperature)
    n = check_num_samples(n, "Laplace.predict")
    if method is PredMethod.GLM:
        return torch.cat([p.mean(0) for p in glm_probability_samples(view, x, n, generator)])
    return predictive_samples(view, x, method, n, generator).mean(0)


COLLAPSE_DROP = 0.05  # accuracy points the weight-sampling predictive may lose on training data
COLLAPSE_POINTS, COLLAPSE_SAMPLES = 256, 16


def warn_if_sampling_collapses(view: PosteriorView, points: Batches) -> None:
    """Warn when the weight-sampling predictive loses more than :data:`COLLAPSE_DROP` accuracy
    against the MAP on (up to :data:`COLLAPSE_POINTS`) training points ``(x, y)`` batches:
    sampled weights then leave the region where the network still fits its own data, the known
    failure of weight sampling for all-weights posteriors (the GLM predictive has none)."""
    map_hits = mc_hits = count = 0
    gen = torch.Generator(view.device).manual_seed(0)
    for x, y in points:
        if count >= COLLAPSE_POINTS:
            break
        take = min(COLLAPSE_POINTS - count, len(y))
        xb = inputs_to(split_inputs(x, take)[0], view.device)
        yb = y[:take].to(view.device)
        with torch.no_grad():
            map_hits += int((call_model(view.model, xb, "Laplace").argmax(-1) == yb).sum())
        probs = predictive_samples(view, xb, PredMethod.MC, COLLAPSE_SAMPLES, gen).mean(0)
        mc_hits += int((probs.argmax(-1) == yb).sum())
        count += take
    map_acc, mc_acc = map_hits / count, mc_hits / count
    if mc_acc < map_acc - COLLAPSE_DROP:
        import warnings

        warnings.warn(
            f"Laplace: weight sampling collapses at this prior: the sampled networks reach "
            f"{mc_acc:.1%} accuracy on training points where the MAP reaches {map_acc:.1%}. Use "
            "the GLM predictive (method='glm', the default), or a larger prior precision.",
            stacklevel=4,
        )
