"""Task pools: fixed, reproducible collections of few-shot tasks with stable integer ids.

A pool is a :class:`torch.utils.data.Dataset` of :class:`~lightning_metaif.influence.tasks.Task` objects.
Position ``i`` holds the task with id ``id_offset + i``. The content of a task is a pure function of
``(seed, task_id)`` and the pool's data: it never depends on the order in which tasks are accessed, on
the process, or on a global random state. Tasks are generated lazily on access, so a pool of 100,000
tasks costs nothing to construct.

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader
    >>> inputs, labels = torch.randn(100, 3), torch.arange(100) % 10
    >>> pool = ClassificationTaskPool(inputs, labels, ways=5, shots=1, queries=3, num_tasks=20, seed=1)
    >>> task = pool[4]
    >>> task.task_id, tuple(task.support_x.shape), task.query_y.tolist()
    (4, (5, 3), [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4])
    >>> batch = next(iter(DataLoader(pool, batch_size=8, collate_fn=collate_tasks)))
    >>> batch.task_ids.tolist()
    [0, 1, 2, 3, 4, 5, 6, 7]
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_metaif.influence.tasks import Task, TaskBatch

__all__ = [
    "TaskPool",
    "ClassificationTaskPool",
    "SinusoidTaskPool",
    "SequenceTaskPool",
    "as_task_pool",
    "collate_tasks",
    "task_generator",
]

# Salts keep the random streams of different uses of the same (seed, task_id) independent.
SALT_CLASSIFICATION = 1
SALT_SINUSOID = 2
SALT_CORRUPTION = 3
SALT_CORRUPTION_SELECT = 4
SALT_SPLIT = 5
SALT_GAUSSIAN_MIXTURE = 6


def task_generator(seed: int, task_id: int, salt: int = 0) -> torch.Generator:
    """A fresh CPU ``torch.Generator`` whose state depends only on ``(salt, seed, task_id)``.

    The three integers are hashed with NumPy's ``SeedSequence``, so neighbouring ids give unrelated streams.

    Example:
        >>> a = torch.rand(3, generator=task_generator(0, 17))
        >>> torch.equal(a, torch.rand(3, generator=task_generator(0, 17)))
        True
    """
    for name, value in (("seed", seed), ("task_id", task_id), ("salt", salt)):
        if int(value) < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value}.")
    state = np.random.SeedSequence([int(salt), int(seed), int(task_id)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(((int(state[0]) << 32) | int(state[1])) & ((1 << 63) - 1))


def collate_tasks(tasks: Sequence[Task]) -> TaskBatch:
    """``collate_fn`` for a ``DataLoader`` over a :class:`TaskPool`: stacks tasks into a :class:`TaskBatch`.

    Example:
        >>> pool = SinusoidTaskPool(10, shots=5, queries=7)
        >>> batch = collate_tasks([pool[0], pool[3]])
        >>> tuple(batch.query_x.shape), batch.task_ids.tolist()
        ((2, 7, 1), [0, 3])
    """
    return TaskBatch.stack(list(tasks))


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def _check_non_negative(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}.")


class TaskPool(Dataset):
    """Base class: ``num_tasks`` tasks with the contiguous ids ``id_offset, ..., id_offset + num_tasks - 1``.

    Subclasses implement :meth:`task` (and may override :meth:`task_labels` and :meth:`task_classes`).
    ``pool[i]`` is the task at position ``i`` (negative positions count from the end);
    ``pool.task(task_id)`` looks a task up by id.
    """

    is_image: bool = False

    def __init__(self, num_tasks: int, *, seed: int = 0, id_offset: int = 0) -> None:
        _check_positive(num_tasks=num_tasks)
        _check_non_negative(seed=seed, id_offset=id_offset)
        self.num_tasks = int(num_tasks)
        self.seed = int(seed)
        self.id_offset = int(id_offset)

    # ---- ids -------------------------------------------------------------------------------------
    @property
    def task_ids(self) -> Tensor:
        """The ``int64`` ids of all tasks, in position order (shape ``[len(pool)]``)."""
        return torch.arange(self.id_offset, self.id_offset + self.num_tasks, dtype=torch.long)

    def __len__(self) -> int:
        return self.num_tasks

    def __contains__(self, task_id: object) -> bool:
        try:
            tid = operator.index(task_id)  # type: ignore[arg-type]
        except TypeError:
            return False
        return self.id_offset <= tid < self.id_offset + self.num_tasks

    def position(self, task_id: int) -> int:
        """Position of ``task_id`` in the pool; ``KeyError`` when the id is not in the pool."""
        tid = operator.index(task_id)
        if tid not in self:
            raise KeyError(
                f"Task id {tid} is not in this pool (ids {self.id_offset}..{self.id_offset + self.num_tasks - 1})."
            )
        return tid - self.id_offset

    def _task_id_at(self, position: int) -> int:
        pos = operator.index(position)
        if pos < 0:
            pos += self.num_tasks
        if not 0 <= pos < self.num_tasks:
            raise IndexError(f"Position {position} is out of range for a pool of {self.num_tasks} tasks.")
        return self.id_offset + pos

    def _check_id(self, task_id: int) -> int:
        self.position(task_id)
        return int(task_id)

    # ---- access ----------------------------------------------------------------------------------
    def __getitem__(self, position: int) -> Task:
        return self.task(self._task_id_at(position))

    def task(self, task_id: int) -> Task:
        """The task with id ``task_id`` (generated on the fly from ``(seed, task_id)``)."""
        raise NotImplementedError

    def task_labels(self, task_id: int) -> tuple[Tensor, Tensor]:
        """``(support_y, query_y)`` of a task; subclasses make this cheaper than :meth:`task`."""
        task = self.task(task_id)
        return task.support_y, task.query_y

    def task_classes(self, task_id: int) -> list[int]:
        """Original class labels of a task; entry ``j`` is the class shown with label ``j``.

        Empty for pools without classes (regression).
        """
        self._check_id(task_id)
        return []

    def batch(self, positions: Sequence[int] | Tensor | None = None) -> TaskBatch:
        """Tasks at ``positions`` (all when ``None``) stacked into one :class:`TaskBatch`."""
        if positions is None:
            positions = range(self.num_tasks)
        elif isinstance(positions, Tensor):
            positions = positions.reshape(-1).tolist()
        return TaskBatch.stack([self[p] for p in positions])

    def batch_ids(self, task_ids: Sequence[int] | Tensor) -> TaskBatch:
        """Tasks with the given ids stacked into one :class:`TaskBatch` (in the given order)."""
        if isinstance(task_ids, Tensor):
            task_ids = task_ids.reshape(-1).tolist()
        return TaskBatch.stack([self.task(t) for t in task_ids])

    def __iter__(self):
        for position in range(self.num_tasks):
            yield self[position]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_tasks={self.num_tasks}, ids={self.id_offset}.."
            f"{self.id_offset + self.num_tasks - 1}, seed={self.seed})"
        )


class SequenceTaskPool:
    """A pool view over any indexable collection of :class:`Task` objects (a list, or a user's ``Dataset``).

    Task ids are each task's ``task_id`` (positions when no task has one); :meth:`batch` stacks tasks of equal
    shapes into a :class:`TaskBatch` (vmapped by the engine) and returns a list otherwise (looped).

    Example:
        >>> tasks = [Task(torch.zeros(2, 1), torch.zeros(2), torch.zeros(3, 1), torch.zeros(3), task_id=10 + i)
        ...          for i in range(3)]
        >>> pool = SequenceTaskPool(tasks)
        >>> pool.task_ids.tolist(), pool.batch([2, 0]).task_ids.tolist()
        ([10, 11, 12], [12, 10])
    """

    def __init__(self, tasks: Any, *, argument: str = "pool") -> None:
        try:
            size = len(tasks)
        except TypeError:
            raise ValueError(
                f"`{argument}` must be a task pool, a Dataset of tasks or a list of tasks; got "
                f"{type(tasks).__name__}, which has no len()."
            ) from None
        if size == 0:
            raise ValueError(f"`{argument}` is empty: give at least one task.")
        first = tasks[0]
        if not isinstance(first, Task):
            raise ValueError(
                f"`{argument}`[0] is a {type(first).__name__}, not a lightning_metaif.Task: a Dataset or list given "
                "as a pool must yield Task(support_x, support_y, query_x, query_y, task_id=...) objects."
            )
        self.tasks = tasks
        ids = [getattr(tasks[i], "task_id", None) for i in range(size)]
        if all(i is None for i in ids):
            ids = list(range(size))
        elif any(i is None for i in ids):
            missing = [p for p, i in enumerate(ids) if i is None][:5]
            raise ValueError(
                f"`{argument}`: tasks at positions {missing} have no task_id; give every task one."
            )
        if len(set(ids)) != len(ids):
            raise ValueError(f"`{argument}` holds duplicate task ids; every task needs its own stable id.")
        self._ids = torch.tensor([int(i) for i in ids], dtype=torch.long)
        self.is_image = bool(getattr(tasks, "is_image", False))

    @property
    def task_ids(self) -> Tensor:
        return self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, position: int) -> Task:
        task = self.tasks[int(position)]
        return Task(task.support_x, task.support_y, task.query_x, task.query_y, int(self._ids[int(position)]))

    def batch(self, positions: Sequence[int] | Tensor | None = None) -> TaskBatch | list[Task]:
        if positions is None:
            positions = range(len(self))
        elif isinstance(positions, Tensor):
            positions = positions.reshape(-1).tolist()
        tasks = [self[p] for p in positions]
        try:
            return TaskBatch.stack(tasks)
        except (RuntimeError, ValueError):  # unequal shapes: the engine loops over a list
            return tasks


def as_task_pool(value: Any, *, argument: str = "pool") -> Any:
    """A pool the callback can score: a pool with ``task_ids`` and ``batch(positions)`` is used as it is; a
    ``TaskBatch``, a ``Dataset`` or a list of tasks is wrapped in a :class:`SequenceTaskPool`."""
    if isinstance(value, TaskBatch):
        return SequenceTaskPool(list(value), argument=argument)
    if hasattr(value, "task_ids") and callable(getattr(value, "batch", None)):
        return value
    return SequenceTaskPool(value, argument=argument)


def _to_tensor(x: Any) -> Tensor:
    """Convert one input sample (tensor, array, number or PIL image) to a tensor."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if hasattr(x, "mode") and hasattr(x, "size") and hasattr(x, "getbands"):  # a PIL image
        array = np.asarray(x, dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array.copy())
        return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1).contiguous()
    return torch.as_tensor(x)


