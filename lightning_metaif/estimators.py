"""The callback's estimators: one object per way of scoring tasks, each making one call into the engine.

:class:`~lightning_metaif.MetaInfluence` schedules rounds, gathers across ranks, decides and publishes; what a
score *is* lives here, in one class per estimator, and each class delegates the maths to its functional twin in
:mod:`lightning_metaif.influence` (the torchmetrics layout: the class holds state across rounds, the function
computes):

=================  ==================================================  ===========================================
estimator          engine call per round                               over rounds
=================  ==================================================  ===========================================
:class:`Trajectory`   :class:`~lightning_metaif.influence.tracin.TracInAccumulator`    sum along the real path
                      fed at every optimizer step; one reference gradient per round
:class:`Checkpoints`  :func:`~lightning_metaif.influence.tracin.point_scores`          sum over checkpoints (TracInCP)
:class:`TaskIF`       :func:`~lightning_metaif.influence.estimators.task_influence`   latest round only
                      (``estimator="task_if"``)
:class:`Ensemble`     :func:`~lightning_metaif.influence.estimators.task_influence`   mean over rounds
                      (``estimator="ensemble"``)
=================  ==================================================  ===========================================

Every estimator attributes the step the optimiser actually took: per-task gradients are scaled by the step's
``D_t`` (learning rate per parameter group times Adam's ``1/(√v̂ + ε)``,
:func:`~lightning_metaif.influence.optim.update_scaling`) and by the task's weight in the step's loss.
Self-influence is, everywhere, ``g_kᵀ D g_k`` for the TracIn family and ``g_kᵀ (H + δI)⁻¹ g_k`` for task-IF.

Example:
    >>> as_estimator("task_if")
    TaskIF(solver='cg', damping=None, l2=0.0, curvature=None, on_error='warn', max_tasks=None, self_influence=False)
    >>> TaskIF(damping=float("nan"))
    Traceback (most recent call last):
    ...
    ValueError: TaskIF(damping=nan) must be a finite number >= 0 or 'auto'.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from lightning_metaif.config import plain_settings
from lightning_metaif.influence.direction import direction_scores, influence_direction
from lightning_metaif.influence.estimators import task_influence
from lightning_metaif.influence.gradients import reference_gradient
from lightning_metaif.influence.instance import instance_influence, query_label_outliers
from lightning_metaif.influence.problem import Params
from lightning_metaif.influence.solvers import SolverError
from lightning_metaif.influence.solvers.settings import CG, SolverSettings, as_solver
from lightning_metaif.influence.tracin import TracInAccumulator, point_scores
from lightning_metaif.records import SampleScore

__all__ = [
    "ESTIMATORS",
    "Checkpoints",
    "Ensemble",
    "RoundContext",
    "RoundEstimator",
    "RoundScores",
    "SampleInfluence",
    "ScoreTotals",
    "TaskIF",
    "TraceTaskIF",
    "Trajectory",
    "as_estimator",
]


@dataclass
class RoundContext:
    """What an estimator may use in one scoring round (plain objects: no Trainer, no Lightning).

    ``positions`` are the pool positions this process scores; ``objective_positions`` /
    ``objective_weights`` describe the training objective of the round (kept tasks and their weights, the same
    on every process), which task-IF's Hessian is built over.
    """

    problem: Any
    params: Params
    pool: Any
    positions: Tensor
    weights: Tensor
    objective_positions: Tensor
    objective_weights: Tensor
    reference: Any
    utility: Callable[[Params], Tensor] | None
    engine: dict[str, Any]
    step: int = 0
    round_index: int = 0
    seed: int = 0
    scaling: Tensor | None = None
    projection: Callable[[Tensor], Tensor] | None = None
    store: Any = None
    position_of: dict[int, int] = field(default_factory=dict)
    progress: Callable[[int, int], None] | None = None  # (tasks done, tasks in the round) for a progress bar
    num_kept: int = (
        0  # kept (unpruned) tasks: M of the training objective (objective_positions may be a sample)
    )
    sum_over_processes: Callable[[Tensor], Tensor] | None = None  # None = one process; else an all-reduce sum
    # None = one process; else, given each pool position's recency on this process (-1 = no data), the mask of
    # positions whose newest data over all processes are this process's (ties: the lowest rank)
    newest_over_processes: Callable[[Tensor], Tensor] | None = None

    @property
    def reference_tasks(self) -> Any:
        """The reference tasks the engine takes (``None`` when a ``utility`` defines the reference)."""
        return None if self.utility is not None else self.reference

    def task_ids(self, positions: Tensor) -> Tensor:
        """Task ids of pool ``positions``."""
        return torch.as_tensor(self.pool.task_ids)[positions]

    @property
    def objective_size(self) -> int:
        """``M``, the number of tasks of the training objective (the kept tasks)."""
        return self.num_kept or len(self.objective_positions)


def seeded_subsample(positions: Tensor, limit: int | None, seed: int, round_index: int) -> Tensor:
    """At most ``limit`` of ``positions``, a seeded random sample (sorted), the same on every process.

    Example:
        >>> seeded_subsample(torch.arange(10), 3, seed=0, round_index=1).tolist() == seeded_subsample(
        ...     torch.arange(10), 3, seed=0, round_index=1).tolist()
        True
    """
    if limit is None or limit >= len(positions):
        return positions
    generator = torch.Generator().manual_seed(seed * 1_000_003 + round_index)
    return positions[torch.randperm(len(positions), generator=generator)[:limit]].sort().values


def _in_slices(
    ctx: RoundContext, score_slice: Callable[[Tensor], RoundScores], size: int = 256
) -> RoundScores:
    """Score ``ctx.positions`` in slices of ``size`` tasks (same result as one call), reporting progress."""
    total = len(ctx.positions)
    if total <= size or ctx.progress is None:
        return score_slice(ctx.positions)
    parts = []
    for start in range(0, total, size):
        parts.append(score_slice(ctx.positions[start : start + size]))
        ctx.progress(min(start + size, total), total)
    self_influence = None
    if all(p.self_influence is not None for p in parts):
        self_influence = torch.cat([p.self_influence for p in parts])
    return RoundScores(
        torch.cat([p.positions for p in parts]),
        torch.cat([p.scores for p in parts]),
        self_influence,
        parts[-1].diagnostics,
    )


@dataclass
class RoundScores:
    """One estimator's output for a round: scores of ``positions`` (pool positions), plus diagnostics."""

    positions: Tensor
    scores: Tensor
    self_influence: Tensor | None = None
    diagnostics: dict[str, float] = field(default_factory=dict)
    recency: Tensor | None = (
        None  # the step each score's data is from (ranks_overlap="latest" keeps the newest)
    )


