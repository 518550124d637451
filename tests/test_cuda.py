"""CUDA runs agree with CPU runs (float64), and nothing leaves the device. Skipped without CUDA."""

from __future__ import annotations

import copy

import pytest
import torch
from cases import CASE_IDS, CASES, Case
from torch.utils.data import DataLoader, TensorDataset

from bayes_kfoc import Laplace, fit_curvature

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
RTOL = 1e-6


@pytest.mark.parametrize("structure", ["kfoc", "kfac", "diag", "full"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_curvature_on_cuda_equals_cpu(case: Case, structure: str) -> None:
    model, x, y = case.make()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # CPU batches, moved by the engine
    kw = dict(fisher="exact", tol=1e-12, max_iter=500, progress=False)
    cpu = fit_curvature(model, loader, structure, **kw)  # type: ignore[arg-type]
    gpu = fit_curvature(copy.deepcopy(model).cuda(), loader, structure, **kw)  # type: ignore[arg-type]
    for name, block in cpu.blocks.items():
        g = gpu.blocks[name]
        assert g.device.type == "cuda"
        ref = block.to_dense()
        assert torch.linalg.norm(g.to_dense().cpu() - ref) <= RTOL * torch.linalg.norm(ref)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_laplace_on_cuda_equals_cpu(case: Case) -> None:
    model, x, y = case.make()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    cpu = Laplace(model, prior_precision=0.8, progress=False, tol=1e-12).fit(loader)
    gpu = Laplace(copy.deepcopy(model).cuda(), prior_precision=0.8, progress=False, tol=1e-12).fit(
        loader
    )
    torch.testing.assert_close(gpu.predict(x).cpu(), cpu.predict(x), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(gpu.log_marginal_likelihood().cpu(), cpu.log_marginal_likelihood())
    samples = gpu.sample(3, generator=torch.Generator("cuda").manual_seed(0))
    assert samples.device.type == "cuda"
    mc = gpu.predict(
        x.cuda(), method="mc", n_samples=4, generator=torch.Generator("cuda").manual_seed(0)
    )
    assert mc.device.type == "cuda"
    tau = gpu.optimize_prior_precision("marglik")
    assert tau.device.type == "cuda"
