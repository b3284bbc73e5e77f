"""Per-task total gradients and the reference gradient (docs/maths.md §2-3).

Two paths compute the same numbers:

* ``vmap``: a :class:`~lightning_metaif.influence.tasks.TaskBatch` (or a list of equal-shape
  :class:`~lightning_metaif.influence.tasks.Task` objects, stacked into one) is split into chunks and each
  chunk's per-task gradients come from one ``torch.func.vmap(torch.func.grad_and_value(task_loss))`` call;
* ``loop``: any sequence of task objects, one ``torch.autograd.grad`` per task (works for code ``torch.func``
  cannot transform, e.g. ``higher``).

With ``vectorize="auto"`` tasks that can be batched take whichever path was faster on (at most
``MEASURE_TASKS`` tasks of) their first chunk (:func:`~lightning_metaif.influence.paths.choose_path`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap

from lightning_metaif.influence.paths import choose_path, remembered_choice
from lightning_metaif.influence.problem import ParamLayout, Params, check_problem, detached, trainable
from lightning_metaif.influence.tasks import Task, TaskBatch, Tasks, iter_chunks, resolve_task_ids, stackable

Vectorize = Literal["auto", "vmap", "loop"]
MEASURE_TASKS = 16  # vectorize="auto" times both paths on at most this many tasks of the first chunk
Utility = Callable[[Params], Tensor]


def check_vectorize(vectorize: Any) -> None:
    if vectorize not in ("auto", "vmap", "loop"):
        raise ValueError(f"vectorize must be 'auto', 'vmap' or 'loop', got {vectorize!r}.")


def batch_for(tasks: Tasks, vectorize: Vectorize, task_ids: Tensor | None = None) -> TaskBatch | None:
    """The tasks as one :class:`TaskBatch` when the ``vmap`` path may run on them, else ``None`` (loop only).

    Raises when ``vectorize="vmap"`` is asked for tasks that cannot be batched.
    """
    check_vectorize(vectorize)
    if vectorize == "loop":
        return None
    batch = stackable(tasks, task_ids)
    if batch is None and vectorize == "vmap":
        raise ValueError(
            "vectorize='vmap' needs the tasks as a TaskBatch or a list of Task objects of equal shapes; pass "
            "one of those or use vectorize='loop' (or 'auto') for other task objects."
        )
    return batch


def use_vmap(tasks: Tasks, vectorize: Vectorize) -> bool:
    """Whether ``tasks`` are a :class:`TaskBatch` that the ``vmap`` path may take (no measurement)."""
    return batch_for(tasks, vectorize) is not None and isinstance(tasks, TaskBatch)


def batch_signature(batch: TaskBatch) -> tuple[Any, ...]:
    """Per-task shapes, dtypes and device of a batch: what a path choice depends on (not its length)."""
    return tuple((tuple(v.shape[1:]), v.dtype, v.device) for v in task_tensors(batch))


def batched_task_loss(problem: Any) -> Callable[..., Tensor]:
    """``task_loss`` as a function of ``(params, support_x, support_y, query_x, query_y)`` for ``vmap``."""

    def loss(
        params: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
    ) -> Tensor:
        return problem.task_loss(params, Task(support_x, support_y, query_x, query_y))

    return loss


def task_tensors(batch: TaskBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return batch.support_x, batch.support_y, batch.query_x, batch.query_y


def check_loss(loss: Any, task_id: int) -> Tensor:
    """A task loss must be a finite scalar tensor; say which task broke it and how to fix it."""
    if not isinstance(loss, Tensor):
        raise ValueError(
            f"task_loss returned {type(loss).__name__} for task {task_id}; it must return a scalar tensor."
        )
    if loss.dim() != 0:
        raise ValueError(
            f"task_loss returned a tensor of shape {tuple(loss.shape)} for task {task_id}; it must return a scalar "
            "(reduce the query loss with a (weighted) mean)."
        )
    if not torch.isfinite(loss):
        raise ValueError(
            f"task_loss is not finite ({loss.item()}) for task {task_id}: check the task's data, lower the inner "
            "learning rate or the number of inner steps."
        )
    return loss


def _raise_non_finite(values: Tensor, ids: Tensor, what: str) -> None:
    bad = ~torch.isfinite(values.reshape(values.shape[0], -1)).all(dim=1)
    if bad.any():
        raise ValueError(
            f"Non-finite {what} for tasks {ids[bad.cpu()].tolist()[:10]}: check those tasks' data, lower the inner "
            "learning rate or the number of inner steps."
        )


def per_task_gradients(
    problem: Any,
    params: Params,
    tasks: Tasks,
    *,
    task_ids: Sequence[int] | Tensor | None = None,
    chunk_size: int = 16,
    vectorize: Vectorize = "auto",
    transform: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Flattened total gradients ``g_k = dℓ_k/dλ`` of every task, and the task losses.

    Args:
        problem: an object with ``task_loss(params, task, support_weights=None, query_weights=None)``.
        params: meta-parameters; those that require grad are differentiated (in dict order).
        tasks: a :class:`TaskBatch`, a list of equal-shape :class:`Task` objects (stacked into one), or any
            sequence of task objects (looped).
        task_ids: ids for a plain sequence without ``task_id`` attributes (validated, must be distinct).
        chunk_size: tasks per ``vmap`` call; bounds memory to ``chunk_size`` gradients at once.
        vectorize: ``"auto"`` (tasks that can be batched: time ``vmap`` and the loop on up to 16 tasks of the
            first chunk and keep the faster, see :mod:`~lightning_metaif.influence.paths`), ``"vmap"`` or
            ``"loop"``.
        transform: applied to each chunk of flat gradients ``[c, p]`` before it is kept, e.g. a random
            projection to ``[c, d]``, so that the full ``[M, p]`` matrix never exists.

    Returns:
        ``(gradients [M, p or d], losses [M])``, rows in task order.

    Example:
        >>> import torch
        >>> class Quadratic:  # ℓ_k(λ) = ‖λ − x_k‖² / 2, no adaptation
        ...     def task_loss(self, params, task, support_weights=None, query_weights=None):
        ...         return 0.5 * ((params["w"] - task.query_x.mean(0)) ** 2).sum()
        >>> tasks = TaskBatch(torch.zeros(3, 1, 2), torch.zeros(3, 1), torch.eye(3, 2)[:, None],
        ...                   torch.zeros(3, 1), torch.arange(3))
        >>> grads, losses = per_task_gradients(Quadratic(), {"w": torch.zeros(2, requires_grad=True)}, tasks)
        >>> grads.tolist()
        [[-1.0, 0.0], [0.0, -1.0], [0.0, 0.0]]
    """
    check_problem(problem)
    params = trainable(params)
    ids = resolve_task_ids(tasks, task_ids)
    layout = ParamLayout.of(params)
    batch = batch_for(tasks, vectorize, ids)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}

    def loop_chunk(chunk: Sequence[Any], chunk_ids: Tensor) -> tuple[Tensor, Tensor]:
        rows, losses = [], []
        for task, task_id in zip(chunk, chunk_ids.tolist()):
            loss = check_loss(problem.task_loss(leaves, task), int(task_id))
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            grads = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads)}
            rows.append(layout.flatten(grads).detach())
            losses.append(loss.detach())
        flat = torch.stack(rows)
        _raise_non_finite(flat, chunk_ids, "gradient")
        return flat, torch.stack(losses)

    if batch is None:
        grad_chunks, loss_chunks = [], []
        for start, chunk in iter_chunks(tasks, chunk_size):
            flat, losses = loop_chunk(chunk, ids[start : start + len(chunk)])
            grad_chunks.append(transform(flat) if transform is not None else flat)
            loss_chunks.append(losses)
        return torch.cat(grad_chunks), torch.cat(loss_chunks)

    with torch.no_grad():
        check_loss(problem.task_loss(detached(params), batch[0]), int(ids[0]))
    grad_fn = vmap(grad_and_value(batched_task_loss(problem)), in_dims=(None, 0, 0, 0, 0))

    def vmap_chunk(chunk: TaskBatch, chunk_ids: Tensor) -> tuple[Tensor, Tensor]:
        grads, losses = grad_fn(detached(params), *task_tensors(chunk))
        flat = layout.flatten(grads).detach()
        _raise_non_finite(losses.detach()[:, None], chunk_ids, "task loss")
        _raise_non_finite(flat, chunk_ids, "gradient")
        return flat, losses.detach()

    # the choice is measured on at most MEASURE_TASKS tasks, so chunks of 16 and of 256 tasks share it
    key = ("gradients", min(chunk_size, MEASURE_TASKS), batch_signature(batch), layout.shapes)

    def faster_path(part: TaskBatch, part_ids: Tensor) -> tuple[str, Any]:
        return choose_path(
            problem,
            key,
            {"vmap": lambda: vmap_chunk(part, part_ids), "loop": lambda: loop_chunk(list(part), part_ids)},
            what=f"per-task gradients of {type(problem).__name__} ({len(part)} tasks)",
            device=part.support_x.device,
        )

    grad_chunks, loss_chunks = [], []
    for start, chunk in iter_chunks(batch, chunk_size):
        chunk_ids = ids[start : start + len(chunk)]
        if vectorize == "vmap":
            flat, losses = vmap_chunk(chunk, chunk_ids)
        else:
            if len(chunk) > MEASURE_TASKS and remembered_choice(problem, key) is None:
                # choose on a few tasks: measuring both paths on a whole large chunk would cost it twice over
                faster_path(chunk[:MEASURE_TASKS], chunk_ids[:MEASURE_TASKS])
            _, (flat, losses) = faster_path(chunk, chunk_ids)
        grad_chunks.append(transform(flat) if transform is not None else flat)
        loss_chunks.append(losses)
    return torch.cat(grad_chunks), torch.cat(loss_chunks)


