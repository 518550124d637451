"""The Pyro integration: the matrix normal, the Bayesian model and the Laplace guide.

Dense float64 references on the tiny registry problems; Monte-Carlo checks are seeded and use
named tolerances.
"""

from __future__ import annotations

import io
import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from cases import CASE_IDS, CASES, Case
from pyro import poutine
from pyro.infer import Predictive, Trace_ELBO
from pyro.nn import PyroModule, PyroSample
from reference import dense_posterior_precision, per_point_jacobians
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from bayes_kfoc import Laplace
from bayes_kfoc.pyro import KroneckerMatrixNormal, LaplaceGuide, bayesian_model

RTOL = 1e-6
MC_COV_TOL = 0.05  # relative Frobenius error of a 40k-sample covariance (seeded)
MC_ATOL_LOGITS = 0.05  # |MC mean − GLM mean| of 4,000 linearised logit draws (seeded; SE ≈ 0.01)
MC_Z = 5.0  # |difference of two independent MC means| / its standard error, per entry (seeded)
KS_CRIT = 1.63  # Kolmogorov-Smirnov critical value at α = 0.01, times 1/sqrt(n)
STRUCTURES = ["kfoc", "kfac", "diag", "full"]

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)


def _fit(
    case: Case, structure: str = "kfoc", subset: str = "all", tau: float = 0.7, **kw: object
) -> Laplace:
    model, x, y = case.make()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    la = Laplace(
        model, structure=structure, modules=subset, prior_precision=tau, progress=False, **kw
    )
    return la.fit(loader)


def _random_kron(o: int, n: int, batch: tuple[int, ...] = (), seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n + 2, generator=g, dtype=torch.float64)
    gg = torch.randn(o, o + 1, generator=g, dtype=torch.float64)
    loc = torch.randn(*batch, o, n, generator=g, dtype=torch.float64)
    return loc, a @ a.T, gg @ gg.T


# -- the matrix normal -------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [(), (3,), (2, 1)])
def test_matrix_normal_log_prob_equals_dense_mvn(batch: tuple[int, ...]) -> None:
    o, n, tau = 3, 4, 0.3
    loc, A, G = _random_kron(o, n, batch)
    d = KroneckerMatrixNormal.from_factors(loc, A, G, tau)
    assert d.batch_shape == batch and d.event_shape == (o, n)
    precision = torch.kron(G, A) + tau * torch.eye(o * n, dtype=torch.float64)
    ref = dist.MultivariateNormal(loc.flatten(-2), precision_matrix=precision)
    x = d.sample((5,))
    assert x.shape == (5, *batch, o, n)
    torch.testing.assert_close(d.log_prob(x), ref.log_prob(x.flatten(-2)), rtol=RTOL, atol=1e-10)
    torch.testing.assert_close(
        d.precision_matrix, precision.expand(*batch, -1, -1), rtol=RTOL, atol=0
    )
    cov = torch.linalg.inv(precision)
    torch.testing.assert_close(
        d.covariance_matrix, cov.expand(*batch, -1, -1), rtol=RTOL, atol=1e-12
    )
    torch.testing.assert_close(
        d.variance.flatten(-2), cov.diagonal().expand(*batch, -1), rtol=RTOL, atol=0
    )
    torch.testing.assert_close(d.entropy(), ref.entropy(), rtol=RTOL, atol=0)
    torch.testing.assert_close(d.mean, loc)


def test_matrix_normal_shapes_expand_and_validation() -> None:
    o, n = 2, 3
    loc, A, G = _random_kron(o, n, (4, 1))
    tau = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)  # batched damping broadcasts
    d = KroneckerMatrixNormal.from_factors(loc, A, G, tau, validate_args=True)
    assert d.batch_shape == (4, 3)
    assert d.rsample((2,)).shape == (2, 4, 3, o, n)
    e = d.expand((5, 4, 3))
    assert e.batch_shape == (5, 4, 3) and e.sample().shape == (5, 4, 3, o, n)
    assert e.log_prob(e.mean).shape == (5, 4, 3)
    # Each damping gives its own precision.
    x = torch.zeros(o, n, dtype=torch.float64)
    for j in range(3):
        p = torch.kron(G, A) + tau[j] * torch.eye(o * n, dtype=torch.float64)
        ref = dist.MultivariateNormal(loc[0, 0].flatten(), precision_matrix=p).log_prob(x.flatten())
        torch.testing.assert_close(d.log_prob(x)[0, j], ref, rtol=RTOL, atol=0)
    with pytest.raises(ValueError, match="input_eigenvectors must end in"):
        KroneckerMatrixNormal(
            loc, torch.ones(n), torch.eye(n + 1), torch.ones(o), torch.eye(o), 1.0
        )
    with pytest.raises(ValueError):
        KroneckerMatrixNormal.from_factors(loc, A, G, -1.0, validate_args=True)


@pytest.mark.mc
def test_matrix_normal_samples_moments_and_goodness_of_fit() -> None:
    o, n, tau, num = 3, 4, 0.2, 40_000
    loc, A, G = _random_kron(o, n, seed=3)
    d = KroneckerMatrixNormal.from_factors(loc, A, G, tau)
    torch.manual_seed(0)
    x = d.sample((num,))
    cov = torch.linalg.inv(torch.kron(G, A) + tau * torch.eye(o * n, dtype=torch.float64))
    diff = (x - loc).flatten(-2)
    emp = diff.T @ diff / num
    assert torch.linalg.norm(emp - cov) / torch.linalg.norm(cov) < MC_COV_TOL
    assert (diff.mean(0).abs() < 5 * cov.diagonal().sqrt() / math.sqrt(num)).all()
    # Goodness of fit against the distribution's own log_prob: 2 (log q(M) - log q(X)) is the
    # Mahalanobis distance, chi-squared with d degrees of freedom; Kolmogorov-Smirnov test.
    maha = 2 * (d.log_prob(loc) - d.log_prob(x[:4000]))
    cdf = torch.special.gammainc(torch.tensor(o * n / 2, dtype=torch.float64), maha / 2).sort()[0]
    grid = torch.arange(1, cdf.numel() + 1, dtype=torch.float64) / cdf.numel()
    ks = torch.maximum((grid - cdf).abs(), (grid - 1 / cdf.numel() - cdf).abs()).max()
    assert ks < KS_CRIT / math.sqrt(cdf.numel()), ks


