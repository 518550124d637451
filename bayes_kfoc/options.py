"""String enums for user-facing options, validated with a message that lists the valid values."""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

E = TypeVar("E", bound="StrEnum")


class StrEnum(str, Enum):
    """A string enum whose ``parse`` names every valid value when it rejects one."""

    @classmethod
    def parse(cls: type[E], value: str | E, what: str) -> E:
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            valid = ", ".join(repr(m.value) for m in cls)
            raise ValueError(
                f"{what}: unknown value {value!r}; valid values are {valid}."
            ) from None

    def __str__(self) -> str:
        return str(self.value)


class Structure(StrEnum):
    """Curvature structure of a block.

    - ``kfoc``: Frobenius-optimal Kronecker factors ``G ⊗ A`` (Van Loan–Pitsianis).
    - ``kfac``: K-FAC factors ``(Σ B_n) ⊗ (1/N Σ ā ā^T)``.
    - ``diag``: the exact diagonal of the Fisher.
    - ``full``: the dense per-module block (small modules and references only).
    """

    KFOC = "kfoc"
    KFAC = "kfac"
    DIAG = "diag"
    FULL = "full"


class FisherType(StrEnum):
    """Which Fisher is approximated (see ``docs/math.md``, "Fisher directions").

    - ``exact``: the type-2 Fisher, every class weighted by its probability (``V = C − 1``).
    - ``mc``: ``mc_samples`` labels drawn from the model's predictive (``V = mc_samples``).
    - ``empirical``: the observed labels (``V = 1``).
    """

    EXACT = "exact"
    MC = "mc"
    EMPIRICAL = "empirical"


class Mode(StrEnum):
    """How K-FOC's solver sees the data.

    - ``auto``: ``cached`` when the estimated statistics fit ``memory_budget``, else ``streaming``.
    - ``cached``: per-layer statistics are kept on the model's device.
    - ``streaming``: every pass re-runs forward and backward over the loader (one pass per
      Lanczos half-step, or per Jacobi power iteration).
    """

    AUTO = "auto"
    CACHED = "cached"
    STREAMING = "streaming"


class Solver(StrEnum):
    """How K-FOC finds the top singular pair of the rearranged Fisher.

    - ``lanczos``: Golub–Kahan–Lanczos bidiagonalisation from K-FAC's ``A`` (fewer passes over
      the statistics; the Ritz factors are projected onto the PSD cone, removing ``O(tol)``).
    - ``power``: the paper's power iteration from K-FAC's ``(A, G)``; every iterate is PSD.

    In streaming fits Lanczos takes one data pass per half-step, and power iteration is Jacobi
    (both updates from one pass).
    """

    LANCZOS = "lanczos"
    POWER = "power"


class KfacReduction(StrEnum):
    """How K-FAC treats a weight shared over positions ``T`` (``docs/math.md``, "K-FAC over
    positions"; Eschenhagen et al., NeurIPS 2023).

    - ``auto`` (default): ``reduce`` for Linear layers over sequences and attention
      projections (a classifier has one output per sequence), ``expand`` for Conv2d (KFC).
    - ``expand``: ``(Σ_{n,t} δδᵀ) ⊗ (1/(N·T) Σ_{n,t} ā āᵀ)``.
    - ``reduce``: ``(Σ_n g gᵀ) ⊗ (1/N Σ_n ā āᵀ)`` with ``g_n = Σ_t δ_{n,t}`` and ``ā_n`` the
      mean of ``ā_{n,t}`` over the positions that reach the output.

    Plain Linear layers (``T = 1``) are the same under all three; K-FOC does not depend on it.
    """

    AUTO = "auto"
    EXPAND = "expand"
    REDUCE = "reduce"


class BlockKind(StrEnum):
    """How a fitted block represents its module's curvature (what ``Structure`` becomes).

    - ``kron``: ``G ⊗ A`` (K-FOC and K-FAC on Linear / Conv2d);
    - ``diag``: a diagonal (``diag``, and modules without Kronecker structure);
    - ``full``: a dense matrix (``full``).
    """

    KRON = "kron"
    DIAG = "diag"
    FULL = "full"


class PredMethod(StrEnum):
    """``glm``: the linearised network (default); ``mc``: the network at sampled weights."""

    GLM = "glm"
    MC = "mc"


class Link(StrEnum):
    """How the GLM's Gaussian over logits becomes probabilities: ``probit`` or ``mc``."""

    PROBIT = "probit"
    MC = "mc"


class TuneMethod(StrEnum):
    """``gridsearch``: a validation metric; ``consistency``: the training-consistency rule (no
    validation data); ``marglik``: maximise the Laplace evidence."""

    MARGLIK = "marglik"
    GRIDSEARCH = "gridsearch"
    CONSISTENCY = "consistency"


class PriorKind(StrEnum):
    """How a tuned prior precision is shared over blocks (:attr:`TuningResult.prior`).

    - ``scaled``: ``τ_b = s · P_b / ||θ*_b||²``, one scale ``s`` over per-block base precisions;
    - ``global``: ``τ_b = s``, one value for every block;
    - ``per-module`` / ``shared``: the evidence maximiser, one ``τ`` per block or one for all.

    ``optimize_prior_precision(prior=...)`` takes ``scaled`` or ``global``.
    """

    SCALED = "scaled"
    GLOBAL = "global"
    PER_MODULE = "per-module"
    SHARED = "shared"


class GlmPath(StrEnum):
    """How the GLM predictive computes the linearised logits' spread (``docs/math.md``, "Sampled
    linearised predictive").

    - ``auto`` (default): ``sampled`` where a cost model says it is at least 4× cheaper (many
      classes, wide convolutions), or where one point's exact Jacobian statistics exceed
      ``memory_budget``; else (and where an operation lacks forward-mode AD) ``exact``.
    - ``exact``: one vector-Jacobian product per class and point, contracted in each block's
      eigenbasis (the exact variances / covariance).
    - ``sampled``: ``n_samples`` weight perturbations from the posterior pushed through
      forward-mode JVPs; a Monte-Carlo estimate whose cost does not grow with the classes.

    Either way a Kronecker or diagonal block whose module *produces* the logits (a last layer)
    uses the closed form, exact and without Jacobians.
    """

    AUTO = "auto"
    EXACT = "exact"
    SAMPLED = "sampled"
