"""The task types the engine understands.

A task is opaque to the engine: it is whatever the problem's ``task_loss`` accepts. One batched form is
understood, :class:`TaskBatch`, whose tensors have a leading task dimension; the engine can ``vmap`` over it.
A single task sliced out of a batch (or built directly) is a :class:`Task`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Task:
    """One few-shot task: a support (inner) set and a query (outer) set.

    Example:
        >>> import torch
        >>> task = Task(torch.randn(5, 3), torch.arange(5), torch.randn(10, 3), torch.arange(10) % 5, task_id=7)
        >>> task.num_support, task.num_query
        (5, 10)
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    task_id: int | None = None

    @property
    def num_support(self) -> int:
        return int(self.support_x.shape[0])

    @property
    def num_query(self) -> int:
        return int(self.query_x.shape[0])

    def to(self, *args: Any, **kwargs: Any) -> Task:
        """Move to a device / cast floating tensors; integer labels only change device."""
        moved = [_move(getattr(self, name), *args, **kwargs) for name in _TENSOR_FIELDS]
        return Task(*moved, task_id=self.task_id)


_TENSOR_FIELDS = ("support_x", "support_y", "query_x", "query_y")


@dataclass(frozen=True)
class TaskBatch:
    """A batch of tasks with equal shapes, stacked along a leading task dimension.

    ``support_x`` is ``[T, S, ...]``, ``support_y`` is ``[T, S, ...]``, ``query_x`` is ``[T, Q, ...]``,
    ``query_y`` is ``[T, Q, ...]`` and ``task_ids`` is an ``int64`` tensor of shape ``[T]`` holding each
    task's stable id.

    Example:
        >>> import torch
        >>> batch = TaskBatch(
        ...     torch.randn(4, 5, 3), torch.zeros(4, 5, dtype=torch.long),
        ...     torch.randn(4, 10, 3), torch.zeros(4, 10, dtype=torch.long), torch.tensor([3, 1, 4, 2]))
        >>> len(batch), batch[1].task_id, len(batch[1:3])
        (4, 1, 2)
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    task_ids: Tensor

    def __post_init__(self) -> None:
        task_ids = torch.as_tensor(self.task_ids)
        if task_ids.dim() != 1:
            raise ValueError(
                f"TaskBatch.task_ids must be a 1-D tensor of task ids, got shape {tuple(task_ids.shape)}."
            )
        if task_ids.is_floating_point():
            raise ValueError("TaskBatch.task_ids must hold integer ids, got a floating-point tensor.")
        object.__setattr__(self, "task_ids", task_ids.to(torch.long))
        num_tasks = task_ids.shape[0]
        for name in _TENSOR_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, Tensor):
                raise ValueError(f"TaskBatch.{name} must be a tensor, got {type(value).__name__}.")
            if value.dim() < 2 or value.shape[0] != num_tasks:
                raise ValueError(
                    f"TaskBatch.{name} must have shape [num_tasks={num_tasks}, num_samples, ...], "
                    f"got {tuple(value.shape)}. Stack tasks along dimension 0 and give one id per task."
                )
        if (
            self.support_x.shape[1] != self.support_y.shape[1]
            or self.query_x.shape[1] != self.query_y.shape[1]
        ):
            raise ValueError(
                "TaskBatch inputs and labels disagree on the number of samples: "
                f"support_x {tuple(self.support_x.shape)} vs support_y {tuple(self.support_y.shape)}, "
                f"query_x {tuple(self.query_x.shape)} vs query_y {tuple(self.query_y.shape)}."
            )

    def __len__(self) -> int:
        return int(self.task_ids.shape[0])

    @property
    def num_support(self) -> int:
        return int(self.support_x.shape[1])

    @property
    def num_query(self) -> int:
        return int(self.query_x.shape[1])

    def __getitem__(self, index: int | slice | Tensor | Sequence[int]) -> Task | TaskBatch:
        """An ``int`` gives one :class:`Task`; a slice, index list or tensor gives a sub-batch."""
        if isinstance(index, int):
            return Task(
                self.support_x[index],
                self.support_y[index],
                self.query_x[index],
                self.query_y[index],
                int(self.task_ids[index]),
            )
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long, device=self.task_ids.device)
        return TaskBatch(
            self.support_x[index],
            self.support_y[index],
            self.query_x[index],
            self.query_y[index],
            self.task_ids[index],
        )

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def to(self, *args: Any, **kwargs: Any) -> TaskBatch:
        """Move to a device / cast floating tensors; integer labels and ids only change device."""
        values = {name: _move(getattr(self, name), *args, **kwargs) for name in _TENSOR_FIELDS}
        return TaskBatch(**values, task_ids=_move(self.task_ids, *args, **kwargs))

    @staticmethod
    def stack(tasks: Sequence[Task]) -> TaskBatch:
        """Stack single tasks of equal shapes into a batch (each must carry a ``task_id``)."""
        if len(tasks) == 0:
            raise ValueError("Cannot stack an empty list of tasks into a TaskBatch.")
        missing = [i for i, t in enumerate(tasks) if t.task_id is None]
        if missing:
            raise ValueError(
                f"Tasks at positions {missing[:5]} have no task_id; give every task a stable id."
            )
        return TaskBatch(
            *(torch.stack([getattr(t, name) for t in tasks]) for name in _TENSOR_FIELDS),
            task_ids=torch.tensor([int(t.task_id) for t in tasks], dtype=torch.long),
        )

    @staticmethod
    def concat(batches: Sequence[TaskBatch]) -> TaskBatch:
        """Concatenate batches along the task dimension."""
        if len(batches) == 0:
            raise ValueError("Cannot concatenate an empty list of TaskBatch objects.")
        return TaskBatch(
            *(torch.cat([getattr(b, name) for b in batches]) for name in _TENSOR_FIELDS),
            task_ids=torch.cat([b.task_ids for b in batches]),
        )

    def field_dict(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _move(value: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    if value.is_floating_point():
        return value.to(*args, **kwargs)
    device = _device_of(*args, **kwargs)
    return value if device is None else value.to(device)


def _device_of(*args: Any, **kwargs: Any) -> torch.device | None:
    if "device" in kwargs:
        return torch.device(kwargs["device"]) if kwargs["device"] is not None else None
    for arg in args:
        if isinstance(arg, (str, torch.device)):
            return torch.device(arg)
        if isinstance(arg, Tensor):
            return arg.device
    return None


Tasks = TaskBatch | Sequence[Any]
"""What the engine accepts as a pool of tasks: a :class:`TaskBatch` (vmapped) or a sequence (looped)."""


def resolve_task_ids(tasks: Tasks, task_ids: Sequence[int] | Tensor | None = None) -> Tensor:
    """Return the ``int64`` ids of ``tasks``, validating them.

    Ids come from ``task_ids`` when given, else from ``TaskBatch.task_ids`` or each task's ``task_id``
    attribute. Raises ``ValueError`` on an empty pool, a length mismatch or duplicate ids.
    """
    num_tasks = len(tasks)
    if num_tasks == 0:
        raise ValueError("The task pool is empty: pass at least one task.")
    if task_ids is None:
        if isinstance(tasks, TaskBatch):
            ids = tasks.task_ids
        else:
            missing = [i for i, t in enumerate(tasks) if getattr(t, "task_id", None) is None]
            if missing:
                raise ValueError(
                    f"Tasks at positions {missing[:5]} have no `task_id` attribute and no `task_ids` were given; "
                    "pass `task_ids=[...]` with one stable integer id per task."
                )
            ids = torch.tensor([int(t.task_id) for t in tasks], dtype=torch.long)
    else:
        ids = torch.as_tensor(task_ids)
        if ids.is_floating_point() or ids.dim() != 1:
            raise ValueError(
                f"`task_ids` must be a 1-D sequence of integers, got {ids.dtype} of shape {tuple(ids.shape)}."
            )
        ids = ids.to(torch.long).cpu()
        if ids.numel() != num_tasks:
            raise ValueError(
                f"`task_ids` has {ids.numel()} entries but there are {num_tasks} tasks; give exactly one id per task."
            )
        if isinstance(tasks, TaskBatch) and not torch.equal(ids, tasks.task_ids.cpu()):
            raise ValueError("`task_ids` disagrees with `TaskBatch.task_ids`; pass one of them, not both.")
    ids = ids.cpu()
    unique, counts = torch.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(
            f"Duplicate task ids {unique[counts > 1].tolist()[:10]}: every task needs a distinct id."
        )
    return ids


def stackable(tasks: Tasks, task_ids: Tensor | None = None) -> TaskBatch | None:
    """``tasks`` as a :class:`TaskBatch` when they can be batched, else ``None``.

    A ``TaskBatch`` is returned as is; a sequence of :class:`Task` objects whose tensors agree in shape, dtype
    and device is stacked (ids from ``task_ids``, else each task's ``task_id``, else positions). Other task
    objects are opaque to the engine and are never converted.

    Example:
        >>> import torch
        >>> tasks = [Task(torch.zeros(2, 3), torch.zeros(2), torch.ones(4, 3), torch.zeros(4)) for _ in range(5)]
        >>> len(stackable(tasks)), stackable(tasks + [Task(torch.zeros(1, 3), torch.zeros(1), torch.ones(4, 3),
        ...                                                 torch.zeros(4))])
        (5, None)
    """
    if isinstance(tasks, TaskBatch):
        return tasks
    if len(tasks) == 0 or not all(type(t) is Task for t in tasks):
        return None
    first = tasks[0]
    signature = [(v.shape, v.dtype, v.device) for v in (getattr(first, n) for n in _TENSOR_FIELDS)]
    for task in tasks[1:]:
        if [(v.shape, v.dtype, v.device) for v in (getattr(task, n) for n in _TENSOR_FIELDS)] != signature:
            return None
    if task_ids is None:
        if all(t.task_id is not None for t in tasks):
            task_ids = torch.tensor([int(t.task_id) for t in tasks], dtype=torch.long)
        else:
            task_ids = torch.arange(len(tasks))
    return TaskBatch(
        *(torch.stack([getattr(t, name) for t in tasks]) for name in _TENSOR_FIELDS),
        task_ids=torch.as_tensor(task_ids, dtype=torch.long),
    )


def select_tasks(tasks: Tasks, index: Sequence[int] | Tensor) -> Tasks:
    """Positions ``index`` of ``tasks``, keeping its kind (a sub-batch or a list)."""
    if isinstance(tasks, TaskBatch):
        return tasks[torch.as_tensor(index, dtype=torch.long)]
    return [tasks[int(i)] for i in torch.as_tensor(index).tolist()]


def iter_chunks(tasks: Tasks, chunk_size: int):
    """Yield ``(start, chunk)`` pairs covering ``tasks`` in order, ``chunk_size`` tasks at a time."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}.")
    for start in range(0, len(tasks), chunk_size):
        stop = min(start + chunk_size, len(tasks))
        if isinstance(tasks, TaskBatch):
            yield start, tasks[start:stop]
        else:
            yield start, list(tasks[start:stop])