def test_matrix_normal_from_block_is_the_laplace_block_posterior() -> None:
    la = _fit(CASES[0], "kfoc")
    name, block = next(iter(la.blocks.items()))
    theta = la.map_vector[la.layout.block_index[name]]
    d = KroneckerMatrixNormal.from_block(block, block.to_mat(theta), la.prior_precision[0])
    p = block.to_dense() + la.prior_precision[0] * torch.eye(block.num_params, dtype=torch.float64)
    x = d.sample((3,))
    ref = dist.MultivariateNormal(theta, precision_matrix=p).log_prob(block.to_vec(x))
    torch.testing.assert_close(d.log_prob(x), ref, rtol=RTOL, atol=1e-9)


# -- the Bayesian model ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_model_sites_names_priors_and_the_user_module_is_untouched(case: Case) -> None:
    net, x, y = case.make()
    before = {k: p.detach().clone() for k, p in net.named_parameters()}
    model = bayesian_model(
        net, {"": 3.0} if case.id == "skip-connection" else 2.0, default_prior_precision=2.0
    )
    assert type(net).__module__ != "pyro.nn.module" and not isinstance(net, PyroModule)
    for k, p in net.named_parameters():
        assert torch.equal(p, before[k])
    trace = poutine.trace(model).get_trace(x, y)
    latent = {k: s for k, s in trace.iter_stochastic_nodes() if k != "data"}
    assert list(latent) == list(before)
    for k, site in latent.items():
        assert site["value"].shape == before[k].shape
        assert site["fn"].event_shape == before[k].shape and site["fn"].batch_shape == ()
        base = site["fn"].base_dist if before[k].ndim else site["fn"]
        tau = 3.0 if k == "scale" else 2.0
        torch.testing.assert_close(base.scale, torch.full_like(base.scale, tau**-0.5))
        assert (base.loc == 0).all()
    assert trace.nodes["obs"]["is_observed"] and trace.nodes["obs"]["fn"].batch_shape == (len(x),)
    assert trace.nodes["probs"]["value"].shape == (len(x), case.num_classes)
    assert {f.name for f in trace.nodes["obs"]["cond_indep_stack"]} == {"data"}


def test_model_prior_precision_from_laplace_and_its_errors() -> None:
    la = _fit(CASES[0], "kfoc", subset="last_layer")
    net = la.model
    with pytest.raises(ValueError, match=r"no prior precision for parameter\(s\) \['0.weight'"):
        bayesian_model(net, la.prior_precision, laplace=la)
    model = bayesian_model(net, la.prior_precision * 3, laplace=la, default_prior_precision=1.0)
    expected = {"0.weight": 1.0, "0.bias": 1.0, "2.weight": 2.1, "2.bias": 2.1}
    assert model.prior_precision == pytest.approx(expected)
    with pytest.raises(ValueError, match=r"has 3 values but there are 1 blocks \(\[.2.\]\)"):
        bayesian_model(net, torch.ones(3), laplace=la, default_prior_precision=1.0)
    with pytest.raises(ValueError, match="tensor of 3 values, one per posterior block"):
        bayesian_model(net, torch.ones(3))
    with pytest.raises(ValueError, match="neither parameters nor modules"):
        bayesian_model(net, {"1": 1.0})
    with pytest.raises(ValueError, match="positive and finite"):
        bayesian_model(net, 0.0)
    other, *_ = CASES[0].make(seed=1)
    with pytest.raises(ValueError, match="differ from the Laplace MAP"):
        bayesian_model(other, laplace=la, default_prior_precision=1.0)


def test_model_per_block_tensor_follows_laplace_block_order_not_named_modules() -> None:
    # SkipNet's root owns ``scale``: named_modules puts the root first, the forward-call order
    # (Laplace's block order) puts it last, so a bare per-block tensor is ambiguous.
    la = _fit(CASES[3], "kfoc")
    net = la.model
    tau = torch.arange(1.0, len(la.blocks) + 1, dtype=torch.float64)
    assert list(la.blocks)[-1] == "scale"  # the orders really differ on this case
    with pytest.raises(ValueError, match=r"laplace=la.*\{module: τ\}"):
        bayesian_model(net, tau)
    model = bayesian_model(net, tau, laplace=la)
    for k, t in model.prior_precision.items():
        module = k.rpartition(".")[0] or k  # the root's own parameter is a block of its own
        assert t == pytest.approx(float(tau[list(la.blocks).index(module)])), k
    la.prior_precision = tau
    by_dict = bayesian_model(net, la.prior_precision_dict())
    assert by_dict.prior_precision == pytest.approx(model.prior_precision)


def test_model_subsampling_and_minibatch_scaling() -> None:
    net, x, y = CASES[0].make()
    model = bayesian_model(net, 1.0, subsample_size=4)
    trace = poutine.trace(model).get_trace(x, y)
    assert trace.nodes["obs"]["value"].shape == (4,) and trace.nodes["probs"]["value"].shape == (
        4,
        3,
    )
    model = bayesian_model(net, 1.0, num_data=110)
    trace = poutine.trace(model).get_trace(x, y)
    assert trace.nodes["obs"]["scale"] == pytest.approx(10.0)


