"""Hand-built realistic classifiers for checks beyond the study's MLP and CNN (no torchvision).

- :func:`resnet`: a small pre-activation-free ResNet with BatchNorm (basic blocks, 1x1
  downsampling shortcuts, global average pooling);
- :func:`vit`: a ViT-like net on image patches: a Linear patch embedding, a learned position
  embedding, pre-norm transformer blocks whose attention is written with Linear layers on
  ``[B, T, d]`` (query/key/value/output projections shared over positions), mean pooling.

- :func:`text_transformer`: a text classifier on PyTorch's own ``nn.TransformerEncoder``
  (``nn.MultiheadAttention`` inside), called Hugging-Face style as
  ``model(input_ids=..., attention_mask=...)``, with masked mean pooling over the real tokens.

The first two take images ``[B, C, H, W]``; all return logits ``[B, num_classes]``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a (1x1-projected when shapes change) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


def resnet(in_channels: int, num_classes: int, widths: tuple[int, ...] = (8, 16)) -> nn.Module:
    """Stem conv + BN, one :class:`BasicBlock` per width (stride 2 after the first), pooling, a
    Linear head."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(),
    ]
    c = widths[0]
    for i, w in enumerate(widths):
        layers.append(BasicBlock(c, w, stride=1 if i == 0 else 2))
        c = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
    return nn.Sequential(*layers)


class Attention(nn.Module):
    """Multi-head self-attention from four Linear layers on ``[B, T, d]``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(z: Tensor) -> Tensor:
            return z.reshape(b, t, h, d // h).transpose(1, 2)  # [B, h, T, d/h]

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)
        return self.out((att @ v).transpose(1, 2).reshape(b, t, d))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PositionEmbedding(nn.Module):
    """``x + E`` with a learned ``E`` of shape ``[T, d]`` (its own module, so its curvature is a
    leaf module's diagonal, not a re-run of the whole network)."""

    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(0.02 * torch.randn(tokens, dim))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.weight


class ViT(nn.Module):
    """Patches ``p x p`` of ``[B, C, H, W]`` → Linear embedding + positions → blocks → mean
    pool → LayerNorm → Linear head."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        patch: int = 2,
        dim: int = 32,
        depth: int = 2,
        heads: int = 4,
    ):
        super().__init__()
        self.patch = patch
        tokens = (image_size // patch) ** 2
        self.embed = nn.Linear(in_channels * patch * patch, dim)
        self.pos = PositionEmbedding(tokens, dim)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch
        b, c, hh, ww = x.shape
        patches = x.unfold(2, p, p).unfold(3, p, p)  # [B, C, H/p, W/p, p, p]
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, (hh // p) * (ww // p), c * p * p)
        h = self.blocks(self.pos(self.embed(patches)))
        return self.head(self.norm(h.mean(dim=1)))


def vit(in_channels: int, image_size: int, num_classes: int, **kwargs: int) -> nn.Module:
    return ViT(in_channels, image_size, num_classes, **kwargs)


class TextTransformer(nn.Module):
    """Token + position embeddings → ``nn.TransformerEncoder`` (``batch_first``, padding mask
    from ``attention_mask``) → mean over the real tokens → LayerNorm → Linear head.

    Inputs: ``input_ids [B, T]`` (int64) and ``attention_mask [B, T]`` (1 for a token, 0 for
    padding); ``T`` may differ between batches up to ``max_len``.
    """

    def __init__(
        self,
        vocab: int,
        num_classes: int,
        dim: int = 32,
        depth: int = 2,
        heads: int = 4,
        max_len: int = 64,
        ff: int = 64,
    ):
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(max_len, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.tokens(input_ids) + self.positions(pos)
        pad = attention_mask == 0
        h = self.encoder(h, src_key_padding_mask=pad)
        keep = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)
        return self.head(self.norm(pooled))


def text_transformer(vocab: int, num_classes: int, **kwargs: int) -> nn.Module:
    return TextTransformer(vocab, num_classes, **kwargs)


def token_task(
    num: int, vocab: int = 50, max_len: int = 24, num_classes: int = 3, seed: int = 0
) -> tuple[dict[str, Tensor], Tensor]:
    """A synthetic text task: variable-length token sequences (padded with id 0, masked) whose
    class is which of ``num_classes`` marker-token groups occurs most often."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max_len // 3, max_len + 1, (num,), generator=g)
    ids = torch.randint(1, vocab, (num, max_len), generator=g)
    mask = (torch.arange(max_len).unsqueeze(0) < lengths.unsqueeze(1)).long()
    ids = ids * mask
    groups = (ids % num_classes) * mask + (1 - mask) * -1
    counts = torch.stack([(groups == c).sum(dim=1) for c in range(num_classes)], dim=1)
    return {"input_ids": ids, "attention_mask": mask}, counts.argmax(dim=1)
