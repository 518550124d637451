"""Curvature blocks: Kronecker, diagonal and dense, each with ``to_dense`` and exact damping."""

from ._base import CurvatureBlock
from ._eigh import Decomposition, EighMethod, robust_eigh
from .dense import DenseBlock
from .diag import DiagBlock
from .kron import KronBlock

__all__ = [
    "CurvatureBlock",
    "Decomposition",
    "DenseBlock",
    "DiagBlock",
    "EighMethod",
    "KronBlock",
    "robust_eigh",
]
