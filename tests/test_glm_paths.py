"""The GLM predictive's paths (issue 20) against dense float64 references: the closed-form last
layer, the sampled linearised predictive (forward-mode JVPs), tuning in bounded memory, and the
memory budget's error.

References: per-point Jacobians from ``torch.func.jacrev`` and the dense block-diagonal
posterior covariance ``(F + τI)^{-1}`` (``tests/reference.py``)."""

from __future__ import annotations

import pytest
import torch
from reference import dense_posterior_precision, per_point_jacobians
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from bayes_kfoc import Laplace
from bayes_kfoc.laplace import predictive
from bayes_kfoc.laplace.tuning import scale_variances
from bayes_kfoc.options import GlmPath
from bayes_kfoc.stats import Collector

MC_DRAWS = 4000
MC_SIGMAS = 5.0  # a sampled mean / covariance entry within 5 of its Monte-Carlo standard errors
MC_SEED = 0


def _net(classes: int, bias: bool, width: int = 6) -> nn.Module:
    torch.manual_seed(0)
    return (
        nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, classes, bias=bias))
        .double()
        .eval()
    )


def _fit(
    classes: int, bias: bool, structure: str, modules: str = "all", **kwargs: object
) -> tuple[Laplace, Tensor, Tensor]:
    model = _net(classes, bias)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(24, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (24,), generator=gen)
    la = Laplace(
        model, structure=structure, modules=modules, progress=False, tol=1e-12, **kwargs
    ).fit(DataLoader(TensorDataset(x, y), batch_size=8))
    la.prior_precision = 0.7
    return la, x, y


def _dense_moments(la: Laplace, x: Tensor) -> tuple[Tensor, Tensor]:
    """``f(x)`` and ``J (F + τI)^{-1} Jᵀ`` from dense Jacobians and the dense posterior."""
    sigma = torch.linalg.inv(dense_posterior_precision(la))
    jac = per_point_jacobians(la.model, x)
    names = [f"{k}.{p}" if k else p for k, b in la.blocks.items() for p in b.param_shapes]
    j = torch.cat([jac[n].reshape(len(x), jac[n].shape[1], -1) for n in names], dim=2)
    with torch.no_grad():
        mean = la.model(x)
    return mean, j @ sigma @ j.transpose(1, 2)


