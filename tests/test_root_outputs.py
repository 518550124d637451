"""A root-owned parameter and a non-tensor model output through the paths added beside the
collector: the sampled linearised predictive (tangents keyed by the parameters' full names,
logits through ``set_logits``), marginal-likelihood training (its prior term over the same
names, its loss on the model's logits) and the coverage's decomposition notes."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from bayes_kfoc import Laplace, marglik_training, set_logits


class RootOwned(nn.Module):
    """``head(x + pos)`` with a root-owned ``pos``; returns ``{"scores": logits, "aux": x}``,
    so the logits must be named with ``set_logits``."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(0.1 * torch.randn(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> dict[str, Any]:
        return {"scores": self.head(x + self.pos), "aux": x}


def _data(n: int = 24) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i : i + 8], y[i : i + 8]) for i in range(0, n, 8)]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return set_logits(RootOwned().double().eval(), "scores")


def test_sampled_glm_on_a_root_owned_parameter_and_a_named_logits_field() -> None:
    model = _model()
    data = _data()
    la = Laplace(model, structure="kfoc", prior_precision=5.0, progress=False).fit(data)
    assert "pos" in la.blocks
    x = data[0][0]
    exact = la.predict(x, glm="exact")
    g = torch.Generator().manual_seed(0)
    sampled = la.predict(x, glm="sampled", n_samples=4000, generator=g)
    assert la.last_glm is not None and la.last_glm.path.name == "SAMPLED"
    # Monte-Carlo estimate of the same probit predictive (seeded): 4,000 draws.
    torch.testing.assert_close(sampled, exact, rtol=0, atol=2e-2)


def test_marglik_training_on_a_root_owned_parameter_and_a_named_logits_field() -> None:
    model = _model()
    result = marglik_training(model, _data(), "kfac", epochs=2, num_data=24, progress=False, seed=0)
    taus = result.history[-1].prior_precision
    assert set(taus) == {"pos", "head"}
    names = {k for k, _ in model.named_parameters()}
    assert set(result.laplace.curvature.param_names()) == names  # type: ignore[union-attr]
    assert torch.isfinite(torch.as_tensor(result.history[-1].loss))


def test_coverage_notes_a_root_owned_blocks_decomposition(monkeypatch: pytest.MonkeyPatch) -> None:
    from bayes_kfoc.blocks import _eigh

    real = _eigh._try
    calls = {"n": 0}

    def fail_native(m: Tensor) -> Any:
        calls["n"] += 1
        return None if m.dtype != torch.float64 else real(m)

    model = _model().float()
    data = [(x.float(), y) for x, y in _data()]
    la = Laplace(model, structure="full", progress=False).fit(data)  # dense blocks: eigh
    monkeypatch.setattr(_eigh, "_try", fail_native)
    for b in la.blocks.values():
        b._eig = None  # type: ignore[attr-defined]
        b.decompositions.clear()  # type: ignore[attr-defined]
    la.curvature.decompose()  # type: ignore[union-attr]
    assert calls["n"] > 0
    assert "float64" in la.curvature.coverage["pos"]  # type: ignore[union-attr]
