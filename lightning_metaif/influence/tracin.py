"""TracIn, TracInCP, inner-product influence and its ensemble (docs/maths.md §5): Hessian-free estimators.

* :class:`Checkpoint`: a saved parameter point with the learning rate used after it and, for Adam, the
  preconditioner ``1/(√v̂ + ε)`` (flat, in ``ParamLayout`` order) as LESS uses it.
* :func:`point_scores`: ``∇f(λ)ᵀ P g_k(λ)`` and ``g_kᵀ P g_k`` at one parameter point, every task, computed in
  the symmetric form ``⟨Π(√P ∇f), Π(√P g_k)⟩`` so that an optional random projection ``Π`` applies to both.
* :class:`TracInAccumulator`: TracIn along the actual SGD path, fed step by step (by the Lightning callback):
  ``score_k += (η_t / B) ∇f(λ_t)ᵀ g_k(λ_t)`` for every task k in the meta-batch of step t; optionally
  cosine-normalised per step and held at the best reference loss (what ``Trajectory`` uses by default).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

from lightning_metaif.influence.gradients import (
    Utility,
    Vectorize,
    per_task_gradients,
    reference_gradient,
)
from lightning_metaif.influence.problem import ParamLayout, Params, trainable
from lightning_metaif.influence.results import InfluenceResult
from lightning_metaif.influence.tasks import Tasks

if TYPE_CHECKING:
    from lightning_metaif.influence.store import CheckpointInfo, GradientStore

Projection = Callable[[Tensor], Tensor]
Normalize = Literal["none", "cosine"]
Keep = Literal["all", "best"]
Weighting = Literal["none", "improvement"]


@dataclass
class Checkpoint:
    """A parameter point for TracInCP / the ensemble.

    Args:
        params: meta-parameters at this checkpoint (same names as the model's; those requiring grad count).
        learning_rate: ``η_c``, the learning rate in effect after this checkpoint (TracInCP weight).
        preconditioner: optional flat ``[p]`` vector multiplying gradients, e.g. Adam's ``1/(√v̂ + ε)``.
        step: optional training step, kept for bookkeeping.

    Example:
        >>> import torch
        >>> c = Checkpoint({"w": torch.zeros(2, requires_grad=True)}, learning_rate=0.1)
        >>> c.learning_rate
        0.1
    """

    params: Params
    learning_rate: float = 1.0
    preconditioner: Tensor | None = None
    step: int | None = None


def _sqrt_preconditioner(preconditioner: Tensor | None, dim: int, reference: Tensor) -> Tensor | None:
    if preconditioner is None:
        return None
    pre = torch.as_tensor(preconditioner).to(dtype=reference.dtype, device=reference.device).reshape(-1)
    if pre.numel() != dim:
        raise ValueError(
            f"The preconditioner has {pre.numel()} entries but the parameters have {dim}: pass a flat vector "
            "in ParamLayout.of(params) order (e.g. Adam's 1/(sqrt(v_hat)+eps) flattened)."
        )
    if (pre < 0).any() or not torch.isfinite(pre).all():
        raise ValueError("The preconditioner must be finite and non-negative (a diagonal PSD scaling).")
    return pre.sqrt()


def point_scores(
    problem: Any,
    params: Params,
    train_tasks: Tasks,
    reference_tasks: Tasks | None = None,
    *,
    utility: Utility | None = None,
    task_ids: Sequence[int] | Tensor | None = None,
    preconditioner: Tensor | None = None,
    projection: Projection | None = None,
    need_reference: bool = True,
    keep_gradients: bool = False,
    chunk_size: int = 16,
    vectorize: Vectorize = "auto",
) -> dict[str, Any]:
    """Inner products at one point: ``dots[k] = ∇fᵀ P g_k``, ``self[k] = g_kᵀ P g_k``, plus ``f`` and losses.

    With ``keep_gradients``, ``rows`` holds the transformed task gradients ``Π(√P g_k)`` (e.g. to store them).
    """
    params = trainable(params)
    layout = ParamLayout.of(params)
    reference = next(iter(params.values()))
    root = _sqrt_preconditioner(preconditioner, layout.numel, reference)

    def transform(rows: Tensor) -> Tensor:
        if root is not None:
            rows = rows * root
        return projection(rows) if projection is not None else rows

    grads, losses = per_task_gradients(
        problem,
        params,
        train_tasks,
        task_ids=task_ids,
        chunk_size=chunk_size,
        vectorize=vectorize,
        transform=transform if (root is not None or projection is not None) else None,
    )
    out: dict[str, Any] = {"self": (grads * grads).sum(1), "losses": losses, "dim": grads.shape[1]}
    if keep_gradients:
        out["rows"] = grads
    if need_reference:
        ref_grad, ref_value = reference_gradient(
            problem, params, reference_tasks, utility=utility, chunk_size=chunk_size, vectorize=vectorize
        )
        ref = transform(ref_grad[None])[0]
        out.update(dots=grads @ ref, reference_value=float(ref_value), reference_grad_norm=float(ref.norm()))
    return out


def _step_products(products: Tensor, self_products: Tensor, reference_square: Tensor | None) -> Tensor:
    """``∇fᵀ P g_k``, or its cosine ``/ (‖√P g_k‖ ‖√P ∇f‖)`` when ``reference_square`` (``‖√P ∇f‖²``) is given
    (0 where a norm is 0); elementwise, so one step or many steps at once give the same numbers."""
    if reference_square is None:
        return products
    norms = self_products.clamp_min(0).sqrt() * reference_square.clamp_min(0).sqrt()
    return torch.where(norms > 0, products / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0.0)


class TracInAccumulator:
    """TracIn along the real training trajectory (Pruthi et al.), fed one optimiser step at a time.

    With plain SGD and meta-batch size ``B``, step t moves ``λ`` by ``−η_t (1/B) Σ_{k∈batch} g_k(λ_t)``, so
    ``update`` adds ``(η_t / B) ∇f(λ_t)ᵀ g_k(λ_t)`` to each task in the batch: its first-order share of the
    decrease of ``f`` (positive = helpful, as everywhere). Completeness: summed over tasks, the scores
    approximate ``f(λ_0) − f(λ_T)`` for small steps. Self-influence accumulates ``η_t ‖g_k(λ_t)‖²``.
    With a diagonal ``preconditioner`` ``P`` (the step's ``D_t = η P``, see
    :func:`lightning_metaif.influence.optim.update_scaling`, with ``learning_rate=1``) the products become
    ``∇fᵀ P g_k`` and ``g_kᵀ P g_k``; with ``task_weights`` ``w_k`` (the weights of the step's weighted mean
    loss) both are multiplied by ``w_k``, as the step moved ``λ`` by ``w_k g_k``.

    Gradients may be projected (the same projection for the task and the reference gradients); a
    ``preconditioner`` (Adam's ``1/(√v̂ + ε)``) must then have the projected dimension or be applied before
    projecting.

    Three options make the scores robust to training that goes on too long (measured in
    ``benchmarks/bench_trajectory_variants.py``; see BENCHMARKS.md: on over-long runs the plain sum inverts):

    * ``normalize="cosine"``: each step adds ``(η_t / B) cos(√P ∇f, √P g_k)`` instead of the inner product,
      so the steps late in training, where the gradients of unlearnable (corrupted) tasks are large, do not
      outweigh the early ones. The cosine is taken in the preconditioner's metric when ``preconditioner`` is
      passed to :meth:`update`. Completeness (scores summing to the decrease of ``f``) no longer holds.
    * ``keep="best"``: :meth:`observe` is given the reference loss at each scoring round; the scores are
      snapshotted whenever it reaches a new minimum and :meth:`scores` returns that snapshot, the way
      ``ModelCheckpoint(monitor=...)`` keeps the best model: the scores describe the model the user keeps,
      and are *held* (``holding`` is True) while the reference loss is above its best.
    * ``weighting="improvement"``: each scoring round adds, to each task seen in it, ``max(0, f_before −
      f_after)`` (how much the reference loss fell over the round) times the task's *mean* contribution
      ``η_t ∇f_tᵀ P g_k`` (or ``η_t cos``) over its occurrences in the round — no ``1/B``, so with cosines a
      score is in units of reference loss. :meth:`observe` gives the losses; call it once before the first
      update for the baseline, otherwise the first round counts 0. Rounds where the reference improves a
      lot dominate; plateaus count little and rounds in which it rose count nothing (``holding`` is True
      after such a round). Contributions of a round count once it is observed.

    Example:
        >>> import torch
        >>> acc = TracInAccumulator()
        >>> _ = acc.update(0, 0.5, [3, 7], torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([1.0, 1.0]))
        >>> acc.scores().scores.tolist(), acc.scores().task_ids.tolist()
        ([0.25, 0.5], [3, 7])
        >>> robust = TracInAccumulator(normalize="cosine", keep="best")
        >>> _ = robust.update(0, 1.0, [3], torch.tensor([[2.0, 0.0]]), torch.tensor([1.0, 0.0]))
        >>> robust.observe(0.9, step=1)   # a new best reference loss: snapshot
        True
        >>> _ = robust.update(1, 1.0, [3], torch.tensor([[-5.0, 0.0]]), torch.tensor([1.0, 0.0]))
        >>> robust.observe(1.2, step=2), robust.holding, robust.scores().scores.tolist()
        (False, True, [1.0])
    """

    def __init__(
        self, *, normalize: Normalize = "none", keep: Keep = "all", weighting: Weighting = "none"
    ) -> None:
        if normalize not in ("none", "cosine"):
            raise ValueError(f"normalize must be 'none' or 'cosine', got {normalize!r}.")
        if keep not in ("all", "best"):
            raise ValueError(f"keep must be 'all' or 'best', got {keep!r}.")
        if weighting not in ("none", "improvement"):
            raise ValueError(f"weighting must be 'none' or 'improvement', got {weighting!r}.")
        self.normalize, self.keep, self.weighting = normalize, keep, weighting
        self._pending = torch.zeros(0, dtype=torch.float64)  # this round's contributions (weighting)
        self._pending_counts = torch.zeros(0, dtype=torch.long)
        self._pending_steps = 0
        self.last_round_weight: float | None = None
        self.unweighted_steps = 0  # steps observed without a baseline loss (weighting="improvement")
        self._index: dict[int, int] = {}
        self._scores = torch.zeros(0, dtype=torch.float64)
        self._self = torch.zeros(0, dtype=torch.float64)
        self._counts = torch.zeros(0, dtype=torch.long)
        # steps not yet in the totals: (rows, weights, η, B, [B] self products, [B] products, ‖√P ∇f‖²)
        self._queue: list[
            tuple[list[int], Tensor | None, float, int, Tensor, Tensor | None, Tensor | None]
        ] = []
        self.steps = 0
        self.last_step: int | None = None
        self._held: dict[str, Any] | None = None  # snapshot at the best reference loss (keep="best")
        self.best_reference_loss: float | None = None
        self.best_step: int | None = None
        self.last_reference_loss: float | None = None

    def _rows(self, task_ids: Sequence[int] | Tensor) -> list[int]:
        """Row of each id (new ids get the next rows; the arrays grow when the queued steps are folded in)."""
        index = self._index
        rows = []
        ids = torch.as_tensor(task_ids)
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(
                f"task_ids must be integers, got a {ids.dtype} tensor: {ids.reshape(-1)[:4].tolist()}."
            )
        for k in ids.reshape(-1).tolist():
            row = index.get(k)
            if row is None:
                row = index[k] = len(index)
            rows.append(row)
        return rows

    def update(
        self,
        step: int,
        learning_rate: float,
        task_ids: Sequence[int] | Tensor,
        task_gradients: Tensor,
        reference_gradient: Tensor | None = None,
        *,
        batch_size: int | None = None,
        preconditioner: Tensor | None = None,
        task_weights: Tensor | None = None,
        return_contributions: bool = True,
    ) -> Tensor | None:
        """Add one step's contributions; returns them (``[B]``, aligned with ``task_ids``) or None.

        Args:
            step: the optimiser step (bookkeeping only).
            learning_rate: ``η_t`` of this step.
            task_ids: ids of the tasks in the meta-batch (``[B]``; repeats allowed).
            task_gradients: ``[B, p]`` (or projected ``[B, d]``) gradients taken at ``λ_t`` before the step.
            reference_gradient: ``∇f(λ_t)`` (``[p]`` or ``[d]``); None records only self-influence and counts.
            batch_size: ``B`` of the mean in the update (default: ``len(task_ids)``).
            preconditioner: optional diagonal scaling of the task gradients (Adam's update direction);
                with ``normalize="cosine"`` the cosine is taken in its metric.
            task_weights: optional ``[B]`` weights ``w_k`` the step applied to each task's gradient.
            return_contributions: ``False`` returns None and leaves the step's ``[B]`` products where the
                gradients are (no copy to the host, no per-task bookkeeping): the per-step hot path of the
                callback. Steps are folded into the totals in one batch when the scores are read
                (:meth:`observe`, :meth:`scores`, :meth:`state_dict`); the totals are the same either way.
        """
        grads = task_gradients if isinstance(task_gradients, Tensor) else torch.as_tensor(task_gradients)
        if grads.dim() != 2:
            raise ValueError(f"task_gradients must be [B, p], got shape {tuple(grads.shape)}.")
        rows = self._rows(task_ids)
        if len(rows) != grads.shape[0]:
            raise ValueError(f"{len(rows)} task ids but {grads.shape[0]} gradient rows: give one id per row.")
        if not (learning_rate >= 0 and math.isfinite(learning_rate)):
            raise ValueError(f"learning_rate must be finite and >= 0, got {learning_rate}.")
        batch = grads.shape[0] if batch_size is None else int(batch_size)
        if batch < 1:
            raise ValueError(f"batch_size must be positive, got {batch}.")
        # A per-step hot path: the products stay in the gradients' own dtype and device, the bookkeeping per
        # task (rows, float64 totals, cosine normalisation) waits for :meth:`_fold`.
        grads = grads.detach()
        direction = grads
        pre = None
        if preconditioner is not None:
            pre = preconditioner if isinstance(preconditioner, Tensor) else torch.as_tensor(preconditioner)
            pre = pre.detach().to(grads).reshape(-1)
            if pre.numel() != grads.shape[1]:
                raise ValueError(
                    f"preconditioner has {pre.numel()} entries, gradients have {grads.shape[1]} columns."
                )
            direction = grads * pre
        weights = None
        if task_weights is not None:
            # a copy: the step is queued until the round, the caller may reuse its buffer meanwhile
            weights = torch.as_tensor(task_weights).detach().to("cpu", torch.float64, copy=True).reshape(-1)
            if weights.numel() != grads.shape[0] or not all(map(math.isfinite, weights.tolist())):
                raise ValueError(
                    f"task_weights must hold {grads.shape[0]} finite weights, one per gradient row."
                )
        raw_self = (grads * direction).sum(1)
        products = ref_square = None
        if reference_gradient is not None:
            ref = (
                reference_gradient
                if isinstance(reference_gradient, Tensor)
                else torch.as_tensor(reference_gradient)
            )
            ref = ref.detach().to(direction).reshape(-1)
            if ref.numel() != grads.shape[1]:
                raise ValueError(
                    f"reference_gradient has {ref.numel()} entries, task gradients have {grads.shape[1]}: "
                    "project both with the same projection."
                )
            products = direction @ ref
            if self.normalize == "cosine":
                ref_square = (ref * (ref if pre is None else ref * pre)).sum()
            if self.weighting == "improvement":
                self._pending_steps += 1
        step_ = (rows, weights, float(learning_rate), batch, raw_self, products, ref_square)
        self._queue.append(step_)
        if len(self._queue) >= 4096:  # bounded memory between rounds
            self._fold()
        self.steps += 1
        self.last_step = int(step)
        if products is None or not return_contributions:
            return None
        products = _step_products(products, raw_self, ref_square).to(device="cpu", dtype=torch.float64)
        contributions = (learning_rate / batch) * products
        return contributions if weights is None else weights * contributions

    def _fold(self) -> None:
        """Add the queued steps to the totals: one host copy and one ``index_add_`` per total for all of them."""
        grow = len(self._index) - self._scores.numel()
        if grow > 0:
            zeros = torch.zeros(grow, dtype=torch.float64)
            self._scores = torch.cat([self._scores, zeros])
            self._pending = torch.cat([self._pending, zeros])
            self._self = torch.cat([self._self, zeros])
            counts = torch.zeros(grow, dtype=torch.long)
            self._pending_counts = torch.cat([self._pending_counts, counts])
            self._counts = torch.cat([self._counts, counts])
        if not self._queue:
            return
        queue, self._queue = self._queue, []
        sizes = torch.tensor([len(q[0]) for q in queue])
        positions = torch.tensor([r for q in queue for r in q[0]], dtype=torch.long)

        def per_row(values: list[float], mask: Tensor | None = None) -> Tensor:
            counts = sizes if mask is None else sizes[mask]
            return torch.tensor(values, dtype=torch.float64).repeat_interleave(counts)

        weights = torch.cat(
            [torch.ones(len(q[0]), dtype=torch.float64) if q[1] is None else q[1] for q in queue]
        )
        raw_self = torch.cat([q[4] for q in queue])
        self._self.index_add_(
            0, positions, per_row([q[2] for q in queue]) * (weights * raw_self.to("cpu", torch.float64))
        )
        self._counts.index_add_(0, positions, torch.ones_like(positions))
        scored = [q for q in queue if q[5] is not None]
        if not scored:
            return
        if len(scored) < len(queue):
            has = torch.tensor([q[5] is not None for q in queue])
            keep = has.repeat_interleave(sizes)
            positions, weights, raw_self = positions[keep], weights[keep], raw_self[keep.to(raw_self.device)]
        else:
            has = None
        products = torch.cat([q[5] for q in scored])
        ref_square = None
        if self.normalize == "cosine":
            counts = (sizes if has is None else sizes[has]).to(products.device)
            ref_square = torch.stack([q[6] for q in scored]).repeat_interleave(counts)
        products = _step_products(products, raw_self, ref_square).to("cpu", torch.float64)
        if self.weighting == "improvement":
            per_task = per_row([q[2] for q in scored], has) * products
            self._pending.index_add_(0, positions, weights * per_task)
            self._pending_counts.index_add_(0, positions, torch.ones_like(positions))
        else:
            scale = per_row([q[2] / q[3] for q in scored], has)
            self._scores.index_add_(0, positions, weights * (scale * products))

    def round_occurrences(self) -> tuple[Tensor, Tensor]:
        """Ids of the tasks updated since the last :meth:`observe`, and how often each was (this process).

        Example:
            >>> acc = TracInAccumulator(weighting="improvement")
            >>> _ = acc.update(0, 1.0, [4, 9, 4], torch.ones(3, 2), torch.ones(2))
            >>> [t.tolist() for t in acc.round_occurrences()]
            [[4, 9], [2, 1]]
        """
        self._fold()
        seen = self._pending_counts > 0
        ids = torch.tensor(list(self._index), dtype=torch.long)  # insertion order = accumulator positions
        return ids[seen], self._pending_counts[seen].clone()

    def observe(
        self, reference_loss: float, step: int | None = None, *, occurrences: Tensor | None = None
    ) -> bool:
        """Record the reference loss of a scoring round; True when it is a new best (scores snapshotted).

        With ``keep="best"`` the snapshot is what :meth:`scores` returns; with ``keep="all"`` the loss is
        only recorded (``holding`` still says whether it is above its best). An observation before any update
        is a baseline only (the first round's weight with ``weighting="improvement"``), never a best. Raises on
        a non-finite loss: a diverged reference must not silently freeze or move the scores.

        ``occurrences`` (``weighting="improvement"`` with the steps split over processes): each task's number of
        occurrences in the round over *all* processes, aligned with :meth:`round_occurrences`. Each process then
        adds its own sum divided by that count, so the processes' scores add up to the mean over every occurrence
        (the default, this process's counts, is right for one process).
        """
        self._fold()
        loss = float(reference_loss)
        if not torch.isfinite(torch.tensor(loss)):
            raise ValueError(
                f"reference_loss must be finite, got {reference_loss}: the reference loss diverged (check the "
                "learning rate) or the reference tasks are broken."
            )
        if self.weighting == "improvement":
            previous = self.last_reference_loss
            if previous is None:
                self.unweighted_steps += self._pending_steps
                weight = 0.0
            else:
                weight = max(0.0, previous - loss)
            counts = self._pending_counts.clamp_min(1)
            if occurrences is not None:
                seen = self._pending_counts > 0
                total = torch.as_tensor(occurrences).reshape(-1).long()
                if total.numel() != int(seen.sum()) or bool((total < self._pending_counts[seen]).any()):
                    raise ValueError(
                        f"occurrences must give, for each of the {int(seen.sum())} tasks of round_occurrences(), "
                        "its count over all processes (at least this process's count), got "
                        f"{total.tolist()}."
                    )
                counts = counts.clone()
                counts[seen] = total
            if self._pending_steps:
                self._scores += weight * self._pending / counts
                self.last_round_weight = weight
            self._pending.zero_()
            self._pending_counts.zero_()
            self._pending_steps = 0
        self.last_reference_loss = loss
        if self.steps == 0:  # a baseline before any step: nothing to keep yet
            return False
        if self.best_reference_loss is not None and loss >= self.best_reference_loss:
            return False
        self.best_reference_loss, self.best_step = loss, self.last_step if step is None else int(step)
        self._held = {
            "ids": list(self._index),
            "scores": self._scores.clone(),
            "self": self._self.clone(),
            "counts": self._counts.clone(),
            "steps": self.steps,
        }
        return True

    @property
    def holding(self) -> bool:
        """True when the reference loss is rising and the last round's contributions are not counted.

        ``keep="best"``: the last observed loss is above the best one; ``weighting="improvement"``: the last
        round's weight was 0 (the loss did not fall over it); otherwise: the last loss is above the best.
        """
        if self.weighting == "improvement" and self.keep == "all":
            return self.last_round_weight == 0.0
        return (
            self.last_reference_loss is not None
            and self.best_reference_loss is not None
            and self.last_reference_loss > self.best_reference_loss
        )

    def scores(self) -> InfluenceResult:
        """The scores as an :class:`~lightning_metaif.influence.results.InfluenceResult`.

        With ``keep="best"`` and at least one :meth:`observe`, the snapshot at the best reference loss (tasks
        first seen after it score 0); otherwise everything accumulated. ``diagnostics`` has ``steps`` (that
        the scores cover), ``last_step``, ``counts``, ``held`` (scores are a snapshot older than the last
        step), ``holding``, ``best_step`` and ``best_reference_loss``.
        """
        self._fold()
        ids = torch.tensor(list(self._index), dtype=torch.long)
        scores, self_influence, counts, steps = self._scores, self._self, self._counts, self.steps
        held = self.keep == "best" and self._held is not None
        if held:
            size = len(self._held["ids"])
            scores, self_influence, counts = (
                torch.cat([self._held[k], torch.zeros(len(ids) - size, dtype=self._held[k].dtype)])
                for k in ("scores", "self", "counts")
            )
            steps = self._held["steps"]
        return InfluenceResult(
            task_ids=ids,
            scores=scores.clone(),
            self_influence=self_influence.clone(),
            estimator="tracin_trajectory",
            diagnostics={
                "steps": steps,
                "last_step": self.last_step,
                "counts": counts.clone(),
                "normalize": self.normalize,
                "keep": self.keep,
                "weighting": self.weighting,
                "last_round_weight": self.last_round_weight,
                "unweighted_steps": self.unweighted_steps,
                "held": bool(held and steps < self.steps),
                "holding": self.holding,
                "best_step": self.best_step,
                "best_reference_loss": self.best_reference_loss,
            },
        )

    def state_dict(self) -> dict[str, Any]:
        self._fold()
        state: dict[str, Any] = {
            "task_ids": torch.tensor(list(self._index), dtype=torch.long),
            "scores": self._scores.clone(),
            "self_influence": self._self.clone(),
            "counts": self._counts.clone(),
            "steps": self.steps,
            "last_step": self.last_step,
            "normalize": self.normalize,
            "keep": self.keep,
            "weighting": self.weighting,
            "pending": self._pending.clone(),
            "pending_counts": self._pending_counts.clone(),
            "pending_steps": self._pending_steps,
            "last_round_weight": self.last_round_weight,
            "unweighted_steps": self.unweighted_steps,
            "best_reference_loss": self.best_reference_loss,
            "best_step": self.best_step,
            "last_reference_loss": self.last_reference_loss,
        }
        if self._held is not None:
            state["held_task_ids"] = torch.tensor(self._held["ids"], dtype=torch.long)
            state["held_scores"] = self._held["scores"].clone()
            state["held_self_influence"] = self._held["self"].clone()
            state["held_counts"] = self._held["counts"].clone()
            state["held_steps"] = self._held["steps"]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._queue = []
        self._index = {int(k): i for i, k in enumerate(state["task_ids"].tolist())}
        self._scores = state["scores"].clone().to(torch.float64)
        self._self = state["self_influence"].clone().to(torch.float64)
        self._counts = state["counts"].clone().to(torch.long)
        self.steps = int(state["steps"])
        self.last_step = state["last_step"]
        self.normalize = state.get("normalize", self.normalize)
        self.keep = state.get("keep", self.keep)
        self.weighting = state.get("weighting", self.weighting)
        self._pending = state.get("pending", torch.zeros(len(self._index))).clone().to(torch.float64)
        self._pending_counts = (
            state.get("pending_counts", torch.zeros(len(self._index), dtype=torch.long))
            .clone()
            .to(torch.long)
        )
        self._pending_steps = int(state.get("pending_steps", 0))
        self.last_round_weight = state.get("last_round_weight")
        self.unweighted_steps = int(state.get("unweighted_steps", 0))
        self.best_reference_loss = state.get("best_reference_loss")
        self.best_step = state.get("best_step")
        self.last_reference_loss = state.get("last_reference_loss")
        self._held = None
        if "held_scores" in state:
            self._held = {
                "ids": state["held_task_ids"].tolist(),
                "scores": state["held_scores"].clone().to(torch.float64),
                "self": state["held_self_influence"].clone().to(torch.float64),
                "counts": state["held_counts"].clone().to(torch.long),
                "steps": int(state["held_steps"]),
            }


# ---------------------------------------------------------------------------- TracIn over a gradient store
Reference = Tensor | Mapping[int, Tensor] | Callable[[int], "Tensor | None"]


@dataclass
class TracInResult:
    """TracIn(CP) scores accumulated per task id (positive = the task helped reduce the reference loss).

    ``counts[i]`` is the number of stored rows (checkpoints x occurrences) that contributed to ``scores[i]``.
    """

    task_ids: Tensor
    scores: Tensor
    counts: Tensor
    diagnostics: dict[str, Any] = field(default_factory=dict)


def store_tracin(
    store: GradientStore,
    reference: Reference,
    *,
    checkpoints: Sequence[CheckpointInfo] | None = None,
    task_ids: Any = None,
    match: Literal["exact", "previous", "nearest"] = "exact",
    per_step_mean: bool = False,
) -> TracInResult:
    """TracIn / TracInCP scores ``Σ lr · ⟨∇f(λ_step), g_k⟩`` over stored rows, accumulated per task id.

    Args:
        reference: the (projected, same projection) gradient of the reference loss ``f``: one tensor ``[dim]``
            for every step, a mapping ``step -> [dim]`` (resolved with ``match``), or a callable
            ``step -> [dim] | None`` (``None`` skips the rows of that step).
        checkpoints: files to use (default: all; checkpoints and trajectory segments).
        task_ids: return scores aligned to these ids (ids never stored get 0); default: every stored id, sorted.
        match: for a mapping: ``"exact"`` (a missing step raises), ``"previous"`` (latest key <= step) or
            ``"nearest"`` key.
        per_step_mean: divide the learning rate of each trajectory row by the number of rows recorded at its
            step (TracIn's ``η_t / B`` when the whole meta-batch of ``B`` tasks was appended).
            Checkpoints always use ``η_c`` (TracInCP).

    The store streams the rows (:meth:`~lightning_metaif.influence.store.GradientStore.iter_blocks`); dots are
    computed in float32 and accumulated in float64. Sign convention: a positive score means the task helped
    reduce ``f``.

    Example:
        >>> import tempfile, torch
        >>> from lightning_metaif.influence.store import GradientStore
        >>> store = GradientStore(tempfile.mkdtemp(), dim=2, dtype=torch.float32)
        >>> _ = store.write_checkpoint(5, 0.5, [10, 11], torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        >>> r = store_tracin(store, torch.tensor([1.0, 1.0]))
        >>> r.task_ids.tolist(), r.scores.tolist()
        ([10, 11], [0.5, 1.0])
    """
    from lightning_metaif.influence.store.format import as_task_ids

    t0 = time.perf_counter()
    infos = list(store.checkpoints() if checkpoints is None else checkpoints)
    resolve = _reference_resolver(store, reference, match)
    step_counts: dict[int, int] = {}
    if per_step_mean:
        for info in infos:
            if info.kind == "segment":
                steps, _ = store.read_steps(info)
                uniq, counts = np.unique(steps.numpy(), return_counts=True)
                for s, c in zip(uniq.tolist(), counts.tolist()):
                    step_counts[s] = step_counts.get(s, 0) + c
    acc_ids = np.empty(0, dtype=np.int64)
    acc_scores = np.empty(0, dtype=np.float64)
    acc_counts = np.empty(0, dtype=np.int64)
    skipped: set[int] = set()
    rows_used = 0
    for info in infos:
        part_ids, part_scores = [], []
        cache: dict[int, Tensor | None] = {}

        def ref(step: int, cache: dict[int, Tensor | None] = cache) -> Tensor | None:
            if step not in cache:
                cache[step] = resolve(step)
                if cache[step] is None:
                    skipped.add(step)
            return cache[step]

        for _, _, block, ids, steps, lrs in store.iter_blocks(info, columns=True):
            if info.kind == "checkpoint":
                vec = ref(info.step)
                if vec is None:
                    break
                contrib = (block @ vec).double().numpy() * info.learning_rate
                keep = slice(None)
            else:
                uniq, inv = np.unique(steps, return_inverse=True)
                refs = [ref(int(s)) for s in uniq]
                ok = np.array([r is not None for r in refs])
                if not ok.any():
                    continue
                mat = torch.stack([r if r is not None else torch.zeros(store.dim) for r in refs])
                dots = torch.einsum("nd,nd->n", block, mat[torch.from_numpy(inv.reshape(-1))])
                weights = lrs.copy()
                if per_step_mean:
                    weights /= np.array([step_counts[int(s)] for s in uniq], dtype=np.float64)[
                        inv.reshape(-1)
                    ]
                contrib = dots.double().numpy() * weights
                keep = ok[inv.reshape(-1)]
            part_ids.append(ids[keep])
            part_scores.append(contrib[keep])
        if not part_ids:
            continue
        ids_all = np.concatenate(part_ids + [acc_ids])
        scores_all = np.concatenate(part_scores + [acc_scores])
        counts_all = np.concatenate([np.ones(sum(p.shape[0] for p in part_ids), dtype=np.int64), acc_counts])
        rows_used += ids_all.shape[0] - acc_ids.shape[0]
        acc_ids, inv = np.unique(ids_all, return_inverse=True)
        inv = inv.reshape(-1)
        acc_scores = np.bincount(inv, weights=scores_all, minlength=acc_ids.shape[0])
        acc_counts = np.bincount(inv, weights=counts_all, minlength=acc_ids.shape[0]).astype(np.int64)
    if task_ids is not None:
        want = as_task_ids(task_ids)
        scores, counts = np.zeros(want.shape[0]), np.zeros(want.shape[0], dtype=np.int64)
        if acc_ids.size:
            pos = np.searchsorted(acc_ids, want).clip(max=acc_ids.size - 1)
            found = acc_ids[pos] == want
            scores[found], counts[found] = acc_scores[pos[found]], acc_counts[pos[found]]
        acc_ids, acc_scores, acc_counts = want, scores, counts
    return TracInResult(
        task_ids=torch.from_numpy(np.ascontiguousarray(acc_ids, dtype=np.int64)),
        scores=torch.from_numpy(np.ascontiguousarray(acc_scores, dtype=np.float64)),
        counts=torch.from_numpy(np.ascontiguousarray(acc_counts, dtype=np.int64)),
        diagnostics={
            "files": len(infos),
            "rows_used": rows_used,
            "skipped_steps": sorted(skipped)[:100],
            "num_skipped_steps": len(skipped),
            "seconds": time.perf_counter() - t0,
        },
    )


def _reference_resolver(
    store: GradientStore, reference: Reference, match: str
) -> Callable[[int], Tensor | None]:
    if match not in ("exact", "previous", "nearest"):
        raise ValueError(f"match must be 'exact', 'previous' or 'nearest', got {match!r}.")

    def prep(v: Any, step: int) -> Tensor:
        v = store.check_vectors(v, torch.float32)
        if v.dim() != 1:
            raise ValueError(
                f"reference for step {step} must have shape [{store.dim}], got {tuple(v.shape)}."
            )
        return v

    if isinstance(reference, Tensor):
        vec = prep(reference, -1)
        return lambda step: vec
    if isinstance(reference, Mapping):
        keys = np.array(sorted(int(k) for k in reference), dtype=np.int64)
        if keys.size == 0:
            raise ValueError("reference mapping is empty.")
        lookup = {int(k): v for k, v in reference.items()}

        def from_mapping(step: int) -> Tensor | None:
            if match == "exact":
                if step not in lookup:
                    raise ValueError(
                        f"no reference gradient for step {step} (have steps {keys[:10].tolist()}...); pass "
                        "match='previous' or 'nearest', or add it."
                    )
                key = step
            elif match == "previous":
                i = int(np.searchsorted(keys, step, side="right")) - 1
                if i < 0:
                    raise ValueError(
                        f"no reference step <= {step} (first is {int(keys[0])}); use match='nearest'."
                    )
                key = int(keys[i])
            else:
                i = int(np.argmin(np.abs(keys - step)))
                key = int(keys[i])
            return prep(lookup[key], step)

        return from_mapping
    if callable(reference):

        def from_callable(step: int) -> Tensor | None:
            v = reference(step)
            return None if v is None else prep(v, step)

        return from_callable
    raise ValueError(
        f"reference must be a Tensor [dim], a mapping step -> Tensor or a callable, got {type(reference).__name__}."
    )