class _NoJacobians:
    """A collector that must not run (the closed form needs no Jacobian)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("the closed-form last layer ran the Jacobian collector")


@pytest.mark.parametrize("structure", ["kfoc", "diag"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("classes", [2, 7])
def test_closed_form_last_layer_equals_the_dense_jacobian_path(
    classes: int, bias: bool, structure: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    la, x, _ = _fit(classes, bias, structure, modules="last_layer")
    mean, cov = _dense_moments(la, x[:9])
    monkeypatch.setattr("bayes_kfoc.laplace._glm_pass.Collector", _NoJacobians)
    m, c = la.glm_distribution(x[:9])
    assert la.last_glm is not None and la.last_glm.closed_form == ("2",)
    torch.testing.assert_close(m, mean)
    torch.testing.assert_close(c, cov, rtol=1e-9, atol=1e-12)
    _, var = predictive.glm_mean_variance(la.view(), x[:9])
    torch.testing.assert_close(var, torch.diagonal(cov, dim1=1, dim2=2), rtol=1e-9, atol=1e-12)
    la.temperature = 1.3
    want = predictive.probit(mean, torch.diagonal(cov, dim1=1, dim2=2), 1.3)
    torch.testing.assert_close(la.predict(x[:9]), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("structure", ["kfac", "diag"])
def test_closed_form_head_inside_an_all_weights_posterior(structure: str) -> None:
    la, x, _ = _fit(5, True, structure)
    mean, cov = _dense_moments(la, x[:9])
    _, c = la.glm_distribution(x[:9])
    assert la.last_glm is not None and la.last_glm.closed_form == ("2",)
    torch.testing.assert_close(c, cov, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        la.predict(x[:9], glm="exact"), predictive.probit(mean, torch.diagonal(cov, dim1=1, dim2=2))
    )


def _assert_moments(draws: Tensor, mean: Tensor, cov: Tensor) -> None:
    """Sample mean and covariance of ``draws`` ``[S, B, C]`` within :data:`MC_SIGMAS` standard
    errors of ``mean`` and ``cov`` (Gaussian: ``Var(x̂_ij) = (Σ_ii Σ_jj + Σ_ij²) / S``)."""
    s = draws.shape[0]
    var = torch.diagonal(cov, dim1=1, dim2=2)
    se_mean = (var / s).sqrt()
    assert bool(((draws.mean(0) - mean).abs() <= MC_SIGMAS * se_mean + 1e-12).all())
    dev = draws - mean
    sample_cov = torch.einsum("sbi,sbj->bij", dev, dev) / s
    se_cov = ((var.unsqueeze(2) * var.unsqueeze(1) + cov.square()) / s).sqrt()
    assert bool(((sample_cov - cov).abs() <= MC_SIGMAS * se_cov + 1e-12).all())


@pytest.mark.mc
@pytest.mark.parametrize("bias", [True, False])
def test_closed_form_mc_link_draws_have_the_dense_moments(bias: bool) -> None:
    la, x, _ = _fit(7, bias, "kfoc", modules="last_layer")
    mean, cov = _dense_moments(la, x[:5])
    gen = torch.Generator().manual_seed(MC_SEED)
    draws = torch.cat(list(predictive.linearised_samples(la.view(), x[:5], MC_DRAWS, gen)), 1)
    _assert_moments(draws, mean, cov)


@pytest.mark.mc
@pytest.mark.parametrize("structure", ["kfoc", "diag", "full"])
def test_sampled_glm_matches_the_exact_glm_in_distribution(structure: str) -> None:
    la, x, _ = _fit(4, True, structure)
    mean, cov = _dense_moments(la, x[:5])
    gen = torch.Generator().manual_seed(MC_SEED)
    view = la.view(glm="sampled")
    draws = torch.cat(list(predictive.linearised_samples(view, x[:5], MC_DRAWS, gen)), 1)
    assert la.last_glm is not None and la.last_glm.path is GlmPath.SAMPLED
    _assert_moments(draws, mean, cov)
    # the probit link: the draws' mean squares as variances, near the exact probit
    gen = torch.Generator().manual_seed(MC_SEED)
    got = la.predict(x[:5], glm="sampled", n_samples=MC_DRAWS, generator=gen)
    want = predictive.probit(mean, torch.diagonal(cov, dim1=1, dim2=2))
    torch.testing.assert_close(got, want, rtol=0, atol=0.01)


def test_sampled_glm_is_seeded_by_its_generator() -> None:
    la, x, _ = _fit(4, True, "kfac")
    a = la.predict(x[:5], glm="sampled", n_samples=8, generator=torch.Generator().manual_seed(3))
    b = la.predict(x[:5], glm="sampled", n_samples=8, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_auto_path_takes_the_sampled_glm_for_many_classes() -> None:
    la, x, _ = _fit(3, True, "kfac")
    la.predict(x[:4])
    assert la.last_glm is not None and la.last_glm.path is GlmPath.EXACT
    many, xm, _ = _fit(400, True, "kfac")
    many.predict(xm[:4], n_samples=8)
    assert many.last_glm is not None and many.last_glm.path is GlmPath.SAMPLED
    assert many.last_glm.sampled_cost < many.last_glm.exact_cost


def test_auto_falls_back_to_the_exact_path_without_forward_mode_ad(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where an operation lacks forward-mode AD, ``glm="auto"`` re-plans the exact path (its own
    chunks) and gives the exact predictive; ``glm="sampled"`` raises naming the fix."""
    from bayes_kfoc.laplace import _glm_pass

    many, xm, _ = _fit(400, True, "kfac")
    exact = many.predict(xm[:4], glm="exact")

    def no_forward_ad(*args: object, **kwargs: object) -> None:
        raise NotImplementedError("trying to use forward AD with an op that does not support it")

    monkeypatch.setattr(_glm_pass, "linearised_deviations", no_forward_ad)
    torch.testing.assert_close(many.predict(xm[:4], n_samples=8), exact)
    assert many.last_glm is not None and many.last_glm.path is GlmPath.EXACT
    with pytest.raises(NotImplementedError, match="use glm='exact'"):
        many.predict(xm[:4], glm="sampled", n_samples=8)


