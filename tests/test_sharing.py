"""Weight sharing (a module called several times per forward) and sequence inputs against the
dense float64 references: one block per module, statistics summed over every call."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import (
    assert_block_matches,
    dense_fisher,
    dense_posterior_precision,
    kron_order,
    module_slice,
    per_point_jacobians,
    rel_err,
    top1_kron,
)
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from bayes_kfoc import DenseBlock, DiagBlock, KronBlock, Laplace, fit_curvature

RTOL = 1e-6


class TwiceShared(nn.Module):
    """One Linear applied twice in a row (same input shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


class SeqShared(nn.Module):
    """A Linear on ``[B, T, d]`` (shared over positions) that is called again on ``[B, d]``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(torch.tanh(self.lin(x)))  # [B, T, 4]
        return self.head(torch.tanh(self.lin(h.mean(1))))  # the second call: [B, 4]


class ConvShared(nn.Module):
    """One Conv2d applied at two resolutions (different numbers of positions per call)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 2 * 2, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.conv(x))  # [B, 2, 4, 4]
        h = torch.tanh(self.conv(F.avg_pool2d(h, 2)))  # [B, 2, 2, 2]
        return self.fc(h.flatten(1))


MODELS = {
    "linear-twice": (TwiceShared, (4,)),
    "seq-and-pooled": (SeqShared, (5, 4)),
    "conv-two-resolutions": (ConvShared, (2, 4, 4)),
}


def _data(key: str, n: int = 9, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    build, shape = MODELS[key]
    torch.manual_seed(seed)
    model = build().double().eval()
    x = torch.randn(n, *shape, dtype=torch.float64)
    return model, x, torch.randint(0, 3, (n,))


def _fit(key: str, structure: str, fisher: str = "exact"):  # type: ignore[no-untyped-def]
    model, x, y = _data(key)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    curv = fit_curvature(
        model, loader, structure, fisher, tol=1e-12, max_iter=500, seed=3, progress=False
    )
    F_, names = dense_fisher(model, list(loader), fisher, seed=3)
    return model, curv, F_, names


@pytest.mark.parametrize("fisher", ["exact", "empirical"])
@pytest.mark.parametrize("key", list(MODELS))
def test_shared_module_kfoc_is_top1_svd_of_the_exact_block(key: str, fisher: str) -> None:
    model, curv, F_, names = _fit(key, "kfoc", fisher)
    shared = next(iter(curv.blocks.values()))
    assert "called 2 times" in curv.coverage[f"{shared.name}.weight"]
    for b in curv.blocks.values():
        if not isinstance(b, KronBlock):
            continue
        n = b.d_in + int(b.bias)
        sl = module_slice(model, names, b.name)
        best, _, _ = top1_kron(kron_order(F_[sl, sl], b.d_out, n, b.bias), b.d_out, n)
        ours = kron_order(b.to_dense(), b.d_out, n, b.bias)
        assert rel_err(ours, best) < RTOL, (b.name, rel_err(ours, best))
        assert b.info["converged"]


@pytest.mark.parametrize("key", list(MODELS))
def test_shared_module_diag_and_full_equal_the_exact_block(key: str) -> None:
    model, diag, F_, names = _fit(key, "diag")
    _, full, _, _ = _fit(key, "full")
    for name, b in diag.blocks.items():
        sl = module_slice(model, names, name)
        assert isinstance(b, DiagBlock)
        torch.testing.assert_close(b.values, torch.diagonal(F_[sl, sl]), rtol=RTOL, atol=1e-12)
        fb = full.blocks[name]
        assert isinstance(fb, DenseBlock)
        torch.testing.assert_close(fb.to_dense(), F_[sl, sl], rtol=RTOL, atol=1e-12)


@pytest.mark.parametrize("key", list(MODELS))
def test_shared_module_kfac_is_the_expand_form_over_all_calls(key: str) -> None:
    """K-FAC "expand" of a module called k times: Σ over every call's positions, A averaged by
    N·ΣT (the default for Conv2d; Linear layers default to "reduce", tests/test_attention.py)."""
    model, x, y = _data(key)
    curv = fit_curvature(model, [(x, y)], "kfac", kfac_reduction="expand", progress=False)
    name = next(iter(curv.blocks))
    b = curv.blocks[name]
    assert isinstance(b, KronBlock)
    module = dict(model.named_modules())[name]
    rows: list[Tensor] = []

    def hook(mod: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
        a = args[0]
        if isinstance(mod, nn.Conv2d):
            a = F.unfold(a, 3, padding=1).transpose(1, 2)
        rows.append(a.reshape(-1, a.shape[-1]))

    h = module.register_forward_hook(hook)
    with torch.no_grad():
        model(x)
    h.remove()
    a = torch.cat(rows)
    a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
    torch.testing.assert_close(b.A, a.T @ a / len(a))


@pytest.mark.filterwarnings("ignore:Laplace. weight sampling collapses")
@pytest.mark.parametrize("structure", ["kfoc", "kfac", "diag", "full"])
@pytest.mark.parametrize("key", list(MODELS))
def test_shared_module_glm_covariance_equals_dense_j_sigma_jt(key: str, structure: str) -> None:
    model, x, y = _data(key)
    la = Laplace(model, structure=structure, prior_precision=0.7, progress=False, tol=1e-12)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=4))
    xt = _data(key, n=5, seed=1)[1]
    _, cov = la.glm_distribution(xt)
    sigma = torch.linalg.inv(dense_posterior_precision(la))
    jac = per_point_jacobians(model, xt)
    names = la.curvature.param_names()
    j = torch.cat([jac[n].reshape(5, jac[n].shape[1], -1) for n in names], dim=2)
    torch.testing.assert_close(cov, j @ sigma @ j.transpose(1, 2), rtol=RTOL, atol=1e-10)
    probs = la.predict(xt, method="mc", n_samples=8, generator=torch.Generator().manual_seed(0))
    assert probs.shape == (5, 3) and torch.isfinite(probs).all()