@pytest.mark.parametrize("linearized", [False, True])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_model_logits_with_particle_dims_equal_a_loop(case: Case, linearized: bool) -> None:
    net, x, _ = case.make()
    model = bayesian_model(net, 1.0, linearized=linearized)
    g = torch.Generator().manual_seed(0)
    params = {
        k: p.detach() + 0.1 * torch.randn(4, *p.shape, generator=g, dtype=p.dtype)
        for k, p in net.named_parameters()
    }
    loop = torch.stack([model.logits({k: v[i] for k, v in params.items()}, x) for i in range(4)])
    torch.testing.assert_close(model.logits(params, x), loop, rtol=RTOL, atol=1e-12)
    # [S, 1, *shape] (a particle plate at dim -2) gives the same logits [S, B, C].
    padded = {k: v.reshape(4, 1, *v.shape[1:]) for k, v in params.items()}
    torch.testing.assert_close(model.logits(padded, x), loop, rtol=RTOL, atol=1e-12)
    if not linearized:  # the nonlinear model is the network itself
        ref = functional_call(net, {k: v[2] for k, v in params.items()}, (x,))
        torch.testing.assert_close(loop[2], ref, rtol=RTOL, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_linearized_model_is_the_first_order_expansion(case: Case) -> None:
    net, x, _ = case.make()
    model = bayesian_model(net, 1.0, linearized=True)
    g = torch.Generator().manual_seed(1)
    theta = {
        k: p.detach() + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype)
        for k, p in net.named_parameters()
    }
    jac = per_point_jacobians(net, x)  # {name: [B, C, *shape]}
    with torch.no_grad():
        ref = net(x) + sum(
            torch.einsum(
                "bcp,p->bc", jac[k].reshape(*jac[k].shape[:2], -1), (theta[k] - p).flatten()
            )
            for k, p in net.named_parameters()
        )
    torch.testing.assert_close(model.logits(theta, x), ref, rtol=RTOL, atol=1e-12)


# -- the guide ---------------------------------------------------------------------------------
def _guide(case: Case, structure: str = "kfoc", subset: str = "all", linearized: bool = False):
    la = _fit(case, structure, subset)
    model = bayesian_model(
        la.model, la.prior_precision, laplace=la, linearized=linearized, default_prior_precision=1.0
    )
    return la, model, LaplaceGuide(model, la)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_guide_sites_shapes_and_one_latent_per_block(case: Case, structure: str) -> None:
    la, _model, guide = _guide(case, structure)
    x = case.make()[1]
    trace = poutine.trace(guide).get_trace(x)
    aux = [
        k
        for k, s in trace.nodes.items()
        if s["type"] == "sample" and s["infer"].get("is_auxiliary")
    ]
    assert aux == [guide.latent_site_name(m) for m in la.blocks]
    for m, block in la.blocks.items():
        site = trace.nodes[guide.latent_site_name(m)]
        if block.structure == "kron":
            assert isinstance(site["fn"], KroneckerMatrixNormal)
            assert site["fn"].event_shape == (block.d_out, block.d_in + int(block.bias))
        else:
            assert site["fn"].event_shape == (block.num_params,)
    for k, p in la.model.named_parameters():
        assert trace.nodes[k]["value"].shape == p.shape
        assert isinstance(trace.nodes[k]["fn"], dist.Delta)
    # A block's sites are its latent, split: the Kronecker latent is W̄ = [W b].
    m0, b0 = next(iter(la.blocks.items()))
    latent = trace.nodes[guide.latent_site_name(m0)]["value"]
    vec = torch.cat(
        [trace.nodes[f"{m0}.{p}" if m0 else p]["value"].flatten() for p in b0.param_shapes]
    )
    expected = b0.to_vec(latent) if b0.structure == "kron" else latent
    torch.testing.assert_close(vec, expected, rtol=0, atol=0)


def test_guide_parameters_outside_the_subset_are_delta_at_the_map() -> None:
    la, model, guide = _guide(CASES[0], "kfoc", subset="last_layer")
    x = CASES[0].make()[1]
    pyro.set_rng_seed(0)
    pred = Predictive(
        model, guide=guide, num_samples=7, return_sites=["0.weight", "0.bias", "2.weight"]
    )(x)
    for k in ["0.weight", "0.bias"]:
        a, b = la.layout.offsets[k]
        expected = la.map_vector[a:b].reshape(la.model.get_parameter(k).shape)
        # Predictive returns global sites as [S, 1, *shape] (one slot for the data plate).
        assert pred[k].shape == (7, 1, *expected.shape)
        torch.testing.assert_close(
            pred[k][:, 0], expected.expand(7, *expected.shape), rtol=0, atol=0
        )
    assert pred["2.weight"].std(0).min() > 0


@pytest.mark.parametrize("structure", ["kfoc", "diag", "full"])
def test_median_is_the_map_and_quantiles_are_the_marginals(structure: str) -> None:
    la, _, guide = _guide(CASES[0], structure)
    median = guide.median()
    for k, (a, b) in la.layout.offsets.items():
        torch.testing.assert_close(median[k].flatten(), la.map_vector[a:b], rtol=0, atol=0)
    std = (
        torch.linalg.inv(dense_posterior_precision(la)).diagonal().sqrt()
    )  # block order = parameter order
    q = guide.quantiles([0.5, float(torch.distributions.Normal(0, 1).cdf(torch.tensor(1.0)))])
    for k, (a, b) in la.layout.offsets.items():
        torch.testing.assert_close(q[k][0].flatten(), la.map_vector[a:b], rtol=RTOL, atol=1e-12)
        torch.testing.assert_close(
            q[k][1].flatten(), la.map_vector[a:b] + std[a:b], rtol=RTOL, atol=1e-9
        )


