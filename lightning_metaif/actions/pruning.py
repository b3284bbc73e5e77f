"""Which tasks to prune in a scoring round, with the safety limits a training run needs.

Two intents:

* ``intent="cleaning"`` (default): remove *harmful* tasks for good, and only on a signal that is stable and
  taken while training is improving: a task must be among the lowest scores for ``stable_rounds`` consecutive
  rounds, no pruning happens in a round where the reference loss rose, and a rollback guard brings the last
  pruned tasks back (a ``"restore"`` decision) if the reference loss got worse after pruning them by more than
  its round-to-round noise (:func:`rollback_tolerance_of`) or the user's ``rollback_tolerance``.
* ``intent="efficiency"``: InfoBatch (Qin et al., ICLR 2024): every round, drop a random ``drop_ratio`` of the
  *well-learned* tasks (loss below the mean of the kept tasks; in the callback, the self-influence the round
  reports, ``Σ η ‖g_k‖²``, stands for the loss) for the coming epoch and give the kept well-learned tasks the weight
  ``1 / (1 − drop_ratio)``, so the expected meta-gradient is unchanged; the dropped tasks come back at the next
  round (a ``"resample"`` decision: ``task_ids`` with weight 0 are dropped, the others re-weighted). No
  dropping in the last ``anneal_fraction`` of training.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_metaif.records import Decision, ScoreRound

Intent = Literal["cleaning", "efficiency"]

ROLLBACK_FLOOR = 0.005
"""``rollback_tolerance="auto"``: the tolerance is at least this share of the reference loss at the prune."""
ROLLBACK_UNMEASURED = 0.02
"""``rollback_tolerance="auto"`` with a single reference loss before the prune (no noise measured yet)."""


def rollback_tolerance_of(reference_losses: Sequence[float], sigmas: float = 3.0) -> float:
    """The automatic rollback tolerance, in loss units, from the reference losses up to a prune (its last).

    How much the reference loss moves by chance from one round to the next, measured before the prune:
    ``sigmas × 1.4826 × median |Δ²L| / √3``, where ``Δ²L_i = L_i − 2 L_(i−1) + L_(i−2)`` are the second
    differences of those rounds. Second differences cancel a steady trend (a loss still falling fast is not
    noise), and for independent round-to-round noise of standard deviation σ they have standard deviation
    ``√6 σ``, so ``1.4826 × median |Δ²L| / √3`` is a robust estimate of ``√2 σ``, the standard deviation of the
    difference of two rounds' losses. At least ``ROLLBACK_FLOOR × |L|``. With two losses only, the one change
    stands for that scale (``sigmas × 1.4826 × |ΔL|``); with one, ``ROLLBACK_UNMEASURED × |L|``.

    Example:
        >>> # a falling loss with noise: Δ² = .05 .07 -.09, median |Δ²| .07
        >>> round(rollback_tolerance_of([1.30, 1.20, 1.15, 1.17, 1.10]), 4)
        0.1798
        >>> rollback_tolerance_of([1.4, 1.2, 1.0, 0.8])  # a straight line: no noise, the floor (0.5% of 0.8)
        0.004
    """
    losses = [float(x) for x in reference_losses]
    if not losses:
        raise ValueError("rollback_tolerance_of needs at least one reference loss.")
    if not all(math.isfinite(x) for x in losses):
        raise ValueError(
            f"rollback_tolerance_of needs finite reference losses, got {losses[-3:]} (last three)."
        )
    if not (isinstance(sigmas, (int, float)) and math.isfinite(sigmas) and sigmas > 0):
        raise ValueError(f"rollback_tolerance_of(sigmas={sigmas!r}) must be a finite value > 0 (e.g. 3.0).")
    floor = ROLLBACK_FLOOR * abs(losses[-1])
    if len(losses) == 1:
        return ROLLBACK_UNMEASURED * abs(losses[-1])
    values = torch.tensor(losses, dtype=torch.float64)
    if len(losses) == 2:
        return max(sigmas * 1.4826 * float((values[1] - values[0]).abs()), floor)
    second = values.diff(n=2).abs()
    return max(sigmas * 1.4826 * float(second.quantile(0.5)) / math.sqrt(3.0), floor)


@dataclass
class PruningMemory:
    """What a :class:`PruningPolicy` remembers between rounds (streaks, last prune, protected ids)."""

    streaks: dict[int, int] = field(default_factory=dict)
    last_round: int = 0
    last_prune_ids: list[int] = field(default_factory=list)
    last_prune_loss: float | None = None
    last_prune_tolerance: float | None = None  # the rollback tolerance of the last prune, in loss units
    rounds_worse: int = 0  # rounds since the last prune whose reference loss exceeded its tolerance
    protected: set[int] = field(default_factory=set)
    dropped: list[int] = field(default_factory=list)  # efficiency: the tasks dropped for the current epoch
    precision: list[float] = field(default_factory=list)  # cleaning: one per round that pruned (ground truth)

    def state_dict(self) -> dict[str, Any]:
        return {
            "streak_ids": torch.tensor(sorted(self.streaks), dtype=torch.long),
            "streak_values": torch.tensor([self.streaks[k] for k in sorted(self.streaks)], dtype=torch.long),
            "last_round": self.last_round,
            "last_prune_ids": torch.tensor(self.last_prune_ids, dtype=torch.long),
            "last_prune_loss": self.last_prune_loss,
            "last_prune_tolerance": self.last_prune_tolerance,
            "rounds_worse": self.rounds_worse,
            "protected": torch.tensor(sorted(self.protected), dtype=torch.long),
            "dropped": torch.tensor(self.dropped, dtype=torch.long),
            "precision": torch.tensor(self.precision, dtype=torch.float64),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.streaks = dict(zip(state["streak_ids"].tolist(), state["streak_values"].tolist(), strict=True))
        self.last_round = int(state["last_round"])
        self.last_prune_ids = state["last_prune_ids"].tolist()
        self.last_prune_loss = state["last_prune_loss"]
        self.last_prune_tolerance = state.get("last_prune_tolerance")
        self.rounds_worse = int(state.get("rounds_worse", 0))
        self.protected = set(state["protected"].tolist())
        self.dropped = state["dropped"].tolist()
        self.precision = state["precision"].tolist()


@dataclass(frozen=True)
class PruningPolicy:
    """Prune the lowest-scoring tasks (scores: positive = helpful, negative = harmful) when it is safe.

    Args:
        fraction: target fraction of the *original* pool to prune in total (lowest scores first).
        threshold: alternatively (or additionally), prune tasks whose score is below this value.
        warmup_rounds: scoring rounds to observe before the first prune (early scores are noisy).
        max_fraction_per_round: at most this fraction of the original pool pruned in one round.
        min_pool_size: never let the number of kept tasks fall below this.
        only_harmful: prune only tasks with a negative score, even if the target fraction is not reached.
        intent: ``"cleaning"`` (remove harmful tasks, default) or ``"efficiency"`` (InfoBatch-style random
            dropping of well-learned tasks with rescaling); see the module docstring.
        stable_rounds: cleaning: a task is pruned only after it was a candidate (kept, below the thresholds,
            among the lowest ``fraction`` of the pool and below the margin) in this many consecutive rounds.
            1 = act on a single round. Rounds are counted from the first, warm-up rounds included.
        margin: cleaning: a candidate's score must lie below the round's median by more than ``margin``
            robust standard deviations (``1.4826 × MAD`` of the kept tasks' scores): an outlier, not the low
            tail of a pool of clean tasks. ``None`` turns the rule off.
        rollback_tolerance: cleaning: if the reference loss of the rounds after a prune exceeds the one of the
            pruning round by more than a tolerance (see ``rollback_rounds``), the tasks of that prune are
            restored (and never pruned again). ``"auto"`` (default): the tolerance is ``rollback_sigmas``
            robust standard deviations of the round-to-round change of the reference loss, measured up to the
            prune (:func:`rollback_tolerance_of`), so a noisy run does not bring tasks back for a jump it
            shows anyway. A number: a fixed relative tolerance (``0.02`` = 2% worse), the user's override.
            ``None`` turns the guard off (also when no reference losses are given).
        rollback_sigmas: ``rollback_tolerance="auto"`` only: how many robust standard deviations of the
            round-to-round change count as noise.
        rollback_rounds: the tasks come back only if the reference loss stays above the pruning round's by
            more than the tolerance for this many consecutive rounds after the prune (a one-round jump is
            noise, a lasting rise is not); ``1`` judges on the first round alone. No pruning happens meanwhile
            (the loss is above the pruning round's, so it is rising).
        drop_ratio: efficiency: the share ``r`` of the well-learned tasks dropped each round.
        anneal_fraction: efficiency: no dropping once ``epoch >= (1 − anneal_fraction) * max_epochs``.

    The policy remembers streaks, the last prune and the rollback state between calls (:attr:`memory`, saved
    with :meth:`state_dict`); use one policy object per training run (or :meth:`reset`). Rounds with any
    non-finite score prune nothing (the decision says so): a broken round never removes data.

    Example:
        >>> import torch
        >>> policy = PruningPolicy(fraction=0.25, warmup_rounds=0, max_fraction_per_round=0.5, min_pool_size=2)
        >>> scores = torch.tensor([0.3, -6.0, 0.1, -7.0, 0.4, 0.2, -0.1, 0.5])  # tasks 1 and 3: outliers
        >>> policy.decide(torch.arange(8), scores, set(), round_index=1).action   # one round is not stable
        'skip'
        >>> d = policy.decide(torch.arange(8), scores, set(), round_index=2)
        >>> d.task_ids, d.action
        ([3, 1], 'prune')
    """

    fraction: float | None = 0.2
    threshold: float | None = None
    warmup_rounds: int = 1
    max_fraction_per_round: float = 0.1
    min_pool_size: int = 1
    only_harmful: bool = True
    intent: Intent = "cleaning"
    stable_rounds: int = 2
    margin: float | None = 3.0
    rollback_tolerance: float | Literal["auto"] | None = "auto"
    rollback_sigmas: float = 3.0
    rollback_rounds: int = 2
    drop_ratio: float = 0.5
    anneal_fraction: float = 0.125
    memory: PruningMemory = field(default_factory=PruningMemory, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.intent not in ("cleaning", "efficiency"):
            raise ValueError(f"PruningPolicy.intent must be 'cleaning' or 'efficiency', got {self.intent!r}.")
        if self.intent == "cleaning" and self.fraction is None and self.threshold is None:
            raise ValueError("PruningPolicy needs `fraction` (e.g. 0.2) or `threshold` (e.g. 0.0), or both.")
        if self.fraction is not None and not 0.0 < self.fraction < 1.0:
            raise ValueError(f"PruningPolicy.fraction must be in (0, 1), got {self.fraction}.")
        if not 0.0 < self.max_fraction_per_round <= 1.0:
            raise ValueError(f"max_fraction_per_round must be in (0, 1], got {self.max_fraction_per_round}.")
        if self.warmup_rounds < 0 or self.min_pool_size < 1:
            raise ValueError("warmup_rounds must be >= 0 and min_pool_size >= 1.")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ValueError(f"PruningPolicy.threshold must be finite, got {self.threshold}.")
        if not isinstance(self.stable_rounds, int) or self.stable_rounds < 1:
            raise ValueError(f"stable_rounds must be an integer >= 1, got {self.stable_rounds!r}.")
        tolerance = self.rollback_tolerance
        if (
            tolerance is not None
            and tolerance != "auto"
            and not (
                isinstance(tolerance, (int, float))
                and not isinstance(tolerance, bool)
                and math.isfinite(tolerance)
                and tolerance >= 0
            )
        ):
            raise ValueError(
                "rollback_tolerance must be 'auto' (from the reference loss's noise), a finite relative value "
                f">= 0 (e.g. 0.02) or None (off), got {tolerance!r}."
            )
        if not (
            isinstance(self.rollback_sigmas, (int, float))
            and math.isfinite(self.rollback_sigmas)
            and self.rollback_sigmas > 0
        ):
            raise ValueError(
                f"rollback_sigmas must be a finite value > 0 (e.g. 3.0), got {self.rollback_sigmas!r}."
            )
        if not isinstance(self.rollback_rounds, int) or self.rollback_rounds < 1:
            raise ValueError(f"rollback_rounds must be an integer >= 1, got {self.rollback_rounds!r}.")
        if self.margin is not None and not (math.isfinite(self.margin) and self.margin >= 0):
            raise ValueError(f"margin must be None (off) or a finite value >= 0, got {self.margin}.")
        if not 0.0 < self.drop_ratio < 1.0:
            raise ValueError(f"drop_ratio must be in (0, 1), got {self.drop_ratio}.")
        if not 0.0 <= self.anneal_fraction < 1.0:
            raise ValueError(f"anneal_fraction must be in [0, 1), got {self.anneal_fraction}.")

    # ------------------------------------------------------------------------------------------ state ----
    def reset(self) -> None:
        """Forget streaks, the last prune and the rollback state (e.g. before reusing the policy)."""
        object.__setattr__(self, "memory", PruningMemory())

    def state_dict(self) -> dict[str, Any]:
        return self.memory.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory.load_state_dict(state)

    # ------------------------------------------------------------------------------------------ decide ---
    def decide_round(
        self,
        round: ScoreRound,
        state: Any,
        *,
        round_index: int,
        pool_size: int,
        history: Sequence[dict[str, float]] = (),
        diagnostics: dict[str, float] | None = None,
        max_epochs: int | None = None,
        **_: Any,
    ) -> Decision:
        """The callback's entry point: decide on the round's scored, kept tasks (never-scored tasks take no part).

        The reference losses come from the callback's history (``influence/reference_loss`` of past rounds) and
        this round's ``diagnostics["reference_loss"]``; the ground truth from ``round.corrupted``. For
        ``intent="efficiency"`` a task is well-learned when its self-influence as the round reports it (the
        estimator's ``Σ η ‖g_k‖²``: small gradients) is below the mean of the kept tasks.

        Example:
            >>> import torch
            >>> from lightning_metaif.actions.state import TaskState
            >>> r = ScoreRound(step=3, epoch=0, estimator="task_if", task_ids=torch.arange(4),
            ...                scores=torch.tensor([-1.0, 2.0, -3.0, 0.0]), scored=torch.tensor([1, 1, 0, 1]))
            >>> policy = PruningPolicy(fraction=0.25, warmup_rounds=0, max_fraction_per_round=0.5,
            ...                        stable_rounds=1, margin=None)
            >>> policy.decide_round(r, TaskState(), round_index=1, pool_size=4).task_ids   # task 2: unscored
            [0]
        """
        scored = torch.ones(len(round.task_ids), dtype=torch.bool) if round.scored is None else round.scored
        pruned_now = torch.tensor([state.is_pruned(t) for t in round.task_ids.tolist()], dtype=torch.bool)
        dropped = getattr(state, "dropped", set())
        permanent = {t for t in state.pruned if t not in dropped}
        take = scored & ~torch.tensor([t in permanent for t in round.task_ids.tolist()], dtype=torch.bool)
        if self.intent == "cleaning":
            take &= ~pruned_now
        losses = [h.get("influence/reference_loss", math.nan) for h in history]
        current = (diagnostics or {}).get("reference_loss")
        if current is not None:
            losses.append(current)
        losses = [x for x in losses if x is not None and math.isfinite(x)]
        truth = None
        if round.corrupted is not None:
            truth = round.task_ids[round.corrupted.bool()].tolist()
        return self.decide(
            round.task_ids[take],
            round.scores[take],
            permanent,
            round_index=round_index,
            pool_size=pool_size,
            step=round.step,
            epoch=round.epoch,
            reference_losses=losses or None,
            ground_truth=truth,
            losses=None if round.self_influence is None else round.self_influence[take],
            max_epochs=max_epochs,
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
        reference_losses: Sequence[float] | None = None,
        ground_truth: Iterable[int] | None = None,
        losses: Tensor | None = None,
        max_epochs: int | None = None,
        seed: int = 0,
    ) -> Decision:
        """This round's decision: ``"prune"``, ``"restore"``, ``"resample"`` or ``"skip"``.

        Args:
            task_ids, scores: the round's scored tasks and their scores (aligned).
            pruned: ids pruned so far (never pruned again).
            round_index: scoring rounds counted from 1.
            pool_size: the original pool size (defaults to ``len(task_ids)``).
            step, epoch: recorded in the decision.
            reference_losses: the reference loss of every round so far, this round's last. Enables the
                "no pruning while the reference loss rises" rule and the rollback guard.
            ground_truth: ids known to be corrupted; a pruning decision then states its precision (also
                appended to ``memory.precision``).
            losses: efficiency only: each task's current training loss (aligned with ``task_ids``).
            max_epochs: efficiency only: the run's length, for the annealing at the end.
            seed: efficiency only: with ``round_index``, seeds the random drop.
        """
        ids = torch.as_tensor(task_ids).long().cpu()
        scores = torch.as_tensor(scores).detach().double().cpu()
        if ids.shape != scores.shape:
            raise ValueError(f"task_ids {tuple(ids.shape)} and scores {tuple(scores.shape)} must be aligned.")
        pool_size = int(pool_size or len(ids))
        losses_seen = [float(x) for x in reference_losses] if reference_losses is not None else []
        if any(not math.isfinite(x) for x in losses_seen):
            raise ValueError(
                f"reference_losses must be finite, got {losses_seen[-3:]}: a diverged reference loss cannot "
                "guide pruning."
            )
        if self.intent == "efficiency":
            return self._resample(ids, losses, pruned, round_index, epoch, max_epochs, step, seed)
        return self._clean(
            ids, scores, pruned, round_index, pool_size, step, epoch, losses_seen, ground_truth
        )

    def _clean(
        self,
        ids: Tensor,
        scores: Tensor,
        pruned: set[int],
        round_index: int,
        pool_size: int,
        step: int,
        epoch: int,
        reference_losses: list[float],
        ground_truth: Iterable[int] | None,
    ) -> Decision:
        memory = self.memory

        def skip(reason: str) -> Decision:
            return Decision(step, epoch, "skip", [], reason)

        if not torch.isfinite(scores).all():
            bad = ids[~torch.isfinite(scores)].tolist()
            memory.streaks.clear()  # a broken round breaks every streak
            return skip(f"{len(bad)} non-finite scores (e.g. ids {bad[:5]}); pruning nothing this round")

        # rollback guard: the rounds after a prune check that the reference loss did not get worse
        if memory.last_prune_ids and memory.last_prune_loss is not None and reference_losses:
            now, before = reference_losses[-1], memory.last_prune_loss
            tolerance = memory.last_prune_tolerance
            if tolerance is None and self.rollback_tolerance is not None:  # memory saved before the field
                tolerance = self._rollback_tolerance(reference_losses[:-1] or [before])
            worse = tolerance is not None and now > before + tolerance
            memory.rounds_worse = memory.rounds_worse + 1 if worse else 0
            if not worse or memory.rounds_worse >= self.rollback_rounds:
                restored = [t for t in memory.last_prune_ids if t in pruned]
                memory.last_prune_ids, memory.last_prune_loss = [], None
                memory.last_prune_tolerance, memory.rounds_worse = None, 0
                if worse and restored:
                    memory.protected.update(restored)
                    for t in restored:
                        memory.streaks.pop(t, None)
                    if self.rollback_tolerance == "auto":
                        rule = (
                            f"{self.rollback_sigmas:g} x the round-to-round noise measured before the prune"
                        )
                    else:
                        rule = f"{self.rollback_tolerance:.0%} of {before:.4g}"
                    return Decision(
                        step,
                        epoch,
                        "restore",
                        restored,
                        f"rollback: reference loss {before:.4g} -> {now:.4g}, above {before:.4g} + tolerance "
                        f"{tolerance:.3g} ({rule}) for {self.rollback_rounds} round(s) after pruning them; "
                        "restored and protected from pruning",
                    )

        in_pool = torch.tensor([int(i) not in pruned for i in ids.tolist()], dtype=torch.bool)
        kept = in_pool & torch.tensor(
            [int(i) not in memory.protected for i in ids.tolist()], dtype=torch.bool
        )
        candidates = kept.clone()
        if self.only_harmful:
            candidates &= scores < 0
        if self.threshold is not None:
            candidates &= scores < self.threshold
        before_margin = candidates.clone()
        margin_bar = None
        if self.margin is not None and kept.sum() >= 3:
            centre = scores[kept].median()
            spread = 1.4826 * (scores[kept] - centre).abs().median()
            margin_bar = float(centre - self.margin * spread)
            candidates &= scores < margin_bar
        if self.fraction is not None and candidates.any():
            # the lowest `fraction` of the pool (by score, among the tasks still kept)
            bottom = max(1, int(math.floor(self.fraction * pool_size)))
            order = torch.argsort(torch.where(kept, scores, torch.inf), stable=True)[:bottom]
            in_bottom = torch.zeros_like(kept)
            in_bottom[order] = True
            candidates &= in_bottom
        previous = memory.last_round
        consecutive = previous == round_index - 1
        memory.streaks = {
            int(t): (memory.streaks.get(int(t), 0) if consecutive else 0) + 1
            for t in ids[candidates].tolist()
        }
        memory.last_round = round_index

        if round_index <= self.warmup_rounds:
            return skip(f"warm-up: round {round_index} of {self.warmup_rounds}")
        if len(reference_losses) >= 2 and reference_losses[-1] > reference_losses[-2]:
            return skip(
                f"reference loss rising ({reference_losses[-2]:.4g} -> {reference_losses[-1]:.4g}): "
                "pruning nothing this round"
            )
        if memory.rounds_worse:  # the guard is still judging the last prune: no new prune may replace it
            return skip(
                f"rollback guard: reference loss above the last prune's for {memory.rounds_worse} of "
                f"{self.rollback_rounds} round(s); pruning nothing until that prune is judged"
            )
        budget_total = pool_size if self.fraction is None else int(math.floor(self.fraction * pool_size))
        budget = min(
            budget_total - len(pruned),
            int(math.floor(self.max_fraction_per_round * pool_size)),
            int(in_pool.sum()) - self.min_pool_size,
        )
        if budget <= 0:
            return skip(
                f"limit reached: {len(pruned)} pruned of {pool_size}, target {budget_total}, "
                f"min pool size {self.min_pool_size}"
            )
        stable = candidates & torch.tensor(
            [memory.streaks.get(int(t), 0) >= self.stable_rounds for t in ids.tolist()]
        )
        order = torch.argsort(scores[stable], stable=True)
        chosen = ids[stable][order][:budget].tolist()
        if not chosen:
            if candidates.any():
                return skip(
                    f"{int(candidates.sum())} candidates, none yet for {self.stable_rounds} consecutive rounds"
                )
            if margin_bar is not None and before_margin.any():
                # they are harmful (or below the threshold), just not outliers by the margin rule
                return skip(
                    f"{int(before_margin.sum())} kept tasks are "
                    f"{'harmful' if self.only_harmful else 'below the threshold'}, none below the median by > "
                    f"{self.margin:g} robust s.d. (lowest score {float(scores[before_margin].min()):.3g}, bar "
                    f"{margin_bar:.3g})"
                )
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
        if self.margin is not None:
            rule.append(f"below the median by > {self.margin:g} robust s.d.")
        if self.stable_rounds > 1:
            rule.append(f"for {self.stable_rounds} consecutive rounds")
        reason = f"{', '.join(rule)}; at most {self.max_fraction_per_round:.0%} per round"
        if ground_truth is not None:
            truth = {int(t) for t in ground_truth}
            hits = sum(t in truth for t in chosen)
            memory.precision.append(hits / len(chosen))
            reason += f"; precision {hits}/{len(chosen)} = {hits / len(chosen):.2f}"
        if reference_losses:
            memory.last_prune_ids, memory.last_prune_loss = list(chosen), reference_losses[-1]
            memory.last_prune_tolerance = self._rollback_tolerance(reference_losses)
            memory.rounds_worse = 0
        for t in chosen:
            memory.streaks.pop(t, None)
        return Decision(step, epoch, "prune", chosen, reason)

    def _rollback_tolerance(self, reference_losses: list[float]) -> float | None:
        """The absolute rise of the reference loss after this prune that brings its tasks back (None: off)."""
        if self.rollback_tolerance is None:
            return None
        if self.rollback_tolerance == "auto":
            return rollback_tolerance_of(reference_losses, self.rollback_sigmas)
        return float(self.rollback_tolerance) * abs(reference_losses[-1])

    def _resample(
        self,
        ids: Tensor,
        losses: Tensor | None,
        pruned: set[int],
        round_index: int,
        epoch: int,
        max_epochs: int | None,
        step: int,
        seed: int,
    ) -> Decision:
        if losses is None or max_epochs is None:
            raise ValueError(
                "PruningPolicy(intent='efficiency') needs `losses` (each task's training loss, aligned with "
                "task_ids) and `max_epochs` (for the annealing at the end) in decide(...)."
            )
        losses = torch.as_tensor(losses).detach().double().cpu()
        if losses.shape != ids.shape:
            raise ValueError(
                f"losses {tuple(losses.shape)} must be aligned with task_ids {tuple(ids.shape)}."
            )
        previous = list(self.memory.dropped)
        self.memory.dropped = []
        if epoch >= (1.0 - self.anneal_fraction) * max_epochs:
            return Decision(
                step,
                epoch,
                "resample",
                [],
                f"annealing: epoch {epoch} is in the last {self.anneal_fraction:.0%} of {max_epochs}; "
                f"every task kept at weight 1 ({len(previous)} dropped tasks back)",
                weights=[],
            )
        finite = torch.isfinite(losses)
        if not finite.all():
            return Decision(
                step, epoch, "resample", [], "non-finite training losses: nothing dropped", weights=[]
            )
        available = torch.tensor([int(t) not in pruned for t in ids.tolist()])
        mean = float(losses[available].mean()) if available.any() else math.inf
        well_learned = available & (losses < mean)
        candidates = ids[well_learned]
        generator = torch.Generator().manual_seed(seed * 1_000_003 + round_index)
        keep_draw = torch.rand(len(candidates), generator=generator, dtype=torch.float64)
        dropped = candidates[keep_draw < self.drop_ratio].tolist()
        rescaled = candidates[keep_draw >= self.drop_ratio].tolist()
        self.memory.dropped = dropped
        weight = 1.0 / (1.0 - self.drop_ratio)
        return Decision(
            step,
            epoch,
            "resample",
            dropped + rescaled,
            f"InfoBatch: dropped {len(dropped)} of {len(candidates)} well-learned tasks (loss < mean "
            f"{mean:.4g}), the other {len(rescaled)} weighted {weight:.3g}",
            weights=[0.0] * len(dropped) + [weight] * len(rescaled),
        )
