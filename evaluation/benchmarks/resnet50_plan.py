"""Sizes, costs and communication of a distributed K-FOC fit of ResNet-50 on ImageNet.

Run::

    .venv/bin/python -m evaluation.benchmarks.resnet50_plan                # tables only
    .venv/bin/python -m evaluation.benchmarks.resnet50_plan --measure      # + CPU timings

The numbers feed ``docs/scaling.md``. ResNet-50 is written out by hand (torchvision's v1.5
layout: stride on the 3x3 convolution, 224x224 inputs; no torchvision needed): every Conv2d
(no bias; BatchNorm follows) and the final Linear 2048→1000 (with bias). For each layer:

- ``n = C_in·k·k`` (+1 with a bias), ``o = C_out``, ``T`` = output positions; the Kronecker
  factors are ``A`` (``n x n``) and ``G`` (``o x o``), float32;
- per-sample cached statistics, both forms the library can keep (``KronStats``): the unfold
  ``a [T, n]`` plus directions ``d [V, T, o]``, or per-direction gradients ``M [V, o, n]``;
  ``cached`` is the one :meth:`KronStats.compact` picks (fewer flops per iteration, evaluated
  with the library's own cost model on ``meta`` tensors, so nothing is allocated);
- flops per sample and power iteration of that form (``a_update`` + ``g_update``);
- forward flops ``2·T·n·o`` per sample (the backward to the layer outputs costs about as much
  per direction, forming ``M`` again as much per direction).

Then per rank (``--world-size`` ranks sharing ``--num-data`` points evenly): the cache,
the factor memory, the all-reduce volume of one power iteration (every factor once: ``Σ n² + o²``
floats; a ring all-reduce sends and receives ``2(k−1)/k`` times that per rank) and the
time per iteration at an *assumed* sustained GPU throughput ``--gpu-tflops`` (default 25 TFLOP/s
fp32, about 40 % of an H100/H200's 67 TFLOP/s fp32 peak; no tensor cores) and all-reduce
bandwidth ``--busbw`` (default 100 GB/s NCCL bus bandwidth over NVLink).

``--measure`` times ``KronStats.a_update`` + ``g_update`` on this CPU for a few representative
layers (a small batch of random statistics, median of 3 after a warm-up) and prints the
achieved GFLOP/s, so the flop model can be checked; GPU estimates stay flop-based.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from bayes_kfoc.stats import GradientStats, SharedStats, kron_stats
from evaluation.benchmarks.timing import median_time


@dataclass
class Layer:
    name: str
    c_in: int
    c_out: int
    k: int
    t: int  # output positions (H_out · W_out)
    bias: bool = False

    @property
    def n(self) -> int:
        return self.c_in * self.k * self.k + int(self.bias)

    @property
    def o(self) -> int:
        return self.c_out

    @property
    def params(self) -> int:
        return self.n * self.o


def resnet50() -> list[Layer]:
    """ResNet-50 v1.5 at 224x224: 53 convolutions and the classifier, in forward order."""
    layers = [Layer("conv1", 3, 64, 7, 112 * 112)]
    c_in = 64
    for stage, (width, blocks, side) in enumerate([(64, 3, 56), (128, 4, 28), (256, 6, 14),
                                                   (512, 3, 7)], start=1):  # fmt: skip
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            side_in = side * 2 if (b == 0 and stage > 1) else side
            layers.append(Layer(f"{p}.conv1", c_in, width, 1, side_in * side_in))
            layers.append(Layer(f"{p}.conv2", width, width, 3, side * side))
            layers.append(Layer(f"{p}.conv3", width, 4 * width, 1, side * side))
            if b == 0:
                layers.append(Layer(f"{p}.downsample.0", c_in, 4 * width, 1, side * side))
            c_in = 4 * width
    layers.append(Layer("fc", 2048, 1000, 1, 1, bias=True))
    return layers


def stats_meta(layer: Layer, v: int, batch: int = 1) -> SharedStats:
    a = torch.empty(batch, layer.t, layer.n, device="meta")
    d = torch.empty(v, batch, layer.t, layer.o, device="meta")
    return SharedStats(a, d, layer.bias)  # the unfold form, for its cost model


def per_sample(layer: Layer, v: int) -> dict[str, float]:
    st = stats_meta(layer, v)
    unfold_b = 4 * (layer.t * layer.n + v * layer.t * layer.o)
    m_b = 4 * v * layer.o * layer.n
    use_m = layer.t > 1 and st._m_flops() < st._unfold_flops()
    return {
        "unfold_bytes": unfold_b,
        "m_bytes": m_b,
        "cached_bytes": m_b if use_m else unfold_b,
        "form": "M" if use_m else "a,d",
        "iter_flops": st._m_flops() if use_m else st._unfold_flops(),
        "fwd_flops": 2 * layer.t * layer.n * layer.o,
        "m_form_flops": 2 * v * layer.t * layer.n * layer.o if use_m else 0,
    }


def human(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(b) < 1000:
            return f"{b:.1f} {unit}"
        b /= 1000
    return f"{b:.1f} EB"


def measure(layers: list[Layer], v: int, batch: int) -> None:
    """Time ``a_update`` + ``g_update`` for representative layers on this CPU."""
    torch.manual_seed(0)
    pick = ["layer1.0.conv2", "layer2.0.conv3", "layer3.0.conv2", "layer4.0.conv2", "fc"]
    print(f"\nCPU timings: a_update + g_update, batch {batch}, V = {v}, float32, "
          f"{torch.get_num_threads()} threads (median of 3 after a warm-up)")  # fmt: skip
    print(f"{'layer':<16}{'T':>6}{'n':>6}{'o':>6}{'form':>6}{'GFLOP':>9}{'s':>9}{'GFLOP/s':>9}")
    for lay in (la for la in layers if la.name in pick):
        a = torch.randn(batch, lay.t, lay.n)
        if lay.bias:
            a[..., -1] = 1
        d = torch.randn(v, batch, lay.t, lay.o)
        st = kron_stats(a, d, lay.bias).compact()
        A = torch.eye(lay.n) + 0.01 * torch.randn(lay.n, lay.n)
        G = torch.eye(lay.o) + 0.01 * torch.randn(lay.o, lay.o)
        form = "M" if isinstance(st, GradientStats) else "a,d"
        meta = stats_meta(lay, v, batch)
        flops = meta._m_flops() if form == "M" else meta._unfold_flops()
        s, _ = median_time(lambda st=st, A=A, G=G: (st.a_update(G), st.g_update(A)), 3, warmup=True)
        print(f"{lay.name:<16}{lay.t:>6}{lay.n:>6}{lay.o:>6}{form:>6}{flops / 1e9:>9.2f}"
              f"{s:>9.3f}{flops / s / 1e9:>9.1f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-data", type=int, default=1_281_167, help="ImageNet-1k train")
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--v", type=int, default=1, help="directions: 1 (mc/empirical), 1000 exact")
    parser.add_argument("--gpu-tflops", type=float, default=25.0, help="assumed sustained fp32")
    parser.add_argument("--busbw", type=float, default=100.0, help="assumed all-reduce GB/s")
    parser.add_argument("--per-layer", action="store_true", help="print every layer")
    parser.add_argument("--measure", action="store_true", help="time representative layers")
    parser.add_argument("--measure-batch", type=int, default=8)
    args = parser.parse_args()
    layers = resnet50()
    v = args.v
    n_rank = -(-args.num_data // args.world_size)
    rows = [(lay, per_sample(lay, v)) for lay in layers]

    print(f"ResNet-50 (v1.5, 224x224): {len(layers)} Kronecker layers, "
          f"{sum(la.params for la in layers) / 1e6:.2f} M weights in them; V = {v} "
          f"direction(s); {args.world_size} ranks x {n_rank} points")  # fmt: skip
    hdr = f"{'layer':<22}{'T':>6}{'n':>6}{'o':>6}{'A+G':>10}{'unfold/pt':>11}{'M/pt':>10}"
    print(hdr + f"{'cached':>8}{'it GF/pt':>10}")
    shown = rows if args.per_layer else [r for r in rows if ".0." in r[0].name or "." not in
                                         r[0].name]  # fmt: skip
    for lay, r in shown:
        fb = 4 * (lay.n**2 + lay.o**2)
        print(f"{lay.name:<22}{lay.t:>6}{lay.n:>6}{lay.o:>6}{human(fb):>10}"
              f"{human(r['unfold_bytes']):>11}{human(r['m_bytes']):>10}{r['form']:>8}"
              f"{r['iter_flops'] / 1e9:>10.3f}")  # fmt: skip
    if not args.per_layer:
        print("(first block of each stage shown; --per-layer prints all)")

    factor_floats = sum(la.n**2 + la.o**2 for la in layers)
    cache_pt = sum(r["cached_bytes"] for _, r in rows)
    m_pt = sum(r["m_bytes"] for _, r in rows)
    unfold_pt = sum(r["unfold_bytes"] for _, r in rows)
    it_pt = sum(r["iter_flops"] for _, r in rows)
    fwd_pt = sum(r["fwd_flops"] for _, r in rows)
    mform_pt = sum(r["m_form_flops"] for _, r in rows)
    fb = 4 * factor_floats
    ring = 2 * (args.world_size - 1) / args.world_size * fb
    tf = args.gpu_tflops * 1e12
    stream_pt = fwd_pt + v * fwd_pt + mform_pt + it_pt  # forward, V x (bwd to z), M, updates
    print()
    print(f"factors (A and G, all layers, fp32):            {human(fb)} per copy "
          f"({factor_floats / 1e6:.1f} M floats); ~4 copies live (K-FAC start, A, G, new) "
          f"-> {human(4 * fb)} per rank")  # fmt: skip
    print(
        f"cached statistics per point (library's choice):  {human(cache_pt)} "
        f"(unfold everywhere {human(unfold_pt)}, M everywhere {human(m_pt)})"
    )
    print(f"cached statistics per rank ({n_rank} points):    {human(cache_pt * n_rank)}")
    print(f"all-reduce per power iteration (each factor once): {human(fb)}; ring traffic per "
          f"rank {human(ring)} -> {ring / (args.busbw * 1e9) * 1e3:.0f} ms at "
          f"{args.busbw:.0f} GB/s")  # fmt: skip
    print(f"K-FOC update flops per point and iteration:      {it_pt / 1e9:.2f} GFLOP")
    print(f"forward flops per point:                         {fwd_pt / 1e9:.2f} GFLOP")
    print(f"per iteration per rank, cached:    {it_pt * n_rank / 1e12:.0f} TFLOP -> "
          f"{it_pt * n_rank / tf:.0f} s at {args.gpu_tflops:.0f} TFLOP/s")  # fmt: skip
    print(
        f"per iteration per rank, streaming: {stream_pt * n_rank / 1e12:.0f} TFLOP "
        f"(forward + {v} backward + M + updates) -> {stream_pt * n_rank / tf:.0f} s"
    )
    kfac_pt = fwd_pt * (1 + v) + sum(
        2 * lay.t * (lay.n**2 + v * lay.o**2) for lay in layers
    )  # forward, V backward, K-FAC Gram sums
    print(f"K-FAC pass (warm start) per rank: {kfac_pt * n_rank / 1e12:.0f} TFLOP -> "
          f"{kfac_pt * n_rank / tf:.0f} s")  # fmt: skip
    if args.measure:
        measure(layers, v, args.measure_batch)


if __name__ == "__main__":
    main()
