"""Layers the way other libraries write them, against dense float64 references: a transposed
Linear (``Conv1D``, ``y = x @ W + b`` with ``W`` ``[d_in, d_out]``, written here as transformers
writes it), a channels-first LayerNorm subclass (permute, ``layer_norm``, permute back), model
outputs without a batch dimension (a root-owned position ``nn.Parameter`` under a padding mask
with data-dependent control flow, a Linear on a batch-free tensor) and ``ModelOutput``-like
returns. The references are per-point Jacobians by ``torch.func.jacrev``, one point at a time."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import pytest
import torch
from reference import assert_block_matches
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from bayes_kfoc import DiagBlock, KronBlock, Laplace, fit_curvature
from bayes_kfoc.stats.output import set_logits

RTOL = 1e-6


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D, as written there: weight ``[nx, nf]``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        size_out = (*x.size()[:-1], self.nf)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """A LayerNorm over the channels of ``[N, C, H, W]``, as several vision libraries write it."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Output(OrderedDict):  # a ModelOutput-like return: a mapping whose fields are attributes
    def __getattr__(self, k: str) -> Any:
        try:
            return self[k]
        except KeyError as err:
            raise AttributeError(k) from err


class GPTLike(nn.Module):
    """Token embedding, a root-owned position parameter, Conv1D projections, a padding mask
    with Python control flow on it (as transformers' mask code), a ModelOutput return."""

    def __init__(self, vocab: int = 12, e: int = 6, t: int = 5, c: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, e)
        self.pos = nn.Parameter(torch.randn(t, e) * 0.3)
        self.c_fc = Conv1D(8, e)
        self.c_proj = Conv1D(e, 8)
        self.head = nn.Linear(e, c)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Output:
        t = input_ids.shape[1]
        h = self.embed(input_ids) + self.pos[:t]
        if not bool(attention_mask.all()):  # data-dependent: torch.func.vmap cannot trace it
            h = h * attention_mask.unsqueeze(-1)
        h = h + self.c_proj(torch.tanh(self.c_fc(h)))
        w = attention_mask.unsqueeze(-1).to(h.dtype)
        logits = self.head((h * w).sum(1) / w.sum(1))
        return Output(loss=None, logits=logits)


class ConvNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.norm = ChannelsFirstLayerNorm(3)
        self.head = nn.Linear(3 * 4 * 5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.norm(self.conv(x))).flatten(1))


