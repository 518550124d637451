"""K-FOC on a CIFAR-size ResNet-18 (random data, CUDA): fit time relative to one training epoch.

The network is a ResNet-18 for 32×32×3 inputs (BasicBlocks 64-128-256-512, BatchNorm in eval
mode during the fit, so its parameters get exact diagonal blocks). Data are ``--n`` random images
with random labels at batch ``--batch``. The reference is one epoch of forward + backward
(``loss.backward()`` per batch, no optimiser step), timed with CUDA synchronisation.

Run: ``python -m evaluation.benchmarks.cuda_resnet [--n 10000] [--fisher mc] [--mc-samples 1]``
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from bayes_kfoc import fit_curvature


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.short(x))


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()
        )
        layers: list[nn.Module] = []
        c = 64
        for c_out, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers += [BasicBlock(c, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c = c_out
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.layers(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


def cuda_time(fn: Callable[[], Any]) -> tuple[float, Any]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--fisher", default="mc")
    parser.add_argument("--mc-samples", type=int, default=1)
    parser.add_argument("--structures", default="kfac,kfoc")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls")
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("cuda_resnet: needs a CUDA device.")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = ResNet18().to(dev)
    x = torch.randn(args.n, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (args.n,), device=dev)
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch)
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, N={args.n}, "
        f"batch={args.batch}, fisher={args.fisher} (mc_samples={args.mc_samples}), "
        f"tf32={args.tf32}, params={sum(p.numel() for p in model.parameters()):,}"
    )

    def epoch() -> None:
        model.train()
        for xb, yb in loader:
            model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xb), yb).backward()
        model.eval()

    epoch()  # warm-up (cuDNN autotuning)
    t_epoch, _ = cuda_time(epoch)
    print(f"one epoch forward+backward: {t_epoch:.2f} s")
    model.eval()
    warm = DataLoader(
        TensorDataset(x[: 2 * args.batch], y[: 2 * args.batch]), batch_size=args.batch
    )
    for s in args.structures.split(","):  # warm-up: kernel selection and first-use costs
        fit_curvature(model, warm, s, args.fisher, mc_samples=args.mc_samples, progress=False)
    for s in args.structures.split(","):
        torch.cuda.reset_peak_memory_stats()
        t, curv = cuda_time(
            lambda s=s: fit_curvature(
                model, loader, s, args.fisher, mc_samples=args.mc_samples, seed=0, progress=False
            )
        )
        peak = torch.cuda.max_memory_allocated() / 2**30
        conv = curv.convergence()
        iters = max((v["iterations"] for v in conv.values()), default=0)
        print(
            f"{s:<5} fit {t:8.2f} s = {t / t_epoch:6.2f} x epoch; mode {curv.mode}; "
            f"max iterations {iters}; peak GPU memory {peak:.1f} GiB"
        )
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fit_curvature(
                    model,
                    loader,
                    s,
                    args.fisher,
                    mc_samples=args.mc_samples,
                    seed=0,
                    progress=False,
                )
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))


if __name__ == "__main__":
    main()
