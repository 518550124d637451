"""The Gaussian posterior of one Laplace block, as a small ``nn.Module`` holding its buffers.

:class:`~bayes_kfoc.pyro.LaplaceGuide` holds one per posterior block in an ``nn.ModuleList``
(``guide.posteriors``, in the Laplace posterior's block order), so ``state_dict`` and
``.to(device)`` see every tensor by a stable name (``posteriors.<i>.<buffer>``). Each posterior is
``N(θ*_b, (F_b + τ_b I)^{-1})`` with ``F_b`` the **summed** Fisher block and ``τ_b`` the prior
precision (buffer ``damping``), over the block's **auxiliary latent**:

- :class:`KronPosterior`: the matrix ``W̄ = [W b]`` (weight flattened to ``d_out x d_in``, bias as
  the **last column**), a :class:`KroneckerMatrixNormal` with precision ``G ⊗ A + τI`` on the
  row-major vec, from the factors' eigendecompositions (exact damping);
- :class:`DiagPosterior`: the vector of the module's parameters in ``parameters_to_vector`` order
  (weight row-major, then bias), ``Normal(θ*, (d + τ)^{-1/2}).to_event(1)``;
- :class:`DensePosterior`: the same vector, ``MultivariateNormal(θ*, precision = F + τI)``.

:meth:`BlockPosterior.unpack` splits a latent value (with any leading sample dims) into the model
sites of the module's parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyro.distributions as dist
import torch
from torch import Tensor, nn

from ..blocks import CurvatureBlock, DenseBlock, DiagBlock, KronBlock, robust_eigh
from .distributions import KroneckerMatrixNormal

if TYPE_CHECKING:
    from ..laplace import Laplace

__all__ = [
    "BlockPosterior",
    "DensePosterior",
    "DiagPosterior",
    "KronPosterior",
    "Site",
    "block_posterior",
    "build_posteriors",
]


@dataclass(frozen=True)
class Site:
    """A model site fed by the guide: ``name`` in the Pyro model, ``param`` the parameter name in
    the Laplace model, ``shape`` the parameter's (and the site's event) shape."""

    name: str
    param: str
    shape: tuple[int, ...]


class BlockPosterior(nn.Module):
    """The posterior of one block (module ``module``) over its auxiliary latent site ``latent``.

    Buffers: ``loc`` (``θ*_b`` in the latent's layout) and ``damping`` (``τ_b``, a 0-d tensor).
    """

    loc: Tensor
    damping: Tensor

    def __init__(
        self, module: str, latent: str, sites: tuple[Site, ...], loc: Tensor, damping: Tensor
    ) -> None:
        super().__init__()
        self.module = module
        self.latent = latent
        self.sites = sites
        self.register_buffer("loc", loc.detach().clone())
        self.register_buffer("damping", damping.detach().clone().to(loc).reshape(()))

    def distribution(self) -> dist.TorchDistribution:
        """The block's Gaussian posterior over the latent."""
        raise NotImplementedError

    def variance(self) -> Tensor:
        """Marginal posterior variances in the latent's layout (exact, damped)."""
        return self.distribution().variance

    @torch.no_grad()
    def set_damping(self, tau: float) -> None:
        """Set ``τ_b`` in place (the curvature and the MAP stay)."""
        self.damping.fill_(tau)

    def unpack(self, value: Tensor) -> dict[str, Tensor]:
        """``{site_name: [..., *shape]}`` from a latent ``[..., P]`` (``parameters_to_vector``
        order of the module's parameters)."""
        sizes = [math.prod(s.shape) for s in self.sites]
        parts = torch.split(value, sizes, dim=-1)
        return {
            s.name: p.reshape(value.shape[:-1] + torch.Size(s.shape))
            for s, p in zip(self.sites, parts, strict=True)
        }


class KronPosterior(BlockPosterior):
    """``W̄ ~ KroneckerMatrixNormal(W̄*, λ_A, Q_A, λ_G, Q_G, τ)``, event shape ``(d_out, n)``.

    Buffers: ``loc``, ``damping``, ``input_eigenvalues`` / ``input_eigenvectors`` (``A``, ``n x n``,
    the bias column included) and ``output_eigenvalues`` / ``output_eigenvectors`` (``G``).
    """

    input_eigenvalues: Tensor
    input_eigenvectors: Tensor
    output_eigenvalues: Tensor
    output_eigenvectors: Tensor

    def __init__(
        self,
        module: str,
        latent: str,
        sites: tuple[Site, ...],
        block: KronBlock,
        theta: Tensor,
        damping: Tensor,
    ) -> None:
        super().__init__(module, latent, sites, block.to_mat(theta), damping)
        la, qa, lg, qg = block.eigh()
        self.register_buffer("input_eigenvalues", la.detach().clone())
        self.register_buffer("input_eigenvectors", qa.detach().clone())
        self.register_buffer("output_eigenvalues", lg.detach().clone())
        self.register_buffer("output_eigenvectors", qg.detach().clone())
        self.d_in = block.d_in

    def distribution(self) -> dist.TorchDistribution:
        return KroneckerMatrixNormal(
            self.loc,
            self.input_eigenvalues,
            self.input_eigenvectors,
            self.output_eigenvalues,
            self.output_eigenvectors,
            self.damping,
        )

    def unpack(self, value: Tensor) -> dict[str, Tensor]:
        """``weight = W̄[..., :d_in]`` reshaped to the weight's shape, ``bias = W̄[..., d_in]``."""
        lead = value.shape[:-2]
        out = {}
        for i, s in enumerate(self.sites):  # the weight, then the bias (KronBlock's order)
            if i == 1:
                out[s.name] = value[..., self.d_in]
            else:
                out[s.name] = value[..., : self.d_in].reshape(lead + torch.Size(s.shape))
        return out


class DiagPosterior(BlockPosterior):
    """``Normal(θ*, (d + τ)^{-1/2}).to_event(1)``; buffer ``curvature`` holds ``d``."""

    curvature: Tensor

    def __init__(
        self,
        module: str,
        latent: str,
        sites: tuple[Site, ...],
        block: DiagBlock,
        theta: Tensor,
        damping: Tensor,
    ) -> None:
        super().__init__(module, latent, sites, theta, damping)
        self.register_buffer("curvature", block.values.detach().clone())

    def distribution(self) -> dist.TorchDistribution:
        return dist.Normal(self.loc, (self.curvature + self.damping).rsqrt()).to_event(1)


class DensePosterior(BlockPosterior):
    """``MultivariateNormal(θ*, precision_matrix=F + τI)``; buffer ``curvature`` holds ``F``."""

    curvature: Tensor

    def __init__(
        self,
        module: str,
        latent: str,
        sites: tuple[Site, ...],
        block: DenseBlock,
        theta: Tensor,
        damping: Tensor,
    ) -> None:
        super().__init__(module, latent, sites, theta, damping)
        self.register_buffer("curvature", block.matrix.detach().clone())

    def distribution(self) -> dist.TorchDistribution:
        eye = torch.eye(self.loc.shape[-1], dtype=self.loc.dtype, device=self.loc.device)
        precision = self.curvature + self.damping * eye
        return dist.MultivariateNormal(self.loc, precision_matrix=precision)

    def variance(self) -> Tensor:
        evals, evecs, _ = robust_eigh(self.curvature, f"{self.module}: curvature")
        lam = evals.clamp_min(0) + self.damping
        return evecs.square() @ lam.reciprocal()


def block_posterior(
    module: str,
    latent: str,
    sites: tuple[Site, ...],
    block: CurvatureBlock,
    theta: Tensor,
    damping: Tensor,
) -> BlockPosterior:
    """The posterior module of ``block`` at the MAP ``theta`` (the block's parameters in
    ``parameters_to_vector`` order), with prior precision ``damping``."""
    theta = theta.detach().to(block.dtype)
    damping = torch.as_tensor(damping, dtype=block.dtype, device=block.device)
    if isinstance(block, KronBlock):
        return KronPosterior(module, latent, sites, block, theta, damping)
    if isinstance(block, DiagBlock):
        return DiagPosterior(module, latent, sites, block, theta, damping)
    if isinstance(block, DenseBlock):
        return DensePosterior(module, latent, sites, block, theta, damping)
    raise TypeError(
        f"LaplaceGuide: block {module!r} has unsupported type {type(block).__name__}; supported "
        "are KronBlock, DiagBlock and DenseBlock."
    )


def build_posteriors(
    laplace: Laplace, prefix: str, latent_name: Callable[[str], str]
) -> tuple[list[BlockPosterior], list[tuple[Site, Tensor]]]:
    """The posterior module of every block of ``laplace`` (block order), and ``(site, θ*)`` of
    every parameter outside them (``named_parameters`` order). Site names are ``prefix`` + the
    parameter name; ``latent_name(module)`` names a block's auxiliary latent."""
    if not laplace.fitted:
        raise RuntimeError("LaplaceGuide: call laplace.fit(train_loader) first.")
    map_vector = laplace.map_vector.detach()
    shapes = {k: tuple(p.shape) for k, p in laplace.model.named_parameters()}
    posteriors: list[BlockPosterior] = []
    covered: set[str] = set()
    for (module, block), tau in zip(laplace.blocks.items(), laplace.prior_precision, strict=True):
        full = [f"{module}.{p}" if f"{module}.{p}" in shapes else p for p in block.param_shapes]
        sites = tuple(Site(prefix + k, k, shapes[k]) for k in full)
        covered.update(full)
        theta = map_vector[laplace.layout.block_index[module]]
        posteriors.append(block_posterior(module, latent_name(module), sites, block, theta, tau))
    fixed = []
    for k, shape in shapes.items():
        if k not in covered:
            a, b = laplace.layout.offsets[k]
            fixed.append((Site(prefix + k, k, shape), map_vector[a:b].reshape(shape).clone()))
    return posteriors, fixed
