"""Content hashes of tensors: what the MAP cache key and the study fingerprint know of the data."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["tensor_digest"]


def tensor_digest(tensors: Iterable[Tensor], length: int = 16) -> str:
    """A SHA-256 hex prefix of the dtypes, shapes and bytes of ``tensors``, in order.

    Two data sets differ in digest whenever any value, label, shape or order differs (half the
    training set, shuffled labels, another normalisation). About 1 s per GiB.
    """
    h = hashlib.sha256()
    for t in tensors:
        shape = tuple(t.shape)
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{t.dtype}:{shape};".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())  # the tensor's own buffer, no copy
    return h.hexdigest()[:length]
