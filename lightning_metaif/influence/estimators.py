"""Task influence: task-IF, direct-IF, TracInCP, the inner-product ensemble, self-influence (docs/maths.md §3, §5).

Every estimator returns an :class:`InfluenceResult` whose ``scores`` follow the project's one convention:
``score_k`` is the first-order predicted *increase* of the reference objective ``f`` if task k were removed
(positive = the task helps, negative = it harms; pruning removes the lowest scores).

* ``task_if``: ``score_k = (w_k / M) ∇f(λ)ᵀ (H + δI)^{-1} g_k`` with the total Hessian ``H`` of
  ``F(λ) = (1/M) Σ w_k ℓ_k + (l2/2)‖λ‖²`` and total task gradients ``g_k``; one solve ``s = (H + δI)^{-1} ∇f``.
* ``direct_if``: the same formula through a :class:`DirectProblem` view in which the adapted parameters are
  treated as independent of ``λ`` (first-order MAML gradients, the direct Hessian): Ren et al.'s baseline.
* ``tracin``: TracInCP ``Σ_c η_c ∇f(λ_c)ᵀ P_c g_k(λ_c)`` over :class:`Checkpoint` s (``checkpoints=None``: the
  inner-product influence at ``params``, ``η = 1``).
* ``ensemble``: Yang et al.'s average of inner-product scores over checkpoints and/or Gaussian-perturbed copies.
* ``self``: self-influence ``g_kᵀ (H + δI)^{-1} g_k`` without a reference set. High self-influence flags
  unusual or mislabelled tasks, so to keep "lowest score = most suspicious" the ``scores`` are the
  *negated* self-influence; the positive values are in ``self_influence``.

The result record lives in :mod:`~lightning_metaif.influence.results`, the damped curvature and its solves in
:mod:`~lightning_metaif.influence.curvature`, the shared argument checks in
:mod:`~lightning_metaif.influence.arguments`; their public names are re-exported here.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_metaif.influence.arguments import (
    DEFAULT_DAMPING,
    ESTIMATORS,
    check_common,
    check_reference,
    task_weight_vector,
)
from lightning_metaif.influence.curvature import Curvature, DampedCurvature, Damping, solve_diagnostics
from lightning_metaif.influence.gradients import (
    Utility,
    Vectorize,
    per_task_gradients,
    reference_gradient,
)
from lightning_metaif.influence.problem import ParamLayout, Params, check_problem, trainable
from lightning_metaif.influence.results import InfluenceResult
from lightning_metaif.influence.solvers import SolveResult
from lightning_metaif.influence.tasks import Tasks, resolve_task_ids, select_tasks
from lightning_metaif.influence.tracin import Checkpoint, Projection, point_scores


class DirectProblem:
    """A view of ``problem`` whose derivatives ignore the adaptation's dependence on ``λ`` (direct-IF).

    ``task_loss(λ) = outer_loss(λ + stop_grad(adapt(λ) − λ), λ, task)``: the value is unchanged, the gradient is
    the direct (first-order MAML) gradient and the Hessian is the direct Hessian ``∇²_θ L_O`` at the adapted
    point. Needs ``adapt`` and ``outer_loss`` on the problem.
    """

    def __init__(self, problem: Any) -> None:
        check_problem(problem)
        if not (callable(getattr(problem, "adapt", None)) and callable(getattr(problem, "outer_loss", None))):
            raise ValueError(
                f"direct-IF needs `adapt(params, task, support_weights=None)` and `outer_loss(adapted, params, "
                f"task, query_weights=None)` on the problem; {type(problem).__name__} has only `task_loss`. "
                "Use estimator='task_if' or 'tracin', or expose the two halves of task_loss."
            )
        self.problem = problem

    def adapt(self, params: Params, task: Any, support_weights: Tensor | None = None) -> Params:
        adapted = self.problem.adapt(params, task, support_weights=support_weights)
        return {
            k: (params[k] + (v - params[k]).detach()) if k in params else v.detach()
            for k, v in adapted.items()
        }

    def outer_loss(
        self, adapted: Params, params: Params, task: Any, query_weights: Tensor | None = None
    ) -> Tensor:
        return self.problem.outer_loss(adapted, params, task, query_weights=query_weights)

    def task_loss(
        self,
        params: Params,
        task: Any,
        support_weights: Tensor | None = None,
        query_weights: Tensor | None = None,
    ) -> Tensor:
        return self.outer_loss(self.adapt(params, task, support_weights), params, task, query_weights)


# --- shared machinery ------------------------------------------------------------------------------------


def _noisy(params: Params, std: float, generator: torch.Generator) -> Params:
    out = {}
    for name, value in params.items():
        noise = torch.randn(value.shape, generator=generator, dtype=value.dtype)
        out[name] = (value.detach() + std * noise.to(value.device)).requires_grad_(True)
    return out


# --- task influence --------------------------------------------------------------------------------------


def task_influence(
    problem: Any,
    params: Params,
    train_tasks: Tasks,
    reference_tasks: Tasks | None = None,
    *,
    task_ids: Sequence[int] | Tensor | None = None,
    estimator: str = "task_if",
    solver: str = "cg",
    damping: Damping = "auto",
    l2: float = 0.0,
    utility: Utility | None = None,
    task_weights: Tensor | Sequence[float] | None = None,
    curvature: Curvature = "auto",
    solver_options: dict[str, Any] | None = None,
    chunk_size: int = 16,
    vectorize: Vectorize = "auto",
    checkpoints: Sequence[Checkpoint] | None = None,
    noise_copies: int = 0,
    noise_std: float = 0.01,
    seed: int = 0,
    projection: Projection | None = None,
    with_self_influence: bool = False,
) -> InfluenceResult:
    """Score every training task: the predicted increase of ``f`` if the task were removed (positive = helps).

    Args:
        problem: object with ``task_loss(params, task, support_weights=None, query_weights=None)``
            (``direct_if`` also needs ``adapt`` / ``outer_loss``).
        params: meta-parameters ``λ*`` (those requiring grad are attributed), ideally at a (local) optimum of
            ``F(λ) = (1/M) Σ w_k ℓ_k + (l2/2)‖λ‖²``.
        train_tasks: the pool of M training tasks (a ``TaskBatch`` is vmapped; a sequence is looped).
        reference_tasks: held-out tasks; ``f`` is their mean query loss (each adapted from ``λ``).
        task_ids: ids for a plain sequence of tasks without ``task_id`` attributes.
        estimator: one of ``"task_if"``, ``"direct_if"``, ``"tracin"``, ``"ensemble"``, ``"self"``.
        solver: inverse-HVP method for ``task_if`` / ``direct_if`` / ``self``: ``"identity"``, ``"dense"``,
            ``"cg"``, ``"lissa"``, ``"arnoldi"`` (``solver_options`` are passed on to it).
        damping: ``δ ≥ 0`` in ``(H + δI)``, or ``"auto"`` (default): a fraction
            (:data:`~lightning_metaif.influence.curvature.AUTO_DAMPING_FRACTION`) of the curvature's mean
            eigenvalue, estimated from seeded probes (``seed``); the chosen ``δ`` is in the diagnostics.
        l2: the L2 coefficient of the training objective (part of ``H``; not of ``g_k``).
        utility: a differentiable ``params -> scalar`` used as ``f`` instead of ``reference_tasks``.
        task_weights: ``w_k`` of the training objective (scales ``H`` and each task's score).
        curvature: ``"gauss_newton"`` (``Jᵀ H_ℓ J`` through the adaptation: PSD, needs ``query_outputs`` and
            ``output_loss`` on the problem), ``"exact"`` total Hessian, Ren et al.'s ``"gamma"`` surrogate, or
            ``"auto"`` (default): Gauss–Newton when the problem exposes it, else exact.
        chunk_size, vectorize: passed to the gradient / Hessian engine.
        checkpoints: :class:`Checkpoint` s for ``tracin`` / ``ensemble`` (default: ``params`` with ``η = 1``).
        noise_copies, noise_std, seed: ``ensemble`` members ``λ + N(0, noise_std²)`` per base point (seeded);
            ``seed`` also seeds the probes of ``damping="auto"``.
        projection: callable ``[n, p] -> [n, d]`` applied to task and reference gradients (only with the
            identity: ``tracin``, ``ensemble``, or ``solver="identity"``).
        with_self_influence: also return ``self_influence``. Cheap for identity / projection / ``tracin`` /
            ``ensemble``, ``solver="dense"`` (one eigendecomposition) and ``"arnoldi"`` (one factorisation);
            ``"cg"`` / ``"lissa"`` solve every task's system together (block solves of 64 tasks, one batched
            product per step), never one solve per task.

    Returns:
        :class:`InfluenceResult` with ``diagnostics`` (solver iterations, residual, damping, seconds,
        reference value, number of parameters, ...).

    Example:
        >>> import torch
        >>> from lightning_metaif.influence.tasks import TaskBatch
        >>> class Quadratic:  # ℓ_k(λ) = ‖λ − x_k‖²/2
        ...     def task_loss(self, params, task, support_weights=None, query_weights=None):
        ...         return 0.5 * ((params["w"] - task.query_x.mean(0)) ** 2).sum()
        >>> train = TaskBatch(torch.zeros(3, 1, 1), torch.zeros(3, 1), torch.tensor([[[1.0]], [[2.0]], [[-3.0]]]),
        ...                   torch.zeros(3, 1), torch.arange(3))
        >>> ref = TaskBatch(torch.zeros(1, 1, 1), torch.zeros(1, 1), torch.tensor([[[1.0]]]), torch.zeros(1, 1),
        ...                 torch.tensor([9]))
        >>> lam = {"w": torch.zeros(1, requires_grad=True)}  # the optimum of the mean loss
        >>> result = task_influence(Quadratic(), lam, train, ref, solver="dense", damping=0.0)
        >>> [round(s, 4) for s in result.scores.tolist()]  # tasks pulling w towards 1 help
        [0.3333, 0.6667, -1.0]
    """
    check_common(estimator, solver, damping)
    check_problem(problem)
    check_reference(reference_tasks, utility, estimator != "self", estimator)
    if noise_copies < 0 or noise_std < 0:
        raise ValueError("noise_copies and noise_std must be >= 0.")
    if noise_copies and estimator != "ensemble":
        raise ValueError("noise_copies only applies to estimator='ensemble'.")
    if checkpoints is not None and estimator not in ("tracin", "ensemble", "self"):
        raise ValueError(
            "checkpoints only apply to estimator='tracin', 'ensemble' or 'self' (with solver='identity')."
        )
    if checkpoints is not None and len(checkpoints) == 0:
        raise ValueError("checkpoints is empty: pass at least one Checkpoint, or None to use `params`.")
    if checkpoints is not None and estimator == "self" and solver != "identity":
        raise ValueError("estimator='self' with checkpoints is TracIn self-influence: use solver='identity'.")
    uses_identity = estimator in ("tracin", "ensemble") or solver == "identity"
    if projection is not None and not uses_identity:
        raise ValueError(
            "A projection only preserves inner products, not inverse-Hessian products: use it with "
            "estimator='tracin'/'ensemble', or solver='identity'."
        )
    start = time.perf_counter()
    params = trainable(params)
    ids = resolve_task_ids(train_tasks, task_ids)
    num_tasks = len(ids)
    like = next(iter(params.values()))
    weights = task_weight_vector(task_weights, num_tasks, like)
    engine = {"chunk_size": chunk_size, "vectorize": vectorize}
    diagnostics: dict[str, Any] = {
        "estimator": estimator,
        "num_tasks": num_tasks,
        "num_params": ParamLayout.of(params).numel,
        "l2": l2,
        "damping": damping,
    }
    self_influence = None

    if estimator in ("tracin", "ensemble") or (estimator == "self" and checkpoints is not None):
        scores, self_influence, extra = _checkpoint_scores(
            problem,
            params,
            train_tasks,
            reference_tasks,
            utility=utility,
            ids=ids,
            estimator=estimator,
            checkpoints=checkpoints,
            noise_copies=noise_copies,
            noise_std=noise_std,
            seed=seed,
            projection=projection,
            engine=engine,
        )
        diagnostics.update(extra, solver="identity")
        scores = scores * weights.to(scores)
        self_influence = self_influence * weights.to(scores)
        if estimator == "self":
            scores = -self_influence
        elif not with_self_influence:
            self_influence = None
    else:
        target = DirectProblem(problem) if estimator == "direct_if" else problem
        identity_projection = projection if solver == "identity" else None
        t0 = time.perf_counter()
        curv = DampedCurvature(
            target,
            params,
            train_tasks,
            solver=solver,
            damping=damping,
            solver_options=solver_options,
            seed=seed,
            task_weights=weights,
            l2=l2,
            curvature=curvature,
            **engine,
        )
        diagnostics.update(
            curvature=curv.curvature,
            damping=curv.damping,
            **curv.damping_info,
            curvature_seconds=time.perf_counter() - t0,
        )
        result = None
        if estimator != "self":
            ref_grad, ref_value = reference_gradient(
                target, params, reference_tasks, utility=utility, **engine
            )
            diagnostics.update(reference_value=float(ref_value), reference_grad_norm=float(ref_grad.norm()))
            t0 = time.perf_counter()
            if identity_projection is not None:
                ref_grad = identity_projection(ref_grad[None])[0]
                result = SolveResult(ref_grad, "identity", curv.damping, 0, float("nan"), True)
            else:
                result = curv.solve(ref_grad)
            diagnostics.update(solve_diagnostics(result), solve_seconds=time.perf_counter() - t0)
        # With one solve and no self-influence, each chunk of task gradients is reduced to its dot products with
        # s as it is computed: memory O(chunk × p), not O(M × p).
        stream = result is not None and not with_self_influence
        transform = identity_projection
        if stream:
            direction = result.solution

            def transform(rows: Tensor) -> Tensor:
                rows = identity_projection(rows) if identity_projection is not None else rows
                return rows @ direction[:, None].to(rows)

        t0 = time.perf_counter()
        grads, losses = per_task_gradients(
            target, params, train_tasks, task_ids=ids, transform=transform, **engine
        )
        diagnostics["gradient_seconds"] = time.perf_counter() - t0
        diagnostics["mean_task_loss"] = float(losses.mean())
        if result is None:
            t0 = time.perf_counter()
            self_influence = curv.quadratic_forms(grads) * weights
            scores = -self_influence
            diagnostics.update(solver=solver, solve_seconds=time.perf_counter() - t0)
        else:
            dots = grads[:, 0] if stream else grads @ result.solution
            scores = weights * dots / num_tasks
            if with_self_influence:
                self_influence = curv.quadratic_forms(grads) * weights
        diagnostics["hessian_products"] = curv.products
    diagnostics["seconds"] = time.perf_counter() - start
    return InfluenceResult(ids, scores, self_influence, estimator, diagnostics)


def _checkpoint_scores(
    problem: Any,
    params: Params,
    train_tasks: Tasks,
    reference_tasks: Tasks | None,
    *,
    utility: Utility | None,
    ids: Tensor,
    estimator: str,
    checkpoints: Sequence[Checkpoint] | None,
    noise_copies: int,
    noise_std: float,
    seed: int,
    projection: Projection | None,
    engine: dict[str, Any],
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """TracInCP (``η``-weighted sum), the ensemble (plain mean of IP scores) or TracIn self-influence."""
    bases = list(checkpoints) if checkpoints is not None else [Checkpoint(params, 1.0)]
    generator = torch.Generator().manual_seed(seed)
    need_reference = estimator != "self"
    member_scores, member_self, values = [], [], []
    for base in bases:
        if not isinstance(base, Checkpoint):
            raise ValueError(f"checkpoints must hold Checkpoint objects, got {type(base).__name__}.")
        points = [trainable(base.params)]
        points += [_noisy(points[0], noise_std, generator) for _ in range(noise_copies)]
        for point in points:
            out = point_scores(
                problem,
                point,
                train_tasks,
                reference_tasks,
                utility=utility,
                task_ids=ids,
                preconditioner=base.preconditioner,
                projection=projection,
                need_reference=need_reference,
                **engine,
            )
            scale = 1.0 if estimator == "ensemble" else float(base.learning_rate)
            member_self.append(scale * out["self"])
            if need_reference:
                member_scores.append(scale * out["dots"])
                values.append(out["reference_value"])
    self_stack = torch.stack(member_self)
    extra: dict[str, Any] = {"num_members": len(member_self), "num_checkpoints": len(bases)}
    if need_reference:
        stack = torch.stack(member_scores)
        extra["reference_value"] = values[-1] if checkpoints is None else values
        if estimator == "ensemble":
            spread = stack.std(0, unbiased=True) if len(stack) > 1 else torch.zeros_like(stack[0])
            extra.update(member_std=spread, mean_member_std=float(spread.mean()), noise_std=noise_std)
            return stack.mean(0), self_stack.mean(0), extra
        return stack.sum(0), self_stack.sum(0), extra
    return torch.zeros_like(self_stack[0]), self_stack.sum(0), extra


def tracin_scores(
    problem: Any,
    checkpoints: Sequence[Checkpoint],
    train_tasks: Tasks,
    reference_tasks: Tasks | None = None,
    **kwargs: Any,
) -> InfluenceResult:
    """TracInCP over ``checkpoints``: ``task_influence(..., estimator="tracin", checkpoints=checkpoints)``."""
    if not checkpoints:
        raise ValueError("tracin_scores needs at least one Checkpoint.")
    return task_influence(
        problem,
        checkpoints[-1].params,
        train_tasks,
        reference_tasks,
        estimator="tracin",
        checkpoints=checkpoints,
        **kwargs,
    )


# --- parameter change ------------------------------------------------------------------------------------


def parameter_change(
    problem: Any,
    params: Params,
    train_tasks: Tasks,
    task_ids_to_remove: Sequence[int] | Tensor,
    *,
    task_ids: Sequence[int] | Tensor | None = None,
    solver: str = "cg",
    damping: Damping = "auto",
    l2: float = 0.0,
    task_weights: Tensor | Sequence[float] | None = None,
    curvature: Curvature = "auto",
    solver_options: dict[str, Any] | None = None,
    chunk_size: int = 16,
    vectorize: Vectorize = "auto",
) -> dict[str, Tensor]:
    """Predicted ``λ*_{-R} − λ* ≈ (1/M) (H + δI)^{-1} Σ_{k∈R} w_k g_k`` for removing the tasks R (no retraining).

    Add the returned dict to the parameters to "edit" the model as if R had never been trained on.

    Example:
        >>> import torch
        >>> from lightning_metaif.influence.tasks import TaskBatch
        >>> class Quadratic:
        ...     def task_loss(self, params, task, support_weights=None, query_weights=None):
        ...         return 0.5 * ((params["w"] - task.query_x.mean(0)) ** 2).sum()
        >>> train = TaskBatch(torch.zeros(2, 1, 1), torch.zeros(2, 1), torch.tensor([[[1.0]], [[-1.0]]]),
        ...                   torch.zeros(2, 1), torch.tensor([5, 6]))
        >>> delta = parameter_change(Quadratic(), {"w": torch.zeros(1, requires_grad=True)}, train, [6],
        ...                          solver="dense", damping=0.0)
        >>> delta["w"].tolist()  # first order; retraining on task 5 alone gives 1.0
        [0.5]
    """
    check_common("task_if", solver, damping)
    check_problem(problem)
    params = trainable(params)
    ids = resolve_task_ids(train_tasks, task_ids)
    remove = torch.as_tensor(task_ids_to_remove, dtype=torch.long).reshape(-1).cpu()
    position = {int(k): i for i, k in enumerate(ids.tolist())}
    unknown = [int(k) for k in remove.tolist() if int(k) not in position]
    if unknown or remove.numel() == 0:
        raise ValueError(f"task_ids_to_remove must be ids of the pool; unknown or empty: {unknown[:10]}.")
    like = next(iter(params.values()))
    weights = task_weight_vector(task_weights, len(ids), like)
    index = torch.tensor([position[int(k)] for k in remove.tolist()], dtype=torch.long)
    engine = {"chunk_size": chunk_size, "vectorize": vectorize}
    grads, _ = per_task_gradients(
        problem, params, select_tasks(train_tasks, index), task_ids=ids[index], **engine
    )
    rhs = (weights[index.to(weights.device)][:, None] * grads).sum(0)
    curv = DampedCurvature(
        problem,
        params,
        train_tasks,
        solver=solver,
        damping=damping,
        solver_options=solver_options,
        task_weights=weights,
        l2=l2,
        curvature=curvature,
        **engine,
    )
    change = curv.solve(rhs).solution / len(ids)
    return {k: v.detach() for k, v in ParamLayout.of(params).unflatten(change).items()}


__all__ = [
    "DEFAULT_DAMPING",
    "ESTIMATORS",
    "Checkpoint",
    "DampedCurvature",
    "DirectProblem",
    "InfluenceResult",
    "parameter_change",
    "task_influence",
    "tracin_scores",
]
