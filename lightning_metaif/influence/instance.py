"""Instance influence (instance-IF, docs/maths.md §4): scores of every support and query sample of every task.

With ``s = (H + δI)^{-1} ∇f`` (one solve shared by all tasks) and per-sample weights ``u`` of task k,

    score_z = (w_k / M) ∂/∂u_z [ sᵀ g_k(λ, u) ]   at u = 1,

the predicted increase of ``f`` if sample z were removed (``u_z: 1 → 0``) and the model retrained; positive =
helpful. One backward of the scalar ``sᵀ g_k`` (a forward-mode directional derivative of ``task_loss``) with
respect to the weights scores all samples of a task at once. Query weights enter ``task_loss`` linearly, so
a task's query scores sum to its task-IF score.

:func:`query_losses` is the query side's own signal: each query sample's loss after adaptation,
``Q · ∂ task_loss / ∂u_z`` (query weights enter linearly), from the same problem contract. A mislabelled query
sample is one the adapted model cannot fit; this finds flipped query labels far better than instance-IF,
whose query scores measure the effect on the *reference* tasks (``benchmarks/bench_detection.py``).
:func:`query_label_outliers` compares each of those losses with the other query samples of its task that carry
the same label: the adapted model fits some classes of an episode worse than others (a 1-shot support example
can be a poor one), which raises every query loss of that class; a flipped label stands out against its
class-mates instead.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from lightning_metaif.influence.arguments import (
    check_common,
    check_reference,
    task_weight_vector,
)
from lightning_metaif.influence.curvature import Curvature, DampedCurvature, Damping, solve_diagnostics
from lightning_metaif.influence.gradients import Utility, Vectorize, reference_gradient, use_vmap
from lightning_metaif.influence.problem import ParamLayout, Params, check_problem, detached, trainable
from lightning_metaif.influence.results import jsonable
from lightning_metaif.influence.tasks import Task, TaskBatch, Tasks, iter_chunks, resolve_task_ids

Scores = Tensor | list[Tensor]


@dataclass
class InstanceInfluenceResult:
    """Per-sample scores: ``support_scores[i][j]`` is support sample j of task ``task_ids[i]``.

    ``support_scores`` / ``query_scores`` are ``[M, S]`` / ``[M, Q]`` tensors, or lists of 1-D tensors when the
    tasks have different sizes.
    """

    task_ids: Tensor
    support_scores: Scores
    query_scores: Scores
    estimator: str = "instance_if"
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.task_ids.numel())

    def task_scores(self) -> Tensor:
        """Sum of each task's query scores: equals its task-IF score (query weights enter linearly)."""
        return torch.stack([torch.as_tensor(q).sum() for q in self.query_scores])

    def ranking(self, part: str = "both") -> list[tuple[int, str, int]]:
        """``(task_id, "support"|"query", index)`` from most harmful to most helpful sample."""
        if part not in ("both", "support", "query"):
            raise ValueError(f"part must be 'both', 'support' or 'query', got {part!r}.")
        rows = []
        for name, table in (("support", self.support_scores), ("query", self.query_scores)):
            if part not in ("both", name):
                continue
            for task_id, values in zip(self.task_ids.tolist(), table):
                rows += [
                    (float(v), int(task_id), name, j) for j, v in enumerate(torch.as_tensor(values).tolist())
                ]
        rows.sort(key=lambda r: r[0])
        return [r[1:] for r in rows]

    def to_dict(self) -> dict[str, Any]:
        return {
            "estimator": self.estimator,
            "task_ids": self.task_ids.tolist(),
            "support_scores": jsonable(list(self.support_scores)),
            "query_scores": jsonable(list(self.query_scores)),
            "diagnostics": jsonable(self.diagnostics),
        }


def _sample_counts(task: Any) -> tuple[int, int]:
    try:
        return int(task.support_x.shape[0]), int(task.query_x.shape[0])
    except AttributeError as error:
        raise ValueError(
            "instance_influence needs tasks with `support_x` and `query_x` (one row per sample) to know how many "
            f"per-sample weights to create; got {type(task).__name__}."
        ) from error