@pytest.mark.parametrize("structure", ["kfoc", "diag", "full"])
def test_guide_log_prob_is_exact_and_trace_elbo_is_finite(structure: str) -> None:
    case = CASES[3]  # skip-connection: Kronecker, LayerNorm (diagonal) and a bare scalar
    la, model, guide = _guide(case, structure)
    _, x, y = case.make()
    pyro.set_rng_seed(0)
    gtrace = poutine.trace(guide).get_trace(x, y)
    full = torch.cat([gtrace.nodes[k]["value"].flatten() for k in la.layout.offsets])
    theta = torch.cat([full[i] for i in la.layout.block_index.values()])  # block order
    mean = la.mean
    ref = dist.MultivariateNormal(mean, precision_matrix=dense_posterior_precision(la)).log_prob(
        theta
    )
    torch.testing.assert_close(gtrace.log_prob_sum(), ref, rtol=RTOL, atol=1e-9)
    # The ELBO's terms: log p(y|θ) + log p(θ) - log q(θ), with the model at the guide's θ.
    mtrace = poutine.trace(poutine.replay(model, trace=gtrace)).get_trace(x, y)
    with torch.no_grad():
        log_lik = (
            torch.distributions.Categorical(
                logits=functional_call(
                    la.model, {k: gtrace.nodes[k]["value"] for k in la.layout.offsets}, (x,)
                )
            )
            .log_prob(y)
            .sum()
        )
    prior = sum(
        torch.distributions.Normal(0, t**-0.5).log_prob(gtrace.nodes[k]["value"]).sum()
        for k, t in model.prior_precision.items()
    )
    torch.testing.assert_close(mtrace.log_prob_sum(), log_lik + prior, rtol=RTOL, atol=1e-9)
    loss = Trace_ELBO().loss(model, guide, x, y)
    assert math.isfinite(loss)
    vec = Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    assert math.isfinite(vec.loss(model, guide, x, y))


@pytest.mark.mc
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("structure", ["kfoc", "diag"])
def test_predictive_mean_matches_laplace_mc_predictive(structure: str, parallel: bool) -> None:
    case = CASES[0]
    la, model, guide = _guide(case, structure)
    x = case.make()[1]
    num = 1000 if parallel else 300
    pyro.set_rng_seed(0)
    pred = Predictive(
        model, guide=guide, num_samples=num, parallel=parallel, return_sites=["obs", "probs"]
    )(x)
    assert pred["probs"].shape == (num, len(x), 3) and pred["obs"].shape == (num, len(x))
    ref = la.predictive_samples(
        x, method="mc", n_samples=num, generator=torch.Generator().manual_seed(1)
    )
    se = ((pred["probs"].var(0) + ref.var(0)) / num).sqrt()
    z = (
        pred["probs"].mean(0)
        - la.predict(x, method="mc", n_samples=num, generator=torch.Generator().manual_seed(1))
    ) / se
    assert z.abs().max() < MC_Z, z.abs().max()


@pytest.mark.mc
@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=[CASE_IDS[0], CASE_IDS[2]])
def test_linearized_predictive_matches_the_glm_predictive(case: Case) -> None:
    la, model, guide = _guide(case, "kfoc", linearized=True)
    x = case.make()[1][:5]
    num = 20_000
    pyro.set_rng_seed(0)
    pred = Predictive(
        model, guide=guide, num_samples=num, parallel=True, return_sites=["logits", "probs"]
    )(x)
    mean, cov = la.glm_distribution(x)
    d = pred["logits"] - mean
    emp = torch.einsum("sbi,sbj->bij", d, d) / num
    assert torch.linalg.norm(emp - cov) / torch.linalg.norm(cov) < MC_COV_TOL
    assert (d.mean(0).abs() < MC_Z * cov.diagonal(dim1=1, dim2=2).sqrt() / math.sqrt(num)).all()
    ref = la.predictive_samples(
        x, method="glm", n_samples=num, generator=torch.Generator().manual_seed(1)
    )
    se = ((pred["probs"].var(0) + ref.var(0)) / num).sqrt()
    assert ((pred["probs"].mean(0) - ref.mean(0)) / se).abs().max() < MC_Z


def test_last_layer_posterior_nonlinear_and_linearized_models_agree_exactly() -> None:
    la = _fit(CASES[0], "kfoc", subset="last_layer")
    x = CASES[0].make()[1]
    models = [
        bayesian_model(
            la.model, la.prior_precision, laplace=la, linearized=lin, default_prior_precision=1.0
        )
        for lin in (False, True)
    ]
    theta = la.sample(6, generator=torch.Generator().manual_seed(0))
    params = {
        k: theta[:, a:b].reshape(6, *la.model.get_parameter(k).shape)
        for k, (a, b) in la.layout.offsets.items()
    }
    torch.testing.assert_close(
        models[0].logits(params, x), models[1].logits(params, x), rtol=RTOL, atol=1e-12
    )


