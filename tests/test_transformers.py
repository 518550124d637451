"""End to end on the hand-built transformers of ``evaluation.zoo``: PyTorch's
``nn.TransformerEncoder`` text classifier (dict inputs, padding, sequence lengths that vary
between batches) and the ViT-like net fit, tune (with and without validation data) and predict,
with every trainable parameter covered and the attention projections in Kronecker blocks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from bayes_kfoc import KronBlock, Laplace
from evaluation.zoo import text_transformer, token_task, vit

pytestmark = [
    pytest.mark.filterwarnings("ignore:Laplace. weight sampling collapses"),
    pytest.mark.filterwarnings("ignore:Laplace.optimize_prior_precision. the chosen prior scale"),
]


def _batches(n: int, seed: int, lengths: tuple[int, ...]) -> list[tuple[dict[str, Tensor], Tensor]]:
    """Batches of the token task with a different padded length each."""
    out = []
    for i, t in enumerate(lengths):
        x, y = token_task(n, max_len=t, seed=seed + i)
        out.append((x, y))
    return out


def _trained_text_model() -> nn.Module:
    torch.manual_seed(0)
    model = text_transformer(50, 3, dim=16, depth=2, heads=2, ff=24, max_len=32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for x, y in _batches(32, 0, (12, 16, 20, 24) * 6):
        opt.zero_grad()
        nn.functional.cross_entropy(model(**x), y).backward()
        opt.step()
    return model.eval()


def _check_coverage(la: Laplace, model: nn.Module) -> None:
    cov = la.curvature.coverage  # type: ignore[union-attr]
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert set(cov) == trainable
    assert all("block" in how for how in cov.values()), cov
    assert la.num_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("structure", ["kfoc", "kfac"])
def test_text_transformer_fit_tune_predict_with_every_parameter_covered(structure: str) -> None:
    model = _trained_text_model()
    train = _batches(24, 100, (16, 20, 24))
    la = Laplace(model, structure=structure, progress=False)
    la.fit(train)
    _check_coverage(la, model)
    for i in range(2):
        for m in ("self_attn", "self_attn.out_proj", "linear1", "linear2"):
            assert isinstance(la.blocks[f"encoder.layers.{i}.{m}"], KronBlock)
    # without validation data: the consistency rule on the recorded (dict) training batches
    la.optimize_prior_precision()
    assert la.tuning is not None and la.tuning.method == "consistency"
    # with validation batches of other lengths
    val = _batches(20, 200, (10, 28))
    la.optimize_prior_precision(val_loader=val)
    assert la.tuning.method == "gridsearch" and la.temperature >= 1.0
    x, _ = token_task(9, max_len=30, seed=300)
    for method in ("glm", "mc"):
        gen = torch.Generator().manual_seed(0)
        probs = la.predict(x, method=method, n_samples=8, generator=gen)
        assert probs.shape == (9, 3) and torch.isfinite(probs).all()
        torch.testing.assert_close(probs.sum(-1), torch.ones(9, dtype=probs.dtype))
    # the GLM's mean logits are the MAP's, whatever the posterior
    mean, var = la.glm_distribution(x)
    with torch.no_grad():
        torch.testing.assert_close(mean * la.temperature, model(**x), rtol=1e-5, atol=1e-5)
    assert bool((torch.diagonal(var, dim1=1, dim2=2) > 0).all())


def test_vit_fit_tune_predict_with_every_parameter_covered() -> None:
    torch.manual_seed(0)
    model = vit(1, 8, 4, dim=16, depth=1, heads=2).eval()
    x = torch.randn(48, 1, 8, 8)
    y = torch.randint(0, 4, (48,))
    train = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 48, 16)]
    la = Laplace(model, structure="kfoc", progress=False)
    la.fit(train)
    _check_coverage(la, model)
    la.optimize_prior_precision(val_loader=[(torch.randn(20, 1, 8, 8), torch.randint(0, 4, (20,)))])
    probs = la.predict(torch.randn(5, 1, 8, 8))
    assert probs.shape == (5, 4) and torch.isfinite(probs).all()


class DefaultEncoder(nn.Module):
    """``nn.TransformerEncoder`` with its defaults (``enable_nested_tensor=True``: in eval mode
    without gradients PyTorch's fused fast path turns padded batches into nested tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        h = self.enc(self.emb(ids), src_key_padding_mask=mask == 0)
        keep = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))


def test_default_transformer_encoder_with_its_fast_path_fits_and_predicts() -> None:
    torch.manual_seed(0)
    model = DefaultEncoder().eval()
    ids = torch.randint(1, 20, (32, 7))
    mask = (torch.arange(7) < torch.randint(2, 8, (32, 1))).long()
    x, y = {"ids": ids, "mask": mask}, torch.randint(0, 3, (32,))
    la = Laplace(model, progress=False).fit([(x, y)])
    _check_coverage(la, model)
    for method in ("glm", "mc"):
        probs = la.predict(x, method=method, n_samples=4)
        assert probs.shape == (32, 3) and torch.isfinite(probs).all()
    la.prior_precision = 1e14  # the posterior collapses onto the MAP: both predictives are it
    with torch.no_grad():
        ref = torch.softmax(model(**x), -1)  # the fused fast path
    torch.testing.assert_close(la.predict(x), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(la.predict(x, method="mc", n_samples=2), ref, rtol=0, atol=1e-5)


def test_attention_posterior_saves_and_loads(tmp_path: Path) -> None:
    model = _trained_text_model()
    la = Laplace(model, structure="kfoc", progress=False).fit(_batches(16, 5, (12, 18)))
    la.optimize_prior_precision(val_loader=_batches(16, 6, (14,)))
    path = tmp_path / "posterior.pt"
    la.save(path)
    again = Laplace.load(path, model)
    x, _ = token_task(6, max_len=20, seed=7)
    torch.testing.assert_close(again.predict(x), la.predict(x))
    assert isinstance(again.blocks["encoder.layers.0.self_attn"], KronBlock)