def instance_influence(
    problem: Any,
    params: Params,
    train_tasks: Tasks,
    reference_tasks: Tasks | None = None,
    *,
    task_ids: Sequence[int] | Tensor | None = None,
    solver: str = "cg",
    damping: Damping = "auto",
    l2: float = 0.0,
    utility: Utility | None = None,
    task_weights: Tensor | Sequence[float] | None = None,
    curvature: Curvature = "auto",
    solver_options: dict[str, Any] | None = None,
    chunk_size: int = 16,
    vectorize: Vectorize = "auto",
) -> InstanceInfluenceResult:
    """Score every support and query sample of every training task (positive = the sample helps ``f``).

    The problem's ``task_loss`` must honour ``support_weights`` / ``query_weights`` (each sample's loss times
    its weight); arguments are as in :func:`~lightning_metaif.influence.estimators.task_influence`. A
    ``TaskBatch`` is vmapped in chunks (forward-over-reverse, then reverse w.r.t. the weights); a sequence of
    tasks is looped with ``torch.autograd`` (and may have different sizes per task).

    Example:
        >>> import torch
        >>> from lightning_metaif.influence.tasks import TaskBatch
        >>> class Mean:  # no adaptation, ℓ = mean_z u_z (λ − y_z)² / 2
        ...     def task_loss(self, params, task, support_weights=None, query_weights=None):
        ...         losses = 0.5 * (params["w"] - task.query_y) ** 2  # [Q]
        ...         w = torch.ones_like(losses) if query_weights is None else query_weights
        ...         return (w * losses).sum() / losses.shape[0]
        >>> train = TaskBatch(torch.zeros(1, 1, 1), torch.zeros(1, 1), torch.zeros(1, 2, 1),
        ...                   torch.tensor([[1.0, -1.0]]), torch.tensor([0]))
        >>> ref = TaskBatch(torch.zeros(1, 1, 1), torch.zeros(1, 1), torch.zeros(1, 1, 1), torch.tensor([[1.0]]),
        ...                 torch.tensor([1]))
        >>> out = instance_influence(Mean(), {"w": torch.zeros(1, requires_grad=True)}, train, ref,
        ...                          solver="dense", damping=0.0)
        >>> out.query_scores.tolist()  # the sample at y=1 helps the reference (y=1), the other harms it
        [[0.5, -0.5]]
    """
    check_common("task_if", solver, damping)
    check_problem(problem)
    check_reference(reference_tasks, utility, True, "instance_if")
    start = time.perf_counter()
    params = trainable(params)
    layout = ParamLayout.of(params)
    ids = resolve_task_ids(train_tasks, task_ids)
    num_tasks = len(ids)
    like = next(iter(params.values()))
    weights = task_weight_vector(task_weights, num_tasks, like)
    engine = {"chunk_size": chunk_size, "vectorize": vectorize}
    ref_grad, ref_value = reference_gradient(problem, params, reference_tasks, utility=utility, **engine)
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
    t0 = time.perf_counter()
    result = curv.solve(ref_grad)
    solve_seconds = time.perf_counter() - t0
    direction = layout.unflatten(result.solution)
    scale = weights / num_tasks
    t0 = time.perf_counter()
    if use_vmap(train_tasks, vectorize):
        support, query = _vmap_scores(problem, params, direction, train_tasks, chunk_size)
        support, query = support * scale[:, None], query * scale[:, None]
    else:
        support, query = _loop_scores(problem, params, direction, train_tasks, ids)
        support = [row * scale[i] for i, row in enumerate(support)]
        query = [row * scale[i] for i, row in enumerate(query)]
        if len({r.numel() for r in support}) == 1 and len({r.numel() for r in query}) == 1:
            support, query = torch.stack(support), torch.stack(query)
    for table, name in ((support, "support"), (query, "query")):
        if not all(torch.isfinite(torch.as_tensor(r)).all() for r in table):
            raise ValueError(f"Non-finite {name} scores: check the tasks' data or raise the damping.")
    diagnostics = {
        "estimator": "instance_if",
        "num_tasks": num_tasks,
        "num_params": layout.numel,
        "l2": l2,
        "curvature": curv.curvature,
        **curv.damping_info,
        "reference_value": float(ref_value),
        "reference_grad_norm": float(ref_grad.norm()),
        **solve_diagnostics(result),
        "solve_seconds": solve_seconds,
        "sample_seconds": time.perf_counter() - t0,
        "seconds": time.perf_counter() - start,
        "hessian_products": curv.products,
    }
    if not math.isfinite(diagnostics["residual"]):
        diagnostics["residual"] = None
    return InstanceInfluenceResult(ids, support, query, "instance_if", diagnostics)