def test_guide_state_dict_and_pickle_round_trip() -> None:
    _la, model, guide = _guide(CASES[3], "kfoc")
    other = _fit(CASES[3], "kfoc", tau=5.0)
    fresh = LaplaceGuide(model, other)
    fresh.load_state_dict(guide.state_dict())
    x = CASES[3].make()[1]
    for g in [fresh]:
        for k, v in guide.median().items():
            torch.testing.assert_close(g.median()[k], v, rtol=0, atol=0)
        pyro.set_rng_seed(3)
        a = guide(x)
        pyro.set_rng_seed(3)
        b = g(x)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(guide, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded._model is None  # as every AutoGuide: the model is not pickled
    assert guide.model is model  # ... and saving leaves the original guide intact
    for k, v in guide.median().items():
        torch.testing.assert_close(loaded.median()[k], v, rtol=0, atol=0)
    pyro.set_rng_seed(0)
    pred = Predictive(model, guide=loaded, num_samples=3, return_sites=["probs"])(x)
    assert pred["probs"].shape == (3, len(x), 3)


def test_guide_errors_name_the_site() -> None:
    la, model, _ = _guide(CASES[0], "kfoc")

    def extra(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        pyro.sample("temperature", dist.LogNormal(0.0, 1.0))
        return model(x, y)

    with pytest.raises(ValueError, match="latent site 'temperature' is not covered"):
        LaplaceGuide(extra, la)
    wider = bayesian_model(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double(), 1.0)
    with pytest.raises(ValueError, match=r"site '0.weight' has value shape \(6, 4\)"):
        LaplaceGuide(wider, la)

    def batched_prior(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        for k, p in la.model.named_parameters():
            pyro.sample(k, dist.Normal(0.0, 1.0).expand(p.shape))  # no .to_event
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Categorical(logits=torch.zeros(len(x), 3)), obs=y)

    with pytest.raises(
        ValueError, match=r"site '0.weight' has value shape \(5, 4\) and event shape \(\)"
    ):
        LaplaceGuide(batched_prior, la)

    def partial(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        pyro.sample("0.weight", dist.Normal(0.0, 1.0).expand([5, 4]).to_event(2))

    with pytest.raises(
        ValueError,
        match=r"parameter site\(s\) \['0.bias', '2.bias', '2.weight'\] that are not latent",
    ):
        LaplaceGuide(partial, la)


def test_guide_moves_with_to_device(device: torch.device) -> None:
    _la, model, guide = _guide(CASES[2], "kfoc")
    model.to(device)
    guide.to(device)
    assert all(b.device.type == device.type for b in guide.buffers())
    x = CASES[2].make()[1].to(device)
    pyro.set_rng_seed(0)
    pred = Predictive(model, guide=guide, num_samples=4, parallel=True, return_sites=["probs"])(x)
    assert pred["probs"].device.type == device.type
    assert all(v.device.type == device.type for v in guide.median().values())


# -- user-written Pyro BNNs ---------------------------------------------------------------------
class TinyBNN(PyroModule):
    """A TyXe-style model: a PyroModule network with PyroSample Normal priors per layer."""

    def __init__(
        self,
        scales: tuple[float, float] = (1.0, 0.5),
        prior: str = "normal",
        device: torch.device | str = "cpu",
        num_data: int | None = None,
    ) -> None:
        super().__init__()
        self.num_data = num_data  # the plate's size; default: the batch (full-batch loaders)
        self.net = PyroModule[nn.Sequential](
            PyroModule[nn.Linear](4, 5), PyroModule[nn.Tanh](), PyroModule[nn.Linear](5, 3)
        )
        self.net.double().to(device)  # priors are built from the parameters: same dtype, device
        for i, s in zip([0, 2], scales, strict=True):
            layer = self.net[i]
            for name, p in list(layer.named_parameters()):
                loc, scale = p.new_zeros(()), p.new_tensor(s)
                base = dist.Normal(loc, scale) if prior == "normal" else dist.Laplace(loc, scale)
                setattr(layer, name, PyroSample(base.expand(p.shape).to_event(p.dim())))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.net(x)
        with pyro.plate("data", self.num_data or x.shape[0], subsample_size=x.shape[0]):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        return logits


def test_from_model_with_given_map_uses_the_model_priors() -> None:
    net, x, y = CASES[0].make()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    bnn = TinyBNN(num_data=len(x))
    map_params = {f"net.{k}": p.detach() for k, p in net.named_parameters()}
    guide = LaplaceGuide.from_model(bnn, loader, map_params=map_params, tol=1e-12, max_iter=500)
    la = guide.laplace
    torch.testing.assert_close(la.prior_precision, torch.tensor([1.0, 4.0], dtype=torch.float64))
    # The same posterior as a Laplace fit of the trained net itself.
    ref = _fit(CASES[0], "kfoc", tau=1.0, tol=1e-12, max_iter=500)  # as tight as the guide's
    ref.prior_precision = torch.tensor([1.0, 4.0])
    for b, rb in zip(la.blocks.values(), ref.blocks.values(), strict=True):
        torch.testing.assert_close(b.to_dense(), rb.to_dense(), rtol=1e-5, atol=1e-9)
    median = guide.median()
    assert list(median) == list(map_params)
    for k, v in map_params.items():
        torch.testing.assert_close(median[k], v, rtol=0, atol=0)
    assert pyro.get_param_store().keys() == set() or "net.0.weight" not in pyro.get_param_store()
    pyro.set_rng_seed(0)
    pred = Predictive(bnn, guide=guide, num_samples=5, return_sites=["obs", "_RETURN"])(x)
    assert pred["_RETURN"].shape == (5, len(x), 3)


def test_from_model_errors() -> None:
    _, x, y = CASES[0].make()
    loader = DataLoader(TensorDataset(x, y), batch_size=11)
    with pytest.raises(TypeError, match=r"site 'net.0.weight' has a Laplace prior"):
        LaplaceGuide.from_model(TinyBNN(prior="laplace"), loader, num_steps=0)
    bnn = TinyBNN()
    scale = torch.tensor(3.0, dtype=torch.float64)
    bnn.net[2].bias = PyroSample(dist.Normal(0.0, scale).expand([3]).to_event(1))
    with pytest.raises(ValueError, match="module '2' has sites with different prior precisions"):
        LaplaceGuide.from_model(bnn, loader, num_steps=0)

    class Noisy(TinyBNN):
        def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
            noise = pyro.sample("noise", dist.Normal(x.new_zeros(()), 1.0))
            return super().forward(x + noise, y)

    with pytest.raises(ValueError, match="'noise'"):
        LaplaceGuide.from_model(Noisy(), loader, num_steps=0)


@pytest.mark.slow
def test_from_model_end_to_end_on_digits() -> None:
    datasets = pytest.importorskip("datasets.digits")
    splits = datasets.load_digits(seed=0)

    class DigitsBNN(PyroModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = PyroModule[nn.Sequential](
                PyroModule[nn.Linear](64, 32), PyroModule[nn.Tanh](), PyroModule[nn.Linear](32, 10)
            )
            for i, s in zip([0, 2], [1.0, 0.5], strict=True):
                for name, p in list(self.net[i].named_parameters()):
                    setattr(
                        self.net[i],
                        name,
                        PyroSample(dist.Normal(0.0, s).expand(p.shape).to_event(p.dim())),
                    )

        def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
            logits = self.net(x)
            with pyro.plate("data", x.shape[0]):
                pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
            return logits

    loader = DataLoader(splits.train, batch_size=len(splits.train))
    bnn = DigitsBNN()
    guide = LaplaceGuide.from_model(bnn, loader, num_steps=200, lr=0.05)
    assert sorted(guide.median()) == ["net.0.bias", "net.0.weight", "net.2.bias", "net.2.weight"]
    x, y = splits.test.tensors
    pyro.set_rng_seed(0)
    num = 200
    pred = Predictive(bnn, guide=guide, num_samples=num, return_sites=["_RETURN"])(x)
    samples = pred["_RETURN"].softmax(-1)
    probs = samples.mean(0)
    accuracy = (probs.argmax(-1) == y).double().mean()
    assert accuracy > 0.9, accuracy
    ref = guide.laplace.predictive_samples(
        x, method="mc", n_samples=num, generator=torch.Generator().manual_seed(0)
    )
    se = ((samples.var(0) + ref.var(0)) / num).sqrt().clamp_min(1e-6)
    assert ((probs - ref.mean(0)) / se).abs().max() < MC_Z


def test_fit_model_guide_and_predict_on_device(device: torch.device) -> None:
    net, x, y = CASES[0].make()
    net, x, y = net.to(device), x.to(device), y.to(device)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    la = Laplace(net, structure="kfoc", prior_precision=0.7, progress=False).fit(loader)
    for linearized in (False, True):
        model = bayesian_model(net, la.prior_precision, laplace=la, linearized=linearized)
        guide = LaplaceGuide(model, la)
        pyro.set_rng_seed(0)
        for parallel in (False, True):
            pred = Predictive(
                model, guide=guide, num_samples=3, parallel=parallel, return_sites=["probs"]
            )(x)
            assert pred["probs"].device.type == device.type
        assert math.isfinite(Trace_ELBO().loss(model, guide, x, y))
    bnn = TinyBNN(device=device, num_data=len(x))
    map_params = {f"net.{k}": p.detach() for k, p in net.named_parameters()}
    guide = LaplaceGuide.from_model(bnn, loader, map_params=map_params)
    pred = Predictive(bnn, guide=guide, num_samples=2, return_sites=["_RETURN"])(x)
    assert pred["_RETURN"].device.type == device.type


@pytest.mark.parametrize(
    ("structure", "kinds"),
    [
        ("kfoc", {"KronPosterior", "DiagPosterior"}),
        ("diag", {"DiagPosterior"}),
        ("full", {"DensePosterior"}),
    ],
)
def test_guide_holds_one_posterior_module_per_block(structure: str, kinds: set[str]) -> None:
    la, _, guide = _guide(CASES[3], structure)
    assert [p.module for p in guide.posteriors] == list(la.blocks)
    assert {type(p).__name__ for p in guide.posteriors} == kinds
    keys = guide.state_dict().keys()
    assert {f"posteriors.{i}.damping" for i in range(len(la.blocks))} <= keys
    for p, tau in zip(guide.posteriors, la.prior_precision, strict=True):
        assert float(p.damping) == pytest.approx(float(tau))


class TutorialBNN(PyroModule):
    """Pyro's tutorial layout: the layers are the model's own attributes, ``forward(x, y)`` holds
    the plate, and nothing is returned (the logits live only in the observed site)."""

    def __init__(self, scales: tuple[float, float] = (1.0, 0.5), num_data: int | None = None):
        super().__init__()
        self.num_data = num_data
        self.fc1 = PyroModule[nn.Linear](4, 5)
        self.fc2 = PyroModule[nn.Linear](5, 3)
        self.double()
        for layer, s in zip([self.fc1, self.fc2], scales, strict=True):
            for name, p in list(layer.named_parameters()):
                prior = dist.Normal(p.new_zeros(()), p.new_tensor(s))
                setattr(layer, name, PyroSample(prior.expand(p.shape).to_event(p.dim())))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        logits = self.fc2(torch.tanh(self.fc1(x)))
        with pyro.plate("data", self.num_data or x.shape[0], subsample_size=x.shape[0]):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)


def _tutorial_map(net: nn.Module) -> dict[str, torch.Tensor]:
    """The MAP of ``CASES[0]``'s Sequential as :class:`TutorialBNN` sites."""
    return {f"fc{1 + int(k[0]) // 2}{k[1:]}": p.detach() for k, p in net.named_parameters()}


def test_from_model_supports_the_tutorial_layout() -> None:
    net, x, y = CASES[0].make()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    bnn = TutorialBNN(num_data=len(x))
    guide = LaplaceGuide.from_model(bnn, loader, map_params=_tutorial_map(net))
    la = guide.laplace
    assert list(la.blocks) == ["fc1", "fc2"]
    torch.testing.assert_close(la.prior_precision, torch.tensor([1.0, 4.0], dtype=torch.float64))
    # The deterministic network's logits are the observed site's (normalised) logits.
    with torch.no_grad():
        torch.testing.assert_close(la.model(x), net(x).log_softmax(-1), rtol=RTOL, atol=1e-12)
    # The same posterior as a Laplace fit of the trained net itself, and the same GLM predictive.
    ref = _fit(CASES[0], "kfoc", tau=1.0)  # the same (default) tolerance as the guide
    ref.prior_precision = torch.tensor([1.0, 4.0])
    for b, rb in zip(la.blocks.values(), ref.blocks.values(), strict=True):
        torch.testing.assert_close(b.to_dense(), rb.to_dense(), rtol=1e-5, atol=1e-9)
    # The GLM over log-softmax outputs: mean log_softmax(f), covariance M Σ Mᵀ with M = I − 1pᵀ
    # (the Jacobian of log-softmax), so every GLM logit draw has the same softmax as the net's.
    mean, cov = la.glm_distribution(x)
    ref_mean, ref_cov = ref.glm_distribution(x)
    p = ref_mean.softmax(-1)
    m = torch.eye(3, dtype=p.dtype) - p[:, None, :].expand(-1, 3, -1)
    torch.testing.assert_close(mean, ref_mean.log_softmax(-1), rtol=RTOL, atol=1e-12)
    torch.testing.assert_close(cov, m @ ref_cov @ m.mT, rtol=1e-5, atol=1e-9)
    assert sorted(guide.median()) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    pyro.set_rng_seed(0)
    pred = Predictive(bnn, guide=guide, num_samples=3, return_sites=["obs", "fc2.weight"])(x)
    assert pred["obs"].shape == (3, len(x)) and pred["fc2.weight"].shape[-2:] == (3, 5)
    # The MAP by SVI works on this layout too.
    fitted = LaplaceGuide.from_model(TutorialBNN(num_data=len(x)), loader, num_steps=30, lr=0.05)
    assert list(fitted.laplace.blocks) == ["fc1", "fc2"]


def test_from_model_refuses_a_likelihood_scaled_to_one_batch() -> None:
    net, x, y = CASES[0].make()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    fix = r"counts as 4 points .* covers 11.*size=11, subsample_size=x.shape\[0\]"
    with pytest.raises(ValueError, match=fix):
        LaplaceGuide.from_model(TutorialBNN(), loader, num_steps=5)
    with pytest.raises(ValueError, match=fix):
        LaplaceGuide.from_model(TinyBNN(), loader, num_steps=5)
    with pytest.warns(UserWarning, match=fix):  # a given MAP: only the ELBO is mis-scaled
        LaplaceGuide.from_model(TutorialBNN(), loader, map_params=_tutorial_map(net))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        LaplaceGuide.from_model(TutorialBNN(num_data=len(x)), loader, num_steps=5)
        full = DataLoader(TensorDataset(x, y), batch_size=len(x))
        LaplaceGuide.from_model(TutorialBNN(), full, num_steps=5)


# -- issue 16: a K-FOC guide for the BNNs people write ---------------------------------------------
def _user_guide(layout: str) -> tuple[nn.Module, torch.Tensor, LaplaceGuide]:
    """A guide on a user BNN (TyXe or tutorial layout) at ``CASES[0]``'s trained net as MAP."""
    net, x, y = CASES[0].make()
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
    if layout == "tyxe":
        bnn: PyroModule = TinyBNN()
        map_params = {f"net.{k}": p.detach() for k, p in net.named_parameters()}
    else:
        bnn = TutorialBNN()
        map_params = _tutorial_map(net)
    return net, x, LaplaceGuide.from_model(bnn, loader, map_params=map_params)


@pytest.mark.parametrize("layout", ["tyxe", "tutorial"])
def test_network_model_samples_in_parallel_through_plain_linear_layers(layout: str) -> None:
    net, x, guide = _user_guide(layout)
    model = guide.network_model()
    sites = list(guide.median())
    pyro.set_rng_seed(0)
    pred = Predictive(
        model, guide=guide, num_samples=6, parallel=True, return_sites=["logits", *sites]
    )(x)
    assert pred["logits"].shape == (6, len(x), 3)
    for s in range(6):  # the reference: the trained nn.Sequential at the sampled weights
        params = {
            k: pred[site][s].reshape(p.shape)
            for (k, p), site in zip(net.named_parameters(), sites, strict=True)
        }
        ref = functional_call(net, params, (x,))
        if layout == "tutorial":  # logits read from the Categorical site: log-softmax
            ref = ref.log_softmax(-1)
        torch.testing.assert_close(pred["logits"][s], ref, rtol=RTOL, atol=1e-12)
    assert pred[sites[0]].std(0).min() > 0
    assert math.isfinite(Trace_ELBO().loss(model, guide, x, CASES[0].make()[2]))


@pytest.mark.mc
@pytest.mark.parametrize("layout", ["tyxe", "tutorial"])
def test_linearized_network_model_matches_the_glm_predictive(layout: str) -> None:
    _, x, guide = _user_guide(layout)
    la = guide.laplace
    x, num = x[:5], 20_000
    pyro.set_rng_seed(0)
    pred = Predictive(
        guide.network_model(linearized=True),
        guide=guide,
        num_samples=num,
        parallel=True,
        return_sites=["logits", "probs"],
    )(x)
    mean, cov = la.glm_distribution(x)
    d = pred["logits"] - mean
    emp = torch.einsum("sbi,sbj->bij", d, d) / num
    assert torch.linalg.norm(emp - cov) / torch.linalg.norm(cov) < MC_COV_TOL
    ref = la.predict(x, link="mc", n_samples=num, generator=torch.Generator().manual_seed(1))
    samples = la.predictive_samples(
        x, method="glm", n_samples=num, generator=torch.Generator().manual_seed(1)
    )
    se = ((pred["probs"].var(0) + samples.var(0)) / num).sqrt()
    assert ((pred["probs"].mean(0) - ref) / se).abs().max() < MC_Z


@pytest.mark.mc
def test_update_makes_the_guide_follow_a_retuned_prior_precision() -> None:
    la, _model, guide = _guide(CASES[0], "kfoc")
    old = la.prior_precision.clone()
    la.optimize_prior_precision("marglik")
    assert not torch.allclose(la.prior_precision, old)
    assert [float(p.damping) for p in guide.posteriors] == pytest.approx(old.tolist())
    assert guide.update(la) is guide
    assert list(guide.prior_precision.values()) == pytest.approx(la.prior_precision.tolist())
    num = 40_000
    pyro.set_rng_seed(0)
    with pyro.plate("draws", num, dim=-1):
        draws = guide()
    theta = torch.cat([draws[k].reshape(num, -1) for k in la.layout.offsets], dim=-1)
    cov = torch.linalg.inv(dense_posterior_precision(la))  # block order = parameter order here
    diff = theta - la.mean
    emp = diff.T @ diff / num
    assert torch.linalg.norm(emp - cov) / torch.linalg.norm(cov) < MC_COV_TOL
    # set_prior_precision changes the guide only, in every spelling.
    guide.set_prior_precision({"0": 2.0, "2": 3.0})
    assert guide.prior_precision == {"0": 2.0, "2": 3.0}
    guide.set_prior_precision(torch.tensor([4.0, 5.0]))
    assert guide.prior_precision == {"0": 4.0, "2": 5.0}
    with pytest.raises(ValueError, match="set_prior_precision lacks module"):
        guide.set_prior_precision({"0": 1.0})
    other = _fit(CASES[0], "kfoc", subset="last_layer")
    with pytest.raises(ValueError, match=r"blocks \['2'\].*differ from the guide's \['0', '2'\]"):
        guide.update(other)


def test_update_without_arguments_follows_guide_laplace() -> None:
    _, _, guide = _user_guide("tutorial")
    guide.laplace.prior_precision = {"fc1": 7.0, "fc2": 9.0}
    guide.update()
    assert guide.prior_precision == {"fc1": 7.0, "fc2": 9.0}
    _la, _model, plain = _guide(CASES[0], "kfoc")
    with pytest.raises(ValueError, match=r"pass it: guide.update\(la\)"):
        plain.update()


def test_bayesian_model_refuses_an_unfitted_laplace() -> None:
    net, *_ = CASES[0].make()
    with pytest.raises(RuntimeError, match=r"laplace= is not fitted.*la.fit\(train_loader\)"):
        bayesian_model(net, laplace=Laplace(net, progress=False))


def test_frozen_parameters_stay_fixed_and_dict_inputs_reach_the_network() -> None:
    """A LoRA-style network (a frozen first layer) called as ``net(**x)``: only the trainable
    parameters are sample sites, the guide's default prototype is a recorded dict point, and
    ``Predictive`` of the linearised model matches the GLM predictive's mean logits."""

    class DictNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(4, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, features: Tensor, scale: Tensor) -> Tensor:
            return self.head(torch.tanh(self.body(features * scale)))

    torch.manual_seed(0)
    net = DictNet().double().eval()
    net.body.requires_grad_(False)
    x = {"features": torch.randn(40, 4, dtype=torch.float64), "scale": torch.ones(40, 1).double()}
    y = torch.randint(0, 3, (40,))
    la = Laplace(net, prior_precision=2.0, progress=False).fit([(x, y)])
    assert list(la.blocks) == ["head"]
    model = bayesian_model(net, laplace=la, linearized=True)
    trace = pyro.poutine.trace(model).get_trace({k: v[:5] for k, v in x.items()})
    sites = [k for k, v in trace.nodes.items() if v["type"] == "sample" and not v["is_observed"]]
    assert [k for k in sites if k not in ("data", "obs")] == ["head.weight", "head.bias"]
    guide = LaplaceGuide(model, la)
    xt = {k: v[:6] for k, v in x.items()}
    pyro.set_rng_seed(0)
    draws = Predictive(model, guide=guide, num_samples=4000, return_sites=["logits"])(xt)
    mean, _ = la.glm_distribution(xt)
    torch.testing.assert_close(draws["logits"].mean(0), mean, rtol=0, atol=MC_ATOL_LOGITS)


def test_model_takes_the_posteriors_prior_precision_by_default() -> None:
    """``bayesian_model(net, laplace=la)`` without ``prior_precision`` uses the posterior's τ
    (issue 23: it used τ = 1 whatever ``la`` held); without ``laplace`` the default is τ = 1."""
    la = _fit(CASES[0], "kfoc")
    la.prior_precision = torch.tensor([0.3, 7.0, 2.5])[: len(la.blocks)]
    model = bayesian_model(la.model, laplace=la)
    expected = la.prior_precision_dict()
    for k, tau in model.prior_precision.items():
        module = k.rpartition(".")[0]
        assert tau == pytest.approx(float(expected.get(k, expected.get(module, float("nan")))))
    plain = bayesian_model(la.model)
    assert set(plain.prior_precision.values()) == {1.0}
