"""The options of one curvature fit, parsed and validated before the loader is touched."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..options import FisherType, KfacReduction, Mode, Solver, Structure

LANCZOS_RESTART = 8  # Krylov steps kept before an explicit restart (memory: up to 9 A, 8 G)


@dataclass(frozen=True)
class FitOptions:
    """Every option of :func:`~bayes_kfoc.fit_curvature`, validated (see its docstring).

    ``base_seed`` is the one seed the MC labels of every pass are drawn from (resolved from
    ``seed`` or ``generator`` by :meth:`parse`).
    """

    structure: Structure
    fisher: FisherType
    modules: str | tuple[str, ...]
    exclude: tuple[str, ...]
    mc_samples: int
    base_seed: int
    mode: Mode
    memory_budget: int | None
    tol: float
    max_iter: int
    progress: bool
    check_determinism: bool
    distributed: bool | None
    dtype: torch.dtype | None
    solver: Solver
    kfac_reduction: KfacReduction = KfacReduction.AUTO

    @staticmethod
    def parse(
        structure: str | Structure = "kfoc",
        fisher: str | FisherType = "exact",
        modules: str | Sequence[str] = "all",
        *,
        exclude: Sequence[str] = (),
        mc_samples: int = 1,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        mode: str | Mode = "auto",
        memory_budget: int | None = None,
        tol: float = 1e-3,
        max_iter: int = 100,
        progress: bool = True,
        check_determinism: bool = True,
        distributed: bool | None = None,
        dtype: torch.dtype | None = None,
        solver: str | Solver = "lanczos",
        kfac_reduction: str | KfacReduction = "auto",
    ) -> FitOptions:
        """Validate every option; raise ``ValueError`` naming the option, the value and the fix."""
        s = Structure.parse(structure, "fit_curvature: structure")
        f = FisherType.parse(fisher, "fit_curvature: fisher")
        m = Mode.parse(mode, "fit_curvature: mode")
        solver_ = Solver.parse(solver, "fit_curvature: solver")
        reduction = KfacReduction.parse(kfac_reduction, "fit_curvature: kfac_reduction")
        if not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(
                f"fit_curvature: mc_samples must be a positive integer, got {mc_samples}."
            )
        if not tol > 0:
            raise ValueError(f"fit_curvature: tol must be positive, got {tol}.")
        if not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"fit_curvature: max_iter must be a positive integer, got {max_iter}.")
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"fit_curvature: dtype must be a floating dtype, got {dtype}.")
        if generator is not None:
            base_seed = int(torch.randint(2**62, (1,), generator=generator).item())
        elif seed is not None:
            base_seed = int(seed)
        else:
            base_seed = int(torch.randint(2**62, (1,)).item())
        return FitOptions(
            structure=s,
            fisher=f,
            modules=modules if isinstance(modules, str) else tuple(modules),
            exclude=tuple(exclude),
            mc_samples=mc_samples,
            base_seed=base_seed,
            mode=m,
            memory_budget=memory_budget,
            tol=float(tol),
            max_iter=max_iter,
            progress=progress,
            check_determinism=check_determinism,
            distributed=distributed,
            dtype=dtype,
            solver=solver_,
            kfac_reduction=reduction,
        )

    @property
    def kronecker(self) -> bool:
        """Whether Linear / Conv2d modules get Kronecker blocks (K-FOC or K-FAC)."""
        return self.structure in (Structure.KFOC, Structure.KFAC)

    @property
    def needs_g_sum(self) -> bool:
        """K-FAC's ``Σ B_n`` is summed only for K-FAC itself and the power iteration's start;
        Lanczos starts from K-FAC's ``A`` alone (its first ``G`` update replaces ``Σ B_n``)."""
        return self.structure is Structure.KFAC or self.solver is Solver.POWER

    @property
    def factor_copies(self) -> int:
        """Factor-sized temporaries per layer while solving: iterates, updates and the Lanczos
        bases (for the memory estimate)."""
        return 2 * LANCZOS_RESTART + 4 if self.solver is Solver.LANCZOS else 4
