"""Issue 13: inputs that used to slip through, each with its exact input (docs/bad_inputs.md).

Streaming loaders, sample counts, a model changed after the fit, inference mode, label and model
dtypes, validation loaders, one-logit models and forward passes that change the model.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from torch.utils.data import DataLoader, TensorDataset

from bayes_kfoc import Laplace, fit_curvature
from bayes_kfoc.laplace import predictive

FACTOR_RTOL = 1e-8  # float64 factors of the same data summed in another order
MC_ATOL = 0.03  # |Δ| of two 4,000-draw MC means of probabilities (σ of each below 0.008)
BF16_ATOL = 0.05  # bf16 model against its float32 copy: bf16 has 8 mantissa bits


def _mlp(classes: int = 3, dropout: bool = False) -> nn.Module:
    torch.manual_seed(0)
    mid: list[nn.Module] = [nn.Dropout(0.5)] if dropout else []
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), *mid, nn.Linear(8, classes)).double().eval()


def _data(n: int = 40, classes: int = 3) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, classes, (n,), generator=gen)


def _batches(x: Tensor, y: Tensor, size: int = 10) -> list[tuple[Tensor, Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def _assert_same_blocks(a: object, b: object, rtol: float = 0.0, atol: float = 0.0) -> None:
    ta = {k: v.tensors() for k, v in a.blocks.items()}  # type: ignore[attr-defined]
    tb = {k: v.tensors() for k, v in b.blocks.items()}  # type: ignore[attr-defined]
    assert ta.keys() == tb.keys()
    for k in ta:
        for name in ta[k]:
            torch.testing.assert_close(ta[k][name], tb[k][name], rtol=rtol, atol=atol)


# -- 1. GLM memory: link="mc" chunk by chunk -----------------------------------------------------


def test_glm_mc_link_samples_chunk_by_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = _data()
    la = Laplace(_mlp(), progress=False, chunk_size=4).fit(_batches(x, y))
    la.prior_precision = 5.0
    points: list[int] = []
    real = predictive.glm_moments

    def spy(*args: object, **kwargs: object) -> tuple[Tensor, Tensor]:
        mean, cov = real(*args, **kwargs)  # type: ignore[arg-type]
        points.append(mean.shape[0])
        return mean, cov

    monkeypatch.setattr(predictive, "glm_moments", spy)
    gen = torch.Generator().manual_seed(0)
    chunked = la.predict(x[:10], link="mc", n_samples=4000, generator=gen)
    samples = la.predictive_samples(x[:10], n_samples=3, generator=gen)
    assert samples.shape == (3, 10, 3)
    assert points and max(points) <= 4  # never a [B, C, C] covariance for all 10 points
    monkeypatch.undo()
    whole = Laplace(_mlp(), progress=False, chunk_size=256).fit(_batches(x, y))
    whole.prior_precision = 5.0
    gen = torch.Generator().manual_seed(1)
    one_chunk = whole.predict(x[:10], link="mc", n_samples=4000, generator=gen)
    torch.testing.assert_close(chunked, one_chunk, rtol=0, atol=MC_ATOL)


# -- 2. Streaming trusts the loader ---------------------------------------------------------------


class CountingGenerator:
    def __init__(self, batches: list[tuple[Tensor, Tensor]]):
        self.batches, self.yielded = batches, 0

    def gen(self) -> Iterator[tuple[Tensor, Tensor]]:
        for b in self.batches:
            self.yielded += 1
            yield b


def test_one_shot_generator_streaming_raises_up_front() -> None:
    x, y = _data()
    source = CountingGenerator(_batches(x, y))
    with pytest.raises(ValueError, match=r"one-shot iterator.*mode='streaming'.*re-iterable"):
        fit_curvature(_mlp(), source.gen(), mode="streaming", progress=False)
    assert source.yielded == 1  # only the first batch, before any pass


def test_one_shot_generator_auto_over_budget_raises() -> None:
    x, y = _data()
    gen = (b for b in _batches(x, y))
    with pytest.raises(ValueError, match=r"one-shot iterator.*memory_budget"):
        fit_curvature(_mlp(), gen, memory_budget=10, progress=False)


def test_one_shot_generator_cached_fit_works() -> None:
    x, y = _data()
    ref = fit_curvature(_mlp(), _batches(x, y), mode="cached", progress=False)
    got = fit_curvature(_mlp(), (b for b in _batches(x, y)), mode="cached", progress=False)
    assert got.mode == "cached"
    _assert_same_blocks(got, ref)


class Shrinking:
    """Every batch in the first pass, one batch fewer in every later pass."""

    def __init__(self, batches: list[tuple[Tensor, Tensor]]):
        self.batches, self.passes = batches, 0

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        self.passes += 1
        return iter(self.batches[: len(self.batches) - (self.passes > 1)])


class Augmenting:
    """The same batches, with fresh noise on x in every pass (random augmentation)."""

    def __init__(self, batches: list[tuple[Tensor, Tensor]]):
        self.batches = batches

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return iter([(bx + 0.01 * torch.randn_like(bx), by) for bx, by in self.batches])


@pytest.mark.parametrize("loader", [Shrinking, Augmenting])
@pytest.mark.parametrize("fisher", ["exact", "mc"])
def test_loader_that_changes_between_passes_raises(loader: type, fisher: str) -> None:
    x, y = _data()
    with pytest.raises(RuntimeError, match=r"pass 2 over the loader saw different data"):
        fit_curvature(
            _mlp(), loader(_batches(x, y)), fisher=fisher, mode="streaming", progress=False
        )


def test_shuffling_loader_with_mc_fisher_streaming_raises() -> None:
    x, y = _data()
    torch.manual_seed(3)
    loader = DataLoader(TensorDataset(x, y), batch_size=10, shuffle=True)
    with pytest.raises(RuntimeError, match=r"same batches in the same order"):
        fit_curvature(_mlp(), loader, fisher="mc", mode="streaming", seed=0, progress=False)


def test_shuffling_loader_with_exact_fisher_streams_correctly() -> None:
    """The summed exact Fisher does not depend on the order: shuffling stays allowed."""
    x, y = _data()
    torch.manual_seed(3)
    loader = DataLoader(TensorDataset(x, y), batch_size=10, shuffle=True)
    got = fit_curvature(_mlp(), loader, mode="streaming", tol=1e-12, progress=False)
    ref = fit_curvature(_mlp(), _batches(x, y), mode="cached", tol=1e-12, progress=False)
    assert got.mode == "streaming"
    _assert_same_blocks(got, ref, rtol=FACTOR_RTOL, atol=1e-12)


# -- 3. Sample counts ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted() -> Laplace:
    x, y = _data()
    return Laplace(_mlp(), progress=False).fit(_batches(x, y))


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda la, x: la.predict(x, link="mc", n_samples=0), ValueError, "got 0"),
        (lambda la, x: la.predict(x, method="mc", n_samples=0), ValueError, "got 0"),
        (lambda la, x: la.predict(x, link="mc", n_samples=-1), ValueError, "got -1"),
        (lambda la, x: la.predictive_samples(x, n_samples=-3), ValueError, "got -3"),
        (lambda la, x: la.sample(-1), ValueError, "got -1"),
        (lambda la, x: la.sample(2.5), TypeError, "got 2.5 of type float"),
        (lambda la, x: la.sample(True), TypeError, "type bool"),
    ],
    ids=[
        "link-mc-0",
        "method-mc-0",
        "link-mc-neg",
        "samples-neg",
        "sample-neg",
        "sample-float",
        "sample-bool",
    ],
)
def test_sample_counts_are_validated(fitted: Laplace, call: object, exc: type, match: str) -> None:
    x, _ = _data(5)
    with pytest.raises(exc, match=rf"n_samples must be a positive integer.*{match}"):
        call(fitted, x)  # type: ignore[operator]


# -- 5. A model changed after the fit -------------------------------------------------------------


def test_predict_after_model_train_raises() -> None:
    x, y = _data()
    la = Laplace(_mlp(dropout=True), progress=False).fit(_batches(x, y))
    la.model.train()
    with pytest.raises(RuntimeError, match=r"train mode with 2 \(Dropout\).*model\.eval\(\)"):
        la.predict(x[:5])
    la.model.eval()
    la.predict(x[:5])


@pytest.mark.parametrize("how", ["in_place", "data", "load_state_dict"])
def test_predict_after_weights_changed_raises(how: str) -> None:
    x, y = _data()
    la = Laplace(_mlp(), progress=False).fit(_batches(x, y))
    w = la.model[2].weight
    with torch.no_grad():
        if how == "in_place":
            w.add_(1e-3)
        elif how == "data":
            w.data[0, 0] += 1e-3  # moves no version counter
        else:
            state = {k: v + 1e-3 for k, v in la.model.state_dict().items()}
            la.model.load_state_dict(state)
    for call in (lambda: la.predict(x[:5]), lambda: la.predict(x[:5], method="mc")):
        with pytest.raises(RuntimeError, match=r"weights changed.*vector_to_parameters"):
            call()
    vector_to_parameters(la.map_vector, la.model.parameters())  # the fix the message names
    la.predict(x[:5])


def test_unchanged_weights_and_a_loaded_posterior_predict() -> None:
    x, y = _data()
    la = Laplace(_mlp(), progress=False).fit(_batches(x, y))
    before = la.predict(x[:5])
    torch.testing.assert_close(la.predict(x[:5]), before, rtol=0, atol=0)
    other = _mlp()
    with torch.no_grad():
        other[0].weight.add_(0.5)
    loaded = Laplace(other, progress=False).load_state_dict(la.state_dict(), check_weights=False)
    loaded.predict(x[:5])  # the user accepted other weights at load time


# -- 6. torch.inference_mode() (Lightning's test loop) --------------------------------------------


@pytest.mark.parametrize("context", [torch.inference_mode, torch.no_grad])
def test_fit_and_predict_under_inference_mode(context: type) -> None:
    x, y = _data()
    ref = Laplace(_mlp(), progress=False).fit(_batches(x, y))
    model = _mlp()
    with context():
        xi, yi = x.clone(), y.clone()  # inference tensors under inference_mode
        la = Laplace(model, progress=False).fit(_batches(xi, yi))
        probit = la.predict(xi[:5])
        mc = la.predict(xi[:5], link="mc", n_samples=50, generator=torch.Generator().manual_seed(0))
        curv = fit_curvature(model, _batches(xi, yi), progress=False)
    torch.testing.assert_close(probit, ref.predict(x[:5]), rtol=0, atol=0)
    ref_mc = ref.predict(x[:5], link="mc", n_samples=50, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mc, ref_mc, rtol=0, atol=0)
    _assert_same_blocks(curv, ref.curvature)
    tau = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    la.log_marginal_likelihood(tau).backward()  # the posterior holds normal tensors
    assert tau.grad is not None and torch.isfinite(tau.grad)


# -- 7. Dtypes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32])
@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_integer_labels_of_any_width(dtype: torch.dtype, fisher: str) -> None:
    classes = 2 if dtype is torch.bool else 3
    x, y = _data(classes=classes)
    ref = fit_curvature(_mlp(classes), _batches(x, y), fisher=fisher, progress=False)
    got = fit_curvature(_mlp(classes), _batches(x, y.to(dtype)), fisher=fisher, progress=False)
    assert got.info.log_likelihood == ref.info.log_likelihood
    _assert_same_blocks(got, ref)


def test_out_of_range_narrow_labels_raise() -> None:
    x, y = _data()
    y8 = y.to(torch.uint8)
    y8[3] = 200
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 3\).*\[0, 200\]"):
        fit_curvature(_mlp(), [(x, y8)], progress=False)


def test_bf16_model_fits_and_predicts_in_float32() -> None:
    x, y = _data()
    model = _mlp().to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    curv = fit_curvature(model, _batches(xb, y), progress=False)
    assert {t.dtype for b in curv.blocks.values() for t in b.tensors().values()} == {torch.float32}
    la = Laplace(model, progress=False).fit(_batches(xb, y))
    probs = la.predict(xb[:10])
    assert probs.dtype == torch.float32 and bool(torch.isfinite(probs).all())
    float_model = _mlp().to(torch.bfloat16).float()  # the same bf16-valued weights
    ref = Laplace(float_model, progress=False).fit(_batches(xb.float(), y))
    torch.testing.assert_close(probs, ref.predict(xb[:10].float()), rtol=0, atol=BF16_ATOL)


def test_uint8_images_into_a_float_model_name_the_cast() -> None:
    x, y = _data()
    images = (x.abs() * 50).to(torch.uint8)
    with pytest.raises(TypeError, match=r"dtype torch\.uint8.*x\.to\(torch\.float64\)"):
        fit_curvature(_mlp(), [(images, y)], progress=False)
    la = Laplace(_mlp(), progress=False).fit(_batches(x, y))
    for method in ("glm", "mc"):
        with pytest.raises(TypeError, match=r"Laplace\.predict.*x\.to\(torch\.float64\)"):
            la.predict(images[:5], method=method)


# -- 8. Validation loaders in tuning ------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"val_loader": []}, ValueError, "yielded no points"),
        ({"val_loader": "labels+5"}, ValueError, r"targets must lie in \[0, 3\)"),
        ({"val_loader": "float labels"}, TypeError, "targets are torch.float64"),
        ({"grid": []}, ValueError, "grid is empty"),
        ({"metric": lambda p, y: float("nan")}, ValueError, "NaN or infinite at every"),
    ],
    ids=["empty", "out-of-range", "float-labels", "empty-grid", "nan-metric"],
)
def test_validation_tuning_inputs(kwargs: dict[str, object], exc: type, match: str) -> None:
    x, y = _data()
    la = Laplace(_mlp(), progress=False).fit(_batches(x, y))
    val = {"labels+5": [(x, y + 5)], "float labels": [(x, y.double())]}
    loader = kwargs.get("val_loader", [(x, y)])
    kwargs = {
        **kwargs,
        "val_loader": val.get(loader, loader) if isinstance(loader, str) else loader,
    }
    before = la.prior_precision.clone()
    with pytest.raises(exc, match=match):
        la.optimize_prior_precision("gridsearch", **kwargs)  # type: ignore[arg-type]
    torch.testing.assert_close(la.prior_precision, before, rtol=0, atol=0)


# -- 9. One logit, one class ----------------------------------------------------------------------


@pytest.mark.parametrize("labels", ["zeros", "ones"])
def test_one_logit_model_names_the_fix(labels: str) -> None:
    x, _ = _data()
    y = torch.zeros(40, dtype=torch.long) if labels == "zeros" else torch.ones(40, dtype=torch.long)
    with pytest.raises(ValueError, match=r"logits \[N, 1\].*torch\.cat\(\[torch\.zeros_like"):
        fit_curvature(_mlp(1), [(x, y)], progress=False)


class TwoLogits(nn.Module):
    """The fix the error names: one Bernoulli logit ``f`` as the logits ``[0, f]``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.f = nn.Linear(4, 1).double()

    def forward(self, x: Tensor) -> Tensor:
        f = self.f(x)
        return torch.cat([torch.zeros_like(f), f], dim=1)


