"""The Fisher directions at the logits against their closed forms (float64)."""

from __future__ import annotations

import pytest
import torch

from bayes_kfoc.options import FisherType
from bayes_kfoc.stats import logit_directions, num_directions


@pytest.mark.parametrize("num_classes", [2, 3, 10])
@pytest.mark.parametrize("scale", [1.0, 30.0])  # 30: near one-hot probabilities, both signs
def test_exact_directions_give_softmax_fisher(num_classes: int, scale: float) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = scale * torch.randn(7, num_classes, generator=gen, dtype=torch.float64)
    logits[0, -1] = 50.0  # confident in the last class: the reflection's worst case
    d = logit_directions(logits, torch.zeros(7, dtype=torch.long), FisherType.EXACT)
    assert d.shape == (num_directions(FisherType.EXACT, num_classes, 1), 7, num_classes)
    assert d.shape[0] == num_classes - 1
    p = torch.softmax(logits, dim=-1)
    want = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    got = torch.einsum("vnc,vnd->ncd", d, d)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)


@pytest.mark.parametrize("fisher", list(FisherType))
def test_single_class_logits_raise(fisher: FisherType) -> None:
    """One logit has a constant softmax and a zero Fisher: an error, not a silent zero."""
    with pytest.raises(ValueError, match=r"C >= 2 classes, got \(4, 1\)"):
        logit_directions(torch.randn(4, 1), torch.zeros(4, dtype=torch.long), fisher)
