"""A task sampler the callback controls: pruned tasks are not drawn, under DDP too."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

from lightning_metaif.actions.state import TaskState


class TaskSampler(DistributedSampler):
    """Draw task positions of a pool, skipping pruned task ids; a ``DistributedSampler`` so Lightning keeps it.

    Every epoch has the same length (``ceil(len(pool) / num_replicas)`` per rank): kept tasks are visited in a
    fresh seeded permutation, repeated cyclically as needed to fill the epoch, so each pruned task's slot goes
    to a kept one and no window of up to ``len(kept)`` consecutive draws repeats a task. The permutation is seeded with ``seed + epoch`` and identical on every rank; rank ``r`` takes
    ``[r::num_replicas]``. Decisions written to ``state`` apply from the next ``iter()`` (the next epoch).

    Without an initialised process group it acts as a single-replica sampler.

    Args:
        dataset: the task pool (its ``task_ids`` give the id at each position; else position = id).
        state: the shared :class:`TaskState`; the :class:`~lightning_metaif.MetaInfluence` callback binds its
            own at the start of training (pass ``callback.task_state`` so a resumed run prunes from its first
            epoch).
        shuffle, seed, num_replicas, rank: as for ``DistributedSampler``.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> state = TaskState(); state.prune([0, 1])
        >>> sampler = TaskSampler(TensorDataset(torch.zeros(6)), state=state, seed=0)
        >>> positions = list(sampler)
        >>> len(positions), {0, 1} & set(positions)
        (6, set())
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        state: TaskState | None = None,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
        )
        self.state = state if state is not None else TaskState()
        self.task_ids: Sequence[int] = _task_ids_of(dataset)

    def kept_positions(self) -> torch.Tensor:
        """Positions of the pool whose task id is not pruned."""
        pruned = self.state.pruned
        return torch.tensor([i for i, t in enumerate(self.task_ids) if t not in pruned], dtype=torch.long)

    def __iter__(self) -> Iterator[int]:
        kept = self.kept_positions()
        if len(kept) == 0:
            raise RuntimeError("Every task of the pool is pruned; set PruningPolicy.min_pool_size >= 1.")
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        repeats = math.ceil(self.total_size / len(kept))
        # One permutation, repeated cyclically: any window of up to len(kept) consecutive draws holds distinct
        # tasks, so a meta-batch that straddles two repeats never contains the same task twice (a fresh
        # permutation per repeat could, and a TaskBatch refuses duplicate task ids).
        if self.shuffle:
            kept = kept[torch.randperm(len(kept), generator=generator)]
        order = kept.repeat(repeats)
        order = order[: self.total_size]
        return iter(order[self.rank : self.total_size : self.num_replicas].tolist())


def _task_ids_of(dataset: Any) -> list[int]:
    ids = getattr(dataset, "task_ids", None)
    if ids is None:
        return list(range(len(dataset)))
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]
    if len(ids) != len(dataset):
        raise ValueError(f"dataset.task_ids has {len(ids)} ids but the dataset has {len(dataset)} tasks.")
    return ids
