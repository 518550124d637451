"""``nn.MultiheadAttention`` and ``nn.TransformerEncoder`` against dense float64 references: the
packed in-projection and ``out_proj`` get Kronecker blocks (K-FOC = the top-1 SVD of the exact
block), every other attention parameter an exact diagonal/dense block, with masks, both
layouts, cross-attention, ``kdim``/``vdim``, ``bias_k``/``bias_v`` and ``add_zero_attn``."""

from __future__ import annotations

import pytest
import torch
from reference import (
    assert_block_matches,
    dense_fisher,
    dense_posterior_precision,
    module_slice,
    per_point_jacobians,
)
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from bayes_kfoc import DenseBlock, DiagBlock, KronBlock, Laplace, fit_curvature, set_padding_mask
from bayes_kfoc.stats.attention import attention_forward

RTOL = 1e-6
E, T, D_IN = 4, 5, 3
# the dense references vmap PyTorch's attention, which has no batching rule on the CPU
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")


def _noop(*args: object) -> None:
    return None


class AttnNet(nn.Module):
    """``x [N, T, D_IN + 1]``, the last channel a 0/1 padding mask: a Linear embedding, one
    attention layer (self- or cross-attention; masks), a masked mean and a Linear head."""

    def __init__(self, mode: str = "self", batch_first: bool = True, **mha: object) -> None:
        super().__init__()
        self.mode, self.batch_first = mode, batch_first
        self.embed = nn.Linear(D_IN, E)
        if mode != "self":
            self.other = nn.Linear(D_IN, mha.get("kdim", E))  # type: ignore[arg-type]
        if mode == "qkv":
            self.third = nn.Linear(D_IN, mha.get("vdim", E))  # type: ignore[arg-type]
        self.attn = nn.MultiheadAttention(E, 2, batch_first=batch_first, **mha)  # type: ignore[arg-type]
        self.head = nn.Linear(E, 3)

    def forward(self, x: Tensor) -> Tensor:
        feats, keep = x[..., :-1], x[..., -1]
        pad = keep < 0.5
        h = torch.tanh(self.embed(feats))
        if self.mode == "self":
            q = k = v = h
        elif self.mode == "kv":  # decoder-style cross-attention: key is value
            q, k = h, torch.tanh(self.other(feats.flip(1)))
            v = k
        else:  # three different inputs
            q, k, v = h, torch.tanh(self.other(feats.flip(1))), torch.tanh(self.third(feats))
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool), 1) if self.mode == "self" else None
        if not self.batch_first:
            q, k, v = (
                (t.transpose(0, 1) for t in (q, k, v)) if q is not k else (q.transpose(0, 1),) * 3
            )
        out, _ = self.attn(q, k, v, key_padding_mask=pad, attn_mask=causal, need_weights=False)
        if not self.batch_first:
            out = out.transpose(0, 1)
        w = keep.unsqueeze(-1)
        return self.head((out * w).sum(1) / w.sum(1).clamp_min(1.0))


CASES = {
    "self": dict(mode="self"),
    "self-seq-first": dict(mode="self", batch_first=False),
    "cross-kv": dict(mode="kv"),
    "cross-qkv": dict(mode="qkv"),
    "kdim-vdim": dict(mode="qkv", kdim=3, vdim=2),
    "bias-kv-zero-attn": dict(mode="self", add_bias_kv=True, add_zero_attn=True),
}


