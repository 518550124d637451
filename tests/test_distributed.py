"""Sharded fits with torch.distributed (gloo, 2 processes) equal the single-process fit."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cases import CASES
from torch.utils.data import DataLoader, TensorDataset

from bayes_kfoc import fit_curvature, marglik_training

RTOL = 1e-6
WORLD = 2
RUNS = [("kfoc", "cached"), ("kfoc", "streaming"), ("kfac", "auto"), ("diag", "auto")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, port: int, case_index: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model, x, y = CASES[case_index].make()
        shard = torch.arange(rank, len(x), WORLD)  # DistributedSampler-style interleaved shard
        loader = DataLoader(TensorDataset(x[shard], y[shard]), batch_size=3)
        results = {}
        for structure, mode in RUNS:
            curv = fit_curvature(
                model,
                loader,
                structure,
                "exact",
                mode=mode,
                tol=1e-12,
                max_iter=500,
                progress=False,
            )
            assert curv.num_data == len(x)
            results[f"{structure}-{mode}"] = {k: b.to_dense() for k, b in curv.blocks.items()}
            results[f"{structure}-{mode}-mode"] = curv.mode
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("case_index", [0, 2], ids=[CASES[0].id, CASES[2].id])
def test_two_gloo_ranks_equal_single_process(case_index: int, tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), case_index, str(tmp_path)), nprocs=WORLD, join=True)
    model, x, y = CASES[case_index].make()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for structure, mode in RUNS:
        single = fit_curvature(
            model, loader, structure, "exact", mode=mode, tol=1e-12, max_iter=500, progress=False
        )
        for res in ranks:
            assert res[f"{structure}-{mode}-mode"] == single.mode
            for name, block in single.blocks.items():
                got = res[f"{structure}-{mode}"][name]
                err = torch.linalg.norm(got - block.to_dense()) / torch.linalg.norm(
                    block.to_dense()
                )
                assert err < RTOL, (structure, mode, name, float(err))


def test_distributed_without_a_process_group_is_a_clear_error() -> None:
    model, x, y = CASES[0].make()
    with pytest.raises(RuntimeError, match="init_process_group"):
        fit_curvature(model, [(x, y)], distributed=True, progress=False)


class _AllReduceAdam(torch.optim.Adam):
    """Adam whose step first averages the gradients over ranks (what ``DistributedDataParallel``
    does for the weights' steps)."""

    def step(self, closure=None):  # type: ignore[no-untyped-def, override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= dist.get_world_size()
        return super().step(closure)


EVEN = 10  # points: equal shards, so the ranks' mean gradients average to the full batch's
MARGLIK = {"epochs": 3, "hyper_steps": 20, "lr_hyp": 0.1, "progress": False}


def _marglik_worker(rank: int, port: int, structure: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model, x, y = CASES[0].make()
        x, y = x[:EVEN], y[:EVEN]
        shard = torch.arange(rank, len(x), WORLD)  # equal interleaved shards, one batch each
        loader = DataLoader(TensorDataset(x[shard], y[shard]), batch_size=len(shard))
        opt = _AllReduceAdam(model.parameters(), lr=1e-2)
        result = marglik_training(
            model, loader, structure, optimizer=opt, num_data=len(x), **MARGLIK
        )
        torch.save(
            {
                "tau": result.laplace.prior_precision,
                "evidence": torch.tensor([h.log_evidence for h in result.history]),
                "params": [p.detach() for p in model.parameters()],
            },
            Path(out_dir) / f"marglik{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("structure", ["kfoc", "kfac"])
def test_marglik_on_two_gloo_ranks_equals_one_process(structure: str, tmp_path: Path) -> None:
    """Sharded marglik training (gradients averaged over ranks, the fits all-reduced) takes the
    same weight and prior steps as one process on all the data."""
    mp.spawn(_marglik_worker, args=(_free_port(), structure, str(tmp_path)), nprocs=WORLD)
    model, x, y = CASES[0].make()
    x, y = x[:EVEN], y[:EVEN]
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    single = marglik_training(model, loader, structure, optimizer=opt, **MARGLIK)
    evidence = torch.tensor([h.log_evidence for h in single.history])
    for r in range(WORLD):
        got = torch.load(tmp_path / f"marglik{r}.pt", weights_only=True)
        torch.testing.assert_close(got["tau"], single.laplace.prior_precision, rtol=1e-6, atol=0)
        torch.testing.assert_close(got["evidence"], evidence, rtol=1e-8, atol=0)
        for p, q in zip(got["params"], model.parameters(), strict=True):
            torch.testing.assert_close(p, q.detach(), rtol=1e-8, atol=1e-10)
