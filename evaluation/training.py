"""Seeded MAP training of a classifier (Adam on mean cross-entropy plus weight decay)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from bayes_kfoc.stats import call_model


def train_map(
    model: nn.Module,
    train: Dataset,
    *,
    epochs: int = 100,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
    on_epoch: Callable[[int, int], None] | None = None,
) -> nn.Module:
    """Train ``model`` in place to a MAP estimate and return it in eval mode.

    ``progress`` shows a tqdm bar; ``on_epoch(epoch, epochs)`` is called after each epoch
    (plain progress lines where there is no terminal).

    ``weight_decay`` (Adam's L2 on the *mean* loss) corresponds to a Gaussian prior of precision
    ``N · weight_decay`` on the summed log-likelihood.
    """
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for epoch in tqdm(range(epochs), desc="MAP training", disable=not progress, leave=False):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(call_model(model, x), y)
            loss.backward()
            opt.step()
        if on_epoch is not None:
            on_epoch(epoch + 1, epochs)
    return model.eval()
