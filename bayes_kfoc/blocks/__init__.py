"""Curvature blocks: Kronecker, diagonal and dense, each with ``to_dense`` and exact damping."""

from ._base import CurvatureBlock
from .dense import DenseBlock
from .diag import DiagBlock
from .kron import KronBlock

__all__ = ["CurvatureBlock", "DenseBlock", "DiagBlock", "KronBlock"]