def _varying_length_batches(seed: int = 0) -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    torch.manual_seed(seed)
    model = SeqShared().double().eval()
    batches = [
        (torch.randn(n, t, 4, dtype=torch.float64), torch.randint(0, 3, (n,)))
        for n, t in [(4, 5), (3, 2), (4, 7)]
    ]
    return model, batches


def test_sequence_lengths_may_vary_between_batches_in_fit() -> None:
    model, batches = _varying_length_batches()
    F_, names = dense_fisher(model, batches, "exact")
    kfoc = fit_curvature(model, batches, "kfoc", tol=1e-12, max_iter=500, progress=False)
    full = fit_curvature(model, batches, "full", progress=False)
    for name, b in kfoc.blocks.items():
        sl = module_slice(model, names, name)
        torch.testing.assert_close(full.blocks[name].to_dense(), F_[sl, sl], rtol=RTOL, atol=1e-12)
        if isinstance(b, KronBlock):
            n = b.d_in + int(b.bias)
            best, _, _ = top1_kron(kron_order(F_[sl, sl], b.d_out, n, b.bias), b.d_out, n)
            assert rel_err(kron_order(b.to_dense(), b.d_out, n, b.bias), best) < RTOL


@pytest.mark.parametrize("structure", ["kfoc", "diag"])
def test_predict_at_another_sequence_length_equals_dense_glm(structure: str) -> None:
    model, batches = _varying_length_batches()
    la = Laplace(model, structure=structure, prior_precision=0.5, progress=False, tol=1e-12)
    la.fit(batches)
    assert la.input_shape == (5, 4)  # the first batch's
    xt = torch.randn(3, 11, 4, dtype=torch.float64)  # a length the fit never saw
    mean, cov = la.glm_distribution(xt)
    sigma = torch.linalg.inv(dense_posterior_precision(la))
    jac = per_point_jacobians(model, xt)
    names = la.curvature.param_names()
    j = torch.cat([jac[n].reshape(3, jac[n].shape[1], -1) for n in names], dim=2)
    ref = j @ sigma @ j.transpose(1, 2)
    torch.testing.assert_close(cov, ref, rtol=RTOL, atol=1e-10)
    with torch.no_grad():
        logits = model(xt)
    torch.testing.assert_close(mean, logits)
    var = torch.diagonal(ref, dim1=1, dim2=2)
    probit = torch.softmax(logits / torch.sqrt(1 + torch.pi / 8 * var), dim=-1)
    torch.testing.assert_close(la.predict(xt), probit, rtol=RTOL, atol=1e-12)
    with pytest.raises(ValueError, match=r"last \(feature\) size must match"):
        la.predict(torch.randn(3, 11, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="number of dimensions"):
        la.predict(torch.randn(3, 4, dtype=torch.float64))


class TiedLM(nn.Module):
    """An embedding whose weight is also the output head's (tied), a Linear between them."""

    def __init__(self, vocab: int = 6, dim: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mid = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)
        self.head.weight = self.embed.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mid(self.embed(x))).mean(1))


