"""Which tasks to prune in a scoring round, with the safety limits a training run needs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_metaif.records import Decision, ScoreRound


@dataclass(frozen=True)
class PruningPolicy:
    """Prune the lowest-scoring tasks (scores: positive = helpful, negative = harmful).

    Args:
        fraction: target fraction of the *original* pool to prune in total (lowest scores first).
        threshold: alternatively (or additionally), prune tasks whose score is below this value.
        warmup_rounds: scoring rounds to observe before the first prune (early scores are noisy).
        max_fraction_per_round: at most this fraction of the original pool pruned in one round.
        min_pool_size: never let the number of kept tasks fall below this.
        only_harmful: prune only tasks with a negative score, even if the target fraction is not reached.

    Rounds with any non-finite score prune nothing (the decision says so): a broken round never removes data.

    Example:
        >>> import torch
        >>> policy = PruningPolicy(fraction=0.25, warmup_rounds=0, max_fraction_per_round=0.5, min_pool_size=2)
        >>> d = policy.decide(torch.arange(8), torch.tensor([3., -2., 1., -5., 4., 2., 0.5, 6.]), set(), round_index=1)
        >>> d.task_ids, d.action
        ([3, 1], 'prune')
    """

    fraction: float | None = 0.2
    threshold: float | None = None
    warmup_rounds: int = 1
    max_fraction_per_round: float = 0.1
    min_pool_size: int = 1
    only_harmful: bool = True

    def __post_init__(self) -> None:
        if self.fraction is None and self.threshold is None:
            raise ValueError("PruningPolicy needs `fraction` (e.g. 0.2) or `threshold` (e.g. 0.0), or both.")
        if self.fraction is not None and not 0.0 < self.fraction < 1.0:
            raise ValueError(f"PruningPolicy.fraction must be in (0, 1), got {self.fraction}.")
        if not 0.0 < self.max_fraction_per_round <= 1.0:
            raise ValueError(f"max_fraction_per_round must be in (0, 1], got {self.max_fraction_per_round}.")
        if self.warmup_rounds < 0 or self.min_pool_size < 1:
            raise ValueError("warmup_rounds must be >= 0 and min_pool_size >= 1.")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ValueError(f"PruningPolicy.threshold must be finite, got {self.threshold}.")

    def decide_round(
        self, round: ScoreRound, state: Any, *, round_index: int, pool_size: int, **_: Any
    ) -> Decision:
        """The callback's entry point: decide on the round's scored, kept tasks (never-scored tasks take no part).

        Example:
            >>> import torch
            >>> from lightning_metaif.actions.state import TaskState
            >>> r = ScoreRound(step=3, epoch=0, estimator="task_if", task_ids=torch.arange(4),
            ...                scores=torch.tensor([-1.0, 2.0, -3.0, 0.0]), scored=torch.tensor([1, 1, 0, 1]))
            >>> PruningPolicy(fraction=0.25, warmup_rounds=0, max_fraction_per_round=0.5).decide_round(
            ...     r, TaskState(), round_index=1, pool_size=4).task_ids   # task 2 was not scored
            [0]
        """
        take = round.scored & ~torch.tensor(
            [state.is_pruned(t) for t in round.task_ids.tolist()], dtype=torch.bool
        )
        return self.decide(
            round.task_ids[take],
            round.scores[take],
            set(state.pruned),
            round_index=round_index,
            pool_size=pool_size,
            step=round.step,
            epoch=round.epoch,
        )

    def decide(
        self,
        task_ids: Tensor,
        scores: Tensor,
        pruned: set[int],
        *,
        round_index: int,
        pool_size: int | None = None,
        step: int = 0,
        epoch: int = 0,
    ) -> Decision:
        """Ids to prune this round (never already-pruned ids), given the round's scores.

        ``round_index`` counts scoring rounds from 1; ``pool_size`` is the original pool size (defaults to
        ``len(task_ids)``).
        """
        ids = torch.as_tensor(task_ids).long().cpu()
        scores = torch.as_tensor(scores).detach().double().cpu()
        if ids.shape != scores.shape:
            raise ValueError(f"task_ids {tuple(ids.shape)} and scores {tuple(scores.shape)} must be aligned.")
        pool_size = int(pool_size or len(ids))

        def skip(reason: str) -> Decision:
            return Decision(step, epoch, "skip", [], reason)

        if not torch.isfinite(scores).all():
            bad = ids[~torch.isfinite(scores)].tolist()
            return skip(f"{len(bad)} non-finite scores (e.g. ids {bad[:5]}); pruning nothing this round")
        if round_index <= self.warmup_rounds:
            return skip(f"warm-up: round {round_index} of {self.warmup_rounds}")
        kept = torch.tensor([int(i) not in pruned for i in ids.tolist()], dtype=torch.bool)
        budget_total = pool_size if self.fraction is None else int(math.floor(self.fraction * pool_size))
        budget = min(
            budget_total - len(pruned),
            int(math.floor(self.max_fraction_per_round * pool_size)),
            int(kept.sum()) - self.min_pool_size,
        )
        if budget <= 0:
            return skip(
                f"limit reached: {len(pruned)} pruned of {pool_size}, target {budget_total}, "
                f"min pool size {self.min_pool_size}"
            )
        candidates = kept.clone()
        if self.only_harmful:
            candidates &= scores < 0
        if self.threshold is not None:
            candidates &= scores < self.threshold
        order = torch.argsort(scores[candidates], stable=True)
        chosen = ids[candidates][order][:budget].tolist()
        if not chosen:
            return skip(
                "no kept task is harmful" if self.only_harmful else "no kept task below the threshold"
            )
        rule = []
        if self.fraction is not None:
            rule.append(f"lowest scores up to {self.fraction:.0%} of {pool_size}")
        if self.threshold is not None:
            rule.append(f"score < {self.threshold:g}")
        if self.only_harmful:
            rule.append("score < 0")
        return Decision(
            step,
            epoch,
            "prune",
            chosen,
            f"{', '.join(rule)}; at most {self.max_fraction_per_round:.0%} per round",
        )
