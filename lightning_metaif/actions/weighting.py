"""From scores to per-task weights: a documented, monotone rule."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TaskWeighting:
    """Down-weight harmful tasks smoothly; keep helpful ones at weight 1.

    The rule, for a round's finite scores ``s`` (positive = helpful):

    * ``scale = median(|s|)`` (robust to a few huge scores);
    * harmful tasks (``s_k < 0``) get ``w_k = max(min_weight, exp(strength * s_k / scale))``, helpful and
      neutral tasks ``w_k = 1``;
    * if ``normalize``, weights are rescaled to mean 1 over the scored tasks, so the expected size of the meta
      gradient stays the same (as InfoBatch rescales kept samples);
    * tasks with a non-finite score keep their previous weight (a broken round never changes weights).

    Args:
        strength: how fast weight falls with harm, in units of the typical score magnitude.
        min_weight: floor of the weight of a harmful task (``0`` would prune; use a pruning policy for that).
        normalize: rescale to mean 1.

    Example:
        >>> import torch
        >>> w = TaskWeighting(strength=1.0, min_weight=0.1, normalize=False)
        >>> w(torch.tensor([2.0, -1.0, 1.0, -100.0])).tolist()
        [1.0, 0.3678794503211975, 1.0, 0.10000000149011612]
    """

    strength: float = 1.0
    min_weight: float = 0.1
    normalize: bool = True

    def __post_init__(self) -> None:
        if not self.strength > 0:
            raise ValueError(f"TaskWeighting.strength must be > 0, got {self.strength}.")
        if not 0.0 < self.min_weight <= 1.0:
            raise ValueError(
                f"TaskWeighting.min_weight must be in (0, 1], got {self.min_weight}; to drop tasks use a PruningPolicy."
            )

    def __call__(self, scores: Tensor, previous: Tensor | None = None) -> Tensor:
        scores = scores.detach().to(torch.float32)
        finite = torch.isfinite(scores)
        weights = torch.ones_like(scores) if previous is None else previous.detach().to(torch.float32).clone()
        if not finite.any():
            return weights
        scale = scores[finite].abs().median().clamp_min(torch.finfo(torch.float32).tiny)
        harm = finite & (scores < 0)
        weights[finite] = 1.0
        weights[harm] = torch.exp(self.strength * scores[harm] / scale).clamp_min(self.min_weight)
        if self.normalize:
            weights[finite] = weights[finite] / weights[finite].mean()
        return weights