def _vmap_scores(
    problem: Any, params: Params, direction: Params, tasks: TaskBatch, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """``∂/∂u [sᵀ g_k(λ, u)]`` for every task of a batch: ``grad_u`` of ``jvp_λ(task_loss)`` in direction s."""

    def directional(sw: Tensor, qw: Tensor, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
        task = Task(sx, sy, qx, qy)

        def loss(p: Params) -> Tensor:
            return problem.task_loss(p, task, sw, qw)

        return jvp(loss, (detached(params),), (direction,))[1]

    fn = vmap(grad(directional, argnums=(0, 1)))
    dtype = next(iter(params.values())).dtype
    supports, queries = [], []
    for _, chunk in iter_chunks(tasks, chunk_size):
        sw = torch.ones(chunk.support_x.shape[:2], dtype=dtype, device=chunk.support_x.device)
        qw = torch.ones(chunk.query_x.shape[:2], dtype=dtype, device=chunk.query_x.device)
        d_support, d_query = fn(sw, qw, chunk.support_x, chunk.support_y, chunk.query_x, chunk.query_y)
        supports.append(d_support.detach())
        queries.append(d_query.detach())
    return torch.cat(supports), torch.cat(queries)


def _loop_scores(
    problem: Any, params: Params, direction: Params, tasks: Tasks, ids: Tensor
) -> tuple[list[Tensor], list[Tensor]]:
    """Per task with ``torch.autograd``: double backward of ``sᵀ ∇_λ task_loss`` to the sample weights."""
    dtype = next(iter(params.values())).dtype
    device = next(iter(params.values())).device
    supports, queries = [], []
    for position, task in enumerate(tasks):
        num_support, num_query = _sample_counts(task)
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        sw = torch.ones(num_support, dtype=dtype, device=device, requires_grad=True)
        qw = torch.ones(num_query, dtype=dtype, device=device, requires_grad=True)
        loss = problem.task_loss(leaves, task, sw, qw)
        grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True, allow_unused=True)
        dot = sum((g * direction[k]).sum() for k, g in zip(leaves, grads) if g is not None)
        if not isinstance(dot, Tensor) or not dot.requires_grad:
            raise ValueError(
                f"task {int(ids[position])}: the gradient of task_loss does not depend on the sample weights; "
                "the problem's task_loss must multiply each sample's loss by support_weights / query_weights."
            )
        d_support, d_query = torch.autograd.grad(dot, [sw, qw], allow_unused=True)
        if d_support is None and d_query is None:
            raise ValueError(
                f"task {int(ids[position])}: task_loss ignores support_weights and query_weights; it must multiply "
                "each sample's loss by its weight for instance influence to be defined."
            )
        supports.append(torch.zeros_like(sw) if d_support is None else d_support.detach())
        queries.append(torch.zeros_like(qw) if d_query is None else d_query.detach())
    return supports, queries


def query_losses(
    problem: Any,
    params: Params,
    tasks: Tasks,
    *,
    chunk_size: int = 16,
    vectorize: Vectorize = "auto",
) -> Tensor | list[Tensor]:
    """Each query sample's loss after adaptation, ``[M, Q]`` (a list of 1-D tensors for ragged tasks).

    Computed from the problem contract alone as ``Q · ∂ task_loss(λ, task, query_weights=u) / ∂u_z`` at
    ``u = 1`` (the query weights enter the task loss linearly), so any problem that honours
    ``query_weights`` works, whatever its adaptation. Higher = the adapted model fits the sample worse: rank
    by it to find mislabelled query samples. The adaptation is the problem's own (e.g. ``MAML.inner_steps``);
    with MAML, scoring with the number of inner steps used at evaluation finds more of them.

    Example:
        >>> import torch
        >>> from lightning_metaif.influence.tasks import TaskBatch
        >>> class Mean:  # no adaptation, ℓ_z = (λ − y_z)² / 2, task loss = weighted mean
        ...     def task_loss(self, params, task, support_weights=None, query_weights=None):
        ...         losses = 0.5 * (params["w"] - task.query_y) ** 2
        ...         w = torch.ones_like(losses) if query_weights is None else query_weights
        ...         return (w * losses).sum() / losses.shape[0]
        >>> tasks = TaskBatch(torch.zeros(1, 1, 1), torch.zeros(1, 1), torch.zeros(1, 3, 1),
        ...                   torch.tensor([[1.0, -1.0, 3.0]]), torch.tensor([0]))
        >>> query_losses(Mean(), {"w": torch.zeros(1, requires_grad=True)}, tasks).tolist()
        [[0.5, 0.5, 4.5]]
    """
    check_problem(problem)
    params = {k: v.detach() for k, v in trainable(params).items()}
    if isinstance(tasks, TaskBatch) and use_vmap(tasks, vectorize):

        def loss(qw: Tensor, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
            return problem.task_loss(params, Task(sx, sy, qx, qy), None, qw)

        fn = vmap(grad(loss))
        dtype = next(iter(params.values())).dtype
        rows = []
        for _, chunk in iter_chunks(tasks, chunk_size):
            qw = torch.ones(chunk.query_x.shape[:2], dtype=dtype, device=chunk.query_x.device)
            rows.append(fn(qw, chunk.support_x, chunk.support_y, chunk.query_x, chunk.query_y).detach())
        out = torch.cat(rows) * tasks.query_x.shape[1]
        if not torch.isfinite(out).all():
            raise ValueError("Non-finite query losses: check the tasks' data and the parameters.")
        return out
    results = []
    for position, task in enumerate(tasks):
        _, num_query = _sample_counts(task)
        dtype = next(iter(params.values())).dtype
        qw = torch.ones(num_query, dtype=dtype, device=task.query_x.device, requires_grad=True)
        with torch.enable_grad():
            value = problem.task_loss(params, task, None, qw)
            (d_query,) = torch.autograd.grad(value, [qw], allow_unused=True)
        if d_query is None:
            raise ValueError(
                f"task at position {position}: task_loss ignores query_weights; it must multiply each query "
                "sample's loss by its weight."
            )
        results.append(d_query.detach() * num_query)
    if len({r.numel() for r in results}) == 1:
        return torch.stack(results)
    return results


def query_label_outliers(
    problem: Any,
    params: Params,
    tasks: Tasks,
    *,
    chunk_size: int = 16,
    vectorize: Vectorize = "auto",
) -> Tensor | list[Tensor]:
    """Each query sample's loss after adaptation minus the mean loss of the *other* query samples of its task with
    the same label, ``[M, Q]`` (a list of 1-D tensors for ragged tasks). Higher = more likely mislabelled.

    The adapted model of an episode fits its classes unevenly (the adaptation sees a few support samples per
    class), so raw query losses (:func:`query_losses`) mix how hard a sample's class was in that episode with
    whether its label is wrong; subtracting the mean loss of its class-mates in the same task removes the first.
    Groups: query samples with equal labels when the labels are integers, one per sample (classification);
    all query samples of the task otherwise (regression targets). A sample with no class-mate is compared with
    the task's other query samples; a task with a single query sample keeps its loss. Leave-one-out means, so a
    sample never lowers its own score.

    Example:
        >>> import torch
        >>> from lightning_metaif.influence.tasks import TaskBatch
        >>> class Fixed:  # no adaptation: ℓ_z = query_x[z] (each sample's loss is its input)
        ...     def task_loss(self, params, task, support_weights=None, query_weights=None):
        ...         losses = task.query_x[:, 0] * params["w"]
        ...         w = torch.ones_like(losses) if query_weights is None else query_weights
        ...         return (w * losses).sum() / losses.shape[0]
        >>> tasks = TaskBatch(torch.zeros(1, 1, 1), torch.zeros(1, 1, dtype=torch.long),
        ...                   torch.tensor([[[1.0], [2.0], [9.0], [5.0], [5.0]]]),
        ...                   torch.tensor([[0, 0, 0, 1, 1]]), torch.tensor([0]))
        >>> query_label_outliers(Fixed(), {"w": torch.ones(1, requires_grad=True)}, tasks).tolist()
        [[-4.5, -3.0, 7.5, 0.0, 0.0]]
    """
    losses = query_losses(problem, params, tasks, chunk_size=chunk_size, vectorize=vectorize)
    labels = tasks.query_y if isinstance(tasks, TaskBatch) else [task.query_y for task in tasks]
    if isinstance(losses, Tensor):
        rows = [_minus_group_means(losses[i], labels[i]) for i in range(losses.shape[0])]
        return torch.stack(rows) if rows else losses
    return [_minus_group_means(loss, label) for loss, label in zip(losses, labels)]


def _minus_group_means(losses: Tensor, labels: Tensor) -> Tensor:
    """``losses[z]`` minus the mean over the other samples of z's group (see :func:`query_label_outliers`)."""
    n = losses.shape[0]
    if n < 2:
        return losses
    labels = labels.to(losses.device)
    others = ~torch.eye(n, dtype=torch.bool, device=losses.device)
    classification = labels.dim() == 1 and not labels.is_floating_point() and not labels.is_complex()
    same = (labels[:, None] == labels[None, :]) & others if classification else others
    same = torch.where(same.any(1, keepdim=True), same, others)  # no class-mate: the task's other samples
    weights = same.to(losses.dtype)
    return losses - (weights @ losses) / weights.sum(1)
