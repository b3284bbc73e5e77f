"""The identity solver (TracIn / inner-product influence) and the exact dense solve (ground truth)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_metaif.influence.solvers.base import LinearOperator, SolverError, SolveResult, check_finite


def identity_solve(operator: LinearOperator, rhs: Tensor, *, damping: float = 0.0) -> SolveResult:
    """``s = rhs``: the identity in place of ``H^{-1}`` (no operator products, residual not computed)."""
    return SolveResult(rhs.clone(), "identity", damping, iterations=0, residual=float("nan"), converged=True)


def dense_solve(
    operator: LinearOperator, rhs: Tensor, *, damping: float = 0.0, allow_indefinite: bool = False
) -> SolveResult:
    """Materialise ``H`` (``operator.dense()`` or ``p`` products), eigendecompose, solve ``(H + δI)s = rhs``.

    Raises :class:`SolverError` when ``H + δI`` has a non-positive eigenvalue (unless ``allow_indefinite``),
    naming the damping that would make it positive definite.
    """
    if hasattr(operator, "dense"):
        matrix = operator.dense()
    else:
        eye = torch.eye(operator.dim, dtype=operator.dtype, device=operator.device)
        matrix = torch.stack([operator.matvec(e) for e in eye], dim=1)
        matrix = 0.5 * (matrix + matrix.T)
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    shifted = eigenvalues + damping
    smallest = float(shifted.min())
    if smallest <= 0 and not allow_indefinite:
        raise SolverError(
            f"H + δI is not positive definite (smallest eigenvalue {smallest:.3e} with δ={damping:g}): raise the "
            f"damping above {-float(eigenvalues.min()):.3e}, or add an L2 term to the training objective."
        )
    solution = eigenvectors @ ((eigenvectors.T @ rhs) / shifted)
    check_finite(solution, "dense", "raise the damping.")
    residual = float((matrix @ solution + damping * solution - rhs).norm() / rhs.norm().clamp_min(1e-300))
    return SolveResult(
        solution,
        "dense",
        damping,
        iterations=operator.dim,
        residual=residual,
        converged=True,
        extra={"min_eigenvalue": float(eigenvalues.min()), "max_eigenvalue": float(eigenvalues.max())},
    )