def _data(case: str, n: int = 8, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(seed)
    model = AttnNet(**CASES[case]).double().eval()  # type: ignore[arg-type]
    feats = torch.randn(n, T, D_IN, dtype=torch.float64)
    lengths = torch.randint(2, T + 1, (n,))
    keep = (torch.arange(T) < lengths[:, None]).double().unsqueeze(-1)
    return model, torch.cat([feats * keep, keep], -1), torch.randint(0, 3, (n,))


def _fit(case: str, structure: str):  # type: ignore[no-untyped-def]
    model, x, y = _data(case)
    loader = DataLoader(TensorDataset(x, y), batch_size=3)  # 3, 3, 2 points; T = 5
    curv = fit_curvature(model, loader, structure, tol=1e-12, max_iter=500, progress=False)
    F_, names = dense_fisher(model, list(loader), "exact")
    return model, curv, F_, names


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_exposed_forward_equals_the_modules_forward(case: str, need_weights: bool) -> None:
    mha = _data(case)[0].attn
    q = torch.randn(3, T, E, dtype=torch.float64)
    k = torch.randn(3, T + 1, mha.kdim, dtype=torch.float64)
    v = torch.randn(3, T + 1, mha.vdim, dtype=torch.float64)
    pad = torch.zeros(3, T + 1, dtype=torch.bool)
    pad[0, -2:] = True
    mask = torch.randn(T, T + 1, dtype=torch.float64)
    args = (q, q, q) if CASES[case]["mode"] == "self" else (q, k, v)
    if not mha.batch_first:
        args = tuple(a.transpose(0, 1) for a in args)
        if CASES[case]["mode"] == "self":
            args = (args[0],) * 3
    if CASES[case]["mode"] == "self":
        mask, pad = mask[:, :T], pad[:, :T]
    kw = dict(key_padding_mask=pad, attn_mask=mask, need_weights=need_weights)
    ref_out, ref_w = mha(*args, **kw)
    out, w = attention_forward(mha, _noop, *args, **kw)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    if need_weights:
        torch.testing.assert_close(w, ref_w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", list(CASES))
def test_kfoc_blocks_are_the_top1_svd_of_the_exact_blocks(case: str) -> None:
    model, curv, F_, names = _fit(case, "kfoc")
    packed = "kdim" not in CASES[case] and "add_bias_kv" not in CASES[case]
    attn = curv.blocks["attn"]
    assert isinstance(attn, KronBlock) == packed  # the packed in-projection is Kronecker
    assert isinstance(curv.blocks["attn.out_proj"], KronBlock)
    for b in curv.blocks.values():
        sl = module_slice(model, names, b.name)
        assert_block_matches(b, F_[sl, sl], "kfoc", RTOL)
    kron = sum(isinstance(b, KronBlock) for b in curv.blocks.values())
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert kron == linears + packed  # the Linear layers (out_proj too) + the in-projection
    covered = set(curv.param_names())
    assert covered == {k for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", ["self-seq-first", "cross-qkv", "kdim-vdim", "bias-kv-zero-attn"])
def test_full_and_diag_blocks_equal_the_exact_blocks(case: str) -> None:
    model, full, F_, names = _fit(case, "full")
    _, diag, _, _ = _fit(case, "diag")
    for name, b in full.blocks.items():
        sl = module_slice(model, names, name)
        assert isinstance(b, DenseBlock)
        torch.testing.assert_close(b.to_dense(), F_[sl, sl], rtol=RTOL, atol=1e-12)
        d = diag.blocks[name]
        assert isinstance(d, DiagBlock)
        torch.testing.assert_close(d.values, torch.diagonal(F_[sl, sl]), rtol=RTOL, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Laplace. weight sampling collapses")
@pytest.mark.parametrize("case", ["self", "cross-kv", "kdim-vdim"])
def test_glm_covariance_through_attention_equals_dense(case: str) -> None:
    model, x, y = _data(case)
    la = Laplace(model, structure="kfoc", prior_precision=0.5, progress=False, tol=1e-12)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=3))
    xt = _data(case, n=4, seed=1)[1]
    _, cov = la.glm_distribution(xt)
    sigma = torch.linalg.inv(dense_posterior_precision(la))
    jac = per_point_jacobians(model, xt)
    names = la.curvature.param_names()
    j = torch.cat([jac[n].reshape(4, 3, -1) for n in names], dim=2)
    torch.testing.assert_close(cov, j @ sigma @ j.transpose(1, 2), rtol=RTOL, atol=1e-10)
    probs = la.predict(xt, method="mc", n_samples=4, generator=torch.Generator().manual_seed(0))
    assert probs.shape == (4, 3) and torch.isfinite(probs).all()


class Encoder(nn.Module):
    """PyTorch's ``nn.TransformerEncoder`` (sequence first, the default layout), padding mask from
    the last input channel, masked mean pooling."""

    def __init__(self, norm_first: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(D_IN, E)
        layer = nn.TransformerEncoderLayer(E, 2, 6, dropout=0.0, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(E, 3)

    def forward(self, x: Tensor) -> Tensor:
        feats, keep = x[..., :-1], x[..., -1]
        h = self.embed(feats).transpose(0, 1)  # [T, N, E]
        h = self.encoder(h, src_key_padding_mask=keep < 0.5).transpose(0, 1)
        w = keep.unsqueeze(-1)
        return self.head((h * w).sum(1) / w.sum(1).clamp_min(1.0))


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_kfoc_is_exact_and_covers_every_parameter(norm_first: bool) -> None:
    torch.manual_seed(0)
    model = Encoder(norm_first).double().eval()
    _, x, y = _data("self", n=T)  # N = T = 5: the batch dimension of [T, N, E] is ambiguous
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    curv = fit_curvature(model, loader, "kfoc", tol=1e-12, max_iter=500, progress=False)
    F_, names = dense_fisher(model, list(loader), "exact")
    assert set(curv.param_names()) == set(names)
    kinds = {k: type(b).__name__ for k, b in curv.blocks.items()}
    for i in range(2):
        for m in ("self_attn", "self_attn.out_proj", "linear1", "linear2"):
            assert kinds[f"encoder.layers.{i}.{m}"] == "KronBlock"
    for b in curv.blocks.values():
        sl = module_slice(model, names, b.name)
        assert_block_matches(b, F_[sl, sl], "kfoc", RTOL)


def test_padding_contributes_nothing() -> None:
    """Another value at the padded positions: the same blocks (the model masks them)."""
    model, x, y = _data("self")
    noisy = x.clone()
    noisy[..., :-1] += 3.0 * (1 - x[..., -1:]) * torch.randn_like(x[..., :-1])
    a = fit_curvature(model, [(x, y)], "kfoc", tol=1e-12, progress=False)
    b = fit_curvature(model, [(noisy, y)], "kfoc", tol=1e-12, progress=False)
    for k in a.blocks:
        torch.testing.assert_close(a.blocks[k].to_dense(), b.blocks[k].to_dense())


@pytest.mark.parametrize("reduction", ["reduce", "auto"])
def test_kfac_reduce_equals_the_reduced_factors(reduction: str) -> None:
    """K-FAC "reduce" (the default for Linear layers over sequences), written out plainly:
    ``G = Σ_n J_nᵀ H_n J_n`` with ``J_n = Σ_t ∂f_n/∂z_{n,t}`` (the Jacobian w.r.t. the bias)
    and ``A = 1/N Σ_n ā_n ā_nᵀ``, ``ā_n`` the mean input over the real (unpadded) tokens."""
    model, x, y = _data("self")
    set_padding_mask(model, lambda x: x[..., -1])  # the model's own mask: the last feature
    curv = fit_curvature(model, [(x, y)], "kfac", kfac_reduction=reduction, progress=False)
    b = curv.blocks["embed"]
    assert isinstance(b, KronBlock)
    with torch.no_grad():
        p = torch.softmax(model(x), dim=-1)
    h = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    j = per_point_jacobians(model, x)["embed.bias"]  # [N, C, E]: Σ over positions
    torch.testing.assert_close(b.G, torch.einsum("nce,ncd,ndf->ef", j, h, j))
    keep = x[..., -1:]
    a = torch.cat([x[..., :-1], torch.ones_like(keep)], -1)
    a_bar = (a * keep).sum(1) / keep.sum(1)
    torch.testing.assert_close(b.A, a_bar.T @ a_bar / len(x))
    expand = fit_curvature(model, [(x, y)], "kfac", kfac_reduction="expand", progress=False)
    flat = a[keep[..., 0] > 0]  # the real positions only
    torch.testing.assert_close(expand.blocks["embed"].A, flat.T @ flat / len(flat))


def test_kfac_reduction_is_validated() -> None:
    model, x, y = _data("self")
    with pytest.raises(ValueError, match="kfac_reduction.*'expand'"):
        fit_curvature(model, [(x, y)], "kfac", kfac_reduction="mean", progress=False)


def test_unsupported_attention_paths_raise_with_the_fix() -> None:
    """Unbatched attention inputs, an instance-level forward override and a Linear whose input
    has no batch dimension each raise an error naming the module and the fix."""

    class Unbatched(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(E, 2)
            self.head = nn.Linear(E, 3)

        def forward(self, x: Tensor) -> Tensor:
            out = torch.stack([self.attn(xi, xi, xi)[0].mean(0) for xi in x])  # [L, E] each
            return self.head(out)

    x, y = torch.randn(4, T, E), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match="unbatched inputs"):
        fit_curvature(Unbatched().eval(), [(x, y)], "kfoc", progress=False)
    model = AttnNet().eval()
    model.attn.forward = model.attn.forward  # type: ignore[method-assign]
    xs, ys = _data("self")[1].float(), torch.randint(0, 3, (8,))
    with pytest.raises(TypeError, match="forward replaced on the instance"):
        fit_curvature(model, [(xs, ys)], "kfoc", progress=False)

    class Broadcast(nn.Module):  # a Linear applied to a batch-free tensor, broadcast later
        def __init__(self) -> None:
            super().__init__()
            self.bias_net = nn.Linear(2, 3)
            self.head = nn.Linear(E, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(x.mean(1)) + self.bias_net(torch.ones(2))

    # a Linear on a batch-free input: its output is handed on expanded, a Kronecker block
    fitted = fit_curvature(Broadcast().eval(), [(x, y)], "kfoc", progress=False)
    assert isinstance(fitted.blocks["bias_net"], KronBlock)
    broadcast = Broadcast().eval()
    broadcast.forward = lambda x: (
        broadcast.head(x.mean(1))
        + broadcast.bias_net(  # type: ignore[method-assign]
            torch.ones(5, 2)
        ).mean(0)
    )
    # expanded along the batch, bias_net's output breaks the forward: whole-model gradients
    fitted = fit_curvature(broadcast, [(x, y)], "kfoc", progress=False)
    assert isinstance(fitted.blocks["bias_net"], KronBlock)


class WithPositions(AttnNet):
    """:class:`AttnNet` plus a learned position embedding of ``arange(T)``: an output without a
    batch dimension, broadcast over the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Embedding(T, E)

    def forward(self, x: Tensor) -> Tensor:
        feats, keep = x[..., :-1], x[..., -1]
        h = torch.tanh(self.embed(feats) + self.pos(torch.arange(x.shape[1])))
        out, _ = self.attn(h, h, h, key_padding_mask=keep < 0.5, need_weights=False)
        w = keep.unsqueeze(-1)
        return self.head((out * w).sum(1) / w.sum(1).clamp_min(1.0))


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_an_output_without_batch_dimension_gets_its_exact_block(structure: str) -> None:
    torch.manual_seed(0)
    model = WithPositions().double().eval()
    _, x, y = _data("self")
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    curv = fit_curvature(model, loader, structure, progress=False)
    F_, names = dense_fisher(model, list(loader), "exact")
    sl = module_slice(model, names, "pos")
    ref = F_[sl, sl] if structure == "full" else torch.diagonal(F_[sl, sl])
    got = curv.blocks["pos"].to_dense() if structure == "full" else curv.blocks["pos"].values
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=1e-12)
