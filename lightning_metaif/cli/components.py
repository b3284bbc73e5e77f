"""Building blocks usable from ``LightningCLI`` configs: a flat MLP for small images, a digits datamodule."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lightning_metaif.meta.datamodule import MetaDataModule


class FlatMLP(nn.Module):
    """``Flatten`` → ReLU MLP → linear ``head``: a fast few-shot backbone for small images (8x8 digits).

    Stateless (no normalisation, no dropout), so :class:`~lightning_metaif.MAML` can ``vmap`` its inner loop.

    Args:
        in_dim: flattened input size (64 for 8x8 digits).
        num_classes: outputs (the number of ways N).
        hidden: widths of the hidden layers.

    Example:
        >>> import torch
        >>> FlatMLP(64, 5, hidden=(16,))(torch.zeros(3, 1, 8, 8)).shape
        torch.Size([3, 5])
    """

    def __init__(self, in_dim: int = 64, num_classes: int = 5, hidden: Sequence[int] = (128, 128)) -> None:
        super().__init__()
        if in_dim < 1 or num_classes < 1 or any(h < 1 for h in hidden):
            raise ValueError(
                f"FlatMLP sizes must be positive, got in_dim={in_dim}, num_classes={num_classes}, hidden={hidden}."
            )
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            width = int(h)
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class DigitsDataModule(MetaDataModule):
    """A :class:`~lightning_metaif.MetaDataModule` over :func:`~lightning_metaif.digits_splits`, with label noise.

    Everything is built from plain arguments, so it works in a ``LightningCLI`` YAML config. With ``noise > 0``
    a seeded share of the training tasks is corrupted (:func:`~lightning_metaif.corrupt_tasks`);
    :attr:`corrupted_task_ids` holds the ground truth (the ``lightning-metaif fit`` command hands it to a
    ``MetaInfluence`` callback that has none, which adds detection AUROC / recall to its metrics).

    Pruning with a separately built callback (as in a config): the callback binds its ``task_state`` into the
    :class:`~lightning_metaif.TaskSampler` of the train loader at ``on_train_start``.

    Args:
        num_tasks: training tasks in the pool.
        num_val_tasks: validation tasks (the callback's default reference set).
        num_test_tasks: meta-test tasks.
        ways, shots, queries: the N-way K-shot task shape (queries per class).
        noise: share of training tasks to corrupt, in ``[0, 1)``.
        noise_mode: ``"random_labels"``, ``"shuffle_query"`` or ``"flip_labels"``.
        batch_size: tasks per meta-batch.
        seed: seed of the class split, of the tasks, of the corruption and of the sampler.

    Example:
        >>> dm = DigitsDataModule(num_tasks=20, num_val_tasks=4, num_test_tasks=4, noise=0.25, batch_size=5)
        >>> len(dm.train_pool), len(dm.corrupted_task_ids)
        (20, 5)
    """

    def __init__(
        self,
        num_tasks: int = 100,
        num_val_tasks: int = 20,
        num_test_tasks: int = 100,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        noise: float = 0.2,
        noise_mode: str = "random_labels",
        batch_size: int = 10,
        seed: int = 0,
    ) -> None:
        from lightning_metaif.meta.datasets import digits_splits
        from lightning_metaif.meta.noise import corrupt_tasks

        if not 0.0 <= noise < 1.0:
            raise ValueError(f"noise must be in [0, 1) (share of training tasks to corrupt), got {noise}.")
        splits = digits_splits(
            ways=ways,
            shots=shots,
            queries=queries,
            num_train_tasks=num_tasks,
            num_val_tasks=num_val_tasks,
            num_test_tasks=num_test_tasks,
            seed=seed,
        )
        train, self.corruption = splits.train, None
        if noise > 0:
            train, self.corruption = corrupt_tasks(splits.train, noise, mode=noise_mode, seed=seed)
        super().__init__(train, splits.val, splits.test, batch_size=batch_size, seed=seed)
        self.splits = splits

    @property
    def corrupted_task_ids(self) -> list[int] | None:
        """Ids of the corrupted training tasks (``None`` without noise)."""
        return None if self.corruption is None else [int(t) for t in self.corruption.task_ids.tolist()]


__all__ = ["DigitsDataModule", "FlatMLP"]
