"""Marginal-likelihood training against dense float64 references.

- the evidence and its gradient in ``log τ`` against ``torch.logdet`` of the dense precision
  (the blocks' ``to_dense()``, and for ``full`` a GGN built independently with ``torch.func``);
- the training's fixed point on multiclass logistic regression against a brute-force one
  (θ*(τ) by dense Newton, the dense GGN, MacKay's condition solved by bisection);
- K-FOC refits warm-started from other factors reach the dense top-1 SVD optimum.
"""

from __future__ import annotations

import math

import pytest
import torch
from cases import CASES
from reference import dense_fisher, kron_order, rel_err, top1_kron
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from bayes_kfoc import KronBlock, Laplace, fit_curvature, marglik_training

RTOL = 1e-6
FIXED_POINT_RTOL = 1e-4  # θ and τ after training from the fixed point (Adam's steps on τ
# move θ along the softmax's null directions, whose curvature is τ alone)
CONVERGED_RTOL = 0.01  # θ, τ after 600 epochs from τ0 = 1 (measured: 1.4e-4 and 4.5e-4)


def _fit(structure: str, tau: Tensor | float = 0.7) -> tuple[Laplace, nn.Module, Tensor, Tensor]:
    model, x, y = CASES[0].make()
    la = Laplace(model, structure=structure, prior_precision=tau, progress=False, tol=1e-12)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=4))
    return la, model, x, y


def _dense_evidence(
    blocks: list[Tensor], theta: Tensor, log_lik: Tensor, log_tau: Tensor
) -> Tensor:
    """``log p(D|θ) − ½ Σ τ_b||θ_b||² + ½ Σ P_b log τ_b − ½ log det(F + diag τ)``, densely."""
    sizes = torch.tensor([b.shape[0] for b in blocks])
    tau = log_tau.exp()
    tau_vec = torch.repeat_interleave(tau, sizes)
    precision = torch.block_diag(*blocks) + torch.diag(tau_vec)
    return (
        log_lik
        - 0.5 * (tau_vec * theta.square()).sum()
        + 0.5 * (sizes.double() * log_tau).sum()
        - 0.5 * torch.logdet(precision)
    )


@pytest.mark.parametrize("structure", ["kfoc", "kfac", "diag", "full"])
def test_evidence_and_its_gradient_in_log_tau_equal_the_dense_logdet(structure: str) -> None:
    la, model, x, y = _fit(structure)
    with torch.no_grad():
        log_lik = torch.log_softmax(model(x), -1).gather(1, y[:, None]).sum()
    log_tau0 = torch.tensor([math.log(0.3), math.log(4.0)], dtype=torch.float64)
    dense = [b.to_dense() for b in la.blocks.values()]
    if structure == "full":  # an independent GGN: torch.func Jacobians, plainly pulled back
        fisher, _ = dense_fisher(model, [(x, y)], "exact")
        sizes = [b.num_params for b in la.blocks.values()]
        dense = [fisher[a : a + s, a : a + s] for a, s in zip([0, sizes[0]], sizes, strict=True)]
    ref_t = log_tau0.clone().requires_grad_(True)
    ref = _dense_evidence(dense, la.mean, log_lik, ref_t)
    (ref_grad,) = torch.autograd.grad(ref, ref_t)
    ours_t = log_tau0.clone().requires_grad_(True)
    ours = la.log_marginal_likelihood(ours_t.exp())
    (ours_grad,) = torch.autograd.grad(ours, ours_t)
    torch.testing.assert_close(ours, ref.detach(), rtol=RTOL, atol=1e-9)
    torch.testing.assert_close(ours_grad, ref_grad, rtol=RTOL, atol=1e-9)
    assert bool((ref_grad.abs() > 1e-3).all())  # away from the optimum: the test can fail


def _logistic_data() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 4, generator=gen, dtype=torch.float64)
    teacher = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    logits = x @ teacher.T + 0.5 * torch.randn(60, 3, generator=gen, dtype=torch.float64)
    return x, logits.argmax(1)


def _flat(w: Tensor, b: Tensor) -> Tensor:
    return torch.cat([w.flatten(), b])


def _jacobians(x: Tensor) -> Tensor:
    """``[N, 3, 15]``: the logits' Jacobian in ``θ = [W.flatten(), b]`` (written out by hand)."""
    jac = torch.zeros(len(x), 3, 15, dtype=torch.float64)
    for c in range(3):
        jac[:, c, 4 * c : 4 * c + 4] = x
        jac[:, c, 12 + c] = 1.0
    return jac