def _reference(ctx: RoundContext) -> tuple[Tensor, float]:
    grad, value = reference_gradient(
        ctx.problem,
        ctx.params,
        ctx.reference_tasks,
        utility=ctx.utility,
        **ctx.engine,
    )
    return grad.detach(), float(value)


def _index_in(all_positions: Tensor, subset: Tensor) -> Tensor:
    """Indices of ``subset`` within ``all_positions`` (both pool positions)."""
    where = {int(p): i for i, p in enumerate(all_positions.tolist())}
    return torch.tensor([where[int(p)] for p in subset.tolist()], dtype=torch.long)


def _check_max_tasks(owner: str, value: int | None, argument: str = "max_tasks") -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{owner}({argument}={value!r}) must be a positive integer or None (every task).")


def _check_solve_settings(owner: str, settings: Any, extra_curvatures: tuple[str, ...] = ()) -> None:
    """The checks of the settings :class:`TaskIF` and :class:`TraceTaskIF` share, naming ``owner``."""
    as_solver(settings.solver, argument=f"{owner}(solver=...)")
    damping = settings.damping
    if damping is not None and not (
        (isinstance(damping, str) and damping == "auto")
        or (
            isinstance(damping, (int, float))
            and not isinstance(damping, bool)
            and math.isfinite(damping)
            and damping >= 0
        )
    ):
        raise ValueError(f"{owner}(damping={damping!r}) must be a finite number >= 0 or 'auto'.")
    if not isinstance(settings.l2, (int, float)) or not math.isfinite(settings.l2) or settings.l2 < 0:
        raise ValueError(f"{owner}(l2={settings.l2!r}) must be a finite number >= 0.")
    if settings.on_error not in ("warn", "raise"):
        raise ValueError(f"{owner}(on_error={settings.on_error!r}) must be 'warn' or 'raise'.")
    _check_curvature(owner, settings.curvature, extra_curvatures)


def _check_curvature(owner: str, value: str | None, extra: tuple[str, ...] = ()) -> None:
    from lightning_metaif.influence.curvature import CURVATURES

    if value is not None and value not in CURVATURES + extra:
        raise ValueError(
            f"{owner}(curvature={value!r}): choose one of {CURVATURES + extra} (or None: the engine's default)."
        )


def _curvature_options(damping: Any, l2: float, curvature: str | None) -> dict[str, Any]:
    """The engine keywords of damping, L2 and curvature (``None`` = the engine's default)."""
    options: dict[str, Any] = {"l2": l2}
    if damping is not None:
        options["damping"] = damping
    if curvature is not None:
        options["curvature"] = curvature
    return options


class RoundEstimator:
    """Base class of the callback's estimators.

    Subclasses set ``name``, implement :meth:`score` (one engine call) and choose how scores combine over rounds
    (``over_rounds``: ``"sum"`` along a path, ``"mean"`` of an ensemble, ``"latest"`` for a point estimate).
    ``traces_steps`` estimators also receive every optimizer step through :meth:`on_step`;
    ``splits_across_ranks`` estimators score a disjoint share of the tasks on each process (the callback sums
    the shares), the others compute the same full result on every process.
    """

    name: ClassVar[str] = ""
    over_rounds: ClassVar[Literal["sum", "mean", "latest"]] = "sum"
    traces_steps: ClassVar[bool] = False
    splits_across_ranks: ClassVar[bool] = True
    ranks_overlap: ClassVar[str] = "sum"  # a task scored on several processes: "sum" (path shares) or "mean"
    max_tasks: int | None = None

    def start(self, ctx: RoundContext) -> None:
        """Called when training starts, also after a resume: fill in what the (restored) state lacks."""

    def on_step(
        self,
        step: int,
        task_ids: Tensor,
        gradients: Tensor,
        *,
        task_weights: Tensor,
        scaling: Tensor | None,
        batch_size: int,
    ) -> None:
        """One optimizer step's per-task gradients (taken at the parameters before the step)."""

    def has_unscored_steps(self) -> bool:
        """Whether steps were traced since the last round (the end of training then scores them)."""
        return False

    def score(self, ctx: RoundContext) -> RoundScores:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """The estimator's settings, for the logger's hyperparameters."""
        return {"name": self.name} | plain_settings(self)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass
class Trajectory(RoundEstimator):
    """TracIn along the real training path (Pruthi et al.), fed at every optimizer step, robust to long runs.

    Step ``t`` contributes, for each task ``k`` of its batch, ``(w_k / B) cos(√D_t ∇f(λ_r), √D_t g_k(λ_t))`` with
    the defaults (``⟨∇f, D_t g_k⟩`` with ``normalize="none"``), where ``B`` is the number of tasks the step
    averaged over (all micro-batches of an accumulated step, all processes), ``w_k`` the task's weight in the
    step's loss, ``D_t`` the step's learning rates times Adam's preconditioner, and ``∇f(λ_r)`` the reference
    gradient refreshed at each round (at the start of training before the first). No projection.

    The defaults were chosen by measurement (``benchmarks/bench_trajectory_variants.py``, BENCHMARKS.md): the
    plain sum inverts when training goes on too long (the signal of late rounds fades to chance while their
    contributions grow), so by default

    * ``normalize="cosine"``: each step adds a cosine, so late steps with large gradients do not dominate;
    * ``weighting="improvement"``: a round's contributions count with the weight ``max(0, f_before − f_after)``,
      how much the reference loss fell over the round (a round where it rose counts nothing);
    * ``keep="best"``: the scores are those at the round with the lowest reference loss so far (the model
      ``ModelCheckpoint(monitor=...)`` would keep) and are *held* while the reference loss is above it; the
      round's ``scores_held`` metric is then 1 and the round line says so.

    ``Trajectory(normalize="none", weighting="none", keep="all")`` is plain TracIn (scores sum to the decrease
    of the reference loss for small steps).

    Example:
        >>> Trajectory().settings()["keep"], Trajectory(normalize="none").normalize
        ('best', 'none')
    """

    name: ClassVar[str] = "trajectory"
    traces_steps: ClassVar[bool] = True
    normalize: str = "cosine"
    weighting: str = "improvement"
    keep: str = "best"

    def __post_init__(self) -> None:
        for arg, value, allowed in (
            ("normalize", self.normalize, ("none", "cosine")),
            ("weighting", self.weighting, ("none", "improvement")),
            ("keep", self.keep, ("all", "best")),
        ):
            if value not in allowed:
                raise ValueError(f"Trajectory({arg}={value!r}): choose one of {allowed}.")
        self._accumulator = self._new_accumulator()
        self._reference: Tensor | None = None
        self._reference_value = math.nan
        self._reported: dict[int, tuple[float, float]] = {}
        self._steps_at_last_round = 0

    def _new_accumulator(self) -> TracInAccumulator:
        return TracInAccumulator(
            normalize=self.normalize,  # type: ignore[arg-type]
            weighting=self.weighting,  # type: ignore[arg-type]
            keep=self.keep,  # type: ignore[arg-type]
        )

    def start(self, ctx: RoundContext) -> None:
        if self._reference is None:
            self._reference, self._reference_value = _reference(ctx)
            self._accumulator.observe(self._reference_value)  # the baseline of the first round

    def on_step(self, step, task_ids, gradients, *, task_weights, scaling, batch_size) -> None:  # noqa: D102
        if self._reference is None:
            raise RuntimeError("Trajectory.on_step before start(): the reference gradient is not set.")
        self._accumulator.update(
            step,
            1.0,
            task_ids,
            gradients,
            self._reference.to(gradients),
            batch_size=batch_size,
            preconditioner=None if scaling is None else scaling.to(gradients),
            task_weights=task_weights,
            return_contributions=False,  # no host copy per step: folded in at the round
        )

    def has_unscored_steps(self) -> bool:
        return self._accumulator.steps > self._steps_at_last_round

    def score(self, ctx: RoundContext) -> RoundScores:
        previous_value = self._reference_value
        self._reference, self._reference_value = _reference(ctx)  # for the steps until the next round
        self._accumulator.observe(self._reference_value, occurrences=self._occurrences_over_processes(ctx))
        totals = self._accumulator.scores()
        # a held snapshot has no data on tasks first seen after it: they stay unscored (not 0)
        seen = totals.diagnostics["counts"] > 0
        totals.task_ids, totals.scores, totals.self_influence = (
            totals.task_ids[seen],
            totals.scores[seen],
            totals.self_influence[seen],
        )
        ids = totals.task_ids.tolist()
        # the callback sums rounds: report what changed since the last report (0 while the scores are held)
        before = torch.tensor([self._reported.get(int(t), (0.0, 0.0)) for t in ids], dtype=torch.float64)
        now = torch.stack([totals.scores, totals.self_influence], 1) if ids else before
        self._reported.update({int(t): (float(a), float(b)) for t, (a, b) in zip(ids, now.tolist())})
        positions = torch.tensor([ctx.position_of[int(t)] for t in ids], dtype=torch.long)
        steps = self._accumulator.steps - self._steps_at_last_round
        self._steps_at_last_round = self._accumulator.steps
        d = totals.diagnostics
        return RoundScores(
            positions,
            (now - before)[:, 0] if ids else torch.zeros(0, dtype=torch.float64),
            (now - before)[:, 1] if ids else torch.zeros(0, dtype=torch.float64),
            {
                "steps_traced": float(steps),
                "reference_loss": self._reference_value,
                "reference_loss_change": self._reference_value - previous_value,
                "scores_held": float(bool(d["holding"])),
                "best_reference_loss": math.nan
                if d["best_reference_loss"] is None
                else float(d["best_reference_loss"]),
            },
        )

    def _occurrences_over_processes(self, ctx: RoundContext) -> Tensor | None:
        """How often each task of this round was traced over all processes (None on one process).

        ``weighting="improvement"`` averages a task's contributions over its occurrences in a round; a task drawn
        on two processes in one round must be averaged over both, not once per process.
        """
        if ctx.sum_over_processes is None or self.weighting != "improvement":
            return None
        ids, local = self._accumulator.round_occurrences()
        positions = torch.tensor([ctx.position_of[int(t)] for t in ids.tolist()], dtype=torch.long)
        counts = torch.zeros(len(ctx.position_of), dtype=torch.float64)
        counts[positions] = local.double()
        return ctx.sum_over_processes(counts)[positions].round().long()

    def state_dict(self) -> dict[str, Any]:
        ids = sorted(self._reported)
        return {
            "accumulator": self._accumulator.state_dict(),
            "reference": None if self._reference is None else self._reference.detach().cpu().clone(),
            "reference_value": self._reference_value,
            "reported_ids": torch.tensor(ids, dtype=torch.long),
            "reported": torch.tensor([self._reported[t] for t in ids], dtype=torch.float64).reshape(-1, 2),
            "steps_at_last_round": self._steps_at_last_round,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["accumulator"]
        for name in ("normalize", "weighting", "keep"):
            if name in saved and saved[name] != getattr(self, name):
                raise ValueError(
                    f"The checkpoint's trajectory scores were accumulated with Trajectory({name}={saved[name]!r}), "
                    f"this run has Trajectory({name}={getattr(self, name)!r}): resume with the same settings, or "
                    "start a new run (scores of different settings cannot be continued)."
                )
        self._accumulator = self._new_accumulator()
        self._accumulator.load_state_dict(saved)
        self._reference = state.get("reference")
        self._reference_value = float(state.get("reference_value", math.nan))
        ids = state.get("reported_ids", torch.zeros(0, dtype=torch.long)).tolist()
        values = state.get("reported", torch.zeros(0, 2, dtype=torch.float64)).tolist()
        self._reported = {int(t): (float(a), float(b)) for t, (a, b) in zip(ids, values)}
        self._steps_at_last_round = int(state.get("steps_at_last_round", self._accumulator.steps))


@dataclass
class Checkpoints(RoundEstimator):
    """TracInCP: each round scores the pool at the current parameters and adds ``⟨∇f, D g_k⟩`` to every task.

    ``D`` is the last step's learning rates times Adam's preconditioner (as for :class:`Trajectory`), so a round
    weighs like the steps it stands for. With a store, the projected gradients ``Π(√D g_k)`` are written as a
    checkpoint (re-scorable later against another reference).

    Args:
        max_tasks: score a seeded random sample of at most this many kept tasks per round (``None``: all).
    """

    name: ClassVar[str] = "checkpoints"
    max_tasks: int | None = None

    def __post_init__(self) -> None:
        _check_max_tasks("Checkpoints", self.max_tasks)

    def score(self, ctx: RoundContext) -> RoundScores:
        return _in_slices(ctx, lambda positions: self._score(ctx, positions))

    def _score(self, ctx: RoundContext, positions: Tensor) -> RoundScores:
        ids = ctx.task_ids(positions)
        out = point_scores(
            ctx.problem,
            ctx.params,
            ctx.pool.batch(positions),
            ctx.reference_tasks,
            utility=ctx.utility,
            task_ids=ids,
            preconditioner=ctx.scaling,
            projection=ctx.projection,
            keep_gradients=ctx.store is not None,
            **ctx.engine,
        )
        weights = ctx.weights[_index_in(ctx.positions, positions)].to(torch.float64)
        # a sampled round stands for the whole kept pool: kept/sampled makes each task's sum over rounds unbiased
        weights = weights * (ctx.objective_size / max(len(ctx.objective_positions), 1))
        if ctx.store is not None:
            ctx.store.write_checkpoint(ctx.step, 1.0, ids, out["rows"])
        return RoundScores(
            positions,
            weights * out["dots"].detach().to("cpu", torch.float64),
            weights * out["self"].detach().to("cpu", torch.float64),
            {"reference_loss": out["reference_value"]},
        )


@dataclass
class TaskIF(RoundEstimator):
    """Ren et al.'s task influence at the current parameters: ``(w_k / M) g_kᵀ (H + δI)^{-1} ∇f``.

    ``H`` is the total Hessian of the round's training objective: the kept (unpruned) tasks, with their
    weights (with ``max_tasks``, estimated on a seeded sample of them; ``M`` stays the number of kept tasks). Scores of one round are not mixed with those of earlier rounds (parameters moved in between):
    each round reports, and actions act on, the tasks scored in that round only.

    Args:
        solver: a name (``"cg"``, ``"dense"``, ``"lissa"``, ``"arnoldi"``, ``"identity"``, ``"ekfac"``) or
            settings (``CG(max_iterations=200)``, ``EKFAC(fit_tasks=256)``, ... from
            :mod:`lightning_metaif.influence.solvers`).
        damping: ``δ``; ``None`` uses the engine's default.
        l2: the L2 coefficient of the training objective (part of ``H``).
        curvature: ``None`` (the engine's default: Gauss–Newton where the module exposes ``query_outputs``,
            as ``MAML`` does), ``"gauss_newton"``, ``"exact"`` or ``"gamma"``.
        on_error: ``"warn"``: a failed solve warns and the round's scores are NaN (nothing acts on them);
            ``"raise"``: training stops with the :class:`~lightning_metaif.influence.solvers.SolverError`.
        max_tasks: a seeded random sample of at most this many kept tasks per round (``None``: all).
        self_influence: also compute ``g_kᵀ (H + δI)^{-1} g_k`` (costs extra solves).
    """

    name: ClassVar[str] = "task_if"
    over_rounds: ClassVar[Literal["sum", "mean", "latest"]] = "latest"
    splits_across_ranks: ClassVar[bool] = False
    solver: str | SolverSettings = "cg"
    damping: float | str | None = None
    l2: float = 0.0
    curvature: str | None = None
    on_error: Literal["warn", "raise"] = "warn"
    max_tasks: int | None = None
    self_influence: bool = False

    def __post_init__(self) -> None:
        _check_solve_settings("TaskIF", self)
        _check_max_tasks("TaskIF", self.max_tasks)

    def score(self, ctx: RoundContext) -> RoundScores:
        settings = as_solver(self.solver)
        options = _curvature_options(self.damping, self.l2, self.curvature)
        positions = ctx.objective_positions
        result = _unless_solver_fails(
            f"TaskIF(solver={self.solver!r}, damping={self.damping!r}, l2={self.l2!r})",
            self.on_error,
            ctx.round_index,
            lambda: task_influence(
                ctx.problem,
                ctx.params,
                ctx.pool.batch(positions),
                ctx.reference_tasks,
                utility=ctx.utility,
                task_ids=ctx.task_ids(positions),
                estimator="task_if",
                solver=settings.name,
                solver_options=settings.options(),
                task_weights=ctx.objective_weights,
                with_self_influence=self.self_influence,
                **options,
                **ctx.engine,
            ),
        )
        if result is None:
            return _failed_round(positions)
        d = result.diagnostics
        _warn_unconverged("TaskIF", ctx.round_index, settings.name, d)
        diagnostics = _solve_metrics(d)
        self_influence = None
        if result.self_influence is not None:
            self_influence = result.self_influence.detach().to("cpu", torch.float64)
        # the engine divides by the sample's size; the objective has M = kept tasks (the sample estimates H only)
        scores = result.scores.detach().to("cpu", torch.float64) * (len(positions) / ctx.objective_size)
        return RoundScores(positions, scores, self_influence, diagnostics)


@dataclass
class TraceTaskIF(RoundEstimator):
    """Task-IF that reuses the trace: one solve per round, the pool scored from the gradients training computed.

    Each round solves once for ``s = (H + δI)^{-1} ∇f``, with ``H`` the curvature of a seeded subsample of
    ``hessian_tasks`` kept tasks (weighted) and the solve warm-started from the previous round's ``s``; every
    kept task is then scored ``(w_k / M) ⟨g_k, s⟩`` from its latest traced meta-gradient ``g_k`` (the one of the
    last step that trained on it), with no second pass over the pool. Tasks not trained on yet are unscored.
    ``g_k`` was taken at the parameters of that step, not the current ones: the price of skipping the pass.

    ``curvature="fisher"`` replaces the curvature products by the empirical Fisher of the traced gradients
    themselves, ``F = (1/n) Σ_k w_k g_k g_kᵀ`` (:func:`~lightning_metaif.influence.fisher.fisher_direction`):
    the solve is then exact (a Cholesky factorisation of an ``n × n`` or ``p × p`` matrix, no iterations) and a
    round costs one reference gradient and one product of the traced rows, at the price of an approximation of
    the total Hessian (``hessian_tasks`` does not apply, and a ``solver`` or ``l2`` other than the defaults is
    refused with an error; BENCHMARKS.md §9 compares both).

    Args:
        hessian_tasks: tasks in the curvature's subsample (``None``: every kept task).
        solver, damping, l2, curvature, on_error: as for :class:`TaskIF`; the default is CG to relative residual
            1e-3, warm-started; a round whose solve misses its tolerance is reported
            (``influence/solver_converged`` = 0) and warned about. ``curvature`` may also be ``"fisher"``.
        projection_dim: keep the traced gradients projected to this dimension (a seeded random projection;
            memory ``pool × projection_dim``); ``None`` keeps them whole. Under DDP, ``curvature="fisher"``
            needs it at most 4,096 (the ``p × p`` Fisher is summed over processes).

    Example:
        >>> TraceTaskIF(curvature="fisher").curvature, TraceTaskIF().hessian_tasks
        ('fisher', 32)
    """

    name: ClassVar[str] = "task_if_trace"
    over_rounds: ClassVar[Literal["sum", "mean", "latest"]] = "latest"
    traces_steps: ClassVar[bool] = True
    ranks_overlap: ClassVar[str] = "latest"  # a task traced on several processes: its newest gradient counts
    hessian_tasks: int | None = 32
    solver: str | SolverSettings = field(default_factory=lambda: CG(tolerance=1e-3))
    damping: float | str | None = None
    l2: float = 0.0
    curvature: str | None = None
    on_error: Literal["warn", "raise"] = "warn"
    projection_dim: int | None = None

    def __post_init__(self) -> None:
        _check_solve_settings("TraceTaskIF", self, extra_curvatures=("fisher",))
        _check_max_tasks("TraceTaskIF", self.hessian_tasks, "hessian_tasks")
        if self.projection_dim is not None and (
            not isinstance(self.projection_dim, int) or self.projection_dim < 1
        ):
            raise ValueError(
                f"TraceTaskIF(projection_dim={self.projection_dim!r}) must be a positive integer or None."
            )
        if self.curvature == "fisher":  # solved exactly from the traced rows: no solver, no l2 to apply
            if self.l2 != 0.0:
                raise ValueError(
                    f"TraceTaskIF(curvature='fisher', l2={self.l2!r}): l2 does not apply to the empirical Fisher; "
                    "regularise it with damping= (a number, or None for the automatic value)."
                )
            if self.solver != CG(tolerance=1e-3):
                raise ValueError(
                    f"TraceTaskIF(curvature='fisher', solver={self.solver!r}): the empirical Fisher is solved "
                    "exactly (Woodbury or Cholesky), no solver applies; drop solver= or choose another curvature."
                )
        self._rows: Tensor | None = None
        self._has_row: Tensor | None = None
        self._row_step: Tensor | None = None
        self._position_of: dict[int, int] = {}
        self._projection: Any = None
        self._direction: Tensor | None = None

    def start(self, ctx: RoundContext) -> None:
        self._position_of = dict(ctx.position_of)
        dim = sum(p.numel() for p in ctx.params.values())
        if self.projection_dim is not None and self.projection_dim < dim:
            from lightning_metaif.influence.projection import RandomProjection

            self._projection = RandomProjection(dim, self.projection_dim, seed=ctx.seed)
            dim = self.projection_dim
        if self._rows is None or self._rows.shape != (len(self._position_of), dim):
            self._rows = torch.zeros(len(self._position_of), dim)
            self._has_row = torch.zeros(len(self._position_of), dtype=torch.bool)
            self._row_step = torch.full((len(self._position_of),), -1, dtype=torch.long)

    def on_step(self, step, task_ids, gradients, *, task_weights, scaling, batch_size) -> None:  # noqa: D102
        rows = gradients.detach()
        if self._projection is not None:
            rows = self._projection(rows)
        positions = torch.tensor([self._position_of[int(t)] for t in task_ids.tolist()], dtype=torch.long)
        self._rows[positions] = rows.to("cpu", self._rows.dtype)
        self._has_row[positions] = True
        self._row_step[positions] = int(step)

    def score(self, ctx: RoundContext) -> RoundScores:
        if self.curvature == "fisher":
            return self._score_with_fisher(ctx)
        settings = as_solver(self.solver)
        objective = ctx.objective_positions
        sample = seeded_subsample(objective, self.hessian_tasks, ctx.seed, ctx.round_index)
        options = _curvature_options(self.damping, self.l2, self.curvature)
        solved = _unless_solver_fails(
            f"TraceTaskIF(solver={self.solver!r}, damping={self.damping!r}, l2={self.l2!r})",
            self.on_error,
            ctx.round_index,
            lambda: influence_direction(
                ctx.problem,
                ctx.params,
                ctx.pool.batch(sample),
                ctx.reference_tasks,
                utility=ctx.utility,
                solver=settings.name,
                solver_options=settings.options(),
                task_weights=ctx.objective_weights[_index_in(objective, sample)],
                x0=self._direction,
                seed=ctx.seed,
                **options,
                **ctx.engine,
            ),
        )
        if solved is None:
            return _failed_round(objective)
        direction, d = solved
        self._direction = direction
        _warn_unconverged("TraceTaskIF", ctx.round_index, settings.name, d)
        return self._scores_from_rows(ctx, self._like_rows(direction), d)

    def _traced(self, ctx: RoundContext) -> tuple[Tensor, Tensor]:
        """The kept tasks this process traced and their weights (under DDP each process holds the rows of the
        tasks it trained on; the callback keeps, per task, the score from the newest row)."""
        objective = ctx.objective_positions
        mine = objective[self._has_row[objective]]
        return mine, ctx.objective_weights[_index_in(objective, mine)]

    def _like_rows(self, vector: Tensor) -> Tensor:
        """A flat parameter-space vector as the rows are kept: on the CPU, float32, projected if they are."""
        vector = vector.to("cpu", torch.float32)
        return vector if self._projection is None else self._projection(vector[None])[0]

    def _scores_from_rows(self, ctx: RoundContext, direction: Tensor, d: dict[str, Any]) -> RoundScores:
        """Every traced kept task scored ``(w_k / M) ⟨g_k, s⟩`` from its row, with the solve's metrics."""
        mine, weights = self._traced(ctx)
        scores = direction_scores(self._rows[mine], direction, weights, ctx.objective_size).to(torch.float64)
        return RoundScores(mine, scores, None, _solve_metrics(d), recency=self._row_step[mine].clone())

    def _score_with_fisher(self, ctx: RoundContext) -> RoundScores:
        from lightning_metaif.influence.fisher import fisher_direction

        mine, weights = self._traced(ctx)
        # the curvature counts each task once: under DDP a task may also hold an older row on another process
        in_curvature = torch.ones(len(mine), dtype=torch.bool)
        if ctx.newest_over_processes is not None:
            recency = torch.full((len(self._position_of),), -1.0, dtype=torch.float64)
            recency[mine] = self._row_step[mine].double()
            in_curvature = ctx.newest_over_processes(recency)[mine]
        gradient, value = _reference(ctx)
        reference = self._like_rows(gradient)
        solved = _unless_solver_fails(
            f"TraceTaskIF(curvature='fisher', damping={self.damping!r})",
            self.on_error,
            ctx.round_index,
            lambda: fisher_direction(
                self._rows[mine[in_curvature]],
                reference,
                weights=weights[in_curvature],
                damping="auto" if self.damping is None else self.damping,
                sum_over_processes=ctx.sum_over_processes,
            ),
        )
        if solved is None:
            return _failed_round(ctx.objective_positions)
        direction, d = solved
        d["reference_value"] = value
        return self._scores_from_rows(ctx, direction, d)

    def state_dict(self) -> dict[str, Any]:
        return {
            "rows": None if self._rows is None else self._rows.clone(),
            "has_row": None if self._has_row is None else self._has_row.clone(),
            "row_step": None if self._row_step is None else self._row_step.clone(),
            "direction": None if self._direction is None else self._direction.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rows, self._has_row, self._direction = state["rows"], state["has_row"], state["direction"]
        self._row_step = state.get("row_step")


def _unless_solver_fails(settings: str, on_error: str, round_index: int, call: Callable[[], Any]) -> Any:
    """Run a solve; on a :class:`SolverError` raise (``on_error="raise"``) or warn and return ``None``."""
    try:
        return call()
    except SolverError as error:
        if on_error == "raise":
            raise
        warnings.warn(
            f"{settings.split('(')[0]} round {round_index - 1}: the solve failed, this round's scores are NaN and "
            f"nothing acts on them: {error} (settings: {settings}; raise `damping` or `l2` of "
            f"{settings.split('(')[0]}, or pass on_error='raise' to stop.)",
            UserWarning,
            stacklevel=3,
        )
        return None


def _failed_round(positions: Tensor) -> RoundScores:
    nan = torch.full((len(positions),), math.nan, dtype=torch.float64)
    return RoundScores(positions, nan, None, {"solver_converged": 0.0, "solver_failed": 1.0})


def _warn_unconverged(owner: str, round_index: int, solver: str, d: dict[str, Any]) -> None:
    if bool(d.get("converged", True)):
        return
    warnings.warn(
        f"{owner} round {round_index - 1}: the {solver} solve stopped at relative residual "
        f"{float(d.get('residual', math.nan)):.2e} after {d.get('iterations')} iterations without reaching its "
        f"tolerance; scores are approximate. Give {owner}(solver=...) more iterations (e.g. CG(max_iterations=...)) "
        "or a larger damping.",
        UserWarning,
        stacklevel=3,
    )


def _solve_metrics(d: dict[str, Any]) -> dict[str, float]:
    damping = d.get("damping", math.nan)
    return {
        "solver_iterations": float(d.get("iterations", 0)),
        "solver_residual": float(d.get("residual", math.nan)),
        "solver_converged": float(bool(d.get("converged", True))),
        "solver_failed": 0.0,
        "damping": float(damping) if isinstance(damping, (int, float)) else math.nan,
        "reference_loss": float(d.get("reference_value", math.nan)),
    }


@dataclass
class Ensemble(RoundEstimator):
    """Yang et al.'s ensemble: inner-product influence averaged over the current parameters and ``copies``
    Gaussian-perturbed copies (``std``), then over rounds.

    Args:
        copies: perturbed copies per round (``0``: the current parameters only).
        std: standard deviation of the perturbation.
        max_tasks: a seeded random sample of at most this many kept tasks per round (``None``: all).
    """

    name: ClassVar[str] = "ensemble"
    over_rounds: ClassVar[Literal["sum", "mean", "latest"]] = "mean"
    copies: int = 4
    std: float = 0.01
    max_tasks: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.copies, int) or self.copies < 0:
            raise ValueError(f"Ensemble(copies={self.copies!r}) must be an integer >= 0.")
        if not isinstance(self.std, (int, float)) or not math.isfinite(self.std) or self.std < 0:
            raise ValueError(f"Ensemble(std={self.std!r}) must be a finite number >= 0.")
        _check_max_tasks("Ensemble", self.max_tasks)

    def score(self, ctx: RoundContext) -> RoundScores:
        return _in_slices(ctx, lambda positions: self._score(ctx, positions))

    def _score(self, ctx: RoundContext, positions: Tensor) -> RoundScores:
        result = task_influence(
            ctx.problem,
            ctx.params,
            ctx.pool.batch(positions),
            ctx.reference_tasks,
            utility=ctx.utility,
            task_ids=ctx.task_ids(positions),
            estimator="ensemble",
            noise_copies=self.copies,
            noise_std=self.std,
            seed=ctx.seed * 7919 + ctx.round_index,  # the same perturbed copies for every slice of the pool
            projection=ctx.projection,
            task_weights=ctx.weights[_index_in(ctx.positions, positions)],
            with_self_influence=True,
            **ctx.engine,
        )
        value = result.diagnostics.get("reference_value", math.nan)
        return RoundScores(
            positions,
            result.scores.detach().to("cpu", torch.float64),
            result.self_influence.detach().to("cpu", torch.float64),
            {"reference_loss": float(value) if isinstance(value, (int, float)) else math.nan},
        )


@dataclass
class SampleInfluence:
    """Score the samples of the ``top_k`` most harmful kept tasks each round (instance influence).

    Inner-product form at the current parameters: a support or query sample's score is the predicted increase
    of the reference loss if its weight in the task's loss went from 1 to 0 (positive = helpful). Query samples
    also get ``excess_loss``, their loss after adaptation minus the mean of the task's other query samples with
    the same label: the better signal for a mislabelled *query* sample (BENCHMARKS.md §4).

    Example:
        >>> SampleInfluence(top_k=0)
        Traceback (most recent call last):
        ...
        ValueError: SampleInfluence(top_k=0) must be a positive integer (leave samples=None to turn it off).
    """

    top_k: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 1:
            raise ValueError(
                f"SampleInfluence(top_k={self.top_k!r}) must be a positive integer (leave samples=None to turn it off)."
            )

    def score(self, ctx: RoundContext, positions: Tensor) -> list[SampleScore]:
        """Sample scores of the tasks at ``positions``, most harmful first."""
        if len(positions) == 0:
            return []
        tasks = ctx.pool.batch(positions)
        result = instance_influence(
            ctx.problem,
            ctx.params,
            tasks,
            ctx.reference_tasks,
            utility=ctx.utility,
            solver="identity",
            chunk_size=ctx.engine.get("chunk_size", 16),
        )
        excess = query_label_outliers(
            ctx.problem, ctx.params, tasks, chunk_size=ctx.engine.get("chunk_size", 16)
        )
        image = bool(getattr(ctx.pool, "is_image", False))
        rows = []
        for i, task_id in enumerate(result.task_ids.tolist()):
            task = tasks[i]
            for split, table, inputs, labels in (
                ("support", result.support_scores, task.support_x, task.support_y),
                ("query", result.query_scores, task.query_x, task.query_y),
            ):
                for j, value in enumerate(torch.as_tensor(table[i]).tolist()):
                    label = labels[j].item() if labels[j].numel() == 1 else None
                    extra = float(excess[i][j]) if split == "query" else None
                    rows.append(
                        SampleScore(task_id, split, j, value, label, inputs[j] if image else None, extra)
                    )
        rows.sort(key=lambda row: row.score)
        return rows


class ScoreTotals:
    """Scores over rounds, per pool position, by one rule: ``"sum"`` (a path goes on), ``"mean"`` (over the rounds
    that scored each task) or ``"latest"`` (only the current round; older scores were taken at other parameters).

    Example:
        >>> totals = ScoreTotals("mean", size=2)
        >>> _ = totals.add(torch.tensor([1.0, 0.0]), None, torch.tensor([True, False]))
        >>> scores, _, scored = totals.add(torch.tensor([3.0, 5.0]), None, torch.tensor([True, True]))
        >>> scores.tolist(), scored.tolist()
        ([2.0, 5.0], [True, True])
    """

    def __init__(self, rule: str, size: int = 0) -> None:
        if rule not in ("sum", "mean", "latest"):
            raise ValueError(f"rule must be 'sum', 'mean' or 'latest', got {rule!r}.")
        self.rule = rule
        self.resize(size)

    @property
    def size(self) -> int:
        return int(self.scores.numel())

    def resize(self, size: int) -> None:
        self.scores = torch.zeros(size, dtype=torch.float64)
        self.self_influence = torch.zeros(size, dtype=torch.float64)
        self.times_scored = torch.zeros(size, dtype=torch.long)
        self.has_self = False

    def add(
        self, scores: Tensor, self_influence: Tensor | None, scored: Tensor
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """Fold one round in; returns the combined ``(scores, self_influence, scored)`` for the round's record."""
        scored = scored.to(torch.bool)
        self.times_scored += scored.long()
        new_self = torch.zeros_like(scores) if self_influence is None else self_influence
        self.has_self = self.has_self or self_influence is not None
        if self.rule == "sum":
            self.scores = self.scores + torch.where(scored, scores, torch.zeros_like(scores))
            self.self_influence = self.self_influence + torch.where(
                scored, new_self, torch.zeros_like(new_self)
            )
            mask = self.times_scored > 0
        elif self.rule == "mean":
            count = self.times_scored.clamp_min(1).to(torch.float64)
            self.scores = torch.where(scored, self.scores + (scores - self.scores) / count, self.scores)
            self.self_influence = torch.where(
                scored, self.self_influence + (new_self - self.self_influence) / count, self.self_influence
            )
            mask = self.times_scored > 0
        else:
            self.scores = torch.where(scored, scores, torch.full_like(scores, math.nan))
            self.self_influence = torch.where(scored, new_self, torch.full_like(new_self, math.nan))
            mask = scored
        return self.scores.clone(), (self.self_influence.clone() if self.has_self else None), mask.clone()

    def state_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "scores": self.scores.clone(),
            "self_influence": self.self_influence.clone(),
            "times_scored": self.times_scored.clone(),
            "has_self": self.has_self,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scores = state["scores"].clone()
        self.self_influence = state["self_influence"].clone()
        self.times_scored = state["times_scored"].clone()
        self.has_self = bool(state["has_self"])


ESTIMATORS: dict[str, type[RoundEstimator]] = {
    cls.name: cls for cls in (Trajectory, Checkpoints, TaskIF, TraceTaskIF, Ensemble)
}


def as_estimator(value: str | RoundEstimator) -> RoundEstimator:
    """An estimator object from a name (with its defaults) or an object, checked."""
    if isinstance(value, RoundEstimator):
        return value
    if isinstance(value, str) and value in ESTIMATORS:
        return ESTIMATORS[value]()
    raise ValueError(
        f"estimator={value!r} is not an estimator; choose one of {tuple(ESTIMATORS)} or pass Trajectory(), "
        "Checkpoints(...), TaskIF(...), TraceTaskIF(...), Ensemble(...) from lightning_metaif.estimators."
    )
