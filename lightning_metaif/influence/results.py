"""The result record every task-influence estimator returns, and its JSON form."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


def jsonable(value: Any) -> Any:
    """Plain Python (JSON-serialisable) form of tensors, dicts, sequences and numbers (non-finite -> None).

    Example:
        >>> jsonable({"a": torch.tensor([1.0, 2.0]), "b": float("nan")})
        {'a': [1.0, 2.0], 'b': None}
    """
    if isinstance(value, Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return f"<{type(value).__name__}>"  # e.g. a reusable LowRankInverse from the arnoldi solver


@dataclass
class InfluenceResult:
    """Scores of one estimator for a pool of tasks (``scores[i]`` belongs to ``task_ids[i]``).

    Example:
        >>> import torch
        >>> r = InfluenceResult(torch.tensor([10, 11, 12]), torch.tensor([0.5, -1.0, 2.0]), estimator="task_if")
        >>> r.ranking().tolist(), len(r)
        ([11, 10, 12], 3)
    """

    task_ids: Tensor
    scores: Tensor
    self_influence: Tensor | None = None
    estimator: str = ""
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.task_ids = torch.as_tensor(self.task_ids).to(torch.long).cpu().reshape(-1)
        self.scores = torch.as_tensor(self.scores).detach().cpu().reshape(-1)
        if self.scores.shape != self.task_ids.shape:
            raise ValueError(
                f"scores has {self.scores.numel()} entries for {self.task_ids.numel()} task ids; they must align."
            )
        if self.self_influence is not None:
            self.self_influence = torch.as_tensor(self.self_influence).detach().cpu().reshape(-1)
            if self.self_influence.shape != self.task_ids.shape:
                raise ValueError("self_influence must have one entry per task id.")

    def __len__(self) -> int:
        return int(self.task_ids.numel())

    def ranking(self) -> Tensor:
        """Task ids ordered from most harmful (lowest score) to most helpful (stable for ties)."""
        order = torch.argsort(self.scores, stable=True)
        return self.task_ids[order]

    def as_dict(self) -> dict[int, float]:
        """``{task_id: score}``."""
        return dict(zip(self.task_ids.tolist(), self.scores.tolist()))

    def to_dict(self) -> dict[str, Any]:
        """Plain Python (JSON-serialisable) form: lists, floats, nested diagnostics."""
        return {
            "estimator": self.estimator,
            "task_ids": self.task_ids.tolist(),
            "scores": self.scores.tolist(),
            "self_influence": None if self.self_influence is None else self.self_influence.tolist(),
            "diagnostics": jsonable(self.diagnostics),
        }


__all__ = ["InfluenceResult", "jsonable"]
