"""Robust factor eigendecompositions (issue 20, goal 4): a rank-deficient factor whose float32
``eigh`` fails to converge is redone in float64 (or with a reported jitter), its eigenpairs equal
the float64 reference, and the coverage report says what was done."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from bayes_kfoc import DenseBlock, KronBlock, Laplace, fit_curvature
from bayes_kfoc.blocks import EighMethod, _eigh, robust_eigh

RTOL = 1e-5  # float32 eigenpairs against the float64 reference, relative to the largest eigenvalue


def _float32_eigh_fails(m: Tensor) -> bool:
    try:
        torch.linalg.eigh(m)
    except torch.linalg.LinAlgError:
        return True
    return False


def _padded_conv(seed: int = 0) -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    """A 3x3 convolution with padding 1 on 1x1 feature maps (ResNet-18's ``layer4`` at CIFAR
    size): 8 of the 9 unfolded taps are padding, so its input factor ``A`` (145²) has rank 17
    and many exactly repeated zero eigenvalues; MKL's float32 ``syevd`` fails on it."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(16, 6, 3, padding=1), nn.Flatten(), nn.Linear(6, 3)).eval()
    x, y = torch.randn(64, 16, 1, 1), torch.randint(0, 3, (64,))
    return net, [(x, y)]


def _assert_matches_float64(evals: Tensor, evecs: Tensor, m: Tensor) -> None:
    """Eigenvalues equal the float64 ones; the eigenvectors are orthonormal and reconstruct
    ``m`` (eigenvectors of repeated eigenvalues are not unique, their span is)."""
    ref = torch.linalg.eigvalsh(m.double())
    scale = float(ref.abs().max())
    torch.testing.assert_close(evals.double(), ref, atol=RTOL * scale, rtol=0)
    q = evecs.double()
    eye = torch.eye(q.shape[0], dtype=torch.float64)
    torch.testing.assert_close(q.T @ q, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close((q * evals.double()) @ q.T, m.double(), atol=RTOL * scale, rtol=0)


@pytest.mark.parametrize("structure", ["kfac", "kfoc"])
def test_rank_deficient_conv_factor_is_redone_in_float64(structure: str) -> None:
    net, data = _padded_conv()
    curv = fit_curvature(net, data, structure, progress=False)
    block = curv.blocks["0"]
    assert isinstance(block, KronBlock) and block.dtype == torch.float32
    assert torch.linalg.matrix_rank(block.A.double()) < block.A.shape[0] // 4
    fails = _float32_eigh_fails(block.A)
    records = curv.decompose()
    la, qa, lg, qg = block.eigh()
    _assert_matches_float64(la, qa, block.A)
    _assert_matches_float64(lg, qg, block.G)
    assert la.dtype == qa.dtype == torch.float32
    want = EighMethod.FLOAT64 if fails else EighMethod.NATIVE
    assert records["0"]["A"].method is want
    noted = "eigendecomposition: A: float32 eigh failed to converge, redone in float64"
    assert (noted in curv.coverage["0.weight"]) is fails
    assert (noted in curv.report()) is fails
    curv.decompose()  # idempotent: the note is replaced, not repeated
    assert curv.coverage["0.weight"].count("eigendecomposition") == int(fails)


def test_the_padded_conv_factor_fails_float32_eigh_here() -> None:
    """The construction above reproduces the crash on this machine's LAPACK (MKL), so the test
    above exercises the fallback; on another LAPACK it may converge (then the test above checks
    the native path)."""
    net, data = _padded_conv()
    block = fit_curvature(net, data, "kfac", progress=False).blocks["0"]
    assert isinstance(block, KronBlock)
    if not torch.backends.mkl.is_available():
        pytest.skip("the failure is MKL's float32 syevd")
    assert _float32_eigh_fails(block.A)


def test_posterior_on_a_rank_deficient_factor_equals_the_float64_dense_posterior() -> None:
    """``(G ⊗ A + δI)^{-1} v`` through the fallback eigenbasis equals a float64 dense solve."""
    net, data = _padded_conv()
    block = fit_curvature(net, data, "kfac", progress=False).blocks["0"]
    damping = 0.3
    v = torch.randn(3, block.num_params, generator=torch.Generator().manual_seed(1))
    dense = block.to_dense().double() + damping * torch.eye(block.num_params, dtype=torch.float64)
    ref = torch.linalg.solve(dense, v.double().T).T
    got = block.matpow(v, -1.0, damping).double()
    torch.testing.assert_close(got, ref, atol=1e-4 * float(ref.abs().max()), rtol=0)
    ref_logdet = torch.linalg.slogdet(dense)[1]
    torch.testing.assert_close(block.logdet(damping).double(), ref_logdet, rtol=1e-5, atol=0)


def test_laplace_fit_on_a_rank_deficient_factor_reports_it_and_survives_save_load(
    tmp_path: object,
) -> None:
    net, data = _padded_conv()
    fails = _float32_eigh_fails(fit_curvature(net, data, "kfoc", progress=False).blocks["0"].A)
    la = Laplace(net, structure="kfoc", progress=False).fit(data)
    curv = la.curvature
    assert curv is not None
    assert curv.decompositions()["0"]["A"].fallback is fails
    path = f"{tmp_path}/post.pt"
    la.save(path)
    loaded = Laplace.load(path, net)
    assert loaded.curvature is not None
    assert loaded.curvature.decompositions()["0"]["A"].fallback is fails
    assert loaded.curvature.coverage == curv.coverage
    torch.testing.assert_close(loaded.predict(data[0][0][:4]), la.predict(data[0][0][:4]))


def _failing(times: int, real: object = torch.linalg.eigh) -> object:
    """An ``eigh`` that fails to converge on its first ``times`` calls, then is the real one."""
    calls = {"n": 0}

    def eigh(m: Tensor) -> tuple[Tensor, Tensor]:
        calls["n"] += 1
        if calls["n"] <= times:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real(m)  # type: ignore[operator, no-any-return]

    return eigh


def _psd(n: int, rank: int, dtype: torch.dtype) -> Tensor:
    x = torch.randn(rank, n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return (x.T @ x).to(dtype)


def test_float64_failure_falls_back_to_a_reported_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    """float32 and float64 both fail: ``F + δI`` in float64, ``δ`` subtracted and reported."""
    m = _psd(20, 5, torch.float32)
    monkeypatch.setattr(_eigh.torch.linalg, "eigh", _failing(2))
    evals, evecs, record = robust_eigh(m, "toy.A")
    monkeypatch.undo()
    assert record.method is EighMethod.JITTER and record.fallback
    assert record.relative_jitter == _eigh.JITTERS[0]
    assert record.jitter == pytest.approx(_eigh.JITTERS[0] * float(m.diagonal().max()))
    assert "jitter" in record.describe() and "δ =" in record.describe()
    _assert_matches_float64(evals, evecs, m)


def test_every_fallback_failing_raises_an_error_naming_the_fixes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    m = _psd(20, 5, torch.float32)
    monkeypatch.setattr(_eigh.torch.linalg, "eigh", _failing(10))
    with pytest.raises(torch.linalg.LinAlgError) as err:
        robust_eigh(m, "layer4.0.conv1.A")
    msg = str(err.value)
    assert "layer4.0.conv1.A" in msg and "(20, 20)" in msg
    assert "eig_dtype=torch.float64" in msg and "dtype=torch.float64" in msg


def test_non_finite_factor_raises_before_any_decomposition() -> None:
    m = _psd(6, 2, torch.float32)
    m[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"toy\.G: non-finite .* \(6, 6\)"):
        robust_eigh(m, "toy.G")


def test_dense_block_records_its_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    m = _psd(12, 3, torch.float32)
    block = DenseBlock("toy", {"weight": torch.Size([3, 4])}, m)
    monkeypatch.setattr(_eigh.torch.linalg, "eigh", _failing(1))
    evals, evecs = block.eigh()
    monkeypatch.undo()
    assert block.decompositions["matrix"].method is EighMethod.FLOAT64
    _assert_matches_float64(evals, evecs, block.matrix)


def test_float64_factor_that_fails_goes_straight_to_jitter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    m = _psd(10, 3, torch.float64)
    monkeypatch.setattr(_eigh.torch.linalg, "eigh", _failing(1))
    evals, evecs, record = robust_eigh(m, "toy")
    monkeypatch.undo()
    assert record.method is EighMethod.JITTER and record.dtype == torch.float64
    _assert_matches_float64(evals, evecs, m)
