"""K-FOC in the inputs' row space (cached fits whose stacked inputs are fewer than the input
features: ResNet-18's last stages at a few hundred points) against the dense float64 top-1 SVD
of the rearranged exact block, and against the same fit without the row space."""

from __future__ import annotations

import pytest
import torch
from reference import dense_fisher, kron_order, module_slice, rel_err, top1_kron
from torch import Tensor, nn

import bayes_kfoc.curvature._rowspace as rowspace
import bayes_kfoc.curvature.drivers as drivers
from bayes_kfoc import KronBlock, fit_curvature

RTOL = 1e-6  # relative Frobenius error against the dense SVD optimum (float64, tol=1e-12)


class _PaddedConvNet(nn.Module):
    """A 3x3 convolution on 2x1 maps (8 channels: n = 73 inputs, T = 2 positions) and a
    head on a 30-wide hidden layer: with 5 points both have fewer stacked inputs than half their
    ``n``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 4, 3, padding=1)
        self.hidden = nn.Linear(8, 30)
        self.head = nn.Linear(30, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.head(torch.tanh(self.hidden(h)))


class _SequenceNet(nn.Module):
    """A Linear over 3 positions of 40 features (K-FAC's start is the "reduce" form)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(40, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.proj(x)).mean(1))


def _problem(kind: str) -> tuple[nn.Module, list[tuple[Tensor, Tensor]], set[str]]:
    torch.manual_seed(0)
    if kind == "conv":
        model: nn.Module = _PaddedConvNet().double().eval()
        x = torch.randn(5, 8, 2, 1, dtype=torch.float64)
        hit = {"conv", "head"}
    else:
        model = _SequenceNet().double().eval()
        x = torch.randn(5, 3, 40, dtype=torch.float64)
        hit = {"proj"}
    y = torch.randint(0, 3, (5,))
    return model, [(x[:3], y[:3]), (x[3:], y[3:])], hit


def _fit(model: nn.Module, data: list[tuple[Tensor, Tensor]], solver: str):  # type: ignore[no-untyped-def]
    return fit_curvature(
        model, data, "kfoc", mode="cached", solver=solver, tol=1e-12, max_iter=500, progress=False
    )


@pytest.mark.parametrize("solver", ["lanczos", "power"])
@pytest.mark.parametrize("kind", ["conv", "sequence"])
def test_row_space_kfoc_is_the_top1_svd_of_the_exact_block(
    kind: str, solver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, data, hit = _problem(kind)
    used: list[int] = []
    real = drivers.row_space

    def spy(stats, kfac_a):  # type: ignore[no-untyped-def]
        out = real(stats, kfac_a)
        used.append(0 if out is None else out.basis.shape[1])
        return out

    monkeypatch.setattr(drivers, "row_space", spy)
    curv = _fit(model, data, solver)
    monkeypatch.undo()
    names = [k for k, b in curv.blocks.items() if isinstance(b, KronBlock)]
    taken = {k for k, r in zip(names, used, strict=True) if r}
    assert taken == hit, (taken, used)
    F, pnames = dense_fisher(model, data, "exact")
    for k in names:
        b = curv.blocks[k]
        assert isinstance(b, KronBlock)
        n = b.d_in + int(b.bias)
        idx = module_slice(model, pnames, k)
        best, _, _ = top1_kron(kron_order(F[idx][:, idx], b.d_out, n, b.bias), b.d_out, n)
        assert rel_err(kron_order(b.to_dense(), b.d_out, n, b.bias), best) < RTOL, k
        assert b.info["converged"]
    # the same factors as the fit in the full input space
    monkeypatch.setattr(rowspace, "ROW_FRACTION", 0.0)
    full = _fit(model, data, solver)
    for k in names:
        b, ref = curv.blocks[k], full.blocks[k]
        assert isinstance(b, KronBlock) and isinstance(ref, KronBlock)
        assert rel_err(b.A, ref.A) < RTOL and rel_err(b.G, ref.G) < RTOL, k


def test_row_space_basis_is_orthonormal_and_spans_the_inputs() -> None:
    model, data, _ = _problem("conv")
    from bayes_kfoc.stats import Collector, targets_for

    targets = targets_for(model, ["conv"])
    with Collector(model, targets, "exact", 1, None) as col:
        stats = [col.batch(x, y, torch.Generator())[0]["conv"] for x, y in data]
    a = torch.cat([st.a.reshape(-1, st.n) for st in stats])  # type: ignore[union-attr]
    space = rowspace.row_space(stats, a.T @ a / a.shape[0])  # type: ignore[arg-type]
    assert space is not None
    q = space.basis
    assert q.shape == (73, 10)
    torch.testing.assert_close(q.T @ q, torch.eye(10, dtype=torch.float64))
    torch.testing.assert_close(a @ q @ q.T, a)  # every input lies in the span
    torch.testing.assert_close(space.expand(space.kfac_a), a.T @ a / a.shape[0])
