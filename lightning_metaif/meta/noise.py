"""Controlled label noise for task pools, with exact ground truth (for detection experiments).

:func:`corrupt_tasks` picks a seeded ``fraction`` of a pool's tasks and wraps the pool in a
:class:`CorruptedTaskPool` that corrupts those tasks' labels on access. The corruption of a task is a pure
function of ``(seed, task_id)`` and the task's labels, like the pools themselves. The returned
:class:`Corruption` records which tasks were corrupted and, per task, which support / query labels actually
changed (computed by comparing old and new labels, so it is exact).

Modes:

- ``"shuffle_query"``: the query labels are permuted so that every query label is wrong where that is
  possible (a derangement with respect to the labels; always possible for balanced N-way tasks with N >= 2).
  The support set is untouched. For regression the query targets are permuted among the query points.
- ``"random_labels"``: every label (of the sets chosen by ``where``) is replaced by a uniformly random class.
  About ``1/ways`` of them keep their label by chance; those are not in ``sample_indices``. For regression the
  targets are replaced by Gaussian noise with standard deviation ``scale``.
- ``"flip_labels"``: ``round(rate * n)`` (at least one) of the ``n`` samples of the chosen sets get a different
  class, uniformly among the other ``ways - 1`` classes. For regression the chosen targets get a large offset
  ``±scale * (1 + U(0, 1))`` instead.

Example:
    >>> import torch
    >>> from lightning_metaif.meta.pools import ClassificationTaskPool
    >>> pool = ClassificationTaskPool(torch.randn(200, 4), torch.arange(200) % 10, ways=5, shots=2, queries=3,
    ...                               num_tasks=50)
    >>> noisy, corruption = corrupt_tasks(pool, 0.2, mode="shuffle_query", seed=1)
    >>> len(noisy), corruption.task_ids.numel(), int(corruption.mask(pool.task_ids).sum())
    (50, 10, 10)
    >>> tid = int(corruption.task_ids[0])
    >>> changed = (noisy.task(tid).query_y != pool.task(tid).query_y).nonzero().flatten().tolist()
    >>> changed == corruption.sample_indices[tid]["query"], len(changed)
    (True, 15)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_metaif.influence.tasks import Task
from lightning_metaif.meta.pools import SALT_CORRUPTION, SALT_CORRUPTION_SELECT, TaskPool, task_generator

__all__ = ["Corruption", "CorruptedTaskPool", "corrupt_tasks", "MODES"]

MODES = ("shuffle_query", "random_labels", "flip_labels")
_WHERE = ("both", "support", "query")


@dataclass
class Corruption:
    """Ground truth of a corruption.

    Attributes:
        task_ids: sorted ``int64`` ids of the corrupted tasks.
        sample_indices: ``{task_id: {"support": [...], "query": [...]}}``, the positions inside each corrupted
            task's support / query set whose label changed.
        mode, fraction, rate, seed, where: the settings that produced it.
    """

    task_ids: Tensor
    sample_indices: dict[int, dict[str, list[int]]]
    mode: str = "shuffle_query"
    fraction: float = 0.0
    rate: float | None = None
    seed: int = 0
    where: str = "both"
    _id_set: set[int] = field(default_factory=set, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.task_ids = torch.as_tensor(self.task_ids, dtype=torch.long).reshape(-1)
        self._id_set = set(self.task_ids.tolist())

    def __contains__(self, task_id: object) -> bool:
        try:
            return int(task_id) in self._id_set  # type: ignore[call-overload]
        except (TypeError, ValueError):
            return False

    def mask(self, task_ids: Sequence[int] | Tensor) -> Tensor:
        """Boolean tensor, ``True`` where ``task_ids[i]`` was corrupted (same shape as ``task_ids``).

        Example:
            >>> Corruption(torch.tensor([2, 5]), {}).mask(torch.tensor([1, 2, 3, 5])).tolist()
            [False, True, False, True]
        """
        ids = torch.as_tensor(task_ids, dtype=torch.long)
        return torch.isin(ids, self.task_ids.to(ids.device))

    def sample_mask(self, task_id: int, which: str, num_samples: int) -> Tensor:
        """Boolean ``[num_samples]`` mask of the changed samples of ``which`` ("support"/"query") in a task."""
        if which not in ("support", "query"):
            raise ValueError(f"`which` must be 'support' or 'query', got {which!r}.")
        out = torch.zeros(num_samples, dtype=torch.bool)
        indices = self.sample_indices.get(int(task_id), {}).get(which, [])
        if indices:
            out[torch.as_tensor(indices, dtype=torch.long)] = True
        return out

    @property
    def num_changed(self) -> int:
        """Total number of labels that changed."""
        return sum(len(v) for d in self.sample_indices.values() for v in d.values())


def _derangement(keys: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A permutation ``perm`` of positions with ``keys[perm] != keys`` wherever possible.

    A random permutation, then each remaining fixed point ``i`` is swapped with a random ``j`` such that both
    positions end up changed (``new[j] != keys[i]`` and ``keys[j] != keys[i]``). For balanced labels with at
    least two classes such a ``j`` always exists, so no fixed point remains.
    """
    perm = rng.permutation(keys.shape[0])
    new = keys[perm]
    for i in np.flatnonzero(new == keys).tolist():
        k = keys[i]
        if new[i] != k:  # already repaired by an earlier swap
            continue
        candidates = np.flatnonzero((new != k) & (keys != k))
        if candidates.size == 0:
            continue
        j = int(candidates[rng.integers(candidates.size)])
        perm[i], perm[j] = perm[j], perm[i]
        new[i], new[j] = new[j], new[i]
    return perm


