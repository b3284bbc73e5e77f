"""The records every layer shares: one scoring round, one decision, one sample score.

These sit on the ground floor of the package (they import only torch): the callback builds them, the actions
return them, the dashboards and files publish them.

Sign convention (project-wide): ``score`` is the first-order predicted *increase* of the reference loss if the task
were removed, so positive = helpful, negative = harmful. Ranks go by score ascending: rank 1 is the most harmful
task. Non-finite scores (NaN, +-inf: a failed or diverged estimate) and tasks not scored yet are *unranked*: their
rank is ``None`` and every ranking puts them after all finite scores, so they are never counted as "most harmful".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

Action = Literal["prune", "weight", "restore", "resample", "skip"]
Split = Literal["support", "query"]
ACTIONS: tuple[str, ...] = ("prune", "weight", "restore", "resample", "skip")
SPLITS: tuple[str, ...] = ("support", "query")

__all__ = ["ACTIONS", "SPLITS", "Decision", "SampleScore", "ScoreRound", "harmful_order"]


@dataclass
class Decision:
    """One action the callback took (or declined to take) in a round; what rank 0 broadcasts to the others.

    ``action``: ``"prune"`` (stop sampling ``task_ids``), ``"weight"`` (set ``weights``, aligned with ``task_ids``),
    ``"restore"`` (bring pruned ``task_ids`` back), ``"resample"`` (efficiency pruning: the previous epoch's
    dropped tasks come back, then the ``task_ids`` whose weight is 0 are dropped for the coming epoch and the
    others get their weight) or ``"skip"`` (nothing, ``reason`` says why).

    Example:
        >>> Decision(step=10, epoch=0, action="prune", task_ids=[3, 5], reason="score < q10")
        Decision(step=10, epoch=0, action='prune', task_ids=[3, 5], reason='score < q10', weights=None)
        >>> from lightning_metaif.actions.state import TaskState
        >>> state = TaskState()
        >>> Decision(1, 0, "weight", [3], "down-weight", weights=[0.5]).apply(state)
        >>> state.weight(3)
        0.5
    """

    step: int
    epoch: int
    action: Action
    task_ids: list[int]
    reason: str
    weights: list[float] | None = None

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"Decision.action must be one of {ACTIONS}, got {self.action!r}")
        self.step, self.epoch = int(self.step), int(self.epoch)
        self.task_ids = [int(t) for t in self.task_ids]
        self.reason = str(self.reason)
        if self.weights is not None:
            self.weights = [float(w) for w in self.weights]
            if len(self.weights) != len(self.task_ids):
                raise ValueError(
                    f"Decision.weights has {len(self.weights)} entries for {len(self.task_ids)} task ids."
                )

    def apply(self, state: Any) -> None:
        """Carry the decision out on a :class:`~lightning_metaif.TaskState` (``"skip"`` does nothing)."""
        if self.action == "prune":
            state.prune(self.task_ids)
        elif self.action == "restore":
            state.restore(self.task_ids)
        elif self.action == "resample":
            state.resample(self.task_ids, self.weights or [])
        elif self.action == "weight":
            if self.weights is None:
                raise ValueError("This 'weight' Decision has no `weights` to apply (one per task id).")
            state.set_weights(self.task_ids, self.weights)

    def to_state(self) -> dict[str, Any]:
        """Plain values only (checkpoints load with ``weights_only=True``)."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "action": self.action,
            "task_ids": list(self.task_ids),
            "reason": self.reason,
            "weights": None if self.weights is None else list(self.weights),
        }


