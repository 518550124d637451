"""A tuned temperature at the end of its range is warned about and sets ``at_edge``, like a
prior scale at the end of its grid."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bayes_kfoc import Laplace


def test_temperature_at_its_upper_bound_warns_and_sets_at_edge() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).eval()
    with torch.no_grad():
        model[2].weight.mul_(20.0)  # confident logits
    x = torch.randn(64, 5)
    la = Laplace(model, structure="kfac", progress=False)
    la.fit([(x, torch.randint(0, 3, (64,)))])
    # validation labels unrelated to the confident predictions: a nearly uniform predictive wins
    val = [(torch.randn(200, 5), torch.randint(0, 3, (200,)))]
    with pytest.warns(UserWarning, match=r"temperature \(T = .*\) is at the upper end"):
        la.optimize_prior_precision(val_loader=val, grid=[1e-2, 1e-1])
    assert la.tuning is not None and la.tuning.at_edge
    assert la.temperature > 99.0
