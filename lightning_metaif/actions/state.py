"""The per-task state that the callback decides and that the sampler and the module read."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor


class TaskState:
    """Per-task weights and the pruned set, keyed by stable task id.

    One object is shared by the callback (which writes it), the :class:`~lightning_metaif.TaskSampler`
    (which skips pruned ids) and the module's ``task_weight_table`` (which scales each task's outer loss).
    It is mutated in place, never replaced, so every holder sees each decision. Unknown ids have weight 1.

    Example:
        >>> state = TaskState()
        >>> state.set_weights([3, 4], [0.5, 2.0]); state.prune([4])
        >>> state.weights_for([3, 4, 5]).tolist(), sorted(state.pruned)
        ([0.5, 0.0, 1.0], [4])
    """

    def __init__(self) -> None:
        self.weights: dict[int, float] = {}
        self.pruned: set[int] = set()
        self.dropped: set[int] = set()  # efficiency pruning: pruned for the current epoch only
        self.rescaled: set[int] = set()  # efficiency pruning: kept tasks re-weighted for the current epoch
        self.version = 0

    def set_weights(self, task_ids: Iterable[int], weights: Iterable[float]) -> None:
        for task_id, weight in zip(task_ids, weights, strict=True):
            weight = float(weight)
            if not (weight >= 0.0 and weight < float("inf")):
                raise ValueError(f"Task weight for id {task_id} must be finite and >= 0, got {weight}.")
            self.weights[int(task_id)] = weight
        self.version += 1

    def prune(self, task_ids: Iterable[int]) -> None:
        self.pruned.update(int(t) for t in task_ids)
        self.version += 1

    def restore(self, task_ids: Iterable[int]) -> None:
        """Bring pruned tasks back (they are sampled again from the next epoch, with their previous weight)."""
        self.pruned.difference_update(int(t) for t in task_ids)
        self.version += 1

    def resample(self, task_ids: Iterable[int], weights: Iterable[float]) -> None:
        """Efficiency pruning for the coming epoch: the previous epoch's dropped tasks come back and its
        re-weighted tasks return to weight 1; then ids with weight 0 are dropped and the others re-weighted.

        Example:
            >>> state = TaskState()
            >>> state.resample([1, 2, 3], [0.0, 0.0, 2.0])
            >>> sorted(state.pruned), state.weight(3)
            ([1, 2], 2.0)
            >>> state.resample([3, 1], [0.0, 2.0])
            >>> sorted(state.pruned), state.weight(2), state.weight(1)
            ([3], 1.0, 2.0)
        """
        self.pruned -= self.dropped
        for task_id in self.rescaled:
            self.weights.pop(task_id, None)
        pairs = [(int(t), float(w)) for t, w in zip(task_ids, weights, strict=True)]
        self.dropped = {t for t, w in pairs if w == 0.0}
        self.pruned |= self.dropped
        self.rescaled = {t for t, w in pairs if w != 0.0}
        self.set_weights(self.rescaled, [w for _, w in pairs if w != 0.0])

    def is_pruned(self, task_id: int) -> bool:
        return int(task_id) in self.pruned

    def weight(self, task_id: int) -> float:
        task_id = int(task_id)
        return 0.0 if task_id in self.pruned else self.weights.get(task_id, 1.0)

    def weights_for(self, task_ids: Iterable[int] | Tensor) -> Tensor:
        """Weights of ``task_ids`` (0 for pruned ids, 1 for ids never weighted)."""
        ids = task_ids.tolist() if isinstance(task_ids, Tensor) else list(task_ids)
        return torch.tensor([self.weight(t) for t in ids], dtype=torch.float32)

    # A dict view that modules read as ``task_weight_table`` (missing id -> 1.0).
    def get(self, task_id: int, default: float = 1.0) -> float:
        task_id = int(task_id)
        if task_id in self.pruned:
            return 0.0
        return self.weights.get(task_id, default)

    def __getitem__(self, task_id: int) -> float:
        return self.get(task_id)

    def __contains__(self, task_id: object) -> bool:
        return isinstance(task_id, int) and (task_id in self.weights or task_id in self.pruned)

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and lists only, so Lightning checkpoints load with ``weights_only=True``."""
        ids = sorted(self.weights)
        return {
            "weight_ids": torch.tensor(ids, dtype=torch.long),
            "weight_values": torch.tensor([self.weights[i] for i in ids], dtype=torch.float64),
            "pruned": torch.tensor(sorted(self.pruned), dtype=torch.long),
            "dropped": torch.tensor(sorted(self.dropped), dtype=torch.long),
            "rescaled": torch.tensor(sorted(self.rescaled), dtype=torch.long),
            "version": self.version,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights = {
            int(i): float(w)
            for i, w in zip(state["weight_ids"].tolist(), state["weight_values"].tolist(), strict=True)
        }
        self.pruned = {int(i) for i in state["pruned"].tolist()}
        self.dropped = {int(i) for i in state.get("dropped", torch.zeros(0)).tolist()}
        self.rescaled = {int(i) for i in state.get("rescaled", torch.zeros(0)).tolist()}
        self.version = int(state.get("version", 0)) + 1