@dataclass
class SampleScore:
    """Influence of one support/query sample of one task (``image`` optional: [H,W], [1|3,H,W] or [H,W,3]).

    ``excess_loss`` (query samples): the sample's loss after adaptation minus the mean loss of the task's other
    query samples with the same label (:func:`~lightning_metaif.influence.instance.query_label_outliers`); high =
    likely mislabelled.

    Example:
        >>> SampleScore(task_id=3, split="query", index=4, score=-0.25, label=1).split
        'query'
    """

    task_id: int
    split: Split
    index: int
    score: float
    label: int | float | None = None
    image: Tensor | None = None
    excess_loss: float | None = None

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"SampleScore.split must be one of {SPLITS}, got {self.split!r}")
        self.task_id, self.index, self.score = int(self.task_id), int(self.index), float(self.score)
        if isinstance(self.label, Tensor):
            self.label = self.label.item()
        if self.excess_loss is not None:
            self.excess_loss = float(self.excess_loss)
        if self.image is not None and not isinstance(self.image, Tensor):
            raise ValueError(
                f"SampleScore.image must be a torch.Tensor or None, got {type(self.image).__name__}"
            )


def _vector(name: str, value: Any, size: int | None, dtype: torch.dtype) -> Tensor:
    tensor = torch.as_tensor(value).detach().to("cpu")
    if tensor.dim() != 1:
        raise ValueError(
            f"ScoreRound.{name} must be 1-D (one entry per task), got shape {tuple(tensor.shape)}"
        )
    if size is not None and tensor.numel() != size:
        raise ValueError(
            f"ScoreRound.{name} has {tensor.numel()} entries but task_ids has {size}: pass one value per task, "
            "in the order of task_ids"
        )
    if (
        dtype == torch.bool
        and tensor.dtype != torch.bool
        and (tensor.is_floating_point() or not bool(((tensor == 0) | (tensor == 1)).all()))
    ):
        raise ValueError(f"ScoreRound.{name} must be a boolean mask (or 0/1 integers)")
    return tensor.to(dtype)


def harmful_order(scores: Tensor) -> Tensor:
    """Positions sorted most harmful first (score ascending, stable), non-finite scores last.

    Example:
        >>> harmful_order(torch.tensor([0.5, float("nan"), -1.0, 0.0])).tolist()
        [2, 3, 0, 1]
    """
    scores = scores.detach().to("cpu", torch.float64)
    finite = torch.isfinite(scores)
    key = torch.where(finite, scores, torch.full_like(scores, float("inf")))
    order = torch.sort(key, stable=True).indices
    # finite +inf placeholders sort with real +inf scores; both are non-finite, so put all non-finite at the end
    return torch.cat([order[finite[order]], order[~finite[order]]])


