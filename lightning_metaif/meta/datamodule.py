"""A LightningDataModule over task pools, with the sampler the influence callback controls."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from lightning_metaif.actions.sampler import TaskSampler
from lightning_metaif.actions.state import TaskState
from lightning_metaif.meta.pools import TaskPool, collate_tasks


class MetaDataModule(pl.LightningDataModule):
    """Train / validation / test task pools as DataLoaders of :class:`~lightning_metaif.TaskBatch`.

    The training loader draws tasks with a :class:`~lightning_metaif.TaskSampler` bound to ``task_state``
    (pass ``callback.task_state`` of a :class:`~lightning_metaif.MetaInfluence` so pruning decisions, also
    restored ones after a resume, apply from the next epoch). The callback uses ``val_pool`` as its default
    reference set.

    Args:
        train_pool, val_pool, test_pool: task pools (``val_pool``/``test_pool`` optional).
        batch_size: tasks per meta-batch.
        task_state: shared state with pruned ids and weights (a fresh one if omitted).
        seed: sampler seed (every rank must use the same).
        num_workers: DataLoader workers.

    Example:
        >>> from lightning_metaif.meta.pools import SinusoidTaskPool
        >>> dm = MetaDataModule(SinusoidTaskPool(8, shots=5, queries=5), batch_size=4)
        >>> batch = next(iter(dm.train_dataloader()))
        >>> len(batch), tuple(batch.support_x.shape)
        (4, (4, 5, 1))
    """

    def __init__(
        self,
        train_pool: TaskPool,
        val_pool: TaskPool | None = None,
        test_pool: TaskPool | None = None,
        *,
        batch_size: int = 16,
        task_state: TaskState | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if len(train_pool) < batch_size:
            raise ValueError(
                f"The training pool has {len(train_pool)} tasks, fewer than batch_size={batch_size}."
            )
        self.train_pool, self.val_pool, self.test_pool = train_pool, val_pool, test_pool
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.task_state = task_state if task_state is not None else TaskState()

    def train_dataloader(self) -> DataLoader:
        sampler = TaskSampler(self.train_pool, state=self.task_state, seed=self.seed)
        return self._loader(self.train_pool, sampler=sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._require(self.val_pool, "val_pool"))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._require(self.test_pool, "test_pool"))

    def _loader(self, pool: TaskPool, **kwargs: Any) -> DataLoader:
        return DataLoader(
            pool, batch_size=self.batch_size, collate_fn=collate_tasks, num_workers=self.num_workers, **kwargs
        )

    @staticmethod
    def _require(pool: TaskPool | None, name: str) -> TaskPool:
        if pool is None:
            raise ValueError(f"MetaDataModule was built without `{name}`; pass one to validate or test.")
        return pool