class CorruptedTaskPool(TaskPool):
    """A pool that wraps ``base`` and corrupts the labels of the tasks in ``corruption`` on access.

    Same ids, positions, inputs and interface as ``base``; other attributes (``ways``, ``shots``, ``classes``,
    ...) are read from ``base``. Built by :func:`corrupt_tasks`.
    """

    def __init__(
        self,
        base: TaskPool,
        corruption: Corruption,
        *,
        ways: int | None,
        regression: bool,
        scale: float = 5.0,
    ) -> None:
        super().__init__(len(base), seed=base.seed, id_offset=base.id_offset)
        self.base = base
        self.corruption = corruption
        self._ways = ways
        self.regression = bool(regression)
        self.scale = float(scale)

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: forward public attributes to the wrapped pool.
        if name.startswith("_") or "base" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(self.__dict__["base"], name)

    @property
    def task_ids(self) -> Tensor:
        return self.base.task_ids

    @property
    def is_image(self) -> bool:  # type: ignore[override]
        return self.base.is_image

    def task_classes(self, task_id: int) -> list[int]:
        """Original classes of the (uncorrupted) task: label noise does not change which classes were drawn."""
        return self.base.task_classes(task_id)

    def corrupt_labels(self, task_id: int, support_y: Tensor, query_y: Tensor) -> tuple[Tensor, Tensor]:
        """The corrupted ``(support_y, query_y)`` of a task (unchanged if the task is not corrupted)."""
        task_id = int(task_id)
        if task_id not in self.corruption:
            return support_y, query_y
        c = self.corruption
        rng = np.random.default_rng(np.random.SeedSequence([SALT_CORRUPTION, c.seed, task_id]))
        sets = {"support": support_y.clone(), "query": query_y.clone()}
        names = (
            ["query"]
            if c.mode == "shuffle_query"
            else (["support", "query"] if c.where == "both" else [c.where])
        )

        if c.mode == "shuffle_query":
            y = sets["query"]
            if y.dim() == 1 and not y.is_floating_point():
                keys = y.numpy()
            else:
                keys = torch.unique(y.reshape(y.shape[0], -1), dim=0, return_inverse=True)[1].numpy()
            sets["query"] = y[torch.as_tensor(_derangement(keys, rng))]
            return sets["support"], sets["query"]

        sizes = [sets[n].shape[0] for n in names]
        total = sum(sizes)
        if c.mode == "random_labels":
            picked = np.arange(total)
        else:
            count = max(1, int(round(float(c.rate) * total)))
            picked = np.sort(rng.choice(total, size=count, replace=False))
        y_all = torch.cat([sets[n] for n in names])
        if self.regression:
            shape = (picked.size, *y_all.shape[1:])
            if c.mode == "random_labels":
                noise = rng.standard_normal(shape) * self.scale
                y_all[torch.as_tensor(picked)] = torch.as_tensor(noise, dtype=y_all.dtype)
            else:
                signs = rng.choice(np.array([-1.0, 1.0]), size=shape)
                offsets = signs * self.scale * (1.0 + rng.random(shape))
                y_all[torch.as_tensor(picked)] += torch.as_tensor(offsets, dtype=y_all.dtype)
        else:
            ways = self._ways if self._ways is not None else int(y_all.max()) + 1
            index = torch.as_tensor(picked, dtype=torch.long)
            if c.mode == "random_labels":
                y_all[index] = torch.as_tensor(rng.integers(0, ways, size=picked.size), dtype=y_all.dtype)
            else:
                shift = torch.as_tensor(rng.integers(1, ways, size=picked.size), dtype=y_all.dtype)
                y_all[index] = (y_all[index] + shift) % ways
        start = 0
        for n, size in zip(names, sizes, strict=True):
            sets[n] = y_all[start : start + size]
            start += size
        return sets["support"], sets["query"]

    def task(self, task_id: int) -> Task:
        task = self.base.task(task_id)
        support_y, query_y = self.corrupt_labels(task_id, task.support_y, task.query_y)
        return Task(task.support_x, support_y, task.query_x, query_y, task_id=task.task_id)

    def task_labels(self, task_id: int) -> tuple[Tensor, Tensor]:
        support_y, query_y = self.base.task_labels(task_id)
        return self.corrupt_labels(task_id, support_y, query_y)

    def __repr__(self) -> str:
        c = self.corruption
        return f"CorruptedTaskPool({self.base!r}, mode={c.mode!r}, corrupted={c.task_ids.numel()}, seed={c.seed})"


