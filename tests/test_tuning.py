"""The tempered predictive and the prior tuning rules against brute-force dense references
(float64: dense Jacobians from ``torch.func``, dense posterior covariances, explicit loops)."""

from __future__ import annotations

import math

import pytest
import torch
from cases import CASES, Case
from reference import per_point_jacobians
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from bayes_kfoc import Laplace
from bayes_kfoc.laplace.prior import scaled_prior_base

KAPPA = math.pi / 8


def _fit(case: Case, structure: str = "kfoc") -> Laplace:
    model, x, y = case.make()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    return Laplace(model, structure=structure, progress=False, tol=1e-12, max_iter=500).fit(loader)


def _dense_logit_moments(la: Laplace, x: Tensor, tau: Tensor) -> tuple[Tensor, Tensor]:
    """``f(x)`` and ``J (F + τI)^{-1} Jᵀ`` from dense blocks and dense Jacobians."""
    prec = torch.block_diag(
        *[
            b.to_dense() + t * torch.eye(b.num_params, dtype=torch.float64)
            for b, t in zip(la.blocks.values(), tau, strict=True)
        ]
    )
    sigma = torch.linalg.inv(prec)
    jac = per_point_jacobians(la.model, x)
    names = la.curvature.param_names()
    j = torch.cat([jac[n].reshape(len(x), jac[n].shape[1], -1) for n in names], dim=2)
    with torch.no_grad():
        mean = la.model(x)
    return mean, j @ sigma @ j.transpose(1, 2)


def _dense_nll(mean: Tensor, cov: Tensor, y: Tensor, t: float) -> Tensor:
    var = torch.diagonal(cov, dim1=1, dim2=2)
    lp = torch.log_softmax(mean / torch.sqrt(t**2 + KAPPA * var), dim=-1)
    return -lp.gather(1, y[:, None]).squeeze(1)


@pytest.mark.parametrize("structure", ["kfoc", "kfac", "diag", "full"])
def test_tempered_predictives_equal_brute_force(structure: str) -> None:
    la = _fit(CASES[3], structure)  # skip connection, LayerNorm, a bare root parameter
    la.temperature = 1.7
    x = CASES[3].make()[1][:6]
    mean, cov = _dense_logit_moments(la, x, la.prior_precision)
    m, c = la.glm_distribution(x)
    torch.testing.assert_close(m, mean / 1.7)
    torch.testing.assert_close(c, cov / 1.7**2, rtol=1e-6, atol=1e-10)
    want = torch.softmax(mean / torch.sqrt(1.7**2 + KAPPA * torch.diagonal(cov, 0, 1, 2)), -1)
    torch.testing.assert_close(la.predict(x), want, rtol=1e-6, atol=1e-10)
    # weight sampling: the network at each sampled vector, divided by T
    gen = torch.Generator().manual_seed(0)
    got = la.predictive_samples(x, method="mc", n_samples=3, generator=gen)
    thetas = la.sample(3, generator=torch.Generator().manual_seed(0))
    names = [k for k, _ in la.model.named_parameters()]
    for s in range(3):
        parts = torch.split(thetas[s], [p.numel() for p in la.model.parameters()])
        params = {k: v.view_as(p) for k, v, p in zip(names, parts, la.model.parameters())}
        logits = functional_call(la.model, params, (x,))
        torch.testing.assert_close(got[s], torch.softmax(logits / 1.7, -1))


def test_joint_search_minimises_the_dense_validation_nll() -> None:
    la = _fit(CASES[0])
    _, xv, yv = CASES[0].make(seed=5)
    val = DataLoader(TensorDataset(xv, yv), batch_size=4)
    la.optimize_prior_precision(val_loader=val, grid=[0.1, 1.0, 10.0, 100.0], one_se=False)
    res = la.tuning
    assert res is not None and res.prior == "scaled"
    sq = torch.stack([la.map_vector[i].square().sum() for i in la.layout.block_index.values()])
    sizes = torch.tensor([b.num_params for b in la.blocks.values()], dtype=torch.float64)
    base = sizes / sq  # P_b / ||θ_b||², written out
    torch.testing.assert_close(scaled_prior_base(sq, sizes), base)
    t_grid = torch.logspace(0, 2, 801, dtype=torch.float64).tolist()  # T ∈ [1, 100]
    for s, score in res.scores.items():
        mean, cov = _dense_logit_moments(la, xv, s * base)
        brute = min(float(_dense_nll(mean, cov, yv, t).mean()) for t in t_grid)
        assert score == pytest.approx(brute, abs=1e-6)  # golden section ≈ a fine T grid
        t_s = res.temperatures[s]
        assert float(_dense_nll(mean, cov, yv, t_s).mean()) == pytest.approx(score, rel=1e-10)
    assert res.scale == min(res.scores, key=res.scores.__getitem__)
    torch.testing.assert_close(la.prior_precision, res.scale * base)
    assert la.temperature == res.temperature >= 1.0