def _tuned(la: Laplace, x: Tensor, y: Tensor, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    passes: list[int] = []
    real = scale_variances.ScaleVariances.take

    def spy(self: scale_variances.ScaleVariances, u: float) -> Tensor:
        passes.append(self.passes)
        return real(self, u)

    monkeypatch.setattr(scale_variances.ScaleVariances, "take", spy)
    la.optimize_prior_precision(val_loader=DataLoader(TensorDataset(x, y), batch_size=8))
    monkeypatch.undo()
    return passes


def test_bounded_memory_tuning_chooses_what_the_in_memory_search_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    la, x, y = _fit(3, True, "kfoc")
    big = _tuned(la, x, y, monkeypatch)
    small, _, _ = _fit(3, True, "kfoc", memory_budget=3_000)
    streamed = _tuned(small, x, y, monkeypatch)
    assert max(big) == 1 and max(streamed) >= 2  # kept terms: one pass; streamed: more
    assert la.tuning is not None and small.tuning is not None
    assert small.tuning.scale == la.tuning.scale
    assert small.tuning.temperature == pytest.approx(la.tuning.temperature, rel=1e-9)
    assert list(small.tuning.scores) == list(la.tuning.scores)
    for a, b in zip(small.tuning.scores.values(), la.tuning.scores.values(), strict=True):
        assert a == pytest.approx(b, rel=1e-9)
    la.optimize_prior_precision()  # the consistency rule, kept and streamed
    small.optimize_prior_precision()
    assert la.tuning is not None and small.tuning is not None
    assert small.tuning.scale == la.tuning.scale


def test_a_budget_below_one_point_raises_naming_the_budget() -> None:
    la, x, y = _fit(3, True, "kfac", memory_budget=64)
    with pytest.raises(MemoryError, match="memory_budget of 64.0 B.*Raise it"):
        la.predict(x[:4], glm="exact")
    with pytest.raises(MemoryError, match="memory_budget"):
        la.optimize_prior_precision(val_loader=[(x, y)])
    with pytest.raises(ValueError, match="unknown value 'fast'"):
        la.predict(x[:4], glm="fast")


def test_collector_sees_no_head_in_an_all_weights_posterior(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    la, x, _ = _fit(5, True, "kfoc")
    names: list[set[str]] = []
    real = Collector.jacobians

    def spy(self: Collector, xb: object, only: set[str] | None = None) -> object:
        names.append({t.name for t in self.targets})
        return real(self, xb, only)  # type: ignore[arg-type]

    monkeypatch.setattr(Collector, "jacobians", spy)
    la.predict(x[:4], glm="exact")
    assert names == [{"0"}]  # the head "2" gets no backpropagated directions


class _ScaledInPlace(nn.Module):
    """The head's output is returned, but scaled in place first: not an identity Jacobian."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        out = self.head(torch.tanh(self.inp(x)))
        return out.mul_(2.0)


def test_a_head_scaled_in_place_takes_the_jacobian_path() -> None:
    torch.manual_seed(0)
    model = _ScaledInPlace().double().eval()
    x = torch.randn(12, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    la = Laplace(model, structure="kfac", progress=False).fit([(x, y)])
    _, cov = _dense_moments(la, x[:5])
    _, c = la.glm_distribution(x[:5])
    assert la.last_glm is not None and la.last_glm.closed_form == ()
    torch.testing.assert_close(c, cov, rtol=1e-9, atol=1e-12)


def _few_positions_conv_net(classes: int) -> nn.Module:
    """Convolutions with few output positions (``T = 4``, then ``T = 1``), as in a ResNet's late
    stages at CIFAR size, where the exact GLM rotates the position factors before multiplying
    them (:meth:`bayes_kfoc.stats.kron.SharedStats.rotated_grads`)."""
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Conv2d(1, 4, 3, stride=2),  # 1×6×6 -> 4×2×2: T = 4, o = 4, n = 10
            nn.Tanh(),
            nn.Conv2d(4, 6, 2),  # -> 6×1×1: T = 1 (rank one)
            nn.Flatten(),
            nn.Tanh(),
            nn.Linear(6, classes),
        )
        .double()
        .eval()
    )


def test_factored_rotation_equals_the_formed_gradients() -> None:
    """``Q_Gᵀ M Q_A`` from rotated position factors equals rotating each formed ``M``, for a
    shape where the factored order is the cheaper one."""
    from bayes_kfoc.stats.kron import KronStats, SharedStats

    gen = torch.Generator().manual_seed(3)
    a = torch.randn(5, 2, 30, generator=gen, dtype=torch.float64)  # N, T, n
    d = torch.randn(4, 5, 2, 20, generator=gen, dtype=torch.float64)  # V, N, T, o
    qg = torch.linalg.qr(torch.randn(20, 20, generator=gen, dtype=torch.float64))[0]
    qa = torch.linalg.qr(torch.randn(30, 30, generator=gen, dtype=torch.float64))[0]
    st = SharedStats(a, d, bias=True)
    formed = KronStats.rotated_grads(st, qg, qa)
    m = torch.einsum("vnto,nti->vnoi", d, a)
    torch.testing.assert_close(formed, qg.T @ m @ qa)  # the reference itself
    torch.testing.assert_close(st.rotated_grads(qg, qa), formed, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("structure", ["kfac", "kfoc"])
@pytest.mark.parametrize("classes", [3, 7])  # 7: T = 4 < C, the position-kernel contraction
def test_exact_glm_on_few_position_convolutions_equals_the_dense_glm(
    structure: str, classes: int
) -> None:
    model = _few_positions_conv_net(classes)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(24, 1, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (24,), generator=gen)
    la = Laplace(model, structure=structure, progress=False, tol=1e-12).fit(
        DataLoader(TensorDataset(x, y), batch_size=8)
    )
    la.prior_precision = 0.7
    mean, cov = _dense_moments(la, x[:9])
    m, c = la.glm_distribution(x[:9])
    assert la.last_glm is not None and la.last_glm.path is GlmPath.EXACT
    torch.testing.assert_close(m, mean)
    torch.testing.assert_close(c, cov, rtol=1e-9, atol=1e-12)
    want = predictive.probit(mean, torch.diagonal(cov, dim1=1, dim2=2))
    torch.testing.assert_close(la.predict(x[:9], glm="exact"), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("structure", ["kfoc", "diag"])
def test_glm_terms_give_the_dense_glm_at_any_prior_and_temperature(structure: str) -> None:
    """``Laplace.glm_terms``: one Jacobian pass, then the dense GLM probit at other priors (a
    scalar, a scale of the scaled prior) and temperatures, without refitting or re-linearising."""
    la, x, _ = _fit(5, True, structure)
    terms = la.glm_terms(x[:9])
    assert terms.blocks == tuple(la.blocks)
    for tau in (0.3, 40.0):
        la.prior_precision = tau
        mean, cov = _dense_moments(la, x[:9])
        var = torch.diagonal(cov, dim1=1, dim2=2)
        torch.testing.assert_close(terms.variances(tau), var, rtol=1e-9, atol=1e-12)
        want = predictive.probit(mean, var, 1.7)
        torch.testing.assert_close(terms.probs(tau, temperature=1.7), want, rtol=1e-9, atol=1e-12)
    scale = 2.5
    la.prior_precision = scale * la.scaled_prior_base()
    _, cov = _dense_moments(la, x[:9])
    torch.testing.assert_close(
        terms.variances(scale=scale), torch.diagonal(cov, dim1=1, dim2=2), rtol=1e-9, atol=1e-12
    )
    with pytest.raises(ValueError, match="not both"):
        terms.probs(1.0, scale=1.0)
