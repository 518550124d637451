"""Brute-force dense references built with ``torch.func`` (tests only, float64)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from bayes_kfoc import DenseBlock, DiagBlock, KronBlock
from bayes_kfoc.blocks import CurvatureBlock
from bayes_kfoc.options import FisherType


def per_point_jacobians(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """``{param_name: [N, C, *shape]}``: Jacobians of the logits per point."""
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}

    def f(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    return vmap(jacrev(f), in_dims=(None, 0))(params, x)


def dense_fisher(
    model: nn.Module,
    batches: list[tuple[Tensor, Tensor]],
    fisher: str,
    mc_samples: int = 1,
    seed: int = 0,
) -> tuple[Tensor, list[str]]:
    """The exact summed Fisher over all parameters (``named_parameters`` order) and the names.

    For ``mc`` the labels are drawn batch by batch from one generator seeded with ``seed``,
    exactly as ``fit_curvature`` draws them.
    """
    ftype = FisherType(fisher)
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    total = None
    for x, y in batches:
        with torch.no_grad():
            logits = model(x)
        jac = per_point_jacobians(model, x)
        j = torch.cat(
            [jac[k].reshape(x.shape[0], logits.shape[1], -1) for k in names], dim=2
        )  # [N, C, P]
        f = _logit_fisher_pullback(logits, y, j, ftype, mc_samples, gen)
        total = f if total is None else total + f
    assert total is not None
    return total, names


def _logit_fisher_pullback(
    logits: Tensor, y: Tensor, j: Tensor, ftype: FisherType, mc_samples: int, gen: torch.Generator
) -> Tensor:
    """``Σ_n J_nᵀ H_n J_n`` with ``H_n`` the per-point Fisher at the logits, written out plainly.

    exact: ``H = diag(p) − p pᵀ``; mc: the mean of ``(e_ŷ − p)(e_ŷ − p)ᵀ`` over ``ŷ ~ p``
    drawn with ``torch.multinomial`` from ``gen`` (the library's draw); empirical:
    ``(e_y − p)(e_y − p)ᵀ``.
    """
    p = torch.softmax(logits, dim=-1)
    c = p.shape[1]
    eye = torch.eye(c, dtype=p.dtype)
    if ftype is FisherType.EXACT:
        h = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    else:
        if ftype is FisherType.MC:
            labels = torch.multinomial(p, mc_samples, replacement=True, generator=gen)  # [N, S]
        else:
            labels = y.unsqueeze(1)
        r = eye[labels] - p.unsqueeze(1)  # [N, S, C]
        h = torch.einsum("nsc,nsd->ncd", r, r) / labels.shape[1]
    return torch.einsum("ncp,ncd,ndq->pq", j, h, j)


def module_slice(model: nn.Module, names: list[str], module_name: str) -> slice:
    """The index range of one module's own parameters inside the dense Fisher."""
    prefix = f"{module_name}." if module_name else ""
    sizes = {k: p.numel() for k, p in model.named_parameters() if k in names}
    start, stop, pos = None, None, 0
    for k in names:
        # a parameter the model itself owns is a block of its own, named by it
        own = k == module_name or (k.startswith(prefix) and "." not in k[len(prefix) :])
        if own and start is None:
            start = pos
        pos += sizes[k]
        if own:
            stop = pos
    assert start is not None and stop is not None
    return slice(start, stop)


def kron_order(block_dense: Tensor, d_out: int, n: int, bias: bool) -> Tensor:
    """Permute a dense block from ``parameters_to_vector`` order to the row-major vec of W̄."""
    idx = torch.arange(d_out * n).reshape(d_out, n)
    perm = torch.cat([idx[:, :-1].flatten(), idx[:, -1]]) if bias else idx.flatten()
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    return block_dense[inv][:, inv]


def top1_kron(block_kron: Tensor, d_out: int, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Best ``G ⊗ A`` (row-major, output factor first) by a dense top-1 SVD of the rearrangement."""
    r = block_kron.reshape(d_out, n, d_out, n).permute(0, 2, 1, 3).reshape(d_out**2, n**2)
    u, s, vh = torch.linalg.svd(r)
    G = u[:, 0].reshape(d_out, d_out) * s[0].sqrt()
    A = vh[0].reshape(n, n) * s[0].sqrt()
    if torch.trace(A) < 0:
        A, G = -A, -G
    return torch.kron(G, A), G, A


def rel_err(a: Tensor, b: Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def assert_block_matches(b: CurvatureBlock, exact: Tensor, structure: str, rtol: float) -> None:
    """A fitted block against its module's exact dense block ``exact``: a Kronecker block must be
    the top-1 SVD optimum of the rearranged block (K-FOC), a ``full`` fit's block must equal it,
    and every other block must be its exact diagonal."""
    if isinstance(b, KronBlock):
        n = b.d_in + int(b.bias)
        best, _, _ = top1_kron(kron_order(exact, b.d_out, n, b.bias), b.d_out, n)
        err = rel_err(kron_order(b.to_dense(), b.d_out, n, b.bias), best)
        assert err < rtol, (b.name, err)
    elif structure == "full":
        assert isinstance(b, DenseBlock), b.name
        torch.testing.assert_close(b.to_dense(), exact, rtol=rtol, atol=1e-12)
    else:
        assert isinstance(b, DiagBlock), b.name
        torch.testing.assert_close(b.values, torch.diagonal(exact), rtol=rtol, atol=1e-12)


def dense_posterior_precision(la: Any) -> Tensor:
    """Block-diagonal ``F_b + τ_b I`` of a fitted ``Laplace``, in its block order (float64)."""
    blocks = [
        b.to_dense() + t * torch.eye(b.num_params, dtype=torch.float64)
        for b, t in zip(la.blocks.values(), la.prior_precision, strict=True)
    ]
    return torch.block_diag(*blocks)