def test_one_standard_error_rule_takes_the_widest_tolerated_posterior() -> None:
    la = _fit(CASES[0])
    _, xv, yv = CASES[0].make(seed=5)
    val = DataLoader(TensorDataset(xv, yv), batch_size=4)
    la.optimize_prior_precision(val_loader=val, grid=[0.1, 1.0, 10.0, 100.0], one_se=True)
    res = la.tuning
    assert res is not None and res.scale is not None
    scales = sorted(res.scores)
    best = min(scales, key=res.scores.__getitem__)
    sq = torch.stack([la.map_vector[i].square().sum() for i in la.layout.block_index.values()])
    base = torch.tensor([b.num_params for b in la.blocks.values()], dtype=torch.float64) / sq

    def pointwise(s: float) -> Tensor:
        mean, cov = _dense_logit_moments(la, xv, s * base)
        return _dense_nll(mean, cov, yv, res.temperatures[s])

    ref = pointwise(best)
    want = best
    for s in reversed([v for v in scales if v < best]):
        d = pointwise(s) - ref
        if float(d.mean()) > float(d.std() / math.sqrt(len(d))):
            break
        want = s
    assert res.scale == pytest.approx(want, rel=1e-12)


def test_consistency_ratio_equals_its_dense_definition() -> None:
    la = _fit(CASES[0])
    la.optimize_prior_precision()  # no validation data: the consistency rule
    res = la.tuning
    assert res is not None and res.method == "consistency" and la.temperature == 1.0
    _, x, y = CASES[0].make()
    sq = torch.stack([la.map_vector[i].square().sum() for i in la.layout.block_index.values()])
    base = torch.tensor([b.num_params for b in la.blocks.values()], dtype=torch.float64) / sq
    with torch.no_grad():
        nll_map = float(-torch.log_softmax(la.model(x), -1).gather(1, y[:, None]).mean())
    for s, r in list(res.scores.items())[:6]:
        tau = s * base
        mean, cov = _dense_logit_moments(la, x, tau)
        drop = len(x) * (float(_dense_nll(mean, cov, y, 1.0).mean()) - nll_map)
        gamma = 0.0
        for b, t in zip(la.blocks.values(), tau, strict=True):
            lam = torch.linalg.eigvalsh(b.to_dense()).clamp_min(0)
            gamma += float((lam / (lam + t)).sum())
        assert r == pytest.approx(drop / (0.5 * gamma), rel=1e-6)


class _NormNet(nn.Module):
    """A bias-free Linear followed by LayerNorm: its weight's scale does not change the output."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6, bias=False)
        self.norm = nn.LayerNorm(6, eps=1e-300, elementwise_affine=False)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.norm(self.inp(x))))


@pytest.mark.parametrize("structure", ["kfoc", "kfac", "diag"])
def test_scaled_prior_makes_the_predictive_invariant_to_normalised_weight_scale(
    structure: str,
) -> None:
    torch.manual_seed(0)
    x = torch.randn(12, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    preds = []
    for c in (1.0, 25.0):
        torch.manual_seed(1)
        net = _NormNet().double().eval()
        with torch.no_grad():
            net.inp.weight.mul_(c)
        la = Laplace(net, structure=structure, progress=False, tol=1e-12, max_iter=500)
        la.fit(DataLoader(TensorDataset(x, y), batch_size=4))
        sq = torch.stack([la.map_vector[i].square().sum() for i in la.layout.block_index.values()])
        sizes = torch.tensor([b.num_params for b in la.blocks.values()], dtype=torch.float64)
        la.prior_precision = 3.0 * scaled_prior_base(sq, sizes)
        preds.append(la.predict(x))
    torch.testing.assert_close(preds[0], preds[1], rtol=1e-8, atol=1e-10)


def test_collapsing_weight_sampling_warns_once_per_prior() -> None:
    la = _fit(CASES[0])
    x = CASES[0].make()[1]
    la.prior_precision = 1e-6  # a prior so wide that sampled networks lose their fit
    with pytest.warns(UserWarning, match="weight sampling collapses"):
        la.predict(x, method="mc", n_samples=8, generator=torch.Generator().manual_seed(1))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same prior again: no second check
        la.predict(x, method="mc", n_samples=8, generator=torch.Generator().manual_seed(1))
        la.prior_precision = 1e8  # a tight posterior: sampled networks are the MAP
        la.predict(x, method="mc", n_samples=8, generator=torch.Generator().manual_seed(1))


def test_fit_records_training_points_from_a_one_shot_loader_too() -> None:
    model, x, y = CASES[0].make()
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, len(x), 4)]
    la = Laplace(model, structure="kfac", progress=False).fit(iter(batches))  # one pass suffices
    la.optimize_prior_precision()  # the consistency rule on the recorded points
    assert la.tuning is not None and la.tuning.method == "consistency"
    with pytest.raises(ValueError, match="one-shot"):  # streaming K-FOC needs a second pass
        Laplace(model, progress=False, mode="streaming").fit(iter(batches))