@dataclass
class ScoreRound:
    """Everything the callback knows after one scoring round.

    Tensors are detached and moved to CPU; per-task tensors must be 1-D and aligned with ``task_ids``.
    ``weights`` defaults to ones, ``pruned`` to all-False, ``scored`` (which tasks have a score at all) to
    all-True. A task that was never scored is unranked and left out of every statistic; its score is NaN. ``decisions`` are the decisions taken in *this* round
    (``round_metrics`` counts the ids of its ``"prune"`` decisions as newly pruned).

    Example:
        >>> r = ScoreRound(step=20, epoch=1, estimator="task_if", task_ids=torch.tensor([7, 8, 9]),
        ...                scores=torch.tensor([0.3, -0.2, 0.1]))
        >>> [(row["id"], row["rank"]) for row in r.to_rows()]
        [(7, 3), (8, 1), (9, 2)]
    """

    step: int
    epoch: int
    estimator: str
    task_ids: Tensor
    scores: Tensor
    self_influence: Tensor | None = None
    weights: Tensor | None = None
    pruned: Tensor | None = None
    decisions: list[Decision] = field(default_factory=list)
    classes: list[list[int]] | None = None
    corrupted: Tensor | None = None
    seconds: float = 0.0
    sample_rows: list[SampleScore] | None = None
    scored: Tensor | None = None

    def __post_init__(self) -> None:
        self.step, self.epoch, self.seconds = int(self.step), int(self.epoch), float(self.seconds)
        self.estimator = str(self.estimator)
        ids = torch.as_tensor(self.task_ids).detach().to("cpu")
        if ids.is_floating_point():
            raise ValueError("ScoreRound.task_ids must be integers (got a floating tensor)")
        self.task_ids = _vector("task_ids", ids, None, torch.long)
        m = self.task_ids.numel()
        if torch.unique(self.task_ids).numel() != m:
            raise ValueError("ScoreRound.task_ids contains duplicates: every task must appear once per round")
        self.scores = _vector("scores", self.scores, m, torch.float64)
        if self.self_influence is not None:
            self.self_influence = _vector("self_influence", self.self_influence, m, torch.float64)
        self.weights = (
            torch.ones(m, dtype=torch.float64)
            if self.weights is None
            else _vector("weights", self.weights, m, torch.float64)
        )
        self.pruned = (
            torch.zeros(m, dtype=torch.bool)
            if self.pruned is None
            else _vector("pruned", self.pruned, m, torch.bool)
        )
        self.scored = (
            torch.ones(m, dtype=torch.bool)
            if self.scored is None
            else _vector("scored", self.scored, m, torch.bool)
        )
        self.scores = torch.where(self.scored, self.scores, torch.full_like(self.scores, float("nan")))
        if self.corrupted is not None:
            self.corrupted = _vector("corrupted", self.corrupted, m, torch.bool)
        if self.classes is not None:
            if len(self.classes) != m:
                raise ValueError(
                    f"ScoreRound.classes has {len(self.classes)} entries but task_ids has {m}: "
                    "pass one list of original classes per task"
                )
            self.classes = [[int(c) for c in cls] for cls in self.classes]
        for i, d in enumerate(self.decisions):
            if not isinstance(d, Decision):
                raise ValueError(f"ScoreRound.decisions[{i}] must be a Decision, got {type(d).__name__}")
        if self.sample_rows is not None:
            for i, s in enumerate(self.sample_rows):
                if not isinstance(s, SampleScore):
                    raise ValueError(
                        f"ScoreRound.sample_rows[{i}] must be a SampleScore, got {type(s).__name__}"
                    )

    @property
    def num_tasks(self) -> int:
        """Number of scored tasks M."""
        return int(self.task_ids.numel())

    def order(self) -> Tensor:
        """Positions most harmful first (see :func:`harmful_order`); never-scored tasks come last."""
        return harmful_order(self.scores)

    def ranks(self) -> list[int | None]:
        """Rank per position: 1 = lowest finite score (most harmful); ``None`` for non-finite scores."""
        ranks: list[int | None] = [None] * self.num_tasks
        finite = torch.isfinite(self.scores)
        for r, pos in enumerate(self.order().tolist(), start=1):
            if bool(finite[pos]):
                ranks[pos] = r
        return ranks

    def to_rows(self) -> list[dict[str, Any]]:
        """One dict per task, in ``task_ids`` order.

        Keys: ``id, score, self_influence, rank, weight, pruned, classes, corrupted, scored`` (``None`` where
        unknown; ``rank`` 1 = most harmful, ``None`` for non-finite or never-scored tasks).
        """
        ranks = self.ranks()
        si = self.self_influence.tolist() if self.self_influence is not None else [None] * self.num_tasks
        cor = self.corrupted.tolist() if self.corrupted is not None else [None] * self.num_tasks
        cls = self.classes if self.classes is not None else [None] * self.num_tasks
        return [
            {
                "id": tid,
                "score": score,
                "self_influence": s,
                "rank": rank,
                "weight": w,
                "pruned": p,
                "classes": c,
                "corrupted": k,
                "scored": d,
            }
            for tid, score, s, rank, w, p, c, k, d in zip(
                self.task_ids.tolist(),
                self.scores.tolist(),
                si,
                ranks,
                self.weights.tolist(),
                self.pruned.tolist(),
                cls,
                cor,
                self.scored.tolist(),
            )
        ]
