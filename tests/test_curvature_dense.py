"""Every structure against the brute-force dense Fisher (torch.func Jacobians, float64)."""

from __future__ import annotations

import copy

import pytest
import torch
from cases import CASE_IDS, CASES, Case
from reference import dense_fisher, kron_order, module_slice, rel_err, top1_kron
from torch.utils.data import DataLoader, TensorDataset

from bayes_kfoc import DenseBlock, DiagBlock, KronBlock, fit_curvature

RTOL = 1e-6  # relative Frobenius error allowed against the dense references (float64)
FISHERS = ["exact", "mc", "empirical"]
MC_SAMPLES = 2
SEED = 7


def _fit(case: Case, structure: str, fisher: str, batch_size: int = 4, **kw):  # type: ignore[no-untyped-def]
    model, x, y = case.make()
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)  # 11 points: 4 + 4 + 3
    curv = fit_curvature(
        model,
        loader,
        structure,
        fisher,
        mc_samples=MC_SAMPLES,
        seed=SEED,
        tol=1e-12,
        max_iter=500,
        progress=False,
        **kw,
    )
    F, names = dense_fisher(model, list(loader), fisher, MC_SAMPLES, SEED)
    return model, curv, F, names


@pytest.mark.parametrize("fisher", FISHERS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_kfoc_is_top1_svd_of_rearranged_exact_block(case: Case, fisher: str) -> None:
    model, curv, F, names = _fit(case, "kfoc", fisher)
    kron_blocks = [b for b in curv.blocks.values() if isinstance(b, KronBlock)]
    assert kron_blocks, "every case has at least one Linear/Conv2d layer"
    for b in kron_blocks:
        n = b.d_in + int(b.bias)
        fb = F[module_slice(model, names, b.name)][:, module_slice(model, names, b.name)]
        best, _, _ = top1_kron(kron_order(fb, b.d_out, n, b.bias), b.d_out, n)
        ours = kron_order(b.to_dense(), b.d_out, n, b.bias)
        assert rel_err(ours, best) < RTOL, (b.name, rel_err(ours, best))
        assert b.info["converged"]


@pytest.mark.parametrize("fisher", FISHERS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_kfoc_error_at_most_kfac_error(case: Case, fisher: str) -> None:
    model, kfoc, F, names = _fit(case, "kfoc", fisher)
    _, kfac, _, _ = _fit(case, "kfac", fisher)
    for name, b in kfoc.blocks.items():
        sl = module_slice(model, names, name)
        err_kfoc = rel_err(b.to_dense(), F[sl, sl])
        err_kfac = rel_err(kfac.blocks[name].to_dense(), F[sl, sl])
        assert err_kfoc <= err_kfac * (1 + 1e-9), (name, err_kfoc, err_kfac)


@pytest.mark.parametrize("fisher", FISHERS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_diag_and_full_equal_exact_block(case: Case, fisher: str) -> None:
    model, diag, F, names = _fit(case, "diag", fisher)
    _, full, _, _ = _fit(case, "full", fisher)
    for name, b in diag.blocks.items():
        sl = module_slice(model, names, name)
        assert isinstance(b, DiagBlock)
        torch.testing.assert_close(b.values, torch.diagonal(F[sl, sl]), rtol=RTOL, atol=1e-12)
        fb = full.blocks[name]
        assert isinstance(fb, DenseBlock)
        torch.testing.assert_close(fb.to_dense(), F[sl, sl], rtol=RTOL, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_non_kronecker_modules_get_their_exact_diagonal(case: Case) -> None:
    model, curv, F, names = _fit(case, "kfoc", "exact")
    for name, b in curv.blocks.items():
        if isinstance(b, DiagBlock):
            sl = module_slice(model, names, name)
            torch.testing.assert_close(b.values, torch.diagonal(F[sl, sl]), rtol=RTOL, atol=1e-12)


def test_kfac_matches_formula_for_linear_layers() -> None:
    case = CASES[0]
    model, x, y = case.make()
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    curv = fit_curvature(model, loader, "kfac", "exact", progress=False)
    # Hand formula: A = 1/N Σ ā ā^T, G = Σ_n Σ_c δ δ^T, with δ from torch.func Jacobians.
    from reference import per_point_jacobians

    acts: dict[str, torch.Tensor] = {}
    h0 = model[0].register_forward_hook(lambda m, i, o: acts.__setitem__("0", i[0]))
    h2 = model[2].register_forward_hook(lambda m, i, o: acts.__setitem__("2", i[0]))
    with torch.no_grad():
        logits = model(x)
    h0.remove()
    h2.remove()
    p = torch.softmax(logits, -1)
    sqrt_h = p.sqrt().unsqueeze(-1) * (torch.eye(3, dtype=p.dtype) - p.unsqueeze(1))  # [N, C, C]
    jac = per_point_jacobians(model, x)
    for name in ["0", "2"]:
        a = torch.cat([acts[name], torch.ones(len(x), 1, dtype=x.dtype)], 1)
        A = a.T @ a / len(x)
        # Jacobian of logits wrt the layer's bias is the Jacobian wrt its output z.
        jz = jac[f"{name}.bias"]  # [N, C, d_out]
        d = torch.einsum("nvc,ncd->nvd", sqrt_h, jz).reshape(-1, jz.shape[-1])
        G = d.T @ d
        b = curv.blocks[name]
        assert isinstance(b, KronBlock)
        torch.testing.assert_close(b.A, A, rtol=RTOL, atol=1e-12)
        torch.testing.assert_close(b.G, G, rtol=RTOL, atol=1e-12)


@pytest.mark.parametrize("case", [c for c in CASES if "mlp" in c.id], ids=lambda c: c.id)
def test_kfac_and_kfoc_exact_for_one_point_on_linear_layers(case: Case) -> None:
    model, x, y = case.make()
    loader = DataLoader(TensorDataset(x[:1], y[:1]), batch_size=1)
    F, names = dense_fisher(model, list(loader), "exact")
    for structure in ["kfac", "kfoc"]:
        curv = fit_curvature(model, loader, structure, "exact", tol=1e-12, progress=False)
        for name, b in curv.blocks.items():
            sl = module_slice(model, names, name)
            assert rel_err(b.to_dense(), F[sl, sl]) < RTOL, (structure, name)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cached_and_streaming_agree(case: Case) -> None:
    model, x, y = case.make()
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    kw = dict(fisher="mc", mc_samples=3, seed=1, tol=1e-12, max_iter=500, progress=False)
    cached = fit_curvature(model, loader, "kfoc", mode="cached", **kw)  # type: ignore[arg-type]
    stream = fit_curvature(model, loader, "kfoc", mode="streaming", **kw)  # type: ignore[arg-type]
    assert cached.mode == "cached" and stream.mode == "streaming"
    for name, b in cached.blocks.items():
        assert rel_err(stream.blocks[name].to_dense(), b.to_dense()) < RTOL, name


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_factors_are_symmetric_psd_and_balanced(case: Case) -> None:
    _, curv, _, _ = _fit(case, "kfoc", "exact")
    for b in curv.blocks.values():
        if isinstance(b, KronBlock):
            for f in (b.A, b.G):
                torch.testing.assert_close(f, f.T)
                evals = torch.linalg.eigvalsh(f)
                assert evals.min() >= -1e-10 * evals.max()
            na, ng = torch.linalg.matrix_norm(b.A), torch.linalg.matrix_norm(b.G)
            torch.testing.assert_close(na, ng)


def test_fisher_is_summed_not_averaged() -> None:
    case = CASES[0]
    model, x, y = case.make()
    one = DataLoader(TensorDataset(x, y), batch_size=11)
    twice = DataLoader(TensorDataset(torch.cat([x, x]), torch.cat([y, y])), batch_size=11)
    c1 = fit_curvature(model, one, "diag", progress=False)
    c2 = fit_curvature(model, twice, "diag", progress=False)
    for name in c1.blocks:
        torch.testing.assert_close(c2.blocks[name].diagonal(), 2 * c1.blocks[name].diagonal())
    assert c2.num_data == 22


def test_mc_fisher_is_reproducible_with_seed_and_generator() -> None:
    model, x, y = CASES[0].make()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    a = fit_curvature(model, loader, "diag", "mc", seed=3, progress=False)
    b = fit_curvature(model, loader, "diag", "mc", seed=3, progress=False)
    c = fit_curvature(model, loader, "diag", "mc", seed=4, progress=False)
    g1 = fit_curvature(
        model, loader, "diag", "mc", generator=torch.Generator().manual_seed(5), progress=False
    )
    g2 = fit_curvature(
        model, loader, "diag", "mc", generator=torch.Generator().manual_seed(5), progress=False
    )
    for k in a.blocks:
        assert torch.equal(a.blocks[k].diagonal(), b.blocks[k].diagonal())
        assert torch.equal(g1.blocks[k].diagonal(), g2.blocks[k].diagonal())
    assert any(not torch.equal(a.blocks[k].diagonal(), c.blocks[k].diagonal()) for k in a.blocks)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_float32_model_accumulates_in_float64_on_request(case: Case) -> None:
    model, x, y = case.make()
    loader64 = DataLoader(TensorDataset(x, y), batch_size=4)
    loader32 = DataLoader(TensorDataset(x.float(), y), batch_size=4)
    ref = fit_curvature(model, loader64, "kfoc", tol=1e-10, progress=False)
    wide = fit_curvature(
        copy.deepcopy(model).float(),
        loader32,
        "kfoc",
        tol=1e-10,
        dtype=torch.float64,
        progress=False,
    )
    for name, block in ref.blocks.items():
        got = wide.blocks[name]
        assert got.dtype == torch.float64
        assert rel_err(got.to_dense(), block.to_dense()) < 1e-5, name


@pytest.mark.parametrize("structure", ["kfoc", "diag"])
def test_shuffled_loader_sums_every_point_once(structure: str) -> None:
    model, x, y = CASES[0].make()
    plain = DataLoader(TensorDataset(x, y), batch_size=4)
    shuffled = DataLoader(
        TensorDataset(x, y), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1)
    )
    a = fit_curvature(model, plain, structure, tol=1e-12, max_iter=500, progress=False)
    b = fit_curvature(model, shuffled, structure, tol=1e-12, max_iter=500, progress=False)
    assert b.num_data == len(x)
    for name, block in a.blocks.items():
        assert rel_err(b.blocks[name].to_dense(), block.to_dense()) < RTOL, name
