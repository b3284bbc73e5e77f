"""The damped curvature ``H + δI`` of the training objective and its solves, shared by every IF estimator.

Curvatures (``curvature=``):

* ``"gauss_newton"``: ``Jᵀ H_ℓ J`` through the adaptation (:class:`~.gauss_newton.GaussNewton`), positive
  semi-definite everywhere; needs ``query_outputs`` / ``output_loss`` on the problem;
* ``"exact"``: the exact total Hessian (:class:`~.hessian.TotalHessian`), third-order terms included;
  indefinite away from a regularised optimum;
* ``"gamma"``: Ren et al.'s surrogate (Gauss–Newton-like term plus ``Γ·I``);
* ``"auto"``: ``"gauss_newton"`` when the problem exposes what it needs, else ``"exact"``.

Damping (``damping=``): a float ``δ ≥ 0``, or ``"auto"``: ``δ = AUTO_DAMPING_FRACTION × (mean eigenvalue of the
curvature)``, the mean eigenvalue being ``trace / p``, exact for ``solver="dense"`` and otherwise a Hutchinson
estimate with :data:`AUTO_DAMPING_PROBES` seeded Rademacher probes. The chosen ``δ`` and how it was chosen are
in :attr:`DampedCurvature.damping_info` (and in every result's diagnostics).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_metaif.influence.ekfac import EKFACFactors
from lightning_metaif.influence.gauss_newton import GaussNewton, check_gauss_newton_problem, has_gauss_newton
from lightning_metaif.influence.hessian import TotalHessian
from lightning_metaif.influence.problem import Params
from lightning_metaif.influence.solvers import DenseMatrix, SolverError, SolveResult, check_finite, solve
from lightning_metaif.influence.solvers.cg import block_cg_solve
from lightning_metaif.influence.solvers.lissa import lissa_solve
from lightning_metaif.influence.tasks import Tasks

Curvature = Literal["auto", "gauss_newton", "exact", "gamma"]
CURVATURES = ("auto", "gauss_newton", "exact", "gamma")
Damping = float | Literal["auto"]

AUTO_DAMPING_FRACTION = 0.1
"""``damping="auto"`` sets ``δ`` to this fraction of the curvature's mean eigenvalue (``trace / p``)."""
AUTO_DAMPING_PROBES = 16
"""Rademacher probes of the Hutchinson trace estimate behind ``damping="auto"`` (seeded, so reproducible)."""


def resolve_curvature(problem: Any, curvature: str) -> str:
    """The concrete curvature for ``problem``: ``"auto"`` becomes ``"gauss_newton"`` when possible.

    Example:
        >>> class OnlyLoss:
        ...     def task_loss(self, params, task, support_weights=None, query_weights=None): ...
        >>> resolve_curvature(OnlyLoss(), "auto")
        'exact'
    """
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}.")
    if curvature == "auto":
        return "gauss_newton" if has_gauss_newton(problem) else "exact"
    if curvature == "gauss_newton":
        check_gauss_newton_problem(problem)
    return curvature


def mean_eigenvalue(
    operator: Any, *, probes: int = AUTO_DAMPING_PROBES, seed: int = 0
) -> tuple[float, float]:
    """``trace / p`` of a symmetric operator and the standard error of the estimate.

    Exact (standard error 0) for a :class:`~lightning_metaif.influence.solvers.DenseMatrix`; otherwise
    Hutchinson's estimator ``mean_i zᵢᵀ A zᵢ / p`` over ``probes`` seeded Rademacher vectors.

    Example:
        >>> A = DenseMatrix(torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64)))
        >>> mean_eigenvalue(A)
        (2.0, 0.0)
    """
    if isinstance(operator, DenseMatrix):
        return float(torch.diagonal(operator.matrix).mean()), 0.0
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(probes):
        z = (torch.randint(0, 2, (operator.dim,), generator=generator) * 2 - 1).to(operator.dtype)
        z = z.to(operator.device)
        values.append(float(z @ operator.matvec(z)) / operator.dim)
    estimates = torch.tensor(values, dtype=torch.float64)
    spread = float(estimates.std(unbiased=True) / math.sqrt(probes)) if probes > 1 else float("nan")
    return float(estimates.mean()), spread