def _tied(seed: int = 0, n: int = 9) -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    torch.manual_seed(seed)
    model = TiedLM().double().eval()
    x = torch.randint(0, 6, (n, 4))
    return model, [(x[:5], torch.randint(0, 6, (5,))), (x[5:], torch.randint(0, 6, (n - 5,)))]


@pytest.mark.parametrize("structure", ["kfoc", "diag", "full"])
def test_tied_weights_get_one_exact_block_covering_every_use(structure: str) -> None:
    model, batches = _tied()
    F_, names = dense_fisher(model, batches, "exact")
    curv = fit_curvature(model, batches, structure, tol=1e-12, max_iter=500, progress=False)
    assert set(curv.blocks) == {"embed", "mid", "head"}
    assert list(curv.blocks["head"].param_shapes) == ["bias"]  # its weight is embed's
    assert set(curv.coverage) == {"embed.weight", "mid.weight", "mid.bias", "head.bias"}
    assert "tied to 'head.weight'" in curv.coverage["embed.weight"]
    assert "tied to 'embed.weight'" in curv.coverage["head.bias"]
    # K-FOC: the tied matrix gets a Kronecker block, the SVD optimum of its exact block
    assert isinstance(curv.blocks["embed"], KronBlock) == (structure == "kfoc")
    for name, b in curv.blocks.items():
        sl = module_slice(model, names, name)
        assert_block_matches(b, F_[sl, sl], structure, RTOL)
    # the head's own use of the tied tensor is in embed's block: untying would change it
    untied = TiedLM().double().eval()
    untied.load_state_dict(model.state_dict())
    untied.head.weight = nn.Parameter(model.embed.weight.detach().clone())
    F_u, names_u = dense_fisher(untied, batches, "exact")
    sl_u = module_slice(untied, names_u, "embed")
    assert not torch.allclose(torch.diagonal(F_u[sl_u, sl_u]), torch.diagonal(F_[:18, :18]))


@pytest.mark.parametrize("structure", ["kfoc", "full"])
def test_tied_weights_glm_covariance_equals_dense_j_sigma_jt(structure: str) -> None:
    model, batches = _tied()
    la = Laplace(model, structure=structure, prior_precision=0.7, progress=False, tol=1e-12)
    la.fit(batches)
    assert la.layout.num_params == sum(b.num_params for b in la.blocks.values())
    xt = torch.randint(0, 6, (4, 7))  # another sequence length too
    _, cov = la.glm_distribution(xt)
    sigma = torch.linalg.inv(dense_posterior_precision(la))
    jac = per_point_jacobians(model, xt)
    names = la.curvature.param_names()
    j = torch.cat([jac[n].reshape(4, jac[n].shape[1], -1) for n in names], dim=2)
    torch.testing.assert_close(cov, j @ sigma @ j.transpose(1, 2), rtol=RTOL, atol=1e-10)


class MaskedEncoder(nn.Module):
    """``model(input_ids=..., attention_mask=...)``: embedding, a Linear, a masked mean, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 3)
        self.lin = nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        h = torch.tanh(self.lin(self.embed(input_ids)))
        m = attention_mask.to(h.dtype).unsqueeze(-1)
        return self.head((h * m).sum(1) / m.sum(1))


class Packed(nn.Module):
    """The reference's view of a dict model: one tensor ``[ids | mask]`` (tests only)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1] // 2
        return self.inner(input_ids=x[:, :t], attention_mask=x[:, t:])


