"""``MetaInfluence``: trace meta-training, score every task, log it, and act on it.

The callback only schedules, gathers, decides and publishes. What a score is lives in the estimator objects
of :mod:`lightning_metaif.estimators` (each one engine call per round); what to do about it in the actions of
:mod:`lightning_metaif.actions`; how it is shown in :mod:`lightning_metaif.dashboards`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_metaif.actions.sampler import TaskSampler
from lightning_metaif.actions.state import TaskState
from lightning_metaif.config import GradientStoreConfig, plain_settings
from lightning_metaif.estimators import (
    RoundContext,
    RoundEstimator,
    RoundScores,
    SampleInfluence,
    ScoreTotals,
    as_estimator,
    seeded_subsample,
)
from lightning_metaif.influence.gradients import per_task_gradients
from lightning_metaif.influence.optim import learning_rates, update_scaling
from lightning_metaif.influence.problem import ParamLayout, Params, trainable
from lightning_metaif.influence.projection import RandomProjection
from lightning_metaif.influence.solvers import SolverError
from lightning_metaif.influence.store import GradientStore
from lightning_metaif.influence.tasks import TaskBatch
from lightning_metaif.meta.pools import as_task_pool
from lightning_metaif.records import Decision, ScoreRound

# Round lines go to this logger (not Lightning's rank_zero one, which `lightning_metaif.quiet` and users silence to
# hide Lightning's tips). As Lightning does for its own logger: print INFO to stderr unless logging is configured.
_round_log = logging.getLogger("lightning_metaif.callback")
if not logging.getLogger().hasHandlers() and not _round_log.handlers:
    _round_log.setLevel(logging.INFO)
    _round_log.addHandler(logging.StreamHandler())
    _round_log.propagate = False

AUTO_CHUNK_BYTES = 16 << 20  # chunk_size=None: one chunk's float32 per-task gradients within 16 MiB
PROJECTION_CACHE_ELEMENTS = 1 << 25  # keep P in memory up to 128 MB (float32); larger ones are regenerated

__all__ = ["MetaInfluence", "ReportsTaskGradients"]


class ReportsTaskGradients:
    """The module contract for handing a training step's per-task gradients to the callback (no recomputation).

    A LightningModule declares ``reports_task_gradients = True`` and returns from ``training_step`` a mapping
    with (besides ``"loss"`` under automatic optimisation):

    * ``"task_ids"``: ``[B]`` integer ids of the step's tasks;
    * ``"task_gradients"``: ``[B, p]`` per-task meta-gradients at the parameters *before* the step, flat in
      ``ParamLayout.of(meta_parameters())`` order (only parameters that require grad);
    * ``"task_weights"`` (optional): ``[B]`` weights ``w_k`` of each task in the step's loss
      ``(1/B) Σ w_k ℓ_k`` (default 1).

    :class:`~lightning_metaif.MAML` implements it. A module that does not declare it gets its per-task gradients
    recomputed by the callback at the start of each batch (one extra backward pass per task).
    """

    reports_task_gradients: bool = True


class MetaInfluence(Callback):
    r"""Score every training task of a meta-learning run while it trains, log the scores, and act on them.

    A score is the first-order predicted *increase* of the reference loss (by default the mean query loss of
    the validation tasks, adapted from the current meta-parameters) if the task were removed: positive = the
    task helps, negative = it harms. The module must implement ``task_loss(params, task, support_weights=None,
    query_weights=None)`` (as :class:`~lightning_metaif.MAML` does) and the training batches must carry task ids
    (a :class:`~lightning_metaif.TaskBatch`). The ``params`` that ``task_loss`` receives are the module's
    ``meta_parameters()`` when it defines one, else its ``named_parameters()``.

    Args:
        estimator: how tasks are scored: ``"trajectory"`` (default), ``"checkpoints"``, ``"task_if"``,
            ``"ensemble"``, or an object from :mod:`lightning_metaif.estimators` with its own settings
            (``TaskIF(solver=CG(max_iterations=200), l2=1e-3)``, ...).
        reference: reference tasks (a ``TaskBatch``, a task pool, a ``Dataset`` or a list of tasks); default:
            the datamodule's ``val_pool``.
        utility: a differentiable ``params -> scalar`` to use as the reference objective instead of tasks.
        pool: the training tasks to score (a pool, a ``Dataset`` or a list of tasks); default: the datamodule's
            ``train_pool`` or the train dataloader's dataset.
        every_n_epochs / every_n_train_steps: when to run a scoring round, as Lightning's ``ModelCheckpoint``
            counts: both ``None`` (default) = at the end of every epoch; at most one of them may be set.
            Training also ends with a round when steps were traced since the last one.
        store: a :class:`~lightning_metaif.config.GradientStoreConfig` to write per-task gradients to disk
            (``None``: no store; the round files are then written to ``<log_dir>/metaif``).
        actions: what to do with the scores each round, e.g.
            ``[TaskWeighting(), PruningPolicy(fraction=0.2)]``; each has a ``decide_round`` method.
        samples: a :class:`~lightning_metaif.estimators.SampleInfluence` to score the samples of the most
            harmful tasks each round (``None``: off).
        ground_truth: known-corrupted task ids (demos, benchmarks): adds detection AUROC, recall@k and
            pruning precision to the metrics.
        seed: seed of the projection, the task sampling and the ensemble noise.
        chunk_size: tasks per vmapped engine call; ``None`` (default): as many as keep one chunk's per-task
            gradients within 16 MiB (float32), between 16 and 256 (a 2,245-parameter MLP: 256; a 1M-parameter
            ConvNet: 16). Larger chunks make a round's pass over the pool several times cheaper for small
            models (one ``vmap`` call per chunk).
        vectorize: ``"auto"`` tries ``torch.func.vmap`` over the tasks and falls back to a per-task loop (with a
            warning) when the module's ``task_loss`` cannot be vmapped; ``"vmap"`` or ``"loop"`` force one path.
        dashboard_every_n_rounds: with a ``WandbLogger``, log the tables and charts (each a W&B artifact) every
            n rounds (the first and the last round always); scalars go every round.
        verbose: print one line per round (through the progress bar when there is one).

    After each round, :attr:`result` is a :class:`~lightning_metaif.records.ScoreRound` with ``task_ids``,
    ``scores``, ``weights``, the ``pruned`` mask and the ``scored`` mask, aligned; :attr:`decisions` lists every
    decision taken so far (kept in the checkpoint). The round's scalars go to every logger once per round and
    to ``trainer.callback_metrics`` (so ``ModelCheckpoint(monitor="influence/...")`` can use them).

    Example::

        from lightning_metaif import MAML, MetaInfluence, PruningPolicy
        influence = MetaInfluence(actions=[PruningPolicy(fraction=0.2)])
        trainer = pl.Trainer(max_epochs=10, callbacks=[influence])
        trainer.fit(MAML(backbone), datamodule=MetaDataModule(train, val, task_state=influence.task_state))
        influence.result.scores
    """

    def __init__(
        self,
        estimator: str | RoundEstimator = "trajectory",
        *,
        reference: Any = None,
        utility: Callable[[Params], Tensor] | None = None,
        pool: Any = None,
        every_n_epochs: int | None = None,
        every_n_train_steps: int | None = None,
        store: GradientStoreConfig | None = None,
        actions: Sequence[Any] | None = None,
        samples: SampleInfluence | None = None,
        ground_truth: Iterable[int] | Tensor | None = None,
        seed: int = 0,
        chunk_size: int | None = None,
        vectorize: str = "auto",
        dashboard_every_n_rounds: int = 1,
        verbose: bool = True,
    ) -> None:
        self.estimator = as_estimator(estimator)
        if not isinstance(dashboard_every_n_rounds, int) or dashboard_every_n_rounds < 1:
            raise ValueError(
                f"dashboard_every_n_rounds must be a positive integer, got {dashboard_every_n_rounds!r}."
            )
        if every_n_epochs is not None and every_n_train_steps is not None:
            raise ValueError(
                f"Give at most one of every_n_epochs={every_n_epochs!r} and every_n_train_steps="
                f"{every_n_train_steps!r} (both None = once per epoch)."
            )
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_train_steps", every_n_train_steps)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")
        if reference is not None and utility is not None:
            raise ValueError("Pass `reference` (tasks) or `utility` (a function of params), not both.")
        if utility is not None and not callable(utility):
            raise ValueError(f"utility must be a callable params -> scalar, got {type(utility).__name__}.")
        if store is not None and getattr(store, "trajectory", False) and not self.estimator.traces_steps:
            raise ValueError(
                f"GradientStoreConfig(trajectory=True) stores every step's gradients, which only the 'trajectory' "
                f"estimator traces; {self.estimator.name!r} does not: drop trajectory=True."
            )
        if store is not None and not isinstance(store, GradientStoreConfig):
            raise ValueError(
                f"store must be a GradientStoreConfig or None, got {type(store).__name__}: "
                "e.g. store=GradientStoreConfig(projection_dim=1024)."
            )
        actions = list(actions or [])
        for i, action in enumerate(actions):
            if not callable(getattr(action, "decide_round", None)):
                raise ValueError(
                    f"actions[{i}] is a {type(action).__name__}, which has no decide_round(...): pass "
                    "TaskWeighting(...) or PruningPolicy(...) from lightning_metaif."
                )
        if samples is not None and not isinstance(samples, SampleInfluence):
            raise ValueError(
                f"samples must be a SampleInfluence or None, got {type(samples).__name__}: e.g. "
                "samples=SampleInfluence(top_k=8)."
            )
        if vectorize not in ("auto", "vmap", "loop"):
            raise ValueError(f"vectorize must be 'auto', 'vmap' or 'loop', got {vectorize!r}.")
        if chunk_size is not None and (
            not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
        ):
            raise ValueError(
                f"chunk_size must be a positive integer or None (automatic), got {chunk_size!r}."
            )
        if reference is not None:
            reference = _check_reference(reference)
        self.reference, self.utility, self.pool = reference, utility, pool
        self.every_n_epochs, self.every_n_train_steps = every_n_epochs, every_n_train_steps
        self.store_config, self.actions, self.samples = store, actions, samples
        self.ground_truth = (
            None if ground_truth is None else {int(i) for i in torch.as_tensor(list(ground_truth)).tolist()}
        )
        self.seed, self.chunk_size, self.vectorize, self.verbose = seed, chunk_size, vectorize, verbose
        self.dashboard_every_n_rounds = dashboard_every_n_rounds

        self.task_state = TaskState()
        self.result: ScoreRound | None = None
        self.history: list[dict[str, float]] = []
        self.decisions: list[Decision] = []
        self.rounds = 0
        # seconds on the training thread: per-step tracing, scoring rounds, and set-up / tear-down (fit start and
        # end, rounds excluded): what the callback adds to a run, measured inside it (bench_overhead.py)
        self.timings: dict[str, float] = {"trace_seconds": 0.0, "round_seconds": 0.0, "setup_seconds": 0.0}
        self._totals = ScoreTotals(self.estimator.over_rounds)
        self._pool_ids: Tensor | None = None
        self._position_of: dict[int, int] = {}
        self._engine_vectorize = vectorize
        self._pending: list[
            tuple[Tensor, Tensor, Tensor]
        ] = []  # (ids, gradients, weights) of the current step
        self._seen_step = 0
        self._last_round_step: int | None = None
        self._step_rates: list[float] | None = None
        self._restored = False
        self._store: GradientStore | None = None
        self._projection: RandomProjection | None = None
        self._layout: ParamLayout | None = None
        self._root: Path | None = None
        self._restored_root: str | None = None
        self._restored_store: dict[str, Any] | None = None
        self.rolled_back: list[str] = []
        self._log_dir: str | None = None
        self._writer: Any = None
        self._dashboards: dict[int, Any] = {}
        self._reference_tasks: Any = None
        self._pool_facts: tuple[list[list[int]] | None, Tensor | None] | None = None  # (classes, corrupted)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(estimator=self.estimator.name, seed=self.seed)

    def settings(self) -> dict[str, Any]:
        """The callback's settings as plain values (they go to every logger's hyperparameters)."""
        return {
            "estimator": self.estimator.settings(),
            "every_n_epochs": self.every_n_epochs,
            "every_n_train_steps": self.every_n_train_steps,
            "store": plain_settings(self.store_config),
            "actions": [{"name": type(a).__name__} | plain_settings(a) for a in self.actions],
            "samples": plain_settings(self.samples),
            "reference": "utility"
            if self.utility is not None
            else ("given" if self.reference else "val_pool"),
            "ground_truth": None if self.ground_truth is None else len(self.ground_truth),
            "seed": self.seed,
            "chunk_size": self.chunk_size,
            "vectorize": self.vectorize,
            "dashboard_every_n_rounds": self.dashboard_every_n_rounds,
        }

    # ------------------------------------------------------------------ set-up ------------------------------

    @contextmanager
    def _setup_time(self) -> Iterator[None]:
        """Add the time of the block, less the rounds it ran, to ``timings["setup_seconds"]``."""
        start, rounds = time.perf_counter(), self.timings["round_seconds"]
        try:
            yield
        finally:
            spent = time.perf_counter() - start - (self.timings["round_seconds"] - rounds)
            self.timings["setup_seconds"] = self.timings.get("setup_seconds", 0.0) + spent

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        with self._setup_time():
            self._setup(trainer, pl_module)

    def _setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not callable(getattr(pl_module, "task_loss", None)):
            raise ValueError(
                f"{type(pl_module).__name__} has no `task_loss(params, task, support_weights=None, "
                "query_weights=None)`. MetaInfluence differentiates through it: implement it on your module "
                "(adapt on the support set, return the query loss) or use `lightning_metaif.MAML`."
            )
        self._log_dir = trainer.log_dir or trainer.default_root_dir  # read on every rank (can hang otherwise)
        if any(type(a).__name__ == "TaskWeighting" for a in self.actions) and not hasattr(
            pl_module, "task_weight_table"
        ):
            raise ValueError(
                f"actions has a TaskWeighting, but {type(pl_module).__name__} has no `task_weight_table`: the "
                "callback sets it to the task weights, and the module must scale each task's loss by "
                "task_weight_table.get(task_id, 1.0) (as lightning_metaif.MAML does). Declare "
                "`self.task_weight_table = {}` in __init__ and read it in training_step, or drop TaskWeighting."
            )
        # the one binding point: the module scales each task's loss by these weights (0 = pruned)
        pl_module.task_weight_table = self.task_state
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and isinstance(getattr(datamodule, "task_state", None), TaskState):
            datamodule.task_state = (
                self.task_state
            )  # a datamodule built apart from the callback (LightningCLI)
        if self.utility is None:
            self._reference_tasks = self._resolve_reference(trainer)
        for logger in trainer.loggers:
            logger.log_hyperparams({"metaif": self.settings()})

    def _resolve_reference(self, trainer: pl.Trainer) -> Any:
        reference = self.reference
        if reference is None:
            reference = getattr(getattr(trainer, "datamodule", None), "val_pool", None)
            if reference is None:
                raise ValueError(
                    "MetaInfluence has no reference set: pass `reference=` (held-out tasks: a TaskBatch, a task "
                    "pool or a list of tasks) or `utility=` (a differentiable function of the meta-parameters), "
                    "or give the datamodule a `val_pool` attribute (MetaDataModule does)."
                )
            reference = _check_reference(reference, argument="datamodule.val_pool")
        return reference

    def _choose_root(self) -> Path:
        """The run's folder: a resumed run keeps its own; a new run never mixes its files into another's."""
        if self._restored_root is not None:
            return Path(self._restored_root)
        if self.store_config is not None and self.store_config.dirpath is not None:
            return Path(self.store_config.dirpath)
        root = Path(self._log_dir) / "metaif"
        candidate, version = root, 0
        while (candidate / "store").exists() or (candidate / "metrics.csv").exists():  # e.g. logger=False
            version += 1
            candidate = root.with_name(f"metaif_{version}")
        return candidate

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with self._setup_time():
            self._train_start(trainer, pl_module)

    def _train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pool = self.pool
        if pool is None:
            pool = getattr(getattr(trainer, "datamodule", None), "train_pool", None)
        if pool is None:
            pool = getattr(trainer.train_dataloader, "dataset", None)
        if pool is None:
            raise ValueError(
                "MetaInfluence needs the training tasks: pass `pool=` (a task pool, a Dataset or a list of tasks) "
                "or train on a MetaDataModule."
            )
        self.pool = as_task_pool(pool, argument="pool")
        pool_ids = torch.as_tensor(self.pool.task_ids).long().cpu()
        if self._pool_ids is not None and not torch.equal(self._pool_ids, pool_ids):
            raise ValueError(
                "The training pool differs from the one in the restored callback state (task ids differ)."
            )
        self._pool_ids = pool_ids
        self._pool_facts = None
        self._position_of = {int(t): i for i, t in enumerate(pool_ids.tolist())}
        if self._totals.size != len(pool_ids):
            self._totals.resize(len(pool_ids))
        sampler = _find_task_sampler(trainer.train_dataloader)
        if sampler is not None:
            sampler.state = self.task_state
        elif any(type(a).__name__ == "PruningPolicy" for a in self.actions):
            raise ValueError(
                "Pruning needs the training DataLoader to draw tasks with `lightning_metaif.TaskSampler` (a "
                "DistributedSampler subclass the callback controls): use MetaDataModule(..., task_state="
                "influence.task_state) or DataLoader(pool, sampler=TaskSampler(pool, state=influence.task_state))."
            )
        self._layout = ParamLayout.of(self._params(pl_module))
        self._root = Path(trainer.strategy.broadcast(str(self._choose_root()), src=0))
        config = self.store_config
        if config is not None:
            dim = self._layout.numel
            # Projecting p parameters to d >= p dimensions costs time and preserves nothing more: keep them.
            if config.projection_dim is not None and config.projection_dim < dim:
                self._projection = RandomProjection(
                    dim,
                    config.projection_dim,
                    seed=self.seed,
                    kind=config.projection,
                    cache_elements=PROJECTION_CACHE_ELEMENTS,
                )
                dim = config.projection_dim
            self._store = GradientStore(
                self._root / "store" / f"rank{trainer.global_rank}",
                dim,
                dtype=config.dtype,
                projection=None if self._projection is None else self._projection.state_dict(),
            )
        if trainer.is_global_zero:
            from lightning_metaif.dashboards.files import RoundFileWriter

            self._writer = RoundFileWriter(self._root)
        if self._restored:
            self._roll_back_files(trainer)
        if not self._restored and self.rounds > 0:
            rank_zero_warn(
                "MetaInfluence: this callback already scored an earlier fit; starting over (scores, decisions, "
                "pruned set and weights reset). Use a new MetaInfluence per run, or resume with ckpt_path=."
            )
            self._reset()
        self._seen_step = trainer.global_step
        if not self._restored:
            for action in self.actions:  # a fresh run: actions forget what an earlier run taught them
                if callable(getattr(action, "reset", None)):
                    action.reset()
        # a restored estimator keeps its state: start() only fills in what is missing
        with torch.enable_grad():
            self._run_engine(lambda ctx: self.estimator.start(ctx), self._context(trainer, pl_module, []))

    def _reset(self) -> None:
        """A fresh start for a second ``fit`` (the task state is cleared in place: samplers hold it)."""
        self.estimator = dataclasses.replace(self.estimator)  # same settings, empty state
        self._totals = ScoreTotals(self.estimator.over_rounds, len(self._pool_ids))
        self.task_state.weights.clear()
        self.task_state.pruned.clear()
        self.task_state.version += 1
        self.rounds, self.history, self.decisions, self.result = 0, [], [], None
        self._last_round_step = None

    # ------------------------------------------------------------------ tracing ------------------------------

    def _reports_gradients(self, pl_module: pl.LightningModule) -> bool:
        return bool(getattr(pl_module, "reports_task_gradients", False))

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.estimator.traces_steps:
            return
        task_ids = _task_ids_of_batch(batch)
        if self._reports_gradients(pl_module):
            return
        start = time.perf_counter()
        tasks = batch if isinstance(batch, TaskBatch) else list(batch)
        with torch.enable_grad():
            grads = self._recompute_gradients(pl_module, tasks)
        self._pending.append((task_ids, grads.detach(), self.task_state.weights_for(task_ids).double()))
        self.timings["trace_seconds"] += time.perf_counter() - start

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if trainer.optimizers and _unwrap(optimizer) is _unwrap(trainer.optimizers[0]):
            self._step_rates = learning_rates(optimizer)  # a scheduler may change them before the batch ends

    def _scaling(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, rates: list[float] | None
    ) -> Tensor | None:
        """``D`` of the last step over the trainable meta-parameters (read after it), ``None`` without one."""
        if not trainer.optimizers:
            return None
        raw = {k: v for k, v in self._raw_params(pl_module).items() if v.requires_grad}
        scaling = update_scaling(trainer.optimizers[0], raw, rates)
        return scaling if bool(scaling.any()) else None  # D >= 0: all zero = the step moved nothing

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        start = time.perf_counter()
        if self.estimator.traces_steps and self._reports_gradients(pl_module):
            self._pending.append(_reported_gradients(pl_module, outputs))
        stepped = trainer.global_step > self._seen_step
        if stepped and self.estimator.traces_steps and self._pending:
            self._trace_step(trainer, pl_module)
        if stepped:
            self._seen_step = trainer.global_step
        self.timings["trace_seconds"] += time.perf_counter() - start
        if (
            stepped
            and self.every_n_train_steps is not None
            and trainer.global_step % self.every_n_train_steps == 0
            and trainer.global_step != self._last_round_step
        ):
            self._run_round(trainer, pl_module, can_log=True)

    def _trace_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """One optimizer step: the per-task gradients of all its micro-batches, scaled as the step scaled them."""
        pending, self._pending = self._pending, []
        if len(pending) == 1:  # no gradient accumulation: no copies
            task_ids, grads, weights = pending[0]
        else:
            task_ids = torch.cat([ids for ids, _, _ in pending])
            grads = torch.cat([g for _, g, _ in pending])
            weights = torch.cat([w for _, _, w in pending])
        # read *after* the step (Adam's v̂ then includes this step's gradient), with the rates it used
        scaling = self._scaling(trainer, pl_module, self._step_rates)
        self._step_rates = None
        batch_size = len(task_ids) * trainer.world_size  # DDP averages the ranks' meta-gradients
        self.estimator.on_step(
            trainer.global_step, task_ids, grads, task_weights=weights, scaling=scaling, batch_size=batch_size
        )
        if self._store is not None and self.store_config is not None and self.store_config.trajectory:
            # rows w_k √D_t g_k with the step's 1/B as its "learning rate": scored against √D_t ∇f they sum to plain
            # TracIn. The store does not keep D_t (Adam's per-step scaling), so a later re-scoring against an
            # unscaled ∇f is a different, preconditioner-weighted quantity unless D_t is a constant multiple of I.
            rows = grads if scaling is None else grads * scaling.to(grads).sqrt()
            rows = rows * weights.to(rows)[:, None]
            self._store.append_step(trainer.global_step, 1.0 / batch_size, task_ids, self._project(rows))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_train_steps is not None:
            return
        every = self.every_n_epochs or 1
        if (trainer.current_epoch + 1) % every == 0 and trainer.global_step != self._last_round_step:
            self._run_round(trainer, pl_module, can_log=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with self._setup_time():
            self._train_end(trainer, pl_module)

    def _train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        needed = (
            self.estimator.has_unscored_steps()
            if self.estimator.traces_steps
            else (trainer.global_step > 0 and trainer.global_step != self._last_round_step)
        )
        if needed:  # the steps after the last round are scored too
            self._run_round(trainer, pl_module, can_log=False)
        elif self.result is not None and trainer.is_global_zero:  # the last round's tables, if skipped
            for dashboard in self._dashboards.values():
                if dashboard.last_skipped:
                    dashboard.rounds_seen -= 1
                    dashboard.log_round(
                        self.result, self.history, metrics=self.history[-1], scalars=False, final=True
                    )
        if self._store is not None:
            self._store.flush()

    # ------------------------------------------------------------------ scoring ------------------------------

    @staticmethod
    def _raw_params(pl_module: pl.LightningModule) -> dict[str, Tensor]:
        getter = getattr(pl_module, "meta_parameters", None)
        return dict(getter()) if callable(getter) else dict(pl_module.named_parameters())

    def _params(self, pl_module: pl.LightningModule) -> Params:
        return trainable(self._raw_params(pl_module))

    def _project(self, grads: Tensor) -> Tensor:
        return grads if self._projection is None else self._projection(grads)

    def _engine(self) -> dict[str, Any]:
        return {"chunk_size": self._chunk_size(), "vectorize": self._engine_vectorize}

    def _chunk_size(self) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        numel = 0 if self._layout is None else self._layout.numel
        return max(16, min(256, AUTO_CHUNK_BYTES // (4 * max(1, numel))))

    def _run_engine(self, call: Callable[[RoundContext], Any], ctx: RoundContext) -> Any:
        """Run an engine call; the first time ``task_loss`` cannot be vmapped, warn once and use the loop."""
        try:
            return call(ctx)
        except (ValueError, TypeError, SolverError):
            raise
        except Exception as error:  # noqa: BLE001 - any failure of vmap means: use the loop path
            if self._engine_vectorize != "auto":
                raise
            rank_zero_warn(
                f"MetaInfluence: {type(ctx.problem).__name__}.task_loss cannot run under torch.func.vmap "
                f"({type(error).__name__}: {error}); using the per-task loop (slower). Pass vectorize='loop' "
                "to skip this attempt."
            )
            self._engine_vectorize = "loop"
            return call(dataclasses.replace(ctx, engine=self._engine()))

    def _recompute_gradients(self, pl_module: pl.LightningModule, tasks: Any) -> Tensor:
        ctx = self._context(None, pl_module, [])

        def call(c: RoundContext) -> Tensor:
            grads, _ = per_task_gradients(c.problem, c.params, tasks, **c.engine)
            return grads

        return self._run_engine(call, ctx)

    def _kept_positions(self) -> Tensor:
        return torch.tensor(
            [i for i, t in enumerate(self._pool_ids.tolist()) if not self.task_state.is_pruned(t)],
            dtype=torch.long,
        )

    def _round_positions(self) -> Tensor:
        """Kept (unpruned) pool positions, a seeded sample of ``max_tasks`` of them when the estimator has one."""
        return seeded_subsample(self._kept_positions(), self.estimator.max_tasks, self.seed, self.rounds)

    def _context(
        self, trainer: pl.Trainer | None, pl_module: pl.LightningModule, positions: Any
    ) -> RoundContext:
        positions = torch.as_tensor(positions, dtype=torch.long)
        objective = positions
        mine = positions
        if trainer is not None and self.estimator.splits_across_ranks:
            mine = positions[trainer.global_rank :: trainer.world_size]
        ids = self._pool_ids if self._pool_ids is not None else torch.zeros(0, dtype=torch.long)
        scaling = None
        if trainer is not None and self._layout is not None:
            scaling = self._scaling(trainer, pl_module, None)
        return RoundContext(
            problem=pl_module,
            params=self._params(pl_module),
            pool=self.pool,
            positions=mine,
            weights=self.task_state.weights_for(ids[mine]).double() if len(mine) else torch.zeros(0),
            objective_positions=objective,
            objective_weights=(
                self.task_state.weights_for(ids[objective]).double() if len(objective) else torch.zeros(0)
            ),
            reference=self._reference_tasks,
            utility=self.utility,
            engine=self._engine(),
            step=0 if trainer is None else trainer.global_step,
            round_index=self.rounds,
            seed=self.seed,
            scaling=scaling,
            projection=self._projection,
            store=self._store,
            position_of=self._position_of,
            # (a round's context only: the per-step gradient recomputation must not scan the pool)
            num_kept=len(self._kept_positions()) if trainer is not None and self._pool_ids is not None else 0,
            sum_over_processes=(
                None if trainer is None or trainer.world_size <= 1 else partial(_sum_over_ranks, trainer)
            ),
            newest_over_processes=(
                None if trainer is None or trainer.world_size <= 1 else partial(_holds_newest, trainer)
            ),
        )

    def _run_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, can_log: bool) -> None:
        start = time.perf_counter()
        self.rounds += 1
        self._last_round_step = trainer.global_step
        num_tasks = len(self._pool_ids)
        ctx = self._context(trainer, pl_module, self._round_positions())
        bar = self._round_bar(trainer, len(ctx.positions))
        if bar is not None:
            ctx.progress = lambda done, total: bar.update(done - bar.n)
        try:
            with torch.enable_grad():
                out: RoundScores = self._run_engine(self.estimator.score, ctx)
        finally:
            if bar is not None:
                bar.close()
        scores = torch.zeros(num_tasks, dtype=torch.float64)
        self_influence = torch.zeros(num_tasks, dtype=torch.float64)
        scored = torch.zeros(num_tasks, dtype=torch.float64)
        scores[out.positions] = out.scores.to(torch.float64)
        if out.self_influence is not None:
            self_influence[out.positions] = out.self_influence.to(torch.float64)
        scored[out.positions] = 1.0
        if self.estimator.splits_across_ranks and self.estimator.ranks_overlap == "latest":
            recency = torch.full((num_tasks,), -1.0, dtype=torch.float64)
            if out.recency is not None:
                recency[out.positions] = out.recency.to(torch.float64)
            scores, self_influence, scored = _newest_over_ranks(
                trainer, recency, scores, self_influence, scored
            )
        elif self.estimator.splits_across_ranks:
            scores, self_influence, scored = (
                _sum_over_ranks(trainer, t) for t in (scores, self_influence, scored)
            )
        scores, self_influence, scored_mask = self._totals.add(
            scores, self_influence if out.self_influence is not None else None, scored > 0
        )
        diagnostics = {k: float(v) for k, v in out.diagnostics.items()}
        round_ = self._make_round(trainer, scores, self_influence, scored_mask, time.perf_counter() - start)
        decisions = self._decide(trainer, round_, diagnostics)
        for decision in decisions:
            decision.apply(self.task_state)
        self.decisions.extend(decisions)
        round_.decisions = decisions
        round_.weights = self.task_state.weights_for(self._pool_ids).double()
        round_.pruned = torch.tensor([self.task_state.is_pruned(t) for t in self._pool_ids.tolist()])
        if trainer.is_global_zero and self.samples is not None:
            kept_harmful = [
                i for i in round_.order().tolist() if not bool(round_.pruned[i]) and bool(round_.scored[i])
            ]
            kept_harmful = [i for i in kept_harmful if math.isfinite(float(round_.scores[i]))]
            with torch.enable_grad():
                round_.sample_rows = self._run_engine(
                    lambda c: self.samples.score(c, torch.tensor(kept_harmful[: self.samples.top_k])), ctx
                )
        if self._store is not None:
            self._store.flush()  # a round's records are on disk before anything acts on them
        round_.seconds = time.perf_counter() - start
        self.timings["round_seconds"] += round_.seconds
        self.result = round_
        self._publish(trainer, pl_module, round_, diagnostics, can_log=can_log)

    def _round_bar(self, trainer: pl.Trainer, total: int) -> Any:
        """A progress bar for a round over many tasks, under the trainer's own (TQDM) bar; ``None`` otherwise."""
        bar = getattr(trainer, "progress_bar_callback", None)
        if (
            total <= 256
            or not trainer.is_global_zero
            or bar is None
            or getattr(bar, "is_disabled", True)
            or type(bar).__name__ != "TQDMProgressBar"
        ):
            return None
        from tqdm.auto import tqdm

        return tqdm(
            total=total,
            desc=f"metaif round {self.rounds - 1} ({self.estimator.name})",
            leave=False,
            unit="task",
        )

    def _make_round(
        self,
        trainer: pl.Trainer,
        scores: Tensor,
        self_influence: Tensor | None,
        scored: Tensor,
        seconds: float,
    ) -> ScoreRound:
        ids = self._pool_ids
        if self._pool_facts is None:  # the pool is fixed during a fit: its classes are read once
            classes = None
            if hasattr(self.pool, "task_classes") and len(ids) <= 100_000:
                try:
                    classes = [list(self.pool.task_classes(int(t))) for t in ids.tolist()]
                except (NotImplementedError, TypeError, ValueError, KeyError):
                    classes = None
            corrupted = None
            if self.ground_truth is not None:
                corrupted = torch.tensor([int(t) in self.ground_truth for t in ids.tolist()])
            self._pool_facts = (classes, corrupted)
        classes, corrupted = self._pool_facts
        return ScoreRound(
            step=trainer.global_step,
            epoch=trainer.current_epoch,
            estimator=self.estimator.name,
            task_ids=ids,
            scores=scores,
            self_influence=self_influence,
            weights=self.task_state.weights_for(ids),
            pruned=torch.tensor([self.task_state.is_pruned(t) for t in ids.tolist()]),
            classes=None if classes is None else list(classes),
            corrupted=None if corrupted is None else corrupted.clone(),
            seconds=seconds,
            scored=scored,
        )

    # ------------------------------------------------------------------ acting ------------------------------

    def _decide(
        self, trainer: pl.Trainer, round_: ScoreRound, diagnostics: Mapping[str, float]
    ) -> list[Decision]:
        """Rank 0 decides (every action sees the round), the others receive the same decisions."""
        payload = None
        if trainer.is_global_zero:
            context = {
                "round_index": self.rounds,
                "pool_size": len(self._pool_ids),
                "history": self.history,
                "diagnostics": dict(diagnostics),
                "max_epochs": trainer.max_epochs,
            }
            payload = [a.decide_round(round_, self.task_state, **context).to_state() for a in self.actions]
        payload = trainer.strategy.broadcast(payload, src=0)
        return [Decision(**d) for d in payload]

    # ------------------------------------------------------------------ publishing ------------------------------

    def _publish(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        round_: ScoreRound,
        diagnostics: Mapping[str, float],
        *,
        can_log: bool,
    ) -> None:
        from lightning_metaif.dashboards.metrics import round_metrics

        metrics = round_metrics(round_)
        metrics.update({f"influence/{k}": v for k, v in diagnostics.items()})
        metrics["influence/round"] = float(self.rounds)
        if can_log:
            # into trainer.callback_metrics on every rank (equal on every rank by construction), so that
            # ModelCheckpoint / EarlyStopping can monitor them; written directly, without `pl_module.log_dict`'s
            # per-scalar result bookkeeping in Lightning
            trainer.callback_metrics.update(
                {k: torch.tensor(v, dtype=torch.float32) for k, v in metrics.items()}
            )
        self.history.append(metrics)
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:  # the scalars, once per round
            logger.log_metrics(metrics, step=trainer.global_step)
            dashboard = self._dashboard_for(logger)
            if dashboard is not None:
                dashboard.log_round(round_, self.history, metrics=metrics, scalars=False, final=not can_log)
        if self._writer is not None:
            self._writer.write(round_, metrics)
        if self.verbose:
            self._print(trainer, self._round_line(round_, metrics))

    def _round_line(self, round_: ScoreRound, metrics: Mapping[str, float]) -> str:
        pruned_now = sum(len(d.task_ids) for d in round_.decisions if d.action == "prune")
        line = (
            f"[metaif] round {self.rounds - 1} ({self.estimator.name}) step {round_.step}: "  # from 0 like the files
            f"{int(metrics.get('influence/num_scored', 0))} tasks scored, "
            f"{metrics.get('influence/fraction_harmful', float('nan')):.0%} harmful, "
            f"{pruned_now} pruned now, {int(round_.pruned.sum())} in total, {round_.seconds:.2f}s"
        )
        if "influence/auroc" in metrics:
            line += f", detection AUROC {metrics['influence/auroc']:.3f}"
        if metrics.get("influence/scores_held", 0.0) > 0:
            line += (
                f"; reference loss rising ({metrics.get('influence/reference_loss', float('nan')):.4g} > best "
                f"{metrics.get('influence/best_reference_loss', float('nan')):.4g}): scores held at the best round"
            )
        for decision in round_.decisions:
            if decision.action == "restore":
                line += f"; restored {len(decision.task_ids)} tasks ({decision.reason})"
        return line

    @staticmethod
    def _print(trainer: pl.Trainer, line: str) -> None:
        bar = getattr(trainer, "progress_bar_callback", None)
        if (
            bar is not None
            and callable(getattr(bar, "print", None))
            and not getattr(bar, "is_disabled", False)
        ):
            bar.print(line)  # printed above the bar, not glued onto it
        elif trainer.is_global_zero:
            _round_log.info(line)

    def _dashboard_for(self, logger: Any) -> Any:
        try:
            from lightning.pytorch.loggers import WandbLogger
        except ImportError:  # pragma: no cover
            return None
        if not isinstance(logger, WandbLogger):
            return None
        if id(logger) not in self._dashboards:
            from lightning_metaif.dashboards.wandb_dashboard import WandbDashboard

            self._dashboards[id(logger)] = WandbDashboard(
                logger, every_n_rounds=self.dashboard_every_n_rounds
            )
        return self._dashboards[id(logger)]

    # ------------------------------------------------------------------ state ------------------------------

    def _roll_back_files(self, trainer: pl.Trainer) -> None:
        """Resuming: drop what the interrupted run wrote after the checkpoint (store records, round files, rows).

        The checkpoint's state lists the store records and the number of rounds it covers; anything later was
        written by the run that died (or was stopped) after saving it. Store files move to
        ``store/rank<r>/rolled-back/``, later round files and rows are removed, so the folder equals that of an
        uninterrupted run at this point and the resumed run re-records the same records under the same names.
        """
        dropped: list[str] = []
        if self._store is not None and self._restored_store is not None:
            dropped += [
                f"store record {info.path.name}" for info in self._store.rollback(self._restored_store)
            ]
        if self._writer is not None:
            dropped += self._writer.rollback(self.rounds)
        self.rolled_back = dropped
        if dropped and trainer.is_global_zero:
            _round_log.info(
                f"MetaInfluence: resumed after round {self.rounds - 1}; dropped what the interrupted run wrote after "
                f"the checkpoint: {', '.join(dropped)}"
            )

    def state_dict(self) -> dict[str, Any]:
        if self._store is not None:
            self._store.flush()  # the checkpoint covers every row recorded up to now
        return {
            "task_state": self.task_state.state_dict(),
            "rounds": self.rounds,
            "last_round_step": self._last_round_step,
            "totals": self._totals.state_dict(),
            "estimator": self.estimator.state_dict(),
            "pool_ids": None if self._pool_ids is None else self._pool_ids.clone(),
            "store": None if self._store is None else self._store.state_dict(),
            "store_root": None if self._root is None else str(self._root),
            "history": [dict(h) for h in self.history],
            "decisions": [d.to_state() for d in self.decisions],
            "actions": [
                a.state_dict() if callable(getattr(a, "state_dict", None)) else None for a in self.actions
            ],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.task_state.load_state_dict(state_dict["task_state"])
        self.rounds = int(state_dict["rounds"])
        self._last_round_step = state_dict.get("last_round_step")
        self._totals.load_state_dict(state_dict["totals"])
        self.estimator.load_state_dict(state_dict["estimator"])
        self._pool_ids = state_dict["pool_ids"]
        self._restored_root = state_dict.get("store_root")
        self._restored_store = state_dict.get("store")
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self.decisions = [Decision(**d) for d in state_dict.get("decisions", [])]
        for action, state in zip(self.actions, state_dict.get("actions", [])):
            if state is not None and callable(getattr(action, "load_state_dict", None)):
                action.load_state_dict(state)
        self._restored = True


# ---------------------------------------------------------------------- helpers ------------------------------


def _check_reference(value: Any, *, argument: str = "reference") -> Any:
    """Reference tasks as the engine takes them (a TaskBatch or a list), never empty."""
    if isinstance(value, TaskBatch):
        tasks = value
    elif callable(getattr(value, "batch", None)) and hasattr(value, "task_ids"):
        if len(value.task_ids) == 0:
            raise ValueError(f"`{argument}` is an empty task pool: give at least one reference task.")
        tasks = value.batch()
    else:
        try:
            tasks = list(value)
        except TypeError:
            raise ValueError(
                f"`{argument}` must be a TaskBatch, a task pool, a Dataset or a list of tasks; got "
                f"{type(value).__name__}."
            ) from None
    if len(tasks) == 0:
        raise ValueError(f"`{argument}` holds no tasks: give at least one reference task (or pass utility=).")
    return tasks


def _task_ids_of_batch(batch: Any) -> Tensor:
    ids = getattr(batch, "task_ids", None)
    if ids is None and isinstance(batch, Mapping):
        ids = batch.get("task_ids")
    if ids is None and isinstance(batch, Sequence) and batch and all(hasattr(t, "task_id") for t in batch):
        ids = [t.task_id for t in batch]
    if ids is None or (isinstance(ids, list) and any(i is None for i in ids)):
        raise ValueError(
            f"The training batch ({type(batch).__name__}) carries no task ids. MetaInfluence needs them to know "
            "which task each gradient belongs to: yield `lightning_metaif.TaskBatch` batches (collate with "
            "`lightning_metaif.meta.collate_tasks`)."
        )
    return torch.as_tensor(ids).long().cpu()


def _reported_gradients(pl_module: pl.LightningModule, outputs: Any) -> tuple[Tensor, Tensor, Tensor]:
    name = type(pl_module).__name__
    if not isinstance(outputs, Mapping) or "task_gradients" not in outputs or "task_ids" not in outputs:
        raise ValueError(
            f"{name} declares reports_task_gradients = True, but its training_step returned "
            f"{type(outputs).__name__} without 'task_ids' and 'task_gradients': return them (see "
            "lightning_metaif.callback.ReportsTaskGradients) or drop the declaration to have them recomputed."
        )
    ids = torch.as_tensor(outputs["task_ids"]).long().cpu().reshape(-1)
    grads = outputs["task_gradients"].detach()
    weights = outputs.get("task_weights")
    weights = torch.ones(len(ids), dtype=torch.float64) if weights is None else torch.as_tensor(weights)
    if grads.dim() != 2 or grads.shape[0] != len(ids):
        raise ValueError(
            f"{name}.training_step returned task_gradients of shape {tuple(grads.shape)} for {len(ids)} task ids: "
            "give one flat [p] row per task."
        )
    return ids, grads, weights.detach().to("cpu", torch.float64).reshape(-1)


def _unwrap(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)


def _find_task_sampler(loader: Any) -> TaskSampler | None:
    for candidate in (
        getattr(loader, "sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
    ):
        if isinstance(candidate, TaskSampler):
            return candidate
    return None


def _newest_over_ranks(trainer: pl.Trainer, recency: Tensor, *values: Tensor) -> tuple[Tensor, ...]:
    """Per task, the values of the rank whose data are the newest (highest ``recency``; -1 = none)."""
    if trainer.world_size <= 1:
        return values
    device = trainer.strategy.root_device
    gathered = [
        trainer.strategy.all_gather(v.to(device)).reshape(trainer.world_size, -1).cpu() for v in values
    ]
    best = _newest_rank(trainer, recency)
    columns = torch.arange(best.numel())
    return tuple(g[best, columns].to(v.dtype) for g, v in zip(gathered, values))


def _newest_rank(trainer: pl.Trainer, recency: Tensor) -> Tensor:
    """Per position, the rank whose ``recency`` is the highest (ties: the lowest rank; argmax takes the first)."""
    gathered = trainer.strategy.all_gather(recency.to(trainer.strategy.root_device))
    return gathered.reshape(trainer.world_size, -1).argmax(0).cpu()


def _holds_newest(trainer: pl.Trainer, recency: Tensor) -> Tensor:
    """Per position, True where this rank's data are the newest over all ranks (-1 = no data here)."""
    return (_newest_rank(trainer, recency) == trainer.global_rank) & (recency >= 0)


def _sum_over_ranks(trainer: pl.Trainer, values: Tensor) -> Tensor:
    if trainer.world_size <= 1:
        return values
    gathered = trainer.strategy.all_gather(values.to(trainer.strategy.root_device))
    # the sum keeps ``values``' shape (TraceTaskIF(curvature="fisher") sums a p x p matrix)
    return gathered.reshape(trainer.world_size, -1).sum(0).reshape(values.shape).cpu().to(values.dtype)