class DampedCurvature:
    """The damped total Hessian ``H + δI`` and its solves; the dense matrix is materialised once and reused.

    Args:
        problem, params, tasks: define ``H`` (see :class:`~lightning_metaif.influence.hessian.TotalHessian`).
        solver: a name from :data:`~lightning_metaif.influence.solvers.SOLVERS`.
        damping: ``δ ≥ 0``, or ``"auto"`` (see the module docstring).
        curvature: ``"auto"``, ``"gauss_newton"``, ``"exact"`` or ``"gamma"`` (see the module docstring).
        solver_options: passed on to the solver.
        seed: seeds the probes of ``damping="auto"``.
        kwargs: passed on to the curvature operator (``task_weights``, ``l2``, ``chunk_size``, ``vectorize``).

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
        damping: Damping,
        curvature: Curvature = "auto",
        solver_options: dict[str, Any] | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        self.solver = solver
        self.curvature = resolve_curvature(problem, curvature)
        self.options = dict(solver_options or {})
        if solver == "ekfac":
            if self.curvature != "gauss_newton":
                raise ValueError(
                    f"solver='ekfac' approximates the Gauss–Newton curvature, not curvature={curvature!r}: pass "
                    "curvature='gauss_newton' (or 'auto' with a problem that has query_outputs/output_loss)."
                )
            unknown = set(self.options) - {"fit_tasks", "draws"}
            if unknown:
                raise ValueError(
                    f"solver='ekfac' takes solver_options fit_tasks and draws, not {sorted(unknown)}."
                )
            self.operator: Any = EKFACFactors(problem, params, tasks, seed=seed, **self.options, **kwargs)
            self.products = 0
            self.damping, self.damping_info = self._choose_damping(damping, seed)
            return
        if self.curvature == "gauss_newton":
            self.operator = GaussNewton(problem, params, tasks, **kwargs)
        else:
            self.operator = TotalHessian(problem, params, tasks, curvature=self.curvature, **kwargs)
        if solver == "dense":
            self.operator = DenseMatrix(self.operator.dense())
        self.products = 0
        self.damping, self.damping_info = self._choose_damping(damping, seed)

    def _choose_damping(self, damping: Damping, seed: int) -> tuple[float, dict[str, Any]]:
        if damping != "auto":
            return float(damping), {"damping_rule": "user"}
        if self.solver == "identity":
            return 0.0, {"damping_rule": "auto", "note": "solver='identity' ignores the curvature"}
        if isinstance(self.operator, EKFACFactors):  # the fitted eigenvalues give the trace for free
            mean, spread = self.operator.mean_eigenvalue, 0.0
        else:
            mean, spread = mean_eigenvalue(self.operator, seed=seed)
        if not isinstance(self.operator, (DenseMatrix, EKFACFactors)):
            self.products += AUTO_DAMPING_PROBES
        info = {
            "damping_rule": "auto",
            "damping_fraction": AUTO_DAMPING_FRACTION,
            "mean_eigenvalue": mean,
            "mean_eigenvalue_stderr": spread,
        }
        if not math.isfinite(mean):
            raise SolverError(
                f"damping='auto' found a non-finite mean eigenvalue ({mean}) of the {self.curvature} curvature: "
                "check the parameters and the tasks' outputs for NaN or inf."
            )
        if not mean > 0:
            raise SolverError(
                f"damping='auto' found a mean eigenvalue of {mean:.3e} for the {self.curvature} curvature, so it "
                "cannot set δ relative to it: pass a float damping, or use curvature='gauss_newton' (PSD)."
            )
        return AUTO_DAMPING_FRACTION * mean, info

    def solve(self, rhs: Tensor) -> SolveResult:
        """``(H + δI)^{-1} rhs`` with the chosen solver (arnoldi's eigenpairs are kept for later solves)."""
        if isinstance(self.operator, EKFACFactors):
            solution = self.operator.solve(rhs, self.damping)
            check_finite(solution, "ekfac", "check the tasks for non-finite outputs, or raise the damping.")
            extra = {
                "fit_tasks": self.operator.fit_tasks,
                "draws": "exact" if self.operator.exact_expectation else self.operator.draws,
                "fit_seconds": self.operator.fit_seconds,
                "factor_bytes": self.operator.memory_bytes(),
                "layers": [layer.module for layer in self.operator.layers],
            }
            return SolveResult(solution, "ekfac", self.damping, 0, float("nan"), True, extra)
        result = solve(self.operator, rhs, method=self.solver, damping=self.damping, **self.options)
        self.products += int(result.extra.get("products", result.iterations))
        if self.solver == "arnoldi" and "inverse" in result.extra:
            self.options.setdefault("inverse", result.extra["inverse"])  # later solves reuse the eigenpairs
        return result

    def quadratic_forms(self, rows: Tensor, block: int = 64) -> Tensor:
        """``g_kᵀ (H + δI)^{-1} g_k`` for each row, never one solve per row.

        ``dense``: one eigendecomposition; ``arnoldi``: one low-rank factorisation applied to every row; ``cg``
        and ``lissa``: block solves of ``block`` rows at a time, each step one batched product for all of them
        (:meth:`~lightning_metaif.influence.hessian.TotalHessian.matmat`).
        """
        if self.solver == "identity":
            return (rows * rows).sum(1)
        if isinstance(self.operator, EKFACFactors):
            return (rows * self.operator.solve(rows, self.damping)).sum(1)
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
        if self.solver == "arnoldi":
            inverse = self.options.get("inverse")
            if inverse is None:
                inverse = self.solve(rows[0]).extra["inverse"]
            inverse = inverse.with_damping(self.damping, self.options.get("complement"))
            return (rows * inverse.apply(rows)).sum(1)
        forms = []
        for start in range(0, rows.shape[0], block):
            chunk = rows[start : start + block]
            if self.solver == "cg":
                options = {
                    k: v for k, v in self.options.items() if k in ("max_iterations", "tolerance", "strict")
                }
                result = block_cg_solve(self.operator, chunk, damping=self.damping, **options)
            elif self.solver == "lissa":
                result = lissa_solve(self.operator, chunk, damping=self.damping, **self.options)
            else:  # a solver without a block form: one solve per row
                forms.append(torch.stack([row @ self.solve(row).solution for row in chunk]))
                continue
            self.products += int(result.extra.get("products", result.iterations))
            forms.append((chunk * result.solution).sum(1))
        return torch.cat(forms)


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


__all__ = [
    "AUTO_DAMPING_FRACTION",
    "AUTO_DAMPING_PROBES",
    "CURVATURES",
    "Curvature",
    "DampedCurvature",
    "mean_eigenvalue",
    "resolve_curvature",
    "solve_diagnostics",
]
