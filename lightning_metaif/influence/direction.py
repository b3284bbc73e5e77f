"""Task-IF from one solve: the influence direction ``s = (H + δI)^{-1} ∇f`` and scores ``(w_k / M) ⟨g_k, s⟩``.

Task influence (Ren et al.) is linear in each task's gradient: ``score_k = (w_k / M) g_kᵀ (H + δI)^{-1} ∇f``. So
one solve for ``s`` serves every task, and the ``g_k`` can be gradients that were already computed, e.g. by
training itself (the callback keeps each task's latest meta-gradient as it trains). The curvature can be
estimated on a seeded subsample of the tasks (an unbiased estimate of the mean curvature), and the solve can be
warm-started from the previous round's ``s``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_metaif.influence.curvature import DampedCurvature, solve_diagnostics
from lightning_metaif.influence.gradients import Utility, Vectorize, reference_gradient
from lightning_metaif.influence.problem import Params, trainable
from lightning_metaif.influence.tasks import Tasks

__all__ = ["direction_scores", "influence_direction"]


def influence_direction(
    problem: Any,
    params: Params,
    hessian_tasks: Tasks,
    reference_tasks: Tasks | None = None,
    *,
    utility: Utility | None = None,
    solver: str = "cg",
    damping: float | str = "auto",
    curvature: str = "auto",
    l2: float = 0.0,
    task_weights: Tensor | Sequence[float] | None = None,
    solver_options: dict[str, Any] | None = None,
    x0: Tensor | None = None,
    seed: int = 0,
    chunk_size: int = 16,
    vectorize: Vectorize = "auto",
) -> tuple[Tensor, dict[str, Any]]:
    """``s = (H + δI)^{-1} ∇f`` with ``H`` the curvature of the (weighted) objective over ``hessian_tasks``.

    Args:
        hessian_tasks: the tasks whose mean curvature stands for the training objective's (all of them, or a
            seeded subsample).
        x0: a starting point for iterative solvers (CG), e.g. the previous round's ``s``.
        Other arguments as in :func:`~lightning_metaif.influence.estimators.task_influence`.

    Returns:
        ``(s, diagnostics)``: the flat direction and the solve's diagnostics (solver, damping, iterations,
        relative residual, converged, reference value, products, seconds).

    Example:
        >>> from lightning_metaif.influence.tasks import TaskBatch
        >>> class Quadratic:  # ℓ_k(λ) = ‖λ − x_k‖²/2, so H = I
        ...     def task_loss(self, params, task, support_weights=None, query_weights=None):
        ...         return 0.5 * ((params["w"] - task.query_x.mean(0)) ** 2).sum()
        >>> tasks = TaskBatch(torch.zeros(2, 1, 1), torch.zeros(2, 1), torch.tensor([[[1.0]], [[-1.0]]]),
        ...                   torch.zeros(2, 1), torch.arange(2))
        >>> ref = TaskBatch(torch.zeros(1, 1, 1), torch.zeros(1, 1), torch.tensor([[[2.0]]]), torch.zeros(1, 1),
        ...                 torch.tensor([9]))
        >>> s, info = influence_direction(Quadratic(), {"w": torch.zeros(1, requires_grad=True)}, tasks, ref,
        ...                               solver="dense", damping=1.0)
        >>> s.tolist(), info["converged"]   # (1 + 1)^{-1} ∇f with ∇f = 0 − 2
        ([-1.0], True)
    """
    start = time.perf_counter()
    params = trainable(params)
    engine = {"chunk_size": chunk_size, "vectorize": vectorize}
    options = dict(solver_options or {})
    if x0 is not None and solver == "cg":
        options["x0"] = x0
    weights = None if task_weights is None else torch.as_tensor(task_weights)
    curv = DampedCurvature(
        problem,
        params,
        hessian_tasks,
        solver=solver,
        damping=damping,
        curvature=curvature,
        solver_options=options,
        seed=seed,
        task_weights=None if weights is None else weights.to(next(iter(params.values()))),
        l2=l2,
        **engine,
    )
    ref_grad, ref_value = reference_gradient(problem, params, reference_tasks, utility=utility, **engine)
    result = curv.solve(ref_grad)
    diagnostics = solve_diagnostics(result) | dict(curv.damping_info)
    diagnostics.update(
        curvature=curv.curvature,
        reference_value=float(ref_value),
        reference_grad_norm=float(ref_grad.norm()),
        hessian_products=curv.products,
        hessian_tasks=len(hessian_tasks),
        seconds=time.perf_counter() - start,
    )
    return result.solution.detach(), diagnostics


def direction_scores(rows: Tensor, direction: Tensor, weights: Tensor, num_objective_tasks: int) -> Tensor:
    """Task-IF scores ``(w_k / M) ⟨g_k, s⟩`` from gradient rows and the direction (both possibly projected by
    the same random projection, which preserves inner products in expectation).

    Example:
        >>> direction_scores(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([3.0, 1.0]),
        ...                  torch.tensor([1.0, 0.5]), 2).tolist()
        [1.5, 0.5]
    """
    if num_objective_tasks < 1:
        raise ValueError(f"num_objective_tasks must be >= 1, got {num_objective_tasks}.")
    products = rows.to(direction.dtype) @ direction
    return weights.to(products.dtype) * products / num_objective_tasks
