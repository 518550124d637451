"""The README's Laplace-LoRA example runs, and what it claims holds when checked independently.

The test executes the README's ``python`` block that starts with ``# laplace-lora example`` in a
fresh namespace, in two parts split at its ``# 2.`` comment (after pretraining, before the
adapters), so that it can keep a copy of the pretrained base. It then reads the names the example
defines (``base``, ``model``, ``LoRALinear``, ``la``, ``loader``, ``R``, ``Y``, ``tr``, ``te``,
``map_probs``, ``la_probs``) and checks, without the example's own arithmetic: the posterior
covers exactly the adapter parameters, the base weights are frozen and unchanged, every block is
a Kronecker block shaped by its adapter, samples leave the base at its weights, the predictive is
a probability vector per point, and ``modules="all"`` selects the same blocks.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch.nn.utils import parameters_to_vector

from bayes_kfoc import KronBlock, Laplace

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "# laplace-lora example"
SPLIT = "\n# 2. "  # the comment that opens the adapter stage


def _example() -> str:
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.M | re.S)
    hits = [b for b in blocks if b.startswith(MARKER + "\n")]
    assert len(hits) == 1, f"README.md should hold one python block starting with {MARKER!r}"
    return hits[0]


def _nll(probs: torch.Tensor, y: torch.Tensor) -> float:
    return float(-probs[torch.arange(len(y)), y].clamp_min(1e-12).log().mean())


def _acc(probs: torch.Tensor, y: torch.Tensor) -> float:
    return float((probs.argmax(-1) == y).double().mean())


def test_readme_lora_example(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("sklearn")
    pretraining, sep, adapting = _example().partition(SPLIT)
    assert sep, f"the example should have a {SPLIT.strip()!r} comment opening the adapter stage"
    ns: dict = {"__name__": "readme_lora_example"}
    with torch.random.fork_rng():  # the example seeds the global generator; keep ours
        exec(compile(pretraining, "README.md (laplace-lora, part 1)", "exec"), ns)
        pretrained = {k: v.detach().clone() for k, v in ns["base"].state_dict().items()}
        exec(compile(sep.lstrip("\n") + adapting, "README.md (laplace-lora, part 2)", "exec"), ns)
    out = capsys.readouterr().out
    model, la = ns["model"], ns["la"]
    x_test, y_test = ns["R"][ns["te"]], ns["Y"][ns["te"]]

    # the model: frozen base Linears, each with a down/up adapter
    lora = [m for m in model.modules() if isinstance(m, ns["LoRALinear"])]
    assert len(lora) == 3
    adapter_ids = {id(m) for lo in lora for m in (lo.down, lo.up)}
    adapter_names = [n for n, m in model.named_modules() if id(m) in adapter_ids]
    n_adapter = sum(p.numel() for lo in lora for m in (lo.down, lo.up) for p in m.parameters())
    n_frozen = sum(p.numel() for lo in lora for p in lo.base.parameters())
    assert n_frozen > 10 * n_adapter > 0

    # the posterior covers the adapters' parameters, and nothing else
    assert la.num_params == n_adapter
    assert list(la.blocks) == adapter_names
    assert la.mean.numel() == n_adapter

    # the base is frozen and still holds its pretrained weights
    for lo in lora:
        assert all(not p.requires_grad for p in lo.base.parameters())
    assert all(lo.base is m for lo, m in zip(lora, ns["base"][::2], strict=True))
    now = ns["base"].state_dict()
    assert now.keys() == pretrained.keys()
    for k, v in pretrained.items():
        assert torch.equal(now[k], v), f"the frozen base's {k} changed"

    # one Kronecker block per adapter Linear, shaped by its weight (no bias)
    modules = dict(model.named_modules())
    for name, block in la.blocks.items():
        assert isinstance(block, KronBlock), f"{name}: {type(block).__name__}"
        d_out, d_in = modules[name].weight.shape
        assert dict(block.param_shapes) == {"weight": (d_out, d_in)}
        assert block.G.shape == (d_out, d_out) and block.A.shape == (d_in, d_in)

    # samples: the frozen entries are the base's weights exactly, the adapter entries vary
    theta = la.sample(16, generator=torch.Generator().manual_seed(0))
    frozen = torch.cat([torch.full((p.numel(),), not p.requires_grad) for p in model.parameters()])
    vec = parameters_to_vector(model.parameters()).detach()
    assert theta.shape == (16, vec.numel()) and int(frozen.sum()) == n_frozen
    assert torch.equal(theta[:, frozen], vec[frozen].expand(16, -1))
    assert bool((theta[:, ~frozen].std(0) > 0).all())

    # valid predictive probabilities, reproducible from the posterior
    for probs in (ns["map_probs"], ns["la_probs"]):
        assert probs.shape == (len(y_test), 10) and bool(torch.isfinite(probs).all())
        assert bool(((probs >= 0) & (probs <= 1)).all())
        torch.testing.assert_close(probs.sum(-1), torch.ones(len(y_test)), atol=1e-5, rtol=0)
    torch.testing.assert_close(la.predict(x_test[:32]), ns["la_probs"][:32])

    # frozen parameters get no posterior when every module is asked for, either
    la_all = Laplace(model, modules="all", progress=False).fit(ns["loader"](ns["tr"]))
    assert list(la_all.blocks) == adapter_names and la_all.num_params == n_adapter
    base_coverage = [v for k, v in la_all.curvature.coverage.items() if ".base." in k]
    assert len(base_coverage) == 6 and all(v.startswith("frozen") for v in base_coverage)

    # the adapters learned the task the base fails, and the posterior improves on the MAP's NLL
    with torch.no_grad():
        base_probs = ns["base"](x_test).softmax(-1)
    assert _acc(base_probs, y_test) < 0.3 < 0.8 < _acc(ns["map_probs"], y_test)
    assert _nll(ns["la_probs"], y_test) < _nll(ns["map_probs"], y_test)
    assert f"random parameters: {n_adapter} = the adapters' {n_adapter}; frozen: {n_frozen}" in out
    assert out.count("KronBlock") == len(adapter_names)