def _ggn(x: Tensor, theta: Tensor) -> Tensor:
    """The exact summed GGN (the Hessian of the summed NLL) of ``softmax(W x + b)`` at θ."""
    jac = _jacobians(x)
    p = torch.softmax(torch.einsum("ncp,p->nc", jac, theta), -1)
    h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("ncp,ncd,ndq->pq", jac, h, jac)


def _map_by_newton(x: Tensor, y: Tensor, tau: float, theta: Tensor | None = None) -> Tensor:
    """θ* of ``Σ NLL + ½τ||θ||²`` for ``softmax(W x + b)``, by dense Newton (float64)."""
    jac = _jacobians(x)
    theta = torch.zeros(15, dtype=torch.float64) if theta is None else theta
    onehot = nn.functional.one_hot(y, 3).double()
    for _ in range(100):
        p = torch.softmax(torch.einsum("ncp,p->nc", jac, theta), -1)
        grad = torch.einsum("ncp,nc->p", jac, p - onehot) + tau * theta
        if float(grad.norm()) < 1e-11:
            break
        theta = theta - torch.linalg.solve(_ggn(x, theta) + tau * torch.eye(15), grad)
    return theta


def _brute_force_fixed_point(x: Tensor, y: Tensor) -> tuple[float, Tensor]:
    """MacKay's fixed point ``Σ λ_i/(λ_i+τ) = τ ||θ*(τ)||²`` (``λ`` of the GGN at ``θ*(τ)``),
    by bisection in ``log τ``; the difference is positive below the root."""

    def gap(log_tau: float) -> float:
        tau = math.exp(log_tau)
        theta = _map_by_newton(x, y, tau)
        lam = torch.linalg.eigvalsh(_ggn(x, theta))
        return float((lam / (lam + tau)).sum() - tau * theta.square().sum())

    lo, hi = -8.0, 8.0
    assert gap(lo) > 0 > gap(hi)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if gap(mid) > 0 else (lo, mid)
    tau = math.exp(0.5 * (lo + hi))
    return tau, _map_by_newton(x, y, tau)


@pytest.fixture(scope="module")
def fixed_point() -> tuple[float, Tensor]:
    return _brute_force_fixed_point(*_logistic_data())


def _linear_model(theta: Tensor | None) -> nn.Linear:
    torch.manual_seed(1)
    model = nn.Linear(4, 3).double()
    if theta is not None:
        with torch.no_grad():
            model.weight.copy_(theta[:12].reshape(3, 4))
            model.bias.copy_(theta[12:])
    return model


def test_the_brute_force_fixed_point_maximises_the_dense_evidence_at_its_map(
    fixed_point: tuple[float, Tensor],
) -> None:
    """At ``θ*(τ*)`` the dense evidence, brute-forced over a log grid, peaks at ``τ*``."""
    tau, theta = fixed_point
    x, y = _logistic_data()
    fisher = _ggn(x, theta)
    grid = torch.linspace(math.log(tau) - 0.05, math.log(tau) + 0.05, 201, dtype=torch.float64)
    log_lik = -nn.functional.cross_entropy(
        x @ theta[:12].reshape(3, 4).T + theta[12:], y, reduction="sum"
    )
    values = torch.stack([_dense_evidence([fisher], theta, log_lik, t.reshape(1)) for t in grid])
    assert abs(float(grid[values.argmax()]) - math.log(tau)) <= 0.0005 + 1e-12


@pytest.mark.parametrize("structure", ["full", "kfoc"])
def test_training_from_the_fixed_point_stays_there(
    fixed_point: tuple[float, Tensor], structure: str
) -> None:
    """θ = θ*(τ*), τ0 = τ*: gradient steps and evidence steps leave both where they are.

    A single Linear layer has one row of ``ā āᵀ`` per point and the softmax's ``B_n``; K-FOC's
    block is then not the full GGN, so only ``full`` must reproduce τ* exactly; K-FOC's τ is
    checked against the dense evidence maximiser of its own block at θ*.
    """
    tau, theta = fixed_point
    x, y = _logistic_data()
    model = _linear_model(theta)
    loader = DataLoader(TensorDataset(x, y), batch_size=60)
    result = marglik_training(
        model,
        loader,
        structure,
        epochs=5 if structure == "full" else 1,  # K-FOC's τ differs: θ would then move
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        prior_precision=tau,
        progress=False,
        tol=1e-12,
        max_iter=500,
    )
    torch.testing.assert_close(
        _flat(model.weight, model.bias).detach(), theta, rtol=FIXED_POINT_RTOL, atol=1e-8
    )
    learned = float(result.laplace.prior_precision[0])
    if structure == "full":
        assert learned == pytest.approx(tau, rel=FIXED_POINT_RTOL)
        return
    block = next(iter(result.laplace.blocks.values()))
    lam = torch.linalg.eigvalsh(block.to_dense())
    tau_kfoc = _evidence_root(lam, float(theta.square().sum()))
    assert learned == pytest.approx(tau_kfoc, rel=FIXED_POINT_RTOL)


