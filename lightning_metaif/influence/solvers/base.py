"""What every inverse-HVP solver takes and returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor


class LinearOperator(Protocol):
    """A symmetric ``p x p`` operator given by its products (e.g. :class:`~..hessian.TotalHessian`)."""

    dim: int
    dtype: torch.dtype
    device: torch.device

    def matvec(self, vector: Tensor) -> Tensor: ...


class SolverError(RuntimeError):
    """An inverse-HVP solve failed (diverged, non-finite, negative curvature); the message names the remedy."""


@dataclass
class SolveResult:
    """Solution of ``(H + δI) s = b`` with diagnostics.

    ``residual`` is the relative residual ``‖(H + δI)s − b‖ / ‖b‖`` (computed with one extra product where the
    solver does not track it); ``iterations`` counts operator products the solver took.
    """

    solution: Tensor
    solver: str
    damping: float
    iterations: int
    residual: float
    converged: bool
    extra: dict[str, Any] = field(default_factory=dict)


class DenseMatrix:
    """Wrap an explicit symmetric matrix as a :class:`LinearOperator` (tests, small problems)."""

    def __init__(self, matrix: Tensor) -> None:
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"Expected a square matrix, got shape {tuple(matrix.shape)}.")
        self.matrix = matrix
        self.dim = matrix.shape[0]
        self.dtype = matrix.dtype
        self.device = matrix.device

    def matvec(self, vector: Tensor) -> Tensor:
        return self.matrix @ vector

    def dense(self) -> Tensor:
        return self.matrix


def relative_residual(operator: LinearOperator, damping: float, solution: Tensor, rhs: Tensor) -> float:
    residual = operator.matvec(solution) + damping * solution - rhs
    return float(residual.norm() / rhs.norm().clamp_min(torch.finfo(rhs.dtype).tiny))


def check_finite(solution: Tensor, solver: str, remedy: str) -> None:
    if not torch.isfinite(solution).all():
        raise SolverError(f"The {solver} solve produced non-finite values: {remedy}")