def _changed(old: Tensor, new: Tensor) -> list[int]:
    diff = old != new
    if diff.dim() > 1:
        diff = diff.reshape(diff.shape[0], -1).any(dim=1)
    return diff.nonzero().flatten().tolist()


def corrupt_tasks(
    pool: TaskPool,
    fraction: float,
    mode: str = "shuffle_query",
    seed: int = 0,
    rate: float = 0.5,
    *,
    where: str = "both",
    scale: float = 5.0,
) -> tuple[CorruptedTaskPool, Corruption]:
    """Corrupt the labels of a seeded ``fraction`` of the tasks of ``pool``.

    Args:
        pool: any :class:`TaskPool` (classification: integer labels; regression: floating targets).
        fraction: share of tasks to corrupt, in ``[0, 1]``; ``round(fraction * len(pool))`` tasks are picked.
        mode: ``"shuffle_query"``, ``"random_labels"`` or ``"flip_labels"`` (see the module docstring).
        seed: which tasks are picked and how they are corrupted depend only on ``(seed, len(pool), task_id)``.
        rate: ``flip_labels`` only: share of the samples of a corrupted task that get a wrong label, in ``(0, 1]``.
        where: ``random_labels`` / ``flip_labels``: corrupt ``"both"`` sets, only ``"support"`` or only
            ``"query"``. ``shuffle_query`` always acts on the query set.
        scale: regression only: noise standard deviation (``random_labels``) / offset size (``flip_labels``).

    Returns:
        ``(corrupted_pool, corruption)``: the wrapped pool (same ids) and the exact ground truth.
    """
    if not isinstance(pool, TaskPool):
        raise ValueError(f"`pool` must be a TaskPool, got {type(pool).__name__}.")
    if mode not in MODES:
        raise ValueError(f"Unknown corruption mode {mode!r}; choose one of {', '.join(MODES)}.")
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or not 0.0 <= float(fraction) <= 1.0
    ):
        raise ValueError(
            f"`fraction` must be a number in [0, 1] (share of tasks to corrupt), got {fraction!r}."
        )
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 < float(rate) <= 1.0:
        raise ValueError(
            f"`rate` must be in (0, 1] (share of samples to flip per corrupted task), got {rate!r}."
        )
    if where not in _WHERE:
        raise ValueError(f"`where` must be one of {', '.join(_WHERE)}, got {where!r}.")
    if mode == "shuffle_query" and where == "support":
        raise ValueError(
            "mode='shuffle_query' corrupts the query set; use where='query' (or 'both'), not 'support'."
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative integer, got {seed!r}.")
    if not scale > 0:
        raise ValueError(f"`scale` must be positive, got {scale!r}.")

    first_support, first_query = pool.task_labels(int(pool.task_ids[0]))
    regression = bool(first_query.is_floating_point())
    ways = getattr(pool, "ways", None)
    if not regression and mode != "shuffle_query" and ways is not None and ways < 2:
        raise ValueError(
            f"mode={mode!r} needs at least 2 classes per task to change labels; the pool has ways={ways}."
        )

    num_tasks = len(pool)
    count = int(round(float(fraction) * num_tasks))
    generator = task_generator(seed, num_tasks, SALT_CORRUPTION_SELECT)
    positions = torch.randperm(num_tasks, generator=generator)[:count]
    task_ids = torch.sort(pool.task_ids[positions]).values
    corruption = Corruption(
        task_ids,
        {},
        mode=mode,
        fraction=float(fraction),
        rate=float(rate) if mode == "flip_labels" else None,
        seed=seed,
        where="query" if mode == "shuffle_query" else where,
    )
    corrupted = CorruptedTaskPool(pool, corruption, ways=ways, regression=regression, scale=scale)
    for task_id in task_ids.tolist():
        support_y, query_y = pool.task_labels(task_id)
        new_support, new_query = corrupted.corrupt_labels(task_id, support_y, query_y)
        corruption.sample_indices[task_id] = {
            "support": _changed(support_y, new_support),
            "query": _changed(query_y, new_query),
        }
    return corrupted, corruption