def _dict_batches(pad_token: int = 0) -> tuple[nn.Module, list[tuple[dict[str, Tensor], Tensor]]]:
    torch.manual_seed(0)
    model = MaskedEncoder().double().eval()
    batches = []
    for n, t in [(4, 5), (3, 6)]:
        lengths = torch.randint(1, t + 1, (n,))
        mask = (torch.arange(t) < lengths[:, None]).long()
        ids = torch.randint(0, 7, (n, t)).masked_fill(mask == 0, pad_token)
        batches.append(({"input_ids": ids, "attention_mask": mask}, torch.randint(0, 3, (n,))))
    return model, batches


@pytest.mark.parametrize("structure", ["kfoc", "diag", "full"])
def test_mapping_inputs_are_passed_as_keywords_and_match_dense(structure: str) -> None:
    model, batches = _dict_batches()
    curv = fit_curvature(model, batches, structure, tol=1e-12, max_iter=500, progress=False)
    packed = Packed(model)
    ref_batches = [(torch.cat([x["input_ids"], x["attention_mask"]], 1), y) for x, y in batches]
    F_, names = dense_fisher(packed, ref_batches, "exact")
    assert curv.num_data == 7 and curv.info.input_shape == (5,)
    for name, b in curv.blocks.items():
        sl = module_slice(packed, names, f"inner.{name}")
        assert_block_matches(b, F_[sl, sl], structure, RTOL)
    # padded positions contribute nothing (the model masks them): another pad token, same blocks
    other = fit_curvature(
        model, _dict_batches(pad_token=5)[1], structure, tol=1e-12, progress=False
    )
    for name, b in curv.blocks.items():
        torch.testing.assert_close(
            other.blocks[name].to_dense(), b.to_dense(), rtol=1e-6, atol=1e-12
        )


@pytest.mark.filterwarnings("ignore:Laplace. weight sampling collapses")
def test_mapping_inputs_in_the_glm_predictive_and_predict() -> None:
    model, batches = _dict_batches()
    la = Laplace(model, structure="kfoc", prior_precision=0.6, progress=False, tol=1e-12)
    la.fit(batches)
    la.chunk_size = 2  # several chunks of the dict
    xt = _dict_batches(pad_token=3)[1][1][0]  # 3 points, another length
    _, cov = la.glm_distribution(xt)
    packed = Packed(model)
    xp = torch.cat([xt["input_ids"], xt["attention_mask"]], 1)
    sigma = torch.linalg.inv(dense_posterior_precision(la))
    jac = per_point_jacobians(packed, xp)
    names = [f"inner.{k}.{p}" for k, b in la.blocks.items() for p in b.param_shapes]
    j = torch.cat([jac[n].reshape(3, jac[n].shape[1], -1) for n in names], dim=2)
    torch.testing.assert_close(cov, j @ sigma @ j.transpose(1, 2), rtol=RTOL, atol=1e-10)
    assert la.predict(xt).shape == (3, 3)
    probs = la.predict(xt, method="mc", n_samples=4, generator=torch.Generator().manual_seed(0))
    assert probs.shape == (3, 3) and torch.isfinite(probs).all()
    with pytest.raises(ValueError, match="share the batch size"):
        la.predict({"input_ids": xt["input_ids"], "attention_mask": xt["attention_mask"][:2]})


def test_tied_matrix_streaming_kfoc_equals_the_cached_fit() -> None:
    model, batches = _tied()
    kw = dict(tol=1e-12, max_iter=500, progress=False)
    cached = fit_curvature(model, batches, "kfoc", mode="cached", **kw)
    streamed = fit_curvature(model, batches, "kfoc", mode="streaming", **kw)
    for name, b in cached.blocks.items():
        torch.testing.assert_close(
            streamed.blocks[name].to_dense(), b.to_dense(), rtol=1e-6, atol=1e-10
        )


def test_tied_matrix_under_kfac_is_its_exact_diagonal() -> None:
    """K-FAC has no form for a tensor used by an Embedding and a Linear: its exact diagonal."""
    model, batches = _tied()
    curv = fit_curvature(model, batches, "kfac", progress=False)
    F_, names = dense_fisher(model, batches, "exact")
    b = curv.blocks["embed"]
    assert isinstance(b, DiagBlock)
    sl = module_slice(model, names, "embed")
    torch.testing.assert_close(b.values, torch.diagonal(F_[sl, sl]), rtol=RTOL, atol=1e-12)
