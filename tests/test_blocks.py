"""Block algebra against dense float64 matrices: to_dense, matvec, powers, log-det, inverse."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bayes_kfoc import DenseBlock, DiagBlock, KronBlock
from bayes_kfoc.blocks.kron import mat_to_vec, vec_to_mat

RTOL = 1e-5


def _psd(n: int, gen: torch.Generator, rank: int | None = None) -> torch.Tensor:
    x = torch.randn(n, rank or n + 2, generator=gen, dtype=torch.float64)
    return x @ x.T


def _blocks(bias: bool, device: torch.device, dtype: torch.dtype = torch.float64):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(0)
    d_out, d_in = 3, 4
    n = d_in + int(bias)
    shapes = {"weight": torch.Size([d_out, d_in])}
    if bias:
        shapes["bias"] = torch.Size([d_out])
    A, G = _psd(n, gen), _psd(d_out, gen)
    p = d_out * n
    return [
        KronBlock("k", shapes, A.to(device, dtype), G.to(device, dtype)),
        DiagBlock("d", shapes, torch.rand(p, generator=gen, dtype=torch.float64).to(device, dtype)),
        DenseBlock("f", shapes, _psd(p, gen).to(device, dtype)),
    ]


def test_kron_dense_order_matches_parameters_to_vector() -> None:
    """The quadratic form of a weight vector equals ``tr(W̄^T G W̄ A)``."""
    gen = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(4, 3).double()
    A, G = _psd(5, gen), _psd(3, gen)
    blk = KronBlock("k", {k: p.shape for k, p in lin.named_parameters()}, A, G)
    v = torch.nn.utils.parameters_to_vector(lin.parameters()).detach()
    xbar = torch.cat([lin.weight, lin.bias[:, None]], 1).detach()
    expected = torch.trace(xbar.T @ G @ xbar @ A)
    torch.testing.assert_close(v @ blk.to_dense() @ v, expected)
    torch.testing.assert_close(mat_to_vec(xbar, True), v)
    torch.testing.assert_close(vec_to_mat(v, 3, 4, True), xbar)


@pytest.mark.parametrize("bias", [True, False])
def test_block_operations_match_dense(bias: bool, device: torch.device) -> None:
    gen = torch.Generator().manual_seed(2)
    for blk in _blocks(bias, device):
        dense = blk.to_dense()
        p = blk.num_params
        v = torch.randn(5, p, generator=gen, dtype=torch.float64).to(device)
        torch.testing.assert_close(blk.matvec(v), v @ dense, rtol=RTOL, atol=1e-10)
        torch.testing.assert_close(blk.frobenius_norm(), torch.linalg.matrix_norm(dense))
        torch.testing.assert_close(blk.trace(), torch.trace(dense))
        torch.testing.assert_close(blk.diagonal(), torch.diagonal(dense))
        torch.testing.assert_close(
            torch.sort(blk.eigenvalues()).values, torch.linalg.eigvalsh(dense), rtol=RTOL, atol=1e-9
        )
        for damping in [0.3, 2.0]:
            damped = dense + damping * torch.eye(p, dtype=dense.dtype, device=device)
            torch.testing.assert_close(blk.logdet(damping), torch.logdet(damped), rtol=RTOL, atol=0)
            torch.testing.assert_close(
                blk.inverse(damping), torch.linalg.inv(damped), rtol=RTOL, atol=1e-10
            )
            evals, evecs = torch.linalg.eigh(damped)
            for power in [-1.0, -0.5, 0.5, 2.0]:
                ref = (evecs * evals.pow(power)) @ evecs.T
                torch.testing.assert_close(
                    blk.matpow(v, power, damping), v @ ref, rtol=RTOL, atol=1e-10
                )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blocks_move_between_devices_and_dtypes(dtype: torch.dtype, device: torch.device) -> None:
    for blk in _blocks(True, torch.device("cpu")):
        moved = blk.to(device, dtype)
        assert moved.device.type == device.type and moved.dtype == dtype
        torch.testing.assert_close(
            moved.to_dense().cpu().double(), blk.to_dense(), rtol=1e-4, atol=1e-4
        )
        assert moved.logdet(1.0).device.type == device.type


def test_roundoff_negative_eigenvalues_are_clamped_and_real_negatives_raise() -> None:
    gen = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=torch.float64))
    almost = q @ torch.diag(torch.tensor([1.0, 0.5, 0.0, -1e-17], dtype=torch.float64)) @ q.T
    shapes = {"weight": torch.Size([2, 4])}
    blk = KronBlock("k", shapes, almost, torch.eye(2, dtype=torch.float64))
    assert blk.eigenvalues().min() >= 0
    bad = q @ torch.diag(torch.tensor([1.0, 0.5, 0.0, -0.1], dtype=torch.float64)) @ q.T
    with pytest.raises(ValueError, match="not positive semi-definite"):
        KronBlock("k", shapes, bad, torch.eye(2, dtype=torch.float64)).eigenvalues()
    with pytest.raises(ValueError, match="singular"):
        KronBlock("k", shapes, almost, torch.eye(2, dtype=torch.float64)).logdet(0.0)


def test_block_shape_checks_name_the_module() -> None:
    shapes = {"weight": torch.Size([2, 3]), "bias": torch.Size([2])}
    with pytest.raises(ValueError, match="layer1.*A \\[4, 4\\]"):
        KronBlock("layer1", shapes, torch.eye(3), torch.eye(2))
    with pytest.raises(ValueError, match="layer1"):
        DiagBlock("layer1", shapes, torch.ones(5))
    with pytest.raises(ValueError, match="layer1"):
        DenseBlock("layer1", shapes, torch.eye(5))


MC_TOL = 0.03  # relative Frobenius error of a 200k-draw covariance estimate (seeded)


@pytest.mark.mc
def test_block_samples_have_the_damped_inverse_covariance() -> None:
    for blk in _blocks(True, torch.device("cpu")):
        draws = blk.sample(200_000, 0.7, torch.Generator().manual_seed(0))
        emp = draws.T @ draws / draws.shape[0]
        ref = blk.inverse(0.7)
        assert torch.linalg.norm(emp - ref) / torch.linalg.norm(ref) < MC_TOL, blk.name


@settings(max_examples=25, deadline=None)
@given(
    d_out=st.integers(1, 4),
    d_in=st.integers(1, 4),
    bias=st.booleans(),
    damping=st.floats(0.05, 5.0),
    power=st.sampled_from([-1.0, -0.5, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_kron_block_powers_match_dense_for_any_shape(
    d_out: int, d_in: int, bias: bool, damping: float, power: float, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    n = d_in + int(bias)
    shapes = {"weight": torch.Size([d_out, d_in])}
    if bias:
        shapes["bias"] = torch.Size([d_out])
    blk = KronBlock("k", shapes, _psd(n, gen, rank=1 + seed % n), _psd(d_out, gen))
    v = torch.randn(3, blk.num_params, generator=gen, dtype=torch.float64)
    assert torch.equal(mat_to_vec(vec_to_mat(v, d_out, d_in, bias), bias), v)
    dense = blk.to_dense() + damping * torch.eye(blk.num_params, dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(dense)
    ref = v @ ((evecs * evals.pow(power)) @ evecs.T)
    torch.testing.assert_close(blk.matpow(v, power, damping), ref, rtol=RTOL, atol=1e-9)
    torch.testing.assert_close(blk.logdet(damping), torch.logdet(dense), rtol=RTOL, atol=1e-9)