def _dense_blocks(model: nn.Module, batches: list[tuple[Any, Tensor]]) -> dict[str, Tensor]:
    """The exact summed Fisher block of every module, from per-point Jacobians (one point at a
    time, so Python control flow is fine), ``{module: [P, P]}`` in parameter order."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    total: Tensor | None = None
    for x, _ in batches:
        n = x["input_ids"].shape[0] if isinstance(x, dict) else x.shape[0]
        for i in range(n):
            xi = {k: v[i : i + 1] for k, v in x.items()} if isinstance(x, dict) else x[i : i + 1]

            def f(p: dict[str, Tensor], xi: Any = xi) -> Tensor:
                out = functional_call(model, p, (), xi) if isinstance(xi, dict) else None
                out = functional_call(model, p, (xi,)) if out is None else out
                return (out if isinstance(out, Tensor) else out["logits"])[0]

            jac = jacrev(f)(params)
            j = torch.cat([jac[k].reshape(jac[k].shape[0], -1) for k in params], dim=1)
            with torch.no_grad():
                prob = torch.softmax(f(params), -1)
            h = torch.diag(prob) - torch.outer(prob, prob)
            fi = j.T @ h @ j
            total = fi if total is None else total + fi
    assert total is not None
    out, pos = {}, 0
    owners: dict[str, list[int]] = {}
    for k, p in model.named_parameters():
        owner = k.rpartition(".")[0] or k  # a parameter the model owns: a block of its own
        owners.setdefault(owner, []).extend(range(pos, pos + p.numel()))
        pos += p.numel()
    for owner, idx in owners.items():
        ix = torch.tensor(idx)
        out[owner] = total[ix][:, ix]
    return out


def _check(block: Any, exact: Tensor, structure: str) -> None:
    """:func:`assert_block_matches`, a transposed (Conv1D) Kronecker block first written in the
    order of its nn.Linear twin (weight ``[d_out, d_in]``), the exact block permuted alike."""
    if isinstance(block, KronBlock) and block.transposed:
        o, i = block.d_out, block.d_in
        perm = torch.arange(o * i).reshape(i, o).T.flatten()  # twin position -> Conv1D position
        perm = torch.cat([perm, torch.arange(o * i, exact.shape[0])])
        twin = {"weight": torch.Size((o, i)), "bias": torch.Size((o,))}
        torch.testing.assert_close(
            block.to_dense()[perm][:, perm],
            KronBlock(block.name, twin, block.A, block.G).to_dense(),
        )
        block, exact = KronBlock(block.name, twin, block.A, block.G), exact[perm][:, perm]
    assert_block_matches(block, exact, structure, RTOL)


def _text_batches() -> list[tuple[dict[str, Tensor], Tensor]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for n in (4, 3):
        ids = torch.randint(1, 12, (n, 5), generator=gen)
        mask = torch.ones(n, 5, dtype=torch.long)
        mask[1:, 3:] = 0  # padding
        ids[mask == 0] = 0
        out.append(({"input_ids": ids, "attention_mask": mask}, torch.randint(0, 3, (n,))))
    return out


@pytest.mark.parametrize("structure", ["kfoc", "diag", "full"])
def test_conv1d_root_parameter_and_model_output_against_dense(structure: str) -> None:
    torch.manual_seed(0)
    model = GPTLike().double().eval()
    batches = _text_batches()
    curv = fit_curvature(model, batches, structure, progress=False, tol=1e-12, max_iter=500)
    exact = _dense_blocks(model, batches)
    assert set(curv.blocks) == set(exact)
    assert "pos" in curv.blocks and "" not in curv.blocks  # the root's parameter, by its name
    assert curv.coverage["pos"].startswith(("diagonal block 'pos'", "dense block 'pos'"))
    for name in ("c_fc", "c_proj"):
        assert isinstance(curv.blocks[name], KronBlock) == (structure == "kfoc")
    for name, block in curv.blocks.items():
        _check(block, exact[name], structure)


def test_conv1d_equals_its_linear_twin_in_kfac_and_the_glm_predictive(tmp_path: Any) -> None:
    """A Conv1D is an nn.Linear with the weight transposed: the same K-FAC factors, and the same
    GLM predictive (which reads every block in parameter order), before and after save/load."""
    torch.manual_seed(0)
    model = GPTLike().double().eval()
    twin = GPTLike().double().eval()
    twin.load_state_dict(model.state_dict())
    for name in ("c_fc", "c_proj"):
        conv = getattr(model, name)
        lin = nn.Linear(conv.weight.shape[0], conv.nf).double()
        with torch.no_grad():
            lin.weight.copy_(conv.weight.T)
            lin.bias.copy_(conv.bias)
        setattr(twin, name, lin)
    batches = _text_batches()
    a = Laplace(model, structure="kfac", progress=False)
    b = Laplace(twin, structure="kfac", progress=False)
    a.fit(batches)
    b.fit(batches)
    for name in ("c_fc", "c_proj"):
        ka, kb = a.blocks[name], b.blocks[name]
        assert isinstance(ka, KronBlock) and isinstance(kb, KronBlock)
        torch.testing.assert_close(ka.A, kb.A)
        torch.testing.assert_close(ka.G, kb.G)
    x = batches[0][0]
    pa, pb = a.predict(x, method="glm"), b.predict(x, method="glm")
    torch.testing.assert_close(pa, pb)
    a.save(tmp_path / "la.pt")
    c = Laplace.load(tmp_path / "la.pt", model)
    torch.testing.assert_close(c.predict(x, method="glm"), pa)


@pytest.mark.parametrize("structure", ["kfoc", "diag", "full"])
def test_channels_first_layernorm_subclass_takes_the_exact_path(structure: str) -> None:
    """The closed form of nn.LayerNorm would normalise the last dimension (W = 5 here, not the
    channels): the subclass's own forward must be differentiated instead."""
    torch.manual_seed(0)
    model = ConvNorm().double().eval()
    with torch.no_grad():
        model.norm.weight.add_(torch.randn(3) * 0.2)
    x = torch.randn(6, 2, 4, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    curv = fit_curvature(model, [(x, y)], structure, progress=False, tol=1e-12, max_iter=500)
    exact = _dense_blocks(model, [(x, y)])
    for name, block in curv.blocks.items():
        _check(block, exact[name], structure)


def test_a_linear_on_a_batch_free_tensor_gets_its_exact_kronecker_optimum() -> None:
    class Bias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("code", torch.randn(4, 2))
            self.shift = nn.Linear(2, 3)
            self.head = nn.Linear(5, 3)

        def forward(self, x: Tensor) -> Tensor:  # shift's input and output have no batch
            return self.head(x) + torch.tanh(self.shift(self.code[:1]))  # [1, 3], broadcast

    torch.manual_seed(0)
    model = Bias().double().eval()
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    for structure in ("kfoc", "diag", "full"):
        curv = fit_curvature(model, [(x, y)], structure, progress=False, tol=1e-12, max_iter=500)
        exact = _dense_blocks(model, [(x, y)])
        for name, block in curv.blocks.items():
            _check(block, exact[name], structure)
    # a use other than broadcasting (a sum over the rows) is caught: whole-model gradients
    model.forward = lambda x: model.head(x) + model.shift(model.code).sum(0)  # type: ignore
    curv = fit_curvature(model, [(x, y)], "diag", progress=False)
    exact = _dense_blocks(model, [(x, y)])
    for name, block in curv.blocks.items():
        _check(block, exact[name], "diag")


def test_other_output_fields_and_tuples() -> None:
    class Tup(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            return self.lin(x), x

    class Other(Tup):
        def forward(self, x: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
            return {"start_logits": self.lin(x)}

    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    tup = Tup()
    assert isinstance(fit_curvature(tup, [(x, y)], "diag", progress=False).blocks["lin"], DiagBlock)
    other = Other()
    with pytest.raises(TypeError, match="set_logits"):
        fit_curvature(other, [(x, y)], "diag", progress=False)
    set_logits(other, "start_logits")
    la = Laplace(other, structure="kfac", progress=False)
    la.fit([(x, y)])
    assert la.predict(x, method="glm").shape == (6, 3)
    set_logits(other, lambda out: out["start_logits"])
    assert la.predict(x, method="mc", n_samples=4).shape == (6, 3)


class RelativeBias(nn.Module):
    """A learned bias per head and token pair, without a batch dimension: added to the scores of
    a folded batch ``[N·windows, heads, T, T]``, so it cannot be expanded along ``N``."""

    def __init__(self, heads: int, t: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(heads, t, t) * 0.3)

    def forward(self) -> Tensor:
        return self.table.unsqueeze(0)


class WindowAttention(nn.Module):
    """Swin-style: ``[N, H·W, C]`` folded into ``[N·windows, ws², C]`` (batch-major), q/k/v
    Linears on the folded batch, a relative bias, unfolded back."""

    def __init__(self, c: int = 4, heads: int = 2, ws: int = 2, hw: int = 4) -> None:
        super().__init__()
        self.c, self.heads, self.ws, self.hw = c, heads, ws, hw
        self.q, self.k, self.v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.bias = RelativeBias(heads, ws * ws)
        self.proj = nn.Linear(c, c)

    def forward(self, x: Tensor, order: str = "batch-major") -> Tensor:
        n, ws, hw, c = x.shape[0], self.ws, self.hw, self.c
        w = x.view(n, hw // ws, ws, hw // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
        if order != "batch-major":  # windows first: point n is not a contiguous block of rows
            w = w.permute(1, 2, 0, 3, 4, 5)
        w = w.reshape(-1, ws * ws, c)

        def heads(t: Tensor) -> Tensor:
            return t.view(t.shape[0], ws * ws, self.heads, -1).transpose(1, 2)

        q, k, v = heads(self.q(w)), heads(self.k(w)), heads(self.v(w))
        att = torch.softmax(q @ k.transpose(-1, -2) + self.bias(), -1)
        o = (att @ v).transpose(1, 2).reshape(-1, ws * ws, c)
        if order != "batch-major":
            o = o.view(hw // ws, hw // ws, n, ws, ws, c).permute(2, 0, 1, 3, 4, 5)
        else:
            o = o.view(n, hw // ws, hw // ws, ws, ws, c)
        o = o.permute(0, 1, 3, 2, 4, 5).reshape(n, hw * hw, c)
        return self.proj(o)


class Windows(nn.Module):
    def __init__(self, order: str = "batch-major") -> None:
        super().__init__()
        self.order = order
        self.embed = nn.Linear(3, 4)
        self.block = WindowAttention()
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.embed(x))
        return self.head((h + self.block(h, self.order)).mean(1))


@pytest.mark.parametrize("structure", ["kfoc", "diag", "full"])
def test_window_attention_folding_the_batch_against_dense(structure: str) -> None:
    """q/k/v see ``[N·4, 4, C]``: Kronecker blocks over each point's rows (K-FOC exact); the
    relative bias, added to the folded scores, takes whole-model per-point gradients."""
    torch.manual_seed(0)
    model = Windows().double().eval()
    x, y = torch.randn(5, 16, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    curv = fit_curvature(model, [(x, y)], structure, progress=False, tol=1e-12, max_iter=500)
    exact = _dense_blocks(model, [(x, y)])
    for m in ("block.q", "block.k", "block.v"):
        assert isinstance(curv.blocks[m], KronBlock) == (structure == "kfoc")
    for name, block in curv.blocks.items():
        _check(block, exact[name], structure)


def test_a_batch_folded_other_than_batch_major_is_refused_by_name() -> None:
    torch.manual_seed(0)
    model = Windows(order="windows-first").double().eval()
    x, y = torch.randn(5, 16, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    with pytest.raises(ValueError, match=r"'block.q'.*not batch-major.*exclude=\['block'\]"):
        fit_curvature(model, [(x, y)], "diag", progress=False)


def test_per_point_gradients_that_fail_every_way_name_the_parameters_and_the_fixes() -> None:
    """A model that neither vmap nor single points can run (Python control flow on its mask,
    and a batch statistic that needs two points): the error names the model's own parameter,
    not the root, and lists the fixes."""

    class Coupled(GPTLike):
        def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Output:
            if input_ids.shape[0] < 2:
                raise RuntimeError("this model needs two points per batch")
            return super().forward(input_ids, attention_mask)

    model = Coupled().double().eval()
    with pytest.raises(RuntimeError, match=r"own parameters \['pos'\].*exclude=.*position_ids"):
        fit_curvature(model, _text_batches(), "diag", progress=False)


class ConvHead(nn.Module):
    """A Conv1D head whose output is the logits (the GLM's closed-form last layer)."""

    def __init__(self, d_in: int, classes: int) -> None:
        super().__init__()
        self.body = nn.Linear(4, d_in)
        self.head = Conv1D(classes, d_in)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(x)))


@pytest.mark.parametrize("d_in", [3, 5])  # square (values silently misplaced) and not
def test_a_conv1d_last_layer_in_closed_form_equals_its_linear_twin(d_in: int) -> None:
    torch.manual_seed(0)
    model = ConvHead(d_in, 3).double().eval()
    twin = ConvHead(d_in, 3).double().eval()
    twin.load_state_dict(model.state_dict())
    lin = nn.Linear(d_in, 3).double()
    with torch.no_grad():
        lin.weight.copy_(model.head.weight.T)
        lin.bias.copy_(model.head.bias)
    twin.head = lin  # type: ignore[assignment]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=g)
    batches = [(x[:12], y[:12]), (x[12:], y[12:])]
    for structure in ("diag", "kfoc"):
        a = Laplace(model, structure=structure, prior_precision=0.5, progress=False).fit(batches)
        b = Laplace(twin, structure=structure, prior_precision=0.5, progress=False).fit(batches)
        pa, pb = a.predict(x[:6]), b.predict(x[:6])
        assert a.last_glm is not None and "head" in a.last_glm.closed_form
        torch.testing.assert_close(pa, pb, rtol=RTOL, atol=1e-10)


def test_kfoc_warm_start_on_a_conv1d() -> None:
    """A warm start from an earlier fit's factors is accepted for a transposed weight."""
    torch.manual_seed(0)
    model = ConvHead(5, 3).double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=g)
    batches = [(x[:12], y[:12]), (x[12:], y[12:])]
    kw: dict[str, Any] = {"structure": "kfoc", "tol": 1e-12, "max_iter": 500, "progress": False}
    first = fit_curvature(model, batches, **kw)
    again = fit_curvature(model, batches, warm_start=first, **kw)
    torch.testing.assert_close(
        again.blocks["head"].to_dense(), first.blocks["head"].to_dense(), rtol=1e-5, atol=1e-8
    )