def test_two_logit_fix_gives_the_bernoulli_fisher() -> None:
    x, _ = _data()
    y = (x[:, 0] > 0).long()
    model = TwoLogits().eval()
    curv = fit_curvature(model, [(x, y)], "full", progress=False)
    s = torch.sigmoid(model.f(x)).detach().squeeze(1)
    a = torch.cat([x, torch.ones(40, 1, dtype=x.dtype)], dim=1)  # (weight, bias) order
    dense = (a * (s * (1 - s)).unsqueeze(1)).T @ a  # Σ σ(1 − σ) ā āᵀ
    torch.testing.assert_close(curv.blocks["f"].tensors()["matrix"], dense, rtol=1e-12, atol=0)


# -- 10. A fit never changes the model ------------------------------------------------------------


class DataClamp(nn.Module):
    """Changes its weight through ``.data`` in forward (no version counter moves)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3).double()

    def forward(self, x: Tensor) -> Tensor:
        self.lin.weight.data.clamp_(-0.1, 0.1)
        return self.lin(x)


def test_fit_never_changes_the_model() -> None:
    torch.manual_seed(0)
    emb = nn.Sequential(nn.Embedding(10, 4, max_norm=0.5), nn.Flatten(), nn.Linear(8, 3))
    emb = emb.double().eval()
    tokens, labels = torch.randint(0, 10, (20, 2)), torch.randint(0, 3, (20,))
    for model, match in [(emb, r"'0' \(Embedding\).*max_norm=None"), (DataClamp(), r"'lin'")]:
        before = parameters_to_vector(model.parameters()).detach().clone()
        xs = tokens if model is emb else torch.randn(20, 4, dtype=torch.float64)
        with pytest.raises(RuntimeError, match=rf"changed .* in place \(restored\).*{match}"):
            fit_curvature(model, [(xs, labels)], progress=False)
        assert torch.equal(parameters_to_vector(model.parameters()), before)
    with torch.no_grad():  # the fix the message names
        emb[0].weight.copy_(torch.renorm(emb[0].weight, 2.0, 0, 0.5))
    emb[0].max_norm = None
    fit_curvature(emb, [(tokens, labels)], progress=False)
