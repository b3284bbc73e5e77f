"""The damped curvature ``H + δI`` of the training objective and its solves, shared by every IF estimator."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_metaif.influence.hessian import TotalHessian
from lightning_metaif.influence.problem import Params
from lightning_metaif.influence.solvers import DenseMatrix, SolverError, SolveResult, solve
from lightning_metaif.influence.tasks import Tasks


class DampedCurvature:
    """The damped total Hessian ``H + δI`` and its solves; the dense matrix is materialised once and reused.

    Args:
        problem, params, tasks: define ``H`` (see :class:`~lightning_metaif.influence.hessian.TotalHessian`).
        solver: a name from :data:`~lightning_metaif.influence.solvers.SOLVERS`.
        damping: ``δ ≥ 0``.
        solver_options: passed on to the solver.
        kwargs: passed on to :class:`~lightning_metaif.influence.hessian.TotalHessian` (``task_weights``,
            ``l2``, ``curvature``, ``chunk_size``, ``vectorize``).

    Example:
        >>> import torch
        >>> from lightning_metaif.influence.tasks import TaskBatch
        >>> class Quadratic:  # ℓ_k(λ) = ‖λ − x_k‖²/2, so H = I
        ...     def task_loss(self, params, task, support_weights=None, query_weights=None):
        ...         return 0.5 * ((params["w"] - task.query_x.mean(0)) ** 2).sum()
        >>> tasks = TaskBatch(torch.zeros(2, 1, 1), torch.zeros(2, 1), torch.ones(2, 1, 1), torch.zeros(2, 1),
        ...                   torch.arange(2))
        >>> curvature = DampedCurvature(Quadratic(), {"w": torch.zeros(1, requires_grad=True)}, tasks,
        ...                             solver="dense", damping=1.0)
        >>> curvature.solve(torch.tensor([4.0])).solution.tolist()  # (1 + 1)^{-1} 4
        [2.0]
    """

    def __init__(
        self,
        problem: Any,
        params: Params,
        tasks: Tasks,
        *,
        solver: str,
        damping: float,
        solver_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.solver, self.damping = solver, damping
        self.options = dict(solver_options or {})
        self.operator: Any = TotalHessian(problem, params, tasks, **kwargs)
        if solver == "dense":
            self.operator = DenseMatrix(self.operator.dense())
        self.products = 0

    def solve(self, rhs: Tensor) -> SolveResult:
        """``(H + δI)^{-1} rhs`` with the chosen solver (arnoldi's eigenpairs are kept for later solves)."""
        result = solve(self.operator, rhs, method=self.solver, damping=self.damping, **self.options)
        self.products += int(result.extra.get("products", result.iterations))
        if self.solver == "arnoldi" and "inverse" in result.extra:
            self.options.setdefault("inverse", result.extra["inverse"])  # later solves reuse the eigenpairs
        return result

    def quadratic_forms(self, rows: Tensor) -> Tensor:
        """``g_kᵀ (H + δI)^{-1} g_k`` for each row (one solve per row; one eigendecomposition for dense)."""
        if self.solver == "identity":
            return (rows * rows).sum(1)
        if self.solver == "dense":
            eigenvalues, eigenvectors = torch.linalg.eigh(self.operator.matrix)
            shifted = eigenvalues + self.damping
            if float(shifted.min()) <= 0:
                raise SolverError(
                    f"H + δI is not positive definite (smallest eigenvalue {float(shifted.min()):.3e} with "
                    f"δ={self.damping:g}): raise the damping above {-float(eigenvalues.min()):.3e}, or add an L2 term."
                )
            coords = rows @ eigenvectors
            return (coords * coords / shifted).sum(1)
        return torch.stack([row @ self.solve(row).solution for row in rows])


def solve_diagnostics(result: SolveResult) -> dict[str, Any]:
    """The fields of a :class:`~lightning_metaif.influence.solvers.SolveResult` that go into diagnostics."""
    return {
        "solver": result.solver,
        "damping": result.damping,
        "iterations": result.iterations,
        "residual": result.residual,
        "converged": result.converged,
        "solver_extra": dict(result.extra),
    }


__all__ = ["DampedCurvature", "solve_diagnostics"]