class ClassificationTaskPool(TaskPool):
    """N-way K-shot classification tasks drawn from a labelled data set.

    Each task picks ``ways`` distinct classes (from ``classes``, default: every label present) and, per class,
    ``shots + queries`` distinct samples; the first ``shots`` go to the support set, the rest to the query
    set. The chosen classes are shown with the labels ``0..ways-1`` in a seeded random order
    (:meth:`task_classes` gives the original class of each label). Samples are laid out class by class:
    ``support_y = [0]*shots + [1]*shots + ...`` and ``query_y = [0]*queries + [1]*queries + ...``.

    Args:
        inputs: a tensor ``[N, ...]`` (or array), or a data set whose items are ``(x, y)`` pairs
            (torchvision style; ``x`` a tensor, array or PIL image). A data set with a ``targets``
            attribute is indexed lazily; otherwise it is iterated once to read its labels.
        labels: integer labels ``[N]``; ``None`` when ``inputs`` is a data set.
        ways, shots, queries: classes per task, support and query samples per class.
        num_tasks: number of tasks in the pool.
        classes: the original labels tasks may use (default all). Use it to split classes between pools.
        seed: the pool seed; task content depends only on ``(seed, task_id)`` (and the data).
        id_offset: id of the task at position 0. Give pools that are used together disjoint id ranges.

    Example:
        >>> import torch
        >>> x, y = torch.randn(60, 2), torch.arange(60) % 6
        >>> pool = ClassificationTaskPool(x, y, ways=3, shots=2, queries=1, num_tasks=100, classes=[0, 1, 2, 3],
        ...                               id_offset=1000)
        >>> pool.task_ids[:3].tolist(), len(pool), set(pool.task_classes(1005)) <= {0, 1, 2, 3}
        ([1000, 1001, 1002], 100, True)
        >>> pool.task(1005).support_y.tolist()
        [0, 0, 1, 1, 2, 2]
    """

    def __init__(
        self,
        inputs: Tensor | Any,
        labels: Tensor | Sequence[int] | None,
        *,
        ways: int,
        shots: int,
        queries: int,
        num_tasks: int,
        classes: Sequence[int] | Tensor | None = None,
        seed: int = 0,
        id_offset: int = 0,
    ) -> None:
        super().__init__(num_tasks, seed=seed, id_offset=id_offset)
        _check_positive(ways=ways, shots=shots, queries=queries)
        self.ways, self.shots, self.queries = int(ways), int(shots), int(queries)

        if isinstance(inputs, (Tensor, np.ndarray)):
            self._inputs: Any = torch.as_tensor(inputs)
            self._is_tensor = True
            if labels is None:
                raise ValueError(
                    "`labels` is required when `inputs` is a tensor: pass one integer label per row."
                )
            labels_t = torch.as_tensor(labels)
            if labels_t.dim() != 1 or labels_t.shape[0] != self._inputs.shape[0]:
                raise ValueError(
                    f"`labels` must be 1-D with one label per input row: inputs have {self._inputs.shape[0]} "
                    f"rows, labels have shape {tuple(labels_t.shape)}."
                )
        else:
            if not hasattr(inputs, "__getitem__") or not hasattr(inputs, "__len__"):
                raise ValueError(
                    "`inputs` must be a tensor [N, ...] or a map-style data set returning (x, y) pairs, "
                    f"got {type(inputs).__name__}."
                )
            self._inputs = inputs
            self._is_tensor = False
            if labels is None:
                targets = getattr(inputs, "targets", None)
                labels_t = (
                    torch.as_tensor(targets)
                    if targets is not None
                    else torch.as_tensor([int(inputs[i][1]) for i in range(len(inputs))])
                )
            else:
                labels_t = torch.as_tensor(labels)
            if labels_t.dim() != 1 or labels_t.shape[0] != len(inputs):
                raise ValueError(
                    f"The data set has {len(inputs)} items but {labels_t.numel()} labels; give one label per item."
                )
        if labels_t.is_floating_point() or labels_t.is_complex():
            raise ValueError(f"Classification labels must be integers, got dtype {labels_t.dtype}.")
        labels_t = labels_t.to(torch.long).cpu()
        if labels_t.numel() == 0:
            raise ValueError("The data set is empty: a classification pool needs labelled samples.")

        present = torch.unique(labels_t)
        if classes is None:
            class_t = present
        else:
            class_t = torch.as_tensor(classes, dtype=torch.long).reshape(-1)
            if torch.unique(class_t).numel() != class_t.numel():
                raise ValueError(f"`classes` contains duplicates: {class_t.tolist()}.")
            missing = class_t[~torch.isin(class_t, present)]
            if missing.numel():
                raise ValueError(
                    f"`classes` names labels with no samples: {missing.tolist()[:10]}; "
                    f"the data has labels {present.tolist()[:20]}{'...' if present.numel() > 20 else ''}."
                )
        self.classes: list[int] = class_t.tolist()
        self.num_classes = len(self.classes)
        if self.ways > self.num_classes:
            raise ValueError(
                f"ways={self.ways} is larger than the {self.num_classes} classes available to this pool; "
                "lower `ways` or give the pool more classes."
            )
        # Per-class index lists, built once with one sort (O(N log N)); tasks then only index into them.
        order = torch.argsort(labels_t, stable=True)
        sorted_labels = labels_t[order]
        starts = torch.searchsorted(sorted_labels, class_t)
        ends = torch.searchsorted(sorted_labels, class_t, right=True)
        self._class_index: list[Tensor] = [
            order[s:e].clone() for s, e in zip(starts.tolist(), ends.tolist(), strict=True)
        ]
        counts = [int(ix.numel()) for ix in self._class_index]
        smallest = min(range(len(counts)), key=counts.__getitem__)
        need = self.shots + self.queries
        if counts[smallest] < need:
            raise ValueError(
                f"shots + queries = {self.shots} + {self.queries} = {need} samples per class are needed, but class "
                f"{self.classes[smallest]} has only {counts[smallest]} samples; lower shots/queries or leave "
                "small classes out with `classes=`."
            )
        self._class_t = class_t
        self._sample_shape: tuple[int, ...] | None = (
            tuple(self._inputs.shape[1:]) if self._is_tensor else None
        )
        self._support_y = torch.arange(self.ways).repeat_interleave(self.shots)
        self._query_y = torch.arange(self.ways).repeat_interleave(self.queries)

    # ---- properties ------------------------------------------------------------------------------
    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one input sample (e.g. ``(1, 8, 8)``)."""
        if self._sample_shape is None:
            self._sample_shape = tuple(self._fetch(self._class_index[0][:1]).shape[1:])
        return self._sample_shape

    @property
    def is_image(self) -> bool:  # type: ignore[override]
        """True when samples are ``[C, H, W]`` images."""
        return len(self.sample_shape) == 3

    # ---- generation ------------------------------------------------------------------------------
    def _draw(self, task_id: int, classes_only: bool = False) -> tuple[Tensor, Tensor | None]:
        g = task_generator(self.seed, task_id, SALT_CLASSIFICATION)
        chosen = torch.randperm(self.num_classes, generator=g)[: self.ways]
        if classes_only:
            return chosen, None
        need = self.shots + self.queries
        rows = []
        for c in chosen.tolist():
            index = self._class_index[c]
            rows.append(index[torch.randperm(index.numel(), generator=g)[:need]])
        return chosen, torch.stack(rows)  # [ways, shots + queries] dataset indices

    def _fetch(self, index: Tensor) -> Tensor:
        if self._is_tensor:  # index_select: advanced indexing was ~2000x slower in some multi-thread runs
            return self._inputs.index_select(0, index.reshape(-1)).reshape(
                *index.shape, *self._inputs.shape[1:]
            )
        return torch.stack([_to_tensor(self._inputs[int(i)][0]) for i in index.tolist()])

    def task_indices(self, task_id: int) -> tuple[Tensor, Tensor]:
        """Data-set indices ``(support [ways*shots], query [ways*queries])`` of a task, in task order."""
        _, index = self._draw(self._check_id(task_id))
        assert index is not None
        return index[:, : self.shots].reshape(-1), index[:, self.shots :].reshape(-1)

    def task(self, task_id: int) -> Task:
        support_index, query_index = self.task_indices(task_id)
        return Task(
            self._fetch(support_index),
            self._support_y.clone(),
            self._fetch(query_index),
            self._query_y.clone(),
            task_id=int(task_id),
        )

    def task_labels(self, task_id: int) -> tuple[Tensor, Tensor]:
        self._check_id(task_id)
        return self._support_y.clone(), self._query_y.clone()

    def task_classes(self, task_id: int) -> list[int]:
        chosen, _ = self._draw(self._check_id(task_id), classes_only=True)
        return self._class_t[chosen].tolist()

    def __repr__(self) -> str:
        return (
            f"ClassificationTaskPool(num_tasks={self.num_tasks}, ids={self.id_offset}.."
            f"{self.id_offset + self.num_tasks - 1}, ways={self.ways}, shots={self.shots}, "
            f"queries={self.queries}, classes={self.num_classes}, seed={self.seed})"
        )


class SinusoidTaskPool(TaskPool):
    """Sinusoid regression tasks (Finn et al. 2017): ``y = A sin(x - phase)``.

    Per task, ``A ~ U(amplitude)``, ``phase ~ U(phase)`` and ``shots + queries`` inputs ``x ~ U(x_range)``,
    all drawn from ``(seed, task_id)``. ``x`` and ``y`` have shape ``[n, 1]`` (``dtype``, default float32).

    Example:
        >>> pool = SinusoidTaskPool(1000, shots=10, queries=20, seed=3)
        >>> task = pool.task(999)
        >>> tuple(task.support_x.shape), tuple(task.query_y.shape)
        ((10, 1), (20, 1))
        >>> amplitude, phase = pool.task_params(999)
        >>> bool(torch.allclose(task.query_y, amplitude * torch.sin(task.query_x - phase)))
        True
    """

    def __init__(
        self,
        num_tasks: int,
        *,
        shots: int,
        queries: int,
        seed: int = 0,
        id_offset: int = 0,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(num_tasks, seed=seed, id_offset=id_offset)
        _check_positive(shots=shots, queries=queries)
        self.shots, self.queries = int(shots), int(queries)
        for name, (low, high) in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if not (math.isfinite(low) and math.isfinite(high)) or low > high:
                raise ValueError(
                    f"`{name}` must be a finite (low, high) pair with low <= high, got {(low, high)}."
                )
        self.amplitude = (float(amplitude[0]), float(amplitude[1]))
        self.phase = (float(phase[0]), float(phase[1]))
        self.x_range = (float(x_range[0]), float(x_range[1]))
        self.dtype = dtype
        self.ways = None

    def _draw(self, task_id: int) -> tuple[float, float, Tensor]:
        g = task_generator(self.seed, task_id, SALT_SINUSOID)
        u = torch.rand(2, generator=g, dtype=torch.float64)
        amplitude = self.amplitude[0] + (self.amplitude[1] - self.amplitude[0]) * float(u[0])
        phase = self.phase[0] + (self.phase[1] - self.phase[0]) * float(u[1])
        x = torch.rand(self.shots + self.queries, 1, generator=g, dtype=torch.float64)
        x = self.x_range[0] + (self.x_range[1] - self.x_range[0]) * x
        return amplitude, phase, x

    def task_params(self, task_id: int) -> tuple[float, float]:
        """``(amplitude, phase)`` of a task."""
        amplitude, phase, _ = self._draw(self._check_id(task_id))
        return amplitude, phase

    def task(self, task_id: int) -> Task:
        amplitude, phase, x = self._draw(self._check_id(task_id))
        y = amplitude * torch.sin(x - phase)
        x, y = x.to(self.dtype), y.to(self.dtype)
        s = self.shots
        return Task(x[:s], y[:s], x[s:], y[s:], task_id=int(task_id))

    def __repr__(self) -> str:
        return (
            f"SinusoidTaskPool(num_tasks={self.num_tasks}, ids={self.id_offset}.."
            f"{self.id_offset + self.num_tasks - 1}, shots={self.shots}, queries={self.queries}, seed={self.seed})"
        )
