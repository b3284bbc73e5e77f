"""From scores to per-task weights: a documented, monotone rule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_metaif.records import Decision, ScoreRound


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

    def decide_round(self, round: ScoreRound, state: Any, **_: Any) -> Decision:
        """The callback's entry point: new weights for the round's scored, kept tasks (normalised over them).

        Example:
            >>> from lightning_metaif.actions.state import TaskState
            >>> state = TaskState(); state.prune([2])
            >>> r = ScoreRound(step=3, epoch=0, estimator="trajectory", task_ids=torch.arange(3),
            ...                scores=torch.tensor([1.0, -1.0, -5.0]))
            >>> d = TaskWeighting(normalize=False).decide_round(r, state)
            >>> d.task_ids, [round(w, 3) for w in d.weights]   # the pruned task 2 takes no part
            ([0, 1], [1.0, 0.368])
        """
        take = round.scored & ~torch.tensor(
            [state.is_pruned(t) for t in round.task_ids.tolist()], dtype=torch.bool
        )
        ids = round.task_ids[take]
        weights = self(round.scores[take].float(), state.weights_for(ids))
        return Decision(
            round.step,
            round.epoch,
            "weight",
            ids.tolist(),
            f"TaskWeighting(strength={self.strength}, min_weight={self.min_weight}, normalize={self.normalize})",
            weights=weights.tolist(),
        )