def _evidence_root(lam: Tensor, sq_norm: float) -> float:
    lo, hi = -20.0, 20.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        t = math.exp(mid)
        lo, hi = (mid, hi) if float((lam / (lam + t)).sum()) > t * sq_norm else (lo, mid)
    return math.exp(0.5 * (lo + hi))


@pytest.mark.slow
def test_training_from_scratch_reaches_the_brute_force_fixed_point(
    fixed_point: tuple[float, Tensor],
) -> None:
    tau, theta = fixed_point
    x, y = _logistic_data()
    model = _linear_model(None)
    loader = DataLoader(TensorDataset(x, y), batch_size=60)
    result = marglik_training(
        model,
        loader,
        "full",
        epochs=600,
        optimizer=torch.optim.Adam(model.parameters(), lr=0.05),
        frequency=5,
        progress=False,
        seed=0,
    )
    learned = float(result.laplace.prior_precision[0])
    assert learned == pytest.approx(tau, rel=CONVERGED_RTOL)
    assert rel_err(_flat(model.weight, model.bias).detach(), theta) < CONVERGED_RTOL
    evidence = [h.log_evidence for h in result.history]
    assert [e is not None for e in evidence] == [i % 5 == 0 for i in range(600)]


@pytest.mark.parametrize("solver", ["lanczos", "power"])
@pytest.mark.parametrize("mode", ["cached", "streaming"])
def test_warm_started_kfoc_reaches_the_dense_top1_optimum(solver: str, mode: str) -> None:
    model, x, y = CASES[0].make()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    kw = {"progress": False, "tol": 1e-10, "max_iter": 500, "solver": solver, "mode": mode}
    before = fit_curvature(model, loader, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    warm = fit_curvature(model, loader, warm_start=before, **kw)
    again = fit_curvature(model, loader, warm_start=warm, **kw)
    fisher, _ = dense_fisher(model, [(x, y)], "exact")
    start = 0
    for name, block in warm.blocks.items():
        assert isinstance(block, KronBlock)
        size = block.num_params
        exact = fisher[start : start + size, start : start + size]
        start += size
        n = block.d_in + int(block.bias)
        best, _, _ = top1_kron(kron_order(exact, block.d_out, n, block.bias), block.d_out, n)
        ours = kron_order(block.to_dense(), block.d_out, n, block.bias)
        assert rel_err(ours, best) < 1e-7, name
        assert again.blocks[name].info.iterations <= 2  # from its own optimum: one step or two


def test_warm_start_errors_name_the_module_and_the_fix() -> None:
    model, x, y = CASES[0].make()
    loader = [(x, y)]
    curv = fit_curvature(model, loader, progress=False)
    bad = {"0": (torch.eye(3, dtype=torch.float64), curv["0"].G)}
    with pytest.raises(ValueError, match=r"warm_start\['0'\] has A \(3, 3\).*needs A \(5, 5\)"):
        fit_curvature(model, loader, warm_start=bad, progress=False)
    with pytest.raises(ValueError, match=r"warm_start names module\(s\) \['nope'\]"):
        fit_curvature(
            model, loader, warm_start={"nope": (curv["0"].A, curv["0"].G)}, progress=False
        )
    with pytest.raises(ValueError, match="structure='kfoc' only"):
        fit_curvature(model, loader, "kfac", warm_start=curv, progress=False)


class _DictNet(nn.Module):
    """A CNN that takes ``model(**{"pixels": x, "scale": s})`` (a mapping input)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 5 * 5, 3)

    def forward(self, pixels: Tensor, scale: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.conv(pixels * scale[:, None, None, None])).flatten(1))


class _DictData(torch.utils.data.Dataset[tuple[dict[str, Tensor], Tensor]]):
    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(24, 2, 5, 5, generator=gen, dtype=torch.float64)
        self.s = torch.rand(24, generator=gen, dtype=torch.float64) + 0.5
        self.y = torch.randint(0, 3, (24,), generator=gen)

    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int) -> tuple[dict[str, Tensor], Tensor]:
        return {"pixels": self.x[i], "scale": self.s[i]}, self.y[i]


@pytest.mark.parametrize("structure", ["kfoc", "kfac", "diag"])
def test_dict_inputs_conv_history_and_seed(structure: str) -> None:
    def run() -> tuple[nn.Module, object]:
        torch.manual_seed(0)
        model = _DictNet().double()
        loader = DataLoader(_DictData(), batch_size=8, shuffle=True)
        result = marglik_training(
            model, loader, structure, epochs=4, burn_in=1, frequency=2, seed=3, progress=False
        )
        return model, result

    model, result = run()
    hist = result.history  # type: ignore[attr-defined]
    assert [h.epoch for h in hist] == [1, 2, 3, 4]
    assert [h.log_evidence is not None for h in hist] == [False, True, False, True]
    assert hist[0].prior_precision == {} and set(hist[1].prior_precision) == {"conv", "fc"}
    assert all(h.seconds >= h.fit_seconds + h.hyper_seconds for h in hist)
    assert (hist[1].solver_iterations is not None) == (structure == "kfoc")
    la = result.laplace  # type: ignore[attr-defined]
    assert la.prior_precision_dict() == hist[-1].prior_precision
    assert not model.training
    x = {"pixels": _DictData().x[:5], "scale": _DictData().s[:5]}
    probs = la.predict(x)
    torch.testing.assert_close(probs.sum(-1), torch.ones(5, dtype=torch.float64))
    model2, result2 = run()  # the same seed: the same run
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
    assert [h.loss for h in hist] == [h.loss for h in result2.history]  # type: ignore[attr-defined]


def test_bad_options_are_clear_errors() -> None:
    model = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    with pytest.raises(ValueError, match="frequency must be an integer ≥ 1, got 0"):
        marglik_training(model, loader, frequency=0, progress=False)
    with pytest.raises(ValueError, match="pass num_data=N"):
        marglik_training(model, [(x, y)], progress=False)
    with pytest.raises(ValueError, match="prior_precision must be positive"):
        marglik_training(model, loader, prior_precision=0.0, progress=False)
    with pytest.raises(ValueError, match="structure"):
        marglik_training(model, loader, "kron", progress=False)


@pytest.mark.parametrize("structure", ["kfoc", "diag", "full"])
def test_the_vectorised_evidence_equals_the_laplace_one(structure: str) -> None:
    from bayes_kfoc.laplace._hyper import Evidence

    la, _, _, _ = _fit(structure)
    tau = torch.tensor([0.3, 4.0], dtype=torch.float64, requires_grad=True)
    ours = Evidence(la)(tau)
    ref = la.log_marginal_likelihood(tau)
    torch.testing.assert_close(ours, ref, rtol=RTOL, atol=1e-9)
    g1, g2 = torch.autograd.grad(ours, tau)[0], torch.autograd.grad(ref, tau)[0]
    torch.testing.assert_close(g1, g2, rtol=RTOL, atol=1e-9)
    closed = Evidence(la).grad_log_tau(tau.detach())  # d/d log τ = τ d/dτ
    torch.testing.assert_close(closed, tau.detach() * g2, rtol=RTOL, atol=1e-9)


def test_the_written_out_adam_matches_torch_adam() -> None:
    from bayes_kfoc.laplace._hyper import Adam as _Adam

    gen = torch.Generator().manual_seed(0)
    ours = torch.zeros(3, dtype=torch.float64)
    ref = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    adam, torch_adam = _Adam(ours, 0.1), torch.optim.Adam([ref], lr=0.1)
    for _ in range(20):
        grad = torch.randn(3, generator=gen, dtype=torch.float64)
        adam.ascend(grad)
        ref.grad = -grad  # torch descends
        torch_adam.step()
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-12, atol=1e-12)


def test_an_unknown_fisher_is_refused_before_any_training() -> None:
    model = nn.Linear(3, 2)
    before = model.weight.detach().clone()
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    with pytest.raises(ValueError, match="marglik_training: fisher: unknown value 'exct'"):
        marglik_training(model, loader, "kfac", epochs=3, burn_in=2, fisher="exct", progress=False)
    assert torch.equal(model.weight, before)