def reference_gradient(
    problem: Any,
    params: Params,
    reference_tasks: Tasks | None = None,
    *,
    utility: Utility | None = None,
    chunk_size: int = 16,
    vectorize: Vectorize = "auto",
) -> tuple[Tensor, Tensor]:
    """Flat gradient ``∇f(λ)`` of the reference objective, and ``f(λ)``.

    ``f`` is ``utility(params)`` when a differentiable utility is given (any scalar function of the
    meta-parameters, e.g. a fairness gap), else the mean ``task_loss`` over ``reference_tasks`` (each task
    adapted from ``λ``). Exactly one of the two must be given.
    """
    if (utility is None) == (reference_tasks is None):
        raise ValueError(
            "Give exactly one reference: `reference_tasks` (held-out tasks whose mean query loss is f) or "
            "`utility` (a differentiable function params -> scalar)."
        )
    params = trainable(params)
    layout = ParamLayout.of(params)
    if utility is not None:
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        value = utility(leaves)
        if not isinstance(value, Tensor) or value.dim() != 0 or not torch.isfinite(value):
            raise ValueError("`utility(params)` must return a finite scalar tensor that depends on params.")
        grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
        grads = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads)}
        return layout.flatten(grads).detach(), value.detach()
    if len(reference_tasks) == 0:
        raise ValueError(
            f"`reference_tasks` is empty ({type(reference_tasks).__name__} with 0 tasks): the reference loss is "
            "the mean query loss over these tasks, so pass at least one held-out task (or a `utility`)."
        )
    total_grad, total_loss = None, 0.0
    for _, chunk in iter_chunks(reference_tasks, chunk_size * 8):
        positions = None if isinstance(chunk, TaskBatch) else torch.arange(len(chunk))
        grads, losses = per_task_gradients(
            problem, params, chunk, task_ids=positions, chunk_size=chunk_size, vectorize=vectorize
        )
        total_grad = grads.sum(0) if total_grad is None else total_grad + grads.sum(0)
        total_loss = total_loss + losses.sum()
    return total_grad / len(reference_tasks), total_loss / len(reference_tasks)
