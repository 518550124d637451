"""Fit times on tiny Hugging Face models (issue 21), against the model's own forward + backward.

Tiny BERT, DistilBERT and GPT-2 (hidden 32, 2 layers, vocab 50) built from configs, random
weights, dict batches with padding (``attention_mask``). For each model and structure (kfoc,
kfac, diag) the wall time of ``fit_curvature`` over the batches is printed next to the time of
one plain forward + backward of the cross-entropy over the same batches (the floor, measured in
the same process), as a ratio, with the load average.

Needs the ``zoo`` extra (transformers). Run:
``python -m evaluation.benchmarks.hf_zoo [--points 64] [--length 16]``
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayes_kfoc import fit_curvature


def _models() -> dict[str, nn.Module]:
    import transformers as t

    kw = {"vocab_size": 50, "num_labels": 3}
    return {
        "bert": t.BertForSequenceClassification(
            t.BertConfig(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=64,
                **kw,
            )
        ),
        "distilbert": t.DistilBertForSequenceClassification(
            t.DistilBertConfig(
                dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64, **kw
            )
        ),
        "gpt2": t.GPT2ForSequenceClassification(
            t.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, pad_token_id=0, **kw)
        ),
    }


def _batches(points: int, length: int) -> list[tuple[dict[str, Tensor], Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(points // 16):
        ids = torch.randint(2, 50, (16, length), generator=g)
        lengths = torch.randint(2, length + 1, (16,), generator=g)
        mask = (torch.arange(length) < lengths[:, None]).long()
        out.append(({"input_ids": ids * mask, "attention_mask": mask}, torch.randint(0, 3, (16,))))
    return out


def _floor(model: nn.Module, batches: list[tuple[dict[str, Tensor], Tensor]]) -> float:
    start = time.perf_counter()
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(model(**x).logits, y).backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--points", type=int, default=64)
    parser.add_argument("--length", type=int, default=16)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    batches = _batches(args.points, args.length)
    print(f"load average {os.getloadavg()}, torch threads {torch.get_num_threads()}")
    for name, model in _models().items():
        model.eval()
        _floor(model, batches)  # warm-up
        floor = _floor(model, batches)
        for structure in ("kfoc", "kfac", "diag"):
            start = time.perf_counter()
            fit_curvature(model, batches, structure, progress=False)
            took = time.perf_counter() - start
            print(
                f"{name:10} {structure:4}  fit {took:6.2f} s  floor (fwd+bwd) {floor:6.3f} s  "
                f"ratio {took / floor:6.1f}"
            )
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
