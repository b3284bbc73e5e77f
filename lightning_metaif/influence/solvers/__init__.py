"""Inverse-Hessian-vector-product solvers with explicit damping (docs/maths.md §6).

``solve(operator, rhs, method=..., damping=δ)`` returns ``s ≈ (H + δI)^{-1} rhs`` as a :class:`SolveResult`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_metaif.influence.checks import check_number, check_options
from lightning_metaif.influence.solvers.base import (
    DenseMatrix,
    LinearOperator,
    SolverError,
    SolveResult,
    check_finite,
    relative_residual,
)
from lightning_metaif.influence.solvers.dense import dense_solve, identity_solve
from lightning_metaif.influence.solvers.settings import (
    CG,
    EKFAC,
    Arnoldi,
    Dense,
    Identity,
    LiSSA,
    SolverSettings,
    as_solver,
)

SOLVERS = ("identity", "dense", "cg", "lissa", "arnoldi")


def solve(
    operator: LinearOperator, rhs: Tensor, *, method: str = "cg", damping: float = 0.0, **options: Any
) -> SolveResult:
    """Solve ``(H + δI) s = rhs`` with the named method.

    Args:
        operator: the (total) Hessian as a linear operator.
        rhs: flat right-hand side of length ``operator.dim``.
        method: one of ``"identity"``, ``"dense"``, ``"cg"``, ``"lissa"``, ``"arnoldi"``.
        damping: ``δ ≥ 0`` added to the diagonal.
        options: solver-specific settings (see each solver).

    Example:
        >>> import torch
        >>> H = DenseMatrix(torch.tensor([[2.0, 0.0], [0.0, 4.0]], dtype=torch.float64))
        >>> solve(H, torch.tensor([2.0, 4.0], dtype=torch.float64), method="dense", damping=0.0).solution.tolist()
        [1.0, 1.0]
    """
    damping = check_number(damping, "damping", minimum=0.0)
    check_options(options, f"solver {method!r}")
    if rhs.shape != (operator.dim,):
        raise ValueError(f"rhs must be a flat vector of length {operator.dim}, got shape {tuple(rhs.shape)}.")
    if method == "identity":
        return identity_solve(operator, rhs, damping=damping, **options)
    if method == "dense":
        return dense_solve(operator, rhs, damping=damping, **options)
    if method == "cg":
        from lightning_metaif.influence.solvers.cg import cg_solve

        return cg_solve(operator, rhs, damping=damping, **options)
    if method == "lissa":
        from lightning_metaif.influence.solvers.lissa import lissa_solve

        return lissa_solve(operator, rhs, damping=damping, **options)
    if method == "arnoldi":
        from lightning_metaif.influence.solvers.arnoldi import arnoldi_solve

        return arnoldi_solve(operator, rhs, damping=damping, **options)
    if method == "ekfac":
        raise ValueError(
            "solver='ekfac' is fitted from the problem's layers, not from Hessian-vector products: use it through "
            "task_influence(..., solver='ekfac') or TaskIF(solver='ekfac')."
        )
    raise ValueError(f"Unknown solver {method!r}; choose one of {SOLVERS}.")


__all__ = [
    "CG",
    "EKFAC",
    "SOLVERS",
    "Arnoldi",
    "Dense",
    "Identity",
    "LiSSA",
    "SolverSettings",
    "as_solver",
    "DenseMatrix",
    "LinearOperator",
    "SolveResult",
    "SolverError",
    "check_finite",
    "relative_residual",
    "solve",
]
