"""The Laplace posterior against dense references on tiny float64 networks."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from cases import CASE_IDS, CASES, Case
from reference import dense_posterior_precision, per_point_jacobians
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from bayes_kfoc import Laplace

RTOL = 1e-6
MC_TOL = 0.05  # relative Frobenius error of a 40k-sample covariance estimate (seeded)
STRUCTURES = ["kfoc", "kfac", "diag", "full"]


def _fit(case: Case, structure: str, subset: str = "all", tau: float = 0.7) -> Laplace:
    model, x, y = case.make()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    la = Laplace(
        model,
        structure=structure,
        modules=subset,
        prior_precision=tau,
        progress=False,
        tol=1e-12,
        max_iter=500,
    )
    return la.fit(loader)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_glm_covariance_equals_dense_j_sigma_jt(case: Case, structure: str) -> None:
    la = _fit(case, structure)
    x = case.make()[1][:5]
    _, cov = la.glm_distribution(x)
    sigma = torch.linalg.inv(dense_posterior_precision(la))
    jac = per_point_jacobians(la.model, x)
    names = la.curvature.param_names()
    j = torch.cat([jac[n].reshape(5, jac[n].shape[1], -1) for n in names], dim=2)  # [B, C, P]
    ref = j @ sigma @ j.transpose(1, 2)
    torch.testing.assert_close(cov, ref, rtol=RTOL, atol=1e-10)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_chunked_glm_variances_equal_the_dense_diagonal(case: Case, structure: str) -> None:
    from bayes_kfoc.laplace.predictive import glm_mean_variance

    la = _fit(case, structure)
    la.chunk_size = 2  # several chunks
    x = case.make()[1][:5]
    sigma = torch.linalg.inv(dense_posterior_precision(la))
    jac = per_point_jacobians(la.model, x)
    names = la.curvature.param_names()
    j = torch.cat([jac[n].reshape(5, jac[n].shape[1], -1) for n in names], dim=2)  # [B, C, P]
    mean, var = glm_mean_variance(la.view(), x)
    torch.testing.assert_close(
        var, torch.einsum("bcp,pq,bcq->bc", j, sigma, j), rtol=RTOL, atol=1e-10
    )
    with torch.no_grad():
        torch.testing.assert_close(mean, la.model(x))


@pytest.mark.parametrize("structure", STRUCTURES)
def test_logdet_and_marglik_equal_dense_computation(structure: str) -> None:
    case = CASES[0]
    la = _fit(case, structure, tau=0.9)
    model, x, y = case.make()
    p_dense = dense_posterior_precision(la)
    with torch.no_grad():
        log_lik = torch.log_softmax(model(x), -1).gather(1, y[:, None]).sum()
    theta = la.mean
    tau = la.prior_precision
    sizes = torch.tensor([b.num_params for b in la.blocks.values()], dtype=torch.float64)
    tau_vec = torch.repeat_interleave(tau, sizes.long())
    expected = (
        log_lik
        - 0.5 * (tau_vec * theta.square()).sum()
        + 0.5 * (sizes * tau.log()).sum()
        - 0.5 * torch.logdet(p_dense)
    )
    torch.testing.assert_close(la.log_marginal_likelihood(), expected, rtol=RTOL, atol=1e-9)


def test_marglik_gradient_step_increases_it_and_the_optimum_is_a_maximum() -> None:
    la = _fit(CASES[0], "kfoc", tau=5.0)
    log_tau = torch.tensor(math.log(5.0), dtype=torch.float64, requires_grad=True)
    value = la.log_marginal_likelihood(log_tau.exp())
    (grad,) = torch.autograd.grad(value, log_tau)
    stepped = la.log_marginal_likelihood((log_tau + 1e-2 * grad.sign()).exp())
    assert stepped > value
    for per_module in [False, True]:
        tau = la.optimize_prior_precision("marglik", per_module=per_module).clone()
        best = la.log_marginal_likelihood(tau)
        for factor in [0.9, 1.1]:
            assert la.log_marginal_likelihood(tau * factor) < best
            if per_module:  # each block separately is at its maximum too
                for i in range(len(tau)):
                    t = tau.clone()
                    t[i] *= factor
                    assert la.log_marginal_likelihood(t) < best


@pytest.mark.mc
@pytest.mark.parametrize("structure", ["kfoc", "diag", "full"])
def test_sample_covariance_matches_dense_inverse(structure: str) -> None:
    la = _fit(CASES[0], structure)
    thetas = la.sample(40_000, generator=torch.Generator().manual_seed(0))
    idx = torch.cat(list(la.layout.block_index.values()))
    d = thetas[:, idx] - la.mean
    emp = d.T @ d / d.shape[0]
    ref = torch.linalg.inv(dense_posterior_precision(la))
    err = torch.linalg.norm(emp - ref) / torch.linalg.norm(ref)
    assert err < MC_TOL, err
    assert (d.mean(0).abs() < 5 * ref.diagonal().sqrt() / math.sqrt(d.shape[0])).all()


def test_last_layer_subset_only_perturbs_the_last_layer() -> None:
    la = _fit(CASES[0], "kfoc", subset="last_layer")
    thetas = la.sample(5, generator=torch.Generator().manual_seed(1))
    first = slice(*la.layout.offsets["0.weight"])
    torch.testing.assert_close(thetas[:, first], la.map_vector[first].expand(5, -1))
    bias0 = slice(*la.layout.offsets["0.bias"])
    torch.testing.assert_close(thetas[:, bias0], la.map_vector[bias0].expand(5, -1))
    last = slice(la.layout.offsets["2.weight"][0], la.layout.offsets["2.bias"][1])
    assert (thetas[:, last] != la.map_vector[last]).all()
    assert list(la.blocks) == ["2"]


def test_save_and_load_round_trip_exactly(tmp_path) -> None:  # type: ignore[no-untyped-def]
    la = _fit(CASES[2], "kfoc")  # CNN with a BatchNorm diagonal block
    la.prior_precision = {name: 0.5 + i for i, name in enumerate(la.blocks)}
    path = tmp_path / "posterior.pt"
    la.save(path)
    la2 = Laplace.load(path, la.model)
    torch.testing.assert_close(la2.prior_precision, la.prior_precision)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(la.sample(7, generator=g1), la2.sample(7, generator=g2))
    x = CASES[2].make()[1][:4]
    assert torch.equal(la.predict(x), la2.predict(x))
    assert la2.log_marginal_likelihood() == la.log_marginal_likelihood()


def test_load_onto_wrong_architecture_or_weights_raises(tmp_path) -> None:  # type: ignore[no-untyped-def]
    la = _fit(CASES[0], "kfac")
    path = tmp_path / "posterior.pt"
    la.save(path)
    other = CASES[1].make()[0]
    with pytest.raises(
        ValueError, match=r"architecture mismatch at parameter #1.*0\.bias.*2\.weight"
    ):
        Laplace.load(path, other)
    model = CASES[0].make(seed=5)[0]
    with pytest.raises(ValueError, match="differ from the posterior's MAP"):
        Laplace.load(path, model)


@pytest.mark.mc
def test_weight_sampling_predictive_approaches_glm_mc_for_a_tight_posterior() -> None:
    la = _fit(CASES[0], "kfoc", tau=50.0)
    x = CASES[0].make()[1]
    g = torch.Generator().manual_seed(0)
    mc = la.predict(x, method="mc", n_samples=4000, generator=g)
    glm = la.predict(x, method="glm", link="mc", n_samples=4000, generator=g)
    assert (mc - glm).abs().max() < 0.02


def test_probit_is_close_to_glm_mc_and_predictions_are_distributions() -> None:
    la = _fit(CASES[0], "kfoc", tau=2.0)
    x = CASES[0].make()[1]
    pr = la.predict(x)
    mc = la.predict(x, link="mc", n_samples=20_000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(pr.sum(-1), torch.ones(len(x), dtype=pr.dtype))
    assert (pr - mc).abs().max() < 0.05
    samples = la.predictive_samples(x, n_samples=8, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (8, len(x), 3)


def test_mc_predictive_is_vectorised_functional_call() -> None:
    la = _fit(CASES[3], "kfoc")  # non-Sequential model with a bare parameter
    x = CASES[3].make()[1][:3]
    thetas = la.sample(4, generator=torch.Generator().manual_seed(0))
    from bayes_kfoc.laplace.predictive import logits_at

    out = logits_at(la.model, thetas, x, chunk=3)
    names = [k for k, _ in la.model.named_parameters()]
    for s in range(4):
        parts = torch.split(thetas[s], [p.numel() for p in la.model.parameters()])
        params = {k: v.view_as(p) for k, v, p in zip(names, parts, la.model.parameters())}
        torch.testing.assert_close(out[s], functional_call(la.model, params, (x,)))


def _dense_probit_nll(la: Laplace, x: torch.Tensor, y: torch.Tensor, tau: float) -> float:
    """The validation NLL of the GLM probit predictive at ``τ``, from dense Jacobians and a
    dense posterior covariance (independent of the library's predictive)."""
    eye_blocks = [
        b.to_dense() + tau * torch.eye(b.num_params, dtype=torch.float64)
        for b in la.blocks.values()
    ]
    sigma = torch.linalg.inv(torch.block_diag(*eye_blocks))
    jac = per_point_jacobians(la.model, x)
    names = la.curvature.param_names()
    j = torch.cat([jac[n].reshape(len(x), jac[n].shape[1], -1) for n in names], dim=2)
    var = torch.einsum("bcp,pq,bcq->bc", j, sigma, j)
    with torch.no_grad():
        logits = la.model(x)
    probs = torch.softmax(logits / torch.sqrt(1 + math.pi / 8 * var), dim=-1)
    return float(-probs.gather(1, y[:, None]).log().mean())


def test_gridsearch_picks_the_best_validation_nll() -> None:
    la = _fit(CASES[0], "kfoc")
    _, x, y = CASES[0].make(seed=9)
    val = DataLoader(TensorDataset(x, y), batch_size=5)
    tau = la.optimize_prior_precision(
        val_loader=val, grid=[0.01, 1.0, 100.0], prior="global", temperature=False, one_se=False
    )
    assert la.tuning is not None and la.tuning.method == "gridsearch"
    scores = la.tuning.scores
    assert len(scores) >= 3 + 7  # the grid (expanded at an edge), 7 points around the best
    dense = {t: _dense_probit_nll(la, x, y, t) for t in scores}
    for t, value in scores.items():
        assert value == pytest.approx(dense[t], rel=1e-8)
    assert float(tau[0]) == pytest.approx(min(dense, key=dense.__getitem__), rel=1e-12)
    assert la.temperature == 1.0


def test_gridsearch_expands_past_an_edge_and_warns_at_its_limits() -> None:
    la = _fit(CASES[0], "kfoc")
    _, x, y = CASES[0].make(seed=9)
    val = DataLoader(TensorDataset(x, y), batch_size=5)
    for grid in ([1e6, 1e7, 1e8], [0.01, 1.0, 100.0]):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            la.optimize_prior_precision(val_loader=val, grid=grid, prior="global")
        assert la.tuning is not None
        searched = sorted(la.tuning.scores)
        best = min(la.tuning.scores, key=la.tuning.scores.__getitem__)
        if best in (searched[0], searched[-1]):  # the search moved past the grid's ends
            assert searched[0] < grid[0] or searched[-1] > grid[-1]
        edges = ("end of the searched range", "temperature (T = ")  # s or T at a bound
        warned = any(e in str(w.message) for w in caught for e in edges)
        assert warned == la.tuning.at_edge


def test_bad_input_gets_clear_errors() -> None:
    model, x, y = CASES[0].make()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    la = Laplace(model, progress=False)
    with pytest.raises(RuntimeError, match="call fit"):
        la.predict(x)
    with pytest.raises(RuntimeError, match="call fit"):
        la.sample(3)
    with pytest.raises(ValueError, match="positive"):
        Laplace(model, prior_precision=0.0)
    with pytest.raises(ValueError, match="classification"):
        Laplace(model, likelihood="regression")
    with pytest.raises(ValueError, match="does not exist"):
        Laplace(model, modules=["nope"], progress=False).fit(loader)
    with pytest.raises(TypeError, match=r"\(inputs, targets\)"):
        Laplace(model, progress=False).fit([(x, y, y)])
    with pytest.raises(TypeError, match="regression"):
        Laplace(model, progress=False).fit([(x, torch.randn(len(x), dtype=torch.float64))])
    la.fit(loader)
    with pytest.raises(ValueError, match=r"fitted on inputs \[N, 4\]"):
        la.predict(torch.randn(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="positive"):
        la.prior_precision = -1.0
    with pytest.raises(ValueError, match="unknown module"):
        la.prior_precision = {"0": 1.0, "2": 1.0, "9": 1.0}
    with pytest.raises(ValueError, match="'auto'|'glm', 'mc'"):
        la.predict(x, method="laplace")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
def test_posterior_runs_on_cuda() -> None:
    model, x, y = CASES[2].make()
    la = Laplace(model.cuda(), progress=False).fit(DataLoader(TensorDataset(x, y), batch_size=4))
    assert la.predict(x[:3]).device.type == "cuda"
    assert la.sample(2).device.type == "cuda"
    assert la.log_marginal_likelihood().device.type == "cuda"


def test_float32_factors_decomposed_in_float64() -> None:
    model, x, y = CASES[2].make()
    model, x = model.float(), x.float()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    la = Laplace(model, eig_dtype=torch.float64, progress=False).fit(loader)
    assert all(b.dtype == torch.float64 for b in la.blocks.values())
    probs = la.predict(x)
    assert probs.dtype == torch.float64 and torch.isfinite(probs).all()


def test_last_layer_mc_runs_the_trunk_once_and_equals_the_full_network() -> None:
    la = _fit(CASES[0], "kfoc", subset="last_layer")
    x = CASES[0].make()[1]
    from bayes_kfoc.laplace.predictive import head_features, logits_at

    assert head_features(la.model, la._targets[0].module, x) is not None
    fast = la.predictive_samples(
        x, method="mc", n_samples=6, generator=torch.Generator().manual_seed(2)
    )
    thetas = la.sample(6, generator=torch.Generator().manual_seed(2))
    slow = torch.softmax(logits_at(la.model, thetas, x), dim=-1)
    torch.testing.assert_close(fast, slow)
    # A head whose output is rescaled afterwards is not the model's output: the full path runs.
    skip = _fit(CASES[3], "kfoc", subset="last_layer")
    assert head_features(skip.model, skip._targets[0].module, CASES[3].make()[1]) is None
