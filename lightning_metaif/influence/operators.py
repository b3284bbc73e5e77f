"""What every curvature operator over a set of tasks shares: its size, dtype, device, and task subsampling."""

from __future__ import annotations

from typing import Any

import torch

from lightning_metaif.influence.problem import ParamLayout, trainable
from lightning_metaif.influence.tasks import select_tasks

__all__ = ["TaskSetOperator"]


class TaskSetOperator:
    """Base of :class:`~lightning_metaif.influence.hessian.TotalHessian` and
    :class:`~lightning_metaif.influence.gauss_newton.GaussNewton`: a symmetric operator on the flat
    meta-parameters (``self.layout``, ``self.params``) that averages over ``self.tasks`` with
    ``self.task_weights``. Subclasses implement ``matvec`` and may reset cached state in :meth:`_subsampled`.
    """

    layout: Any
    params: Any
    tasks: Any
    task_weights: torch.Tensor

    def _set_tasks(self, params: Any, tasks: Any, task_weights: Any, what: str) -> None:
        """``params`` (trainable leaves), their layout, ``tasks`` and one weight per task (default 1)."""
        self.params = trainable(params)
        self.layout = ParamLayout.of(self.params)
        if len(tasks) == 0:
            raise ValueError(f"The {what} needs at least one training task.")
        self.tasks = tasks
        like = next(iter(self.params.values()))
        if task_weights is None:
            self.task_weights = torch.ones(len(tasks), dtype=like.dtype, device=like.device)
        else:
            self.task_weights = torch.as_tensor(task_weights, dtype=like.dtype, device=like.device)
            if self.task_weights.shape != (len(tasks),):
                raise ValueError(
                    f"task_weights has shape {tuple(self.task_weights.shape)}, expected ({len(tasks)},): one per task."
                )

    @property
    def dim(self) -> int:
        return self.layout.numel

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def subsample(self, batch_size: int, generator: torch.Generator | None = None) -> Any:
        """The same operator over a random mini-batch of tasks (an unbiased estimate, for LiSSA)."""
        index = torch.randperm(len(self.tasks), generator=generator)[
            : max(1, min(batch_size, len(self.tasks)))
        ]
        sub = type(self).__new__(type(self))
        sub.__dict__.update(self.__dict__)
        sub.tasks = select_tasks(self.tasks, index)
        if getattr(self, "task_ids", None) is not None:
            sub.task_ids = self.task_ids[index]
        sub.task_weights = self.task_weights[index.to(self.task_weights.device)]
        sub._subsampled(index)
        return sub

    def _subsampled(self, index: torch.Tensor) -> None:
        """Hook for a subsampled copy (``self``) to drop or cut what it cached for the whole task set."""
