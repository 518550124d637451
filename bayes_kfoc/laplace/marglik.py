"""Online marginal-likelihood training: learn the prior while training the network.

:func:`marglik_training` follows Immer et al. (ICML 2021, "Scalable marginal likelihood
estimation for model selection in deep learning", Algorithm 1) and laplace-torch's
``marglik_training``:

1. every epoch, Adam steps on the network's MAP objective under the current prior;
2. after ``burn_in`` epochs, every ``frequency`` epochs: refit the curvature at the current
   weights (K-FOC warm-started from the previous fit's factors) and take ``hyper_steps`` Adam
   steps on ``t = log τ`` to raise the Laplace evidence (``docs/math.md``, "Marginal-likelihood
   training")

   ``log p(D|θ) − ½ Σ_b τ_b ||θ_b||² + ½ Σ_b P_b log τ_b − ½ Σ_b log det(F_b + τ_b I)``

   whose log-determinant is a sum over the block's eigenvalues (``Σ log(λ_G,i λ_A,j + τ)`` for a
   Kronecker block: the eigenbases are fixed, so the gradient in ``τ`` is exact).

Scales: ``F`` is the Fisher **summed** over the ``N`` training points and ``τ`` the prior
precision on that scale. The network's per-batch loss is the same objective divided by ``N``:
``mean NLL + ½ Σ_b τ_b ||θ_b||² / N`` (so ``τ_b = N·λ`` is weight decay ``λ`` on a mean loss).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..curvature import full_param_name
from ..curvature.passes import dataset_size
from ..options import FisherType, Structure
from ..stats import call_model
from ..stats.inputs import inputs_to
from . import _hyper
from .laplace import Laplace
from .prior import check_prior_precision


@dataclass(frozen=True)
class MarglikEpoch:
    """One epoch of :func:`marglik_training`.

    Attributes:
        epoch: 1-based epoch number.
        loss: mean per-point MAP objective over the epoch's batches
            (``mean NLL + ½ Σ τ_b ||θ_b||² / N``).
        nll: mean training NLL over the epoch's batches (at the weights of each step).
        log_evidence: the Laplace log evidence after this epoch's hyper-steps (summed scale),
            ``None`` in an epoch without a refit (burn-in, or between refits).
        prior_precision: ``τ`` per block (module name → value) after this epoch; before the
            first fit, the initial value for every block the first fit will have is not known
            yet, so it is empty.
        seconds: wall time of the epoch (training, fit and hyper-steps).
        fit_seconds: wall time of the curvature fit (0 without one).
        hyper_seconds: wall time of the hyper-steps (0 without them).
        solver_iterations: K-FOC iterations summed over blocks in this epoch's fit (``None``
            unless a K-FOC fit ran): a warm-started refit takes one or two per block.
    """

    epoch: int
    loss: float
    nll: float
    log_evidence: float | None
    prior_precision: dict[str, float]
    seconds: float
    fit_seconds: float = 0.0
    hyper_seconds: float = 0.0
    solver_iterations: int | None = None


@dataclass
class MarglikResult:
    """What :func:`marglik_training` returns.

    Attributes:
        laplace: a fitted :class:`Laplace` at the trained weights and the learned prior, ready
            to ``predict`` (temperature 1).
        model: the trained network (the same object that was passed in), in eval mode.
        history: one :class:`MarglikEpoch` per epoch.
    """

    laplace: Laplace
    model: nn.Module
    history: list[MarglikEpoch] = field(default_factory=list)

    @property
    def prior_precision(self) -> dict[str, float]:
        """The learned ``τ`` per block (module name → value)."""
        return self.laplace.prior_precision_dict()

    @property
    def log_evidence(self) -> list[float | None]:
        """The log evidence per epoch (``None`` where there was no refit)."""
        return [h.log_evidence for h in self.history]


def _num_data(loader: Iterable[Any], num_data: int | None) -> int:
    if num_data is not None:
        if not isinstance(num_data, int) or num_data < 1:
            raise ValueError(
                f"marglik_training: num_data must be a positive integer, got {num_data!r}."
            )
        return num_data
    size = dataset_size(loader)
    if size is None:
        raise ValueError(
            "marglik_training: the loader has no .dataset with a length, so the number of "
            "training points N (the scale of the prior term in the loss) is unknown; pass "
            "num_data=N (all ranks together when distributed)."
        )
    return size


def _check_options(epochs: int, burn_in: int, frequency: int, hyper_steps: int) -> None:
    for name, value, low in (
        ("epochs", epochs, 1),
        ("burn_in", burn_in, 0),
        ("frequency", frequency, 1),
        ("hyper_steps", hyper_steps, 1),
    ):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"marglik_training: {name} must be an integer ≥ {low}, got {value!r}.")


class _Prior:
    """The prior term ``½ Σ_b τ_b ||θ_b||²`` of the MAP loss, per parameter tensor.

    Until the first fit every parameter has ``τ0``; afterwards a block's parameters take its
    learned ``τ_b`` and parameters outside every block (``modules`` not ``"all"``, excluded
    modules) keep ``τ0``.
    """

    def __init__(self, model: nn.Module, tau0: float):
        self.params = dict(model.named_parameters())
        self.tau = {k: tau0 for k, p in self.params.items() if p.requires_grad}

    def update(self, la: Laplace, tau: Tensor) -> None:
        for (name, block), t in zip(la.blocks.items(), tau.tolist(), strict=True):
            for local in block.param_shapes:
                self.tau[full_param_name(name, local)] = t

    def term(self) -> Tensor:
        return 0.5 * sum(  # type: ignore[return-value]
            t * self.params[k].square().sum() for k, t in self.tau.items()
        )


def marglik_training(
    model: nn.Module,
    train_loader: Iterable[Any],
    structure: str = "kfoc",
    *,
    epochs: int = 100,
    lr: float = 1e-3,
    optimizer: torch.optim.Optimizer | None = None,
    prior_precision: float = 1.0,
    per_module: bool = True,
    lr_hyp: float = 0.1,
    hyper_steps: int = 100,
    burn_in: int = 0,
    frequency: int = 1,
    fisher: str = "exact",
    modules: str | Sequence[str] = "all",
    num_data: int | None = None,
    warm_start: bool = True,
    eig_dtype: torch.dtype | None = torch.float64,
    seed: int | None = None,
    progress: bool = True,
    **fit_kwargs: Any,
) -> MarglikResult:
    """Train ``model`` on ``train_loader`` and learn its prior precisions by the Laplace evidence.

    See the module docstring for the algorithm and scales. The defaults are laplace-torch's
    (Adam ``lr=1e-3`` on the weights, Adam ``lr_hyp=0.1`` on ``log τ`` with 100 steps per
    refit, a refit every epoch from the first, ``τ0 = 1`` on the summed scale).

    Args:
        model: a classifier returning logits ``[B, C]``; trained in place.
        train_loader: ``(x, y)`` batches (``x`` a tensor, or a mapping passed as
            ``model(**x)``); iterated once per epoch for training and once (cached K-FOC,
            K-FAC, diag, full) or more (streaming K-FOC) per refit. Shuffle it freely: each fit
            is one pass over it.
        structure: ``"kfoc"`` (default), ``"kfac"``, ``"diag"`` or ``"full"``.
        epochs: training epochs.
        lr: the weights' Adam learning rate (ignored when ``optimizer`` is given).
        optimizer: an optimizer over ``model``'s parameters to use instead of Adam; its own
            weight decay should be zero (the prior is the weight decay).
        prior_precision: ``τ0``, the initial prior precision of every block (summed scale).
        per_module: one ``τ`` per module (block), else one shared by all blocks.
        lr_hyp: Adam's learning rate on ``log τ``.
        hyper_steps: Adam steps on ``log τ`` per refit.
        burn_in: epochs before the first refit.
        frequency: refit (and step ``τ``) every ``frequency`` epochs after the burn-in.
        fisher: ``"exact"``, ``"mc"`` or ``"empirical"`` (see :func:`~bayes_kfoc.fit_curvature`).
        modules: which modules are random (as in :class:`Laplace`); the others keep ``τ0``.
        num_data: ``N``, the number of training points over all ranks (default:
            ``len(train_loader.dataset)``).
        warm_start: start each K-FOC refit from the previous fit's factors.
        eig_dtype: dtype of the posterior's eigendecompositions (:class:`Laplace`'s
            ``eig_dtype``); float64 by default: the factors of a network early in training are
            often rank-deficient, and float32 ``eigh`` fails on some of them (issue 20).
        seed: seeds the global RNG for the run (shuffling, dropout, MC labels) inside
            ``torch.random.fork_rng``, so the caller's RNG state is left as it was.
        progress: a tqdm bar over epochs (fits run without their own bars).
        fit_kwargs: forwarded to :func:`~bayes_kfoc.fit_curvature` (``tol``, ``mode``,
            ``distributed``, ``memory_budget``, ...).

    Returns:
        A :class:`MarglikResult` (``.laplace``, ``.model``, ``.history``).

    Distributed: the fits all-reduce every sum over data (``distributed=`` in ``fit_kwargs``,
    detected by default), so every rank sees the same evidence and takes the same ``τ`` steps;
    wrap the model in ``DistributedDataParallel`` for the weights' steps as usual.
    """
    _check_options(epochs, burn_in, frequency, hyper_steps)
    check_prior_precision(torch.tensor([float(prior_precision)]), "prior_precision")
    if "warm_start" in fit_kwargs:
        raise ValueError(
            "marglik_training: pass warm_start=True/False; the factors are the previous fit's."
        )
    kind = Structure.parse(structure, "marglik_training: structure")
    FisherType.parse(fisher, "marglik_training: fisher")  # before any training, not at a refit
    n = _num_data(train_loader, num_data)
    devices = [p.device for p in model.parameters() if p.device.type == "cuda"][:1]
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        return _train(
            model,
            train_loader,
            kind,
            n,
            epochs=epochs,
            optimizer=optimizer or torch.optim.Adam(model.parameters(), lr=lr),
            tau0=float(prior_precision),
            per_module=per_module,
            lr_hyp=lr_hyp,
            hyper_steps=hyper_steps,
            burn_in=burn_in,
            frequency=frequency,
            fisher=fisher,
            modules=modules,
            warm_start=warm_start,
            progress=progress,
            fit_kwargs={"eig_dtype": eig_dtype, **fit_kwargs},
        )


def _train(
    model: nn.Module,
    loader: Iterable[Any],
    structure: Structure,
    n: int,
    *,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    tau0: float,
    per_module: bool,
    lr_hyp: float,
    hyper_steps: int,
    burn_in: int,
    frequency: int,
    fisher: str,
    modules: str | Sequence[str],
    warm_start: bool,
    progress: bool,
    fit_kwargs: dict[str, Any],
) -> MarglikResult:
    device = next(model.parameters()).device
    prior = _Prior(model, tau0)
    log_tau: Tensor | None = None  # float64, one per block (or one shared), after the first fit
    hyper_opt: _hyper.Adam | None = None
    la: Laplace | None = None
    history: list[MarglikEpoch] = []
    fitted_at = 0  # the epoch whose weights la was fitted at

    def fit() -> Laplace:
        kwargs = dict(fit_kwargs)
        if la is not None:  # the first fit checked the model's determinism already
            kwargs.setdefault("check_determinism", False)
        if warm_start and structure is Structure.KFOC and la is not None:
            kwargs["warm_start"] = la.curvature
        model.eval()
        new = Laplace(
            model,
            structure=structure.value,
            fisher=fisher,
            modules=modules,
            progress=False,
            **kwargs,
        )
        new.fit(loader)
        return new

    bar = tqdm(range(1, epochs + 1), desc="marglik training", disable=not progress)
    for epoch in bar:
        start = time.perf_counter()
        model.train()
        loss_sum = nll_sum = 0.0
        batches = 0
        for x, y in loader:
            x, y = inputs_to(x, device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            nll = nn.functional.cross_entropy(call_model(model, x, "marglik_training"), y)
            loss = nll + prior.term() / n
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach())
            nll_sum += float(nll.detach())
            batches += 1
        if batches == 0:
            raise ValueError("marglik_training: the loader yielded no batches.")
        fit_s = hyper_s = 0.0
        evidence: float | None = None
        iterations: int | None = None
        if epoch > burn_in and (epoch - burn_in - 1) % frequency == 0:
            t0 = time.perf_counter()
            la = fit()
            fitted_at = epoch
            t1 = time.perf_counter()
            fit_s = t1 - t0
            if log_tau is None:
                size = len(la.blocks) if per_module else 1
                log_tau = torch.full((size,), math.log(tau0), dtype=torch.float64, device=device)
                hyper_opt = _hyper.Adam(log_tau, lr_hyp)
            assert hyper_opt is not None
            evidence = _hyper.hyper_steps(la, log_tau, hyper_opt, hyper_steps)
            tau = _hyper.expand(log_tau, len(la.blocks))
            la.prior_precision = tau
            prior.update(la, tau)
            hyper_s = time.perf_counter() - t1
            iterations = _solver_iterations(la)
        taus = {} if la is None else la.prior_precision_dict()
        history.append(
            MarglikEpoch(
                epoch=epoch,
                loss=loss_sum / batches,
                nll=nll_sum / batches,
                log_evidence=evidence,
                prior_precision=taus,
                seconds=time.perf_counter() - start,
                fit_seconds=fit_s,
                hyper_seconds=hyper_s,
                solver_iterations=iterations,
            )
        )
        post = {"loss": f"{loss_sum / batches:.4g}"}
        if evidence is not None:
            post["log_evidence"] = f"{evidence:.5g}"
        bar.set_postfix(post)
    model.eval()
    if la is None or fitted_at != epochs:  # the last fit is stale (or none ran): refit at θ*
        tau_now = None if la is None else la.prior_precision
        la = fit()
        la.prior_precision = tau0 if tau_now is None else tau_now
    return MarglikResult(la, model, history)


def _solver_iterations(la: Laplace) -> int | None:
    its = [getattr(b.info, "iterations", None) for b in la.blocks.values()]
    counted = [i for i in its if isinstance(i, int)]
    return sum(counted) if counted else None
