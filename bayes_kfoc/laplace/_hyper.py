"""The hyper-steps of marginal-likelihood training: Adam up the Laplace evidence in ``log τ``.

With the curvature, the weights and the log-likelihood of a refit held fixed, the evidence is a
function of ``τ`` alone (``docs/math.md``, "Laplace evidence"); :class:`Evidence` evaluates it
and its ``log τ`` gradient in closed form, vectorised over blocks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .laplace import Laplace
from .tuning import LOG_TAU_BOUNDS


def expand(log_tau: Tensor, blocks: int) -> Tensor:
    tau = log_tau.detach().exp()
    return tau.expand(blocks).clone() if tau.numel() == 1 else tau


class Evidence:
    """The Laplace evidence of a fitted :class:`Laplace` as a function of ``τ`` (one value per
    block), with the curvature, the weights and the log-likelihood held fixed: every block's
    eigenvalues concatenated once, so that each evaluation is a few vectorised operations
    (:meth:`Laplace.log_marginal_likelihood` loops over blocks). Differentiable in ``τ``.
    """

    def __init__(self, la: Laplace):
        evals = [b.eigenvalues().detach().double() for b in la.blocks.values()]
        device = evals[0].device
        self.eigenvalues = torch.cat(evals)
        counts = torch.tensor([e.numel() for e in evals], device=device)
        self.index = torch.repeat_interleave(torch.arange(len(evals), device=device), counts)
        self.sizes = torch.tensor(
            [b.num_params for b in la.blocks.values()], dtype=torch.float64, device=device
        )
        self.sq_norms = la._block_sq_norms().to(device)
        self.log_likelihood = la.log_likelihood

    def __call__(self, tau: Tensor) -> Tensor:
        """``log p(D|θ*) − ½Σ τ_b||θ_b||² + ½Σ P_b log τ_b − ½Σ_b Σ_i log(λ_{b,i} + τ_b)``."""
        return (
            self.log_likelihood
            - 0.5 * (tau * self.sq_norms).sum()
            + 0.5 * (self.sizes * tau.log()).sum()
            - 0.5 * torch.log(self.eigenvalues + tau[self.index]).sum()
        )

    def grad_log_tau(self, tau: Tensor) -> Tensor:
        """The gradient in ``t = log τ``, in closed form (no autograd graph):
        ``½ [P_b − τ_b ||θ_b||² − τ_b Σ_i 1/(λ_{b,i} + τ_b)]``."""
        inv = torch.zeros_like(tau).index_add_(
            0, self.index, (self.eigenvalues + tau[self.index]).reciprocal()
        )
        return 0.5 * (self.sizes - tau * self.sq_norms - tau * inv)


class Adam:
    """Adam (Kingma & Ba, with ``torch.optim.Adam``'s defaults: ``β = (0.9, 0.999)``,
    ``ε = 1e-8``) *ascending* a handful of scalars in place: written out, because
    ``torch.optim``'s per-step overhead is most of the cost at this size. Its state persists
    across refits, as laplace-torch's hyper-optimiser's does."""

    def __init__(self, param: Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999)):
        self.param, self.lr, self.betas, self.eps = param, lr, betas, 1e-8
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)
        self.t = 0

    def ascend(self, grad: Tensor) -> None:
        b1, b2 = self.betas
        self.t += 1
        self.m.mul_(b1).add_(grad, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (self.v / (1 - b2**self.t)).sqrt_().add_(self.eps)
        self.param.addcdiv_(self.m, denom, value=self.lr / (1 - b1**self.t))


def hyper_steps(la: Laplace, log_tau: Tensor, opt: Adam, steps: int) -> float:
    """``steps`` Adam steps up the log evidence in ``log τ``; returns the evidence after them."""
    evidence = Evidence(la)
    blocks = len(la.blocks)
    for _ in range(steps):
        tau = log_tau.exp()
        grad = evidence.grad_log_tau(tau.expand(blocks) if tau.numel() == 1 else tau)
        opt.ascend(grad.sum(0, keepdim=True) if tau.numel() == 1 else grad)
        log_tau.clamp_(*LOG_TAU_BOUNDS)  # a block without an interior maximum (zero weights)
    return float(la.log_marginal_likelihood(expand(log_tau, blocks)))
