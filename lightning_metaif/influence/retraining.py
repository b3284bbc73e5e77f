"""Ground truth by retraining, for small problems (docs/maths.md §7).

Influence scores are first-order predictions of what retraining would do; this module does the retraining
so that tests and benchmarks can measure them against the truth:

* :func:`train_to_convergence`: minimise ``F(λ) = (1/M) Σ_k w_k ℓ_k(λ; u_k) + (l2/2)‖λ‖²`` with damped Newton
  (exact Hessian from ``torch.func.hessian``, eigenvalue shift when indefinite, backtracking line search) to a
  gradient norm near ``1e-10`` in float64. Meant for a few hundred parameters.
* :func:`leave_one_task_out`: for each task k, set ``w_k = 0`` (the ``1/M`` normaliser is kept, so the
  perturbation is exactly the one the influence function linearises), warm-start Newton from ``λ*`` and
  record ``f(λ*_{-k}) − f(λ*)``: the *increase* of the reference objective when k is removed, which is what a
  task score predicts (positive = the task helped).
* :func:`leave_one_sample_out`: the same with one per-sample weight ``u_z = 0`` (support or query sample).

Make the truth trustworthy first: use an L2 term large enough that the total Hessian is clearly positive
definite at ``λ*`` (``TrainResult.min_eigenvalue`` reports it), otherwise retraining can wander to another
basin and the "truth" is noise.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap

from lightning_metaif.influence.gradients import Utility, batched_task_loss, task_tensors
from lightning_metaif.influence.problem import ParamLayout, Params, check_problem, detached, trainable
from lightning_metaif.influence.tasks import Task, TaskBatch, Tasks, resolve_task_ids


@dataclass
class TrainResult:
    """Outcome of :func:`train_to_convergence`."""

    params: Params
    objective: float
    grad_norm: float
    iterations: int
    converged: bool
    min_eigenvalue: float
    seconds: float


@dataclass
class TaskRetrainResult:
    """Leave-one-task-out ground truth: ``deltas[i] = f(λ*_{-k}) − f(λ*)`` for ``k = task_ids[i]``."""

    task_ids: Tensor
    deltas: Tensor
    param_changes: Tensor
    reference_value: float
    base: TrainResult
    iterations: list[int] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class SampleRetrainResult:
    """Leave-one-sample-out ground truth, ``[n_tasks, S]`` and ``[n_tasks, Q]`` (NaN where not retrained)."""

    task_ids: Tensor
    support_deltas: Tensor
    query_deltas: Tensor
    reference_value: float
    base: TrainResult
    max_grad_norm: float = 0.0
    seconds: float = 0.0


def training_objective(
    problem: Any,
    layout: ParamLayout,
    tasks: Tasks,
    *,
    l2: float = 0.0,
    task_weights: Tensor | None = None,
    support_weights: Tensor | None = None,
    query_weights: Tensor | None = None,
) -> Callable[[Tensor], Tensor]:
    """``F`` as a function of the flat parameter vector (a pure function, ``torch.func``-transformable).

    ``support_weights`` ``[M, S]`` / ``query_weights`` ``[M, Q]`` need a :class:`TaskBatch`; a plain sequence
    of tasks is summed in a Python loop.
    """
    num_tasks = len(tasks)
    weighted = support_weights is not None or query_weights is not None
    if isinstance(tasks, TaskBatch):
        data = task_tensors(tasks)
        if weighted:
            sw = support_weights
            qw = query_weights
            if sw is None:
                sw = torch.ones(tasks.support_x.shape[:2], dtype=tasks.support_x.dtype)
            if qw is None:
                qw = torch.ones(tasks.query_x.shape[:2], dtype=tasks.query_x.dtype)

            def one(params: Params, sw_k: Tensor, qw_k: Tensor, sx, sy, qx, qy) -> Tensor:
                return problem.task_loss(params, Task(sx, sy, qx, qy), sw_k, qw_k)

            losses_fn = vmap(one, in_dims=(None, 0, 0, 0, 0, 0, 0))

            def losses(params: Params) -> Tensor:
                return losses_fn(params, sw, qw, *data)
        else:
            batched = vmap(batched_task_loss(problem), in_dims=(None, 0, 0, 0, 0))

            def losses(params: Params) -> Tensor:
                return batched(params, *data)
    else:
        if weighted:
            raise ValueError("Per-sample weights need the tasks as a TaskBatch.")
        task_list = list(tasks)

        def losses(params: Params) -> Tensor:
            return torch.stack([problem.task_loss(params, t) for t in task_list])

    def objective(flat: Tensor) -> Tensor:
        values = losses(layout.unflatten(flat))
        if task_weights is not None:
            values = values * task_weights
        return values.sum() / num_tasks + 0.5 * l2 * (flat**2).sum()

    return objective


def newton_minimize(
    objective: Callable[[Tensor], Tensor],
    x0: Tensor,
    *,
    tol: float = 1e-10,
    max_iter: int = 100,
    min_curvature: float = 1e-6,
    final_eigenvalue: bool = True,
) -> tuple[Tensor, float, int, bool, float]:
    """Damped Newton with an eigenvalue shift and backtracking; returns ``(x, grad_norm, iters, converged, λ_min)``.

    ``λ_min`` is the smallest Hessian eigenvalue at the returned point when ``final_eigenvalue`` (one more
    Hessian), else at the last Newton step.

    Example:
        >>> import torch
        >>> x0 = torch.zeros(3, dtype=torch.float64)
        >>> x, g, _, ok, _ = newton_minimize(lambda x: ((x - 1.0) ** 4).sum() + (x**2).sum(), x0)
        >>> ok, round(float(x[0]), 6)
        (True, 0.410245)
    """
    value_and_grad = torch.func.grad_and_value(objective)
    hess_fn = torch.func.jacrev(torch.func.jacrev(objective))
    x = x0.detach().clone()
    g, f0 = value_and_grad(x)
    min_eig = float("nan")
    for iteration in range(max_iter + 1):
        grad_norm = float(g.norm())
        if grad_norm <= tol:
            if final_eigenvalue:
                hessian = hess_fn(x)
                min_eig = float(torch.linalg.eigvalsh(0.5 * (hessian + hessian.T)).min())
            return x, grad_norm, iteration, True, min_eig
        if iteration == max_iter:
            break
        hessian = hess_fn(x)
        eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (hessian + hessian.T))
        min_eig = float(eigenvalues.min())
        shift = max(0.0, min_curvature - min_eig)
        step = eigenvectors @ ((eigenvectors.T @ g) / (eigenvalues + shift))
        slope = float(g @ step)
        t = 1.0
        while True:
            candidate = x - t * step
            g1, f1 = value_and_grad(candidate)
            sufficient = float(f1) <= float(f0) - 1e-4 * t * slope
            # Near the optimum the decrease falls below float resolution: accept a step that keeps F
            # (to rounding) and reduces the gradient.
            flat_but_better = (
                float(f1) <= float(f0) + 1e-12 * max(1.0, abs(float(f0))) and float(g1.norm()) < grad_norm
            )
            if sufficient or flat_but_better or t < 1e-12:
                break
            t *= 0.5
        if t < 1e-12:
            break
        x, g, f0 = candidate, g1, f1
    return x, float(g.norm()), iteration, False, min_eig


def train_to_convergence(
    problem: Any,
    params: Params,
    tasks: Tasks,
    *,
    l2: float = 0.0,
    task_weights: Tensor | Sequence[float] | None = None,
    support_weights: Tensor | None = None,
    query_weights: Tensor | None = None,
    tol: float = 1e-10,
    max_iter: int = 100,
    final_eigenvalue: bool = True,
) -> TrainResult:
    """Minimise ``F`` from ``params`` with damped Newton (use float64 and a few hundred parameters at most).

    Example:
        >>> import torch
        >>> class Quadratic:
        ...     def task_loss(self, params, task, support_weights=None, query_weights=None):
        ...         return 0.5 * ((params["w"] - task.query_x.mean(0)) ** 2).sum()
        >>> tasks = TaskBatch(torch.zeros(2, 1, 2), torch.zeros(2, 1), torch.ones(2, 1, 2),
        ...                   torch.zeros(2, 1), torch.arange(2))
        >>> out = train_to_convergence(Quadratic(), {"w": torch.zeros(2, requires_grad=True)}, tasks, l2=1.0)
        >>> out.converged, out.params["w"].tolist()
        (True, [0.5, 0.5])
    """
    check_problem(problem)
    start = time.perf_counter()
    params = trainable(params)
    layout = ParamLayout.of(params)
    weights = None if task_weights is None else torch.as_tensor(task_weights, dtype=layout_dtype(params))
    objective = training_objective(
        problem,
        layout,
        tasks,
        l2=l2,
        task_weights=weights,
        support_weights=support_weights,
        query_weights=query_weights,
    )
    x0 = layout.flatten(detached(params))
    x, grad_norm, iterations, converged, min_eig = newton_minimize(
        objective, x0, tol=tol, max_iter=max_iter, final_eigenvalue=final_eigenvalue
    )
    out = {k: v.requires_grad_(True) for k, v in layout.unflatten(x.detach()).items()}
    return TrainResult(
        params=out,
        objective=float(objective(x)),
        grad_norm=grad_norm,
        iterations=iterations,
        converged=converged,
        min_eigenvalue=min_eig,
        seconds=time.perf_counter() - start,
    )


def layout_dtype(params: Params) -> torch.dtype:
    return next(iter(params.values())).dtype


def reference_value(
    problem: Any, params: Params, reference_tasks: Tasks | None = None, *, utility: Utility | None = None
) -> float:
    """``f(λ)``: ``utility(params)`` or the mean task loss over ``reference_tasks`` (no gradients)."""
    if (utility is None) == (reference_tasks is None):
        raise ValueError("Give exactly one reference: `reference_tasks` or `utility`.")
    leaves = trainable(params)  # some problems differentiate the inner loss with torch.autograd
    if utility is not None:
        return float(utility(leaves).detach())
    if isinstance(reference_tasks, TaskBatch):
        batched = vmap(batched_task_loss(problem), in_dims=(None, 0, 0, 0, 0))
        return float(batched(detached(leaves), *task_tensors(reference_tasks)).mean().detach())
    values = [float(problem.task_loss(leaves, t).detach()) for t in reference_tasks]
    return sum(values) / len(values)


def leave_one_task_out(
    problem: Any,
    params: Params,
    tasks: Tasks,
    reference_tasks: Tasks | None = None,
    *,
    utility: Utility | None = None,
    l2: float = 0.0,
    task_ids: Sequence[int] | Tensor | None = None,
    remove: Sequence[int] | None = None,
    tol: float = 1e-10,
    max_iter: int = 100,
) -> TaskRetrainResult:
    """Retrain without each task (``w_k = 0``, warm start from ``λ*``) and measure ``f(λ*_{-k}) − f(λ*)``.

    ``params`` is first refined to ``λ*`` (cheap when it is converged already). ``remove`` limits the
    removals to some task ids (default: every task). ``param_changes[i]`` is ``λ*_{-k} − λ*`` (flat).
    """
    start = time.perf_counter()
    ids = resolve_task_ids(tasks, task_ids)
    base = train_to_convergence(problem, params, tasks, l2=l2, tol=tol, max_iter=max_iter)
    if not base.converged:
        raise ValueError(
            f"Training did not converge (grad norm {base.grad_norm:.2e}); raise max_iter or l2 before retraining."
        )
    f_star = reference_value(problem, base.params, reference_tasks, utility=utility)
    layout = ParamLayout.of(base.params)
    x_star = layout.flatten(detached(base.params))
    remove_ids = ids.tolist() if remove is None else [int(k) for k in remove]
    position = {int(k): i for i, k in enumerate(ids.tolist())}
    unknown = [k for k in remove_ids if k not in position]
    if unknown:
        raise ValueError(f"Task ids {unknown[:10]} are not in the pool.")
    deltas, changes, iterations, grad_norms = [], [], [], []
    for k in remove_ids:
        weights = torch.ones(len(tasks), dtype=x_star.dtype)
        weights[position[k]] = 0.0
        out = train_to_convergence(
            problem,
            base.params,
            tasks,
            l2=l2,
            task_weights=weights,
            tol=tol,
            max_iter=max_iter,
            final_eigenvalue=False,
        )
        deltas.append(reference_value(problem, out.params, reference_tasks, utility=utility) - f_star)
        changes.append(layout.flatten(detached(out.params)) - x_star)
        iterations.append(out.iterations)
        grad_norms.append(out.grad_norm)
    return TaskRetrainResult(
        task_ids=torch.tensor(remove_ids, dtype=torch.long),
        deltas=torch.tensor(deltas, dtype=x_star.dtype),
        param_changes=torch.stack(changes),
        reference_value=f_star,
        base=base,
        iterations=iterations,
        grad_norms=grad_norms,
        seconds=time.perf_counter() - start,
    )


def leave_one_sample_out(
    problem: Any,
    params: Params,
    tasks: TaskBatch,
    reference_tasks: Tasks | None = None,
    *,
    utility: Utility | None = None,
    l2: float = 0.0,
    positions: Sequence[int] | None = None,
    parts: Sequence[str] = ("support", "query"),
    tol: float = 1e-10,
    max_iter: int = 100,
) -> SampleRetrainResult:
    """Retrain with one sample weight ``u_z = 0`` at a time; ``deltas = f(λ*_{-z}) − f(λ*)``.

    ``positions`` are task positions in ``tasks`` whose samples are removed one by one (default: all, which
    is ``M (S + Q)`` retrainings: keep it small). Entries of tasks not in ``positions`` stay NaN.
    """
    if not isinstance(tasks, TaskBatch):
        raise ValueError("leave_one_sample_out needs the tasks as a TaskBatch (per-sample weight tensors).")
    bad = [p for p in parts if p not in ("support", "query")]
    if bad:
        raise ValueError(f"parts must be drawn from ('support', 'query'), got {bad}.")
    start = time.perf_counter()
    base = train_to_convergence(problem, params, tasks, l2=l2, tol=tol, max_iter=max_iter)
    if not base.converged:
        raise ValueError(
            f"Training did not converge (grad norm {base.grad_norm:.2e}); raise max_iter or l2 before retraining."
        )
    f_star = reference_value(problem, base.params, reference_tasks, utility=utility)
    dtype = layout_dtype(base.params)
    shapes = {"support": tasks.support_x.shape[:2], "query": tasks.query_x.shape[:2]}
    deltas = {part: torch.full(shapes[part], float("nan"), dtype=dtype) for part in ("support", "query")}
    worst = 0.0
    for position in range(len(tasks)) if positions is None else positions:
        for part in parts:
            for index in range(shapes[part][1]):
                weights = torch.ones(shapes[part], dtype=dtype)
                weights[position, index] = 0.0
                kwargs = {"support_weights" if part == "support" else "query_weights": weights}
                out = train_to_convergence(
                    problem,
                    base.params,
                    tasks,
                    l2=l2,
                    tol=tol,
                    max_iter=max_iter,
                    final_eigenvalue=False,
                    **kwargs,
                )
                worst = max(worst, out.grad_norm)
                value = reference_value(problem, out.params, reference_tasks, utility=utility)
                deltas[part][position, index] = value - f_star
    return SampleRetrainResult(
        task_ids=tasks.task_ids.clone(),
        support_deltas=deltas["support"],
        query_deltas=deltas["query"],
        reference_value=f_star,
        base=base,
        max_grad_norm=worst,
        seconds=time.perf_counter() - start,
    )
