"""The README's Laplace-LoRA example on a Hugging Face BERT (peft) runs, and what it claims holds
when checked independently: the model is passed as it is (ModelOutput, dict batches with
padding), the blocks keep the model's own names and are exactly the trainable parameters, every
block is Kronecker, and the predictive is a probability vector per point."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "# hf-lora example"


def _example() -> str:
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.M | re.S)
    hits = [b for b in blocks if b.startswith(MARKER + "\n")]
    assert len(hits) == 1, f"README.md should hold one python block starting with {MARKER!r}"
    return hits[0]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_readme_hf_lora_example(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    ns: dict = {"__name__": "readme_hf_example"}
    with torch.random.fork_rng():
        exec(compile(_example(), "README.md (hf-lora)", "exec"), ns)
    out = capsys.readouterr().out
    model, la = ns["model"], ns["la"]
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    names = {f"{b}.{p}" for b, block in la.blocks.items() for p in block.param_shapes}
    assert names == trainable  # the model's own names, exactly the trainable parameters
    assert sum("lora_" in k for k in la.blocks) == 8
    assert la.num_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    probs = ns["la_probs"]
    assert probs.shape == (128, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(128, dtype=probs.dtype))
    assert "Laplace-LoRA  test NLL" in out
