"""``MetaInfluence``: trace meta-training, score every task, log it, and act on it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_metaif.actions.pruning import PruningPolicy
from lightning_metaif.actions.sampler import TaskSampler
from lightning_metaif.actions.state import TaskState
from lightning_metaif.actions.weighting import TaskWeighting
from lightning_metaif.dashboards.round import Decision, SampleScore, ScoreRound
from lightning_metaif.influence.estimators import task_influence
from lightning_metaif.influence.gradients import per_task_gradients, reference_gradient
from lightning_metaif.influence.hessian import TotalHessian
from lightning_metaif.influence.instance import instance_influence
from lightning_metaif.influence.problem import ParamLayout, Params, trainable
from lightning_metaif.influence.projection import RandomProjection
from lightning_metaif.influence.solvers import SOLVERS, SolverError, solve
from lightning_metaif.influence.store import GradientStore
from lightning_metaif.influence.tasks import TaskBatch
from lightning_metaif.influence.tracin import TracInAccumulator

Mode = Literal["trajectory", "checkpoints", "task_if", "ensemble"]
MODES: tuple[str, ...] = ("trajectory", "checkpoints", "task_if", "ensemble")
PROJECTION_CACHE_ELEMENTS = 1 << 25  # keep P in memory up to 128 MB (float32); larger ones are regenerated
STORE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


class MetaInfluence(Callback):
    r"""Score every training task of a meta-learning run while it trains, log the scores, and act on them.

    A score is the first-order predicted *increase* of the reference loss (by default the mean query loss of
    the validation tasks, adapted from the current meta-parameters) if the task were removed: positive = the
    task helps, negative = it harms. The module must implement ``task_loss(params, task, support_weights=None,
    query_weights=None)`` (as :class:`~lightning_metaif.MAML` does) and the training batches must carry task ids
    (a :class:`~lightning_metaif.TaskBatch`). The ``params`` that ``task_loss`` receives are the module's
    ``meta_parameters()`` when it defines one, else its ``named_parameters()`` (keys as Lightning names them,
    e.g. ``"net.0.weight"``); define ``meta_parameters()`` if your ``task_loss`` expects other names.

    Modes:

    * ``"trajectory"`` (TracIn along the real path): at each optimizer step, the per-task meta-gradients of the
      batch (taken from the module's ``last_task_gradients`` when it exposes them, recomputed otherwise) add
      ``(η_t / B) ⟨∇f, g_k(λ_t)⟩`` to their tasks' scores, exactly (no projection), with ``∇f`` refreshed at
      each round (at the start of training before the first): one reference gradient per round instead of per
      step. With ``store_trajectory=True`` the projected per-step gradients also go to the store.
    * ``"checkpoints"`` (TracInCP): every round scores the pool at the current parameters and adds
      ``η ⟨P∇f, P g_k⟩`` to each task's running sum; the projected gradients are stored as a checkpoint.
    * ``"task_if"``: Ren et al.'s task influence at the current parameters: ``(1/M) g_kᵀ (H + δI)^{-1} ∇f`` with
      the exact total Hessian over the pool (``solver``, ``damping``, ``l2``).
    * ``"ensemble"`` (Yang et al.): inner-product influence averaged over the current parameters and
      ``ensemble_copies`` Gaussian-perturbed copies, then over rounds (checkpoints).

    Args:
        mode: one of ``"trajectory"``, ``"checkpoints"``, ``"task_if"``, ``"ensemble"``.
        reference: reference tasks (a ``TaskBatch``, a task pool or a sequence of tasks); default: the
            datamodule's ``val_pool``.
        utility: a differentiable ``params -> scalar`` to use as the reference objective instead of tasks.
        pool: the training task pool to score; default: the datamodule's ``train_pool`` or the train
            dataloader's dataset (it must have ``task_ids`` and ``batch(positions)``).
        every_n_epochs / every_n_steps: when to run a scoring round (exactly one of them).
        max_tasks_per_round: score a seeded random sample of the pool per round (periodic modes).
        projection_dim: dimension of the random projection of stored gradients (``None``, or a value not below
            the number of meta-parameters: gradients are stored unprojected).
        projection_kind: ``"rademacher"`` or ``"gaussian"``.
        store_dtype: ``"float16"`` or ``"float32"`` for the on-disk gradient store.
        store_dir: where the gradient store and score files go; default ``<trainer.log_dir>/metaif`` (or
            ``metaif_1``, ... when that folder holds another run's files, e.g. with ``logger=False``). A run
            resumed from a checkpoint keeps the folder recorded in the checkpoint.
        solver, damping, l2, solver_options: inverse-HVP settings of ``"task_if"``.
        on_solver_error: ``"warn"`` (default): a failed solve (negative curvature, divergence) warns with the
            remedy and the round's scores are NaN, so nothing is pruned or re-weighted; ``"raise"`` stops
            training with the :class:`~lightning_metaif.influence.solvers.SolverError`.
        ensemble_copies, ensemble_std: perturbed copies for ``"ensemble"``.
        weighting: a :class:`~lightning_metaif.TaskWeighting` to down-weight harmful tasks (``None``: off).
        pruning: a :class:`~lightning_metaif.PruningPolicy` to prune tasks (``None``: off); needs the train
            loader to sample with a :class:`~lightning_metaif.TaskSampler`.
        corrupted_task_ids: known-corrupted ids (demos, benchmarks): adds detection AUROC and recall@k.
        sample_top_k: score the samples of the ``k`` most harmful tasks each round (instance influence) and log
            the most harmful samples (with images when inputs are images); ``0`` turns it off.
        seed: seed of the projection, the task sampling and the ensemble noise.
        chunk_size: tasks per vmapped gradient call.
        store_trajectory: in ``"trajectory"`` mode, also write each step's projected per-task gradients to the
            store (to re-score the path later against other references). Off by default: scoring does not need
            them, and projecting every step costs about as much as a small MAML step (``benchmarks/``).
        vectorize: ``"auto"`` tries ``torch.func.vmap`` over the tasks and falls back to a per-task loop (with a
            warning) when the module's ``task_loss`` cannot be vmapped (e.g. ``higher`` inside); ``"vmap"`` or
            ``"loop"`` force one path.
        verbose: print one summary line per round.

    After each round, :attr:`result` is a :class:`~lightning_metaif.dashboards.ScoreRound` with ``task_ids``,
    ``scores``, ``weights`` and the ``pruned`` mask, aligned.

    Example::

        from lightning_metaif import MAML, MetaInfluence, PruningPolicy
        influence = MetaInfluence(mode="trajectory", pruning=PruningPolicy(fraction=0.2))
        trainer = pl.Trainer(max_epochs=10, callbacks=[influence])
        trainer.fit(MAML(backbone), datamodule=MetaDataModule(train, val, task_state=influence.task_state))
        influence.result.scores
    """

    def __init__(
        self,
        mode: Mode = "trajectory",
        *,
        reference: Any = None,
        utility: Callable[[Params], Tensor] | None = None,
        pool: Any = None,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        max_tasks_per_round: int | None = None,
        projection_dim: int | None = 1024,
        projection_kind: str = "rademacher",
        store_dtype: str = "float16",
        store_dir: str | os.PathLike[str] | None = None,
        solver: str = "cg",
        damping: float = 1e-3,
        l2: float = 0.0,
        solver_options: Mapping[str, Any] | None = None,
        on_solver_error: str = "warn",
        ensemble_copies: int = 4,
        ensemble_std: float = 0.01,
        weighting: TaskWeighting | None = None,
        pruning: PruningPolicy | None = None,
        corrupted_task_ids: Iterable[int] | Tensor | None = None,
        sample_top_k: int = 0,
        seed: int = 0,
        chunk_size: int = 16,
        store_trajectory: bool = False,
        vectorize: str = "auto",
        verbose: bool = True,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        if (every_n_epochs is None) == (every_n_steps is None):
            raise ValueError("Give exactly one of every_n_epochs (e.g. 1) and every_n_steps (e.g. 50).")
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if max_tasks_per_round is not None and max_tasks_per_round < 1:
            raise ValueError(f"max_tasks_per_round must be >= 1 or None, got {max_tasks_per_round}.")
        if projection_dim is not None and projection_dim < 1:
            raise ValueError(f"projection_dim must be a positive integer or None, got {projection_dim}.")
        if projection_kind not in ("rademacher", "gaussian"):
            raise ValueError(f"projection_kind must be 'rademacher' or 'gaussian', got {projection_kind!r}.")
        if store_dtype not in STORE_DTYPES:
            raise ValueError(f"store_dtype must be one of {tuple(STORE_DTYPES)}, got {store_dtype!r}.")
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}.")
        if vectorize not in ("auto", "vmap", "loop"):
            raise ValueError(f"vectorize must be 'auto', 'vmap' or 'loop', got {vectorize!r}.")
        if on_solver_error not in ("warn", "raise"):
            raise ValueError(f"on_solver_error must be 'warn' or 'raise', got {on_solver_error!r}.")
        if damping < 0 or l2 < 0:
            raise ValueError(f"damping and l2 must be >= 0, got damping={damping}, l2={l2}.")
        if ensemble_copies < 0 or ensemble_std < 0:
            raise ValueError("ensemble_copies and ensemble_std must be >= 0.")
        if reference is not None and utility is not None:
            raise ValueError("Pass `reference` (tasks) or `utility` (a function of params), not both.")
        if weighting is not None and not isinstance(weighting, TaskWeighting):
            raise ValueError(f"weighting must be a TaskWeighting or None, got {type(weighting).__name__}.")
        if pruning is not None and not isinstance(pruning, PruningPolicy):
            raise ValueError(f"pruning must be a PruningPolicy or None, got {type(pruning).__name__}.")
        if sample_top_k < 0 or chunk_size < 1:
            raise ValueError("sample_top_k must be >= 0 and chunk_size >= 1.")
        self.mode = mode
        self.reference, self.utility, self.pool = reference, utility, pool
        self.every_n_epochs, self.every_n_steps = every_n_epochs, every_n_steps
        self.max_tasks_per_round = max_tasks_per_round
        self.projection_dim, self.projection_kind = projection_dim, projection_kind
        self.store_dtype, self.store_dir = store_dtype, store_dir
        self.solver, self.damping, self.l2 = solver, float(damping), float(l2)
        self.solver_options = dict(solver_options or {})
        self.on_solver_error = on_solver_error
        self.vectorize = self._vectorize = vectorize
        self.store_trajectory = store_trajectory
        self.ensemble_copies, self.ensemble_std = ensemble_copies, float(ensemble_std)
        self.weighting, self.pruning = weighting, pruning
        self.corrupted_task_ids = (
            None
            if corrupted_task_ids is None
            else {int(i) for i in torch.as_tensor(list(corrupted_task_ids)).tolist()}
        )
        self.sample_top_k, self.seed, self.chunk_size, self.verbose = sample_top_k, seed, chunk_size, verbose

        self.task_state = TaskState()
        self.result: ScoreRound | None = None
        self.history: list[dict[str, float]] = []
        self.decisions: list[Decision] = []
        self.rounds = 0
        self.timings: dict[str, float] = {"trace_seconds": 0.0, "round_seconds": 0.0}
        self._cumulative: Tensor | None = None
        self._cumulative_self: Tensor | None = None
        self._ever_scored: Tensor | None = None
        self._rounds_scored: Tensor | None = None
        self._pool_ids: Tensor | None = None
        self._accumulator = TracInAccumulator()
        self._step_reference: Tensor | None = None
        self._batch: Any = None
        self._store: GradientStore | None = None
        self._projection: RandomProjection | None = None
        self._layout: ParamLayout | None = None
        self._root: Path | None = None
        self._restored_root: str | None = None
        self._solve_metrics: dict[str, float] = {}
        self._log_dir: str | None = None
        self._writer: Any = None
        self._dashboards: dict[int, Any] = {}
        self._reference_tasks: Any = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode, projection_dim=self.projection_dim, seed=self.seed)

    # ------------------------------------------------------------------ set-up ------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not callable(getattr(pl_module, "task_loss", None)):
            raise ValueError(
                f"{type(pl_module).__name__} has no `task_loss(params, task, support_weights=None, "
                "query_weights=None)`. MetaInfluence differentiates through it: implement it on your module "
                "(adapt on the support set, return the query loss) or use `lightning_metaif.MAML`."
            )
        self._log_dir = trainer.log_dir or trainer.default_root_dir  # read on every rank (can hang otherwise)
        pl_module.task_weight_table = self.task_state
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and isinstance(getattr(datamodule, "task_state", None), TaskState):
            # a datamodule built apart from the callback (LightningCLI) must sample with the callback's state,
            # also when its loaders are rebuilt (`reload_dataloaders_every_n_epochs`)
            datamodule.task_state = self.task_state
        if self.utility is None:
            self._reference_tasks = self._resolve_reference(trainer)

    def _choose_root(self) -> Path:
        """The run's folder: a resumed run keeps its own; a new run never mixes its files into another's."""
        if self._restored_root is not None:
            return Path(self._restored_root)
        if self.store_dir is not None:
            return Path(self.store_dir)
        root = Path(self._log_dir) / "metaif"
        candidate, version = root, 0
        while (candidate / "store").exists() or (candidate / "metrics.csv").exists():  # e.g. logger=False
            version += 1
            candidate = root.with_name(f"metaif_{version}")
        return candidate

    def _resolve_reference(self, trainer: pl.Trainer) -> Any:
        reference = self.reference
        if reference is None:
            datamodule = getattr(trainer, "datamodule", None)
            reference = getattr(datamodule, "val_pool", None)
        if reference is None:
            raise ValueError(
                "MetaInfluence has no reference set: pass `reference=` (held-out tasks: a TaskBatch, a task pool "
                "or a list of tasks) or `utility=` (a differentiable function of the meta-parameters), or give "
                "the datamodule a `val_pool` attribute (MetaDataModule does)."
            )
        return _as_tasks(reference, "reference")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pool = self.pool
        if pool is None:
            pool = getattr(getattr(trainer, "datamodule", None), "train_pool", None)
        if pool is None:
            pool = getattr(trainer.train_dataloader, "dataset", None)
        if pool is None or not hasattr(pool, "task_ids") or not callable(getattr(pool, "batch", None)):
            raise ValueError(
                "MetaInfluence needs the training task pool (an object with `task_ids` and `batch(positions)`, "
                "e.g. lightning_metaif.meta.ClassificationTaskPool): pass `pool=` or train on a MetaDataModule."
            )
        self.pool = pool
        pool_ids = torch.as_tensor(pool.task_ids).long().cpu()
        if self._pool_ids is not None and not torch.equal(self._pool_ids, pool_ids):
            raise ValueError(
                "The training pool differs from the one in the restored callback state (task ids differ)."
            )
        self._pool_ids = pool_ids
        self._position_of = {int(t): i for i, t in enumerate(pool_ids.tolist())}
        sampler = _find_task_sampler(trainer.train_dataloader)
        if sampler is not None:
            sampler.state = self.task_state
        elif self.pruning is not None:
            raise ValueError(
                "Pruning needs the training DataLoader to draw tasks with `lightning_metaif.TaskSampler` (a "
                "DistributedSampler subclass the callback controls): use MetaDataModule(..., task_state="
                "influence.task_state) or DataLoader(pool, sampler=TaskSampler(pool, state=influence.task_state))."
            )
        params = self._params(pl_module)
        self._layout = ParamLayout.of(params)
        # Projecting p parameters up to d >= p dimensions costs time and preserves nothing more: keep them as is.
        if self.projection_dim is not None and self.projection_dim < self._layout.numel:
            self._projection = RandomProjection(
                self._layout.numel,
                self.projection_dim,
                seed=self.seed,
                kind=self.projection_kind,
                cache_elements=PROJECTION_CACHE_ELEMENTS,
            )
        self._root = Path(trainer.strategy.broadcast(str(self._choose_root()), src=0))
        dim = self._layout.numel if self._projection is None else self.projection_dim
        rank_dir = self._root / "store" / f"rank{trainer.global_rank}"
        self._store = GradientStore(
            rank_dir,
            dim,
            dtype=STORE_DTYPES[self.store_dtype],
            projection=None if self._projection is None else self._projection.state_dict(),
        )
        if trainer.is_global_zero:
            from lightning_metaif.dashboards.files import RoundFileWriter

            self._writer = RoundFileWriter(self._root)

    # ------------------------------------------------------------------ tracing ------------------------------

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.mode == "trajectory":
            _task_ids_of_batch(batch)
            self._batch = batch

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.mode != "trajectory" or self._batch is None or not _is_first_optimizer(trainer, optimizer):
            return
        start = time.perf_counter()
        batch, self._batch = self._batch, None
        task_ids = _task_ids_of_batch(batch)
        grads = getattr(pl_module, "last_task_gradients", None)
        exposed_ids = getattr(pl_module, "last_task_ids", None)
        if (
            grads is None
            or exposed_ids is None
            or not torch.equal(torch.as_tensor(exposed_ids).cpu(), task_ids)
        ):
            with torch.enable_grad():  # optimizers run their closure (and this hook) under no_grad
                grads = self._gradients(pl_module, self._params(pl_module), batch)
        grads = grads.detach()
        preconditioner = _adam_preconditioner(optimizer, self._layout, self._raw_params(pl_module))
        if preconditioner is not None:
            grads = grads * preconditioner.to(grads)
        if self._step_reference is None:  # ∇f at the start of training, then at each round
            with torch.enable_grad():
                self._step_reference = self._reference(pl_module, self._params(pl_module))
        learning_rate = float(optimizer.param_groups[0]["lr"])
        batch_size = len(task_ids) * trainer.world_size  # DDP averages the ranks' meta-gradients
        self._accumulator.update(
            trainer.global_step,
            learning_rate,
            task_ids,
            grads,
            self._step_reference.to(grads),
            batch_size=batch_size,
        )
        if self.store_trajectory:
            self._store.append_step(trainer.global_step, learning_rate, task_ids, self._project(grads))
        self.timings["trace_seconds"] += time.perf_counter() - start

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if (
            self.every_n_steps is not None
            and trainer.global_step > 0
            and trainer.global_step % self.every_n_steps == 0
        ):
            self._run_round(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs is not None and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._run_round(trainer, pl_module)

    # ------------------------------------------------------------------ scoring ------------------------------

    @staticmethod
    def _raw_params(pl_module: pl.LightningModule) -> dict[str, Tensor]:
        getter = getattr(pl_module, "meta_parameters", None)
        return dict(getter()) if callable(getter) else dict(pl_module.named_parameters())

    def _params(self, pl_module: pl.LightningModule) -> Params:
        return trainable(self._raw_params(pl_module))

    def _project(self, grads: Tensor) -> Tensor:
        return grads if self._projection is None else self._projection(grads)

    def _reference(self, pl_module: pl.LightningModule, params: Params) -> Tensor:
        grad, _ = reference_gradient(
            pl_module,
            params,
            self._reference_tasks if self.utility is None else None,
            utility=self.utility,
            chunk_size=self.chunk_size,
            vectorize="loop" if self._vectorize == "loop" else "auto",
        )
        return grad

    def _gradients(
        self, pl_module: pl.LightningModule, params: Params, tasks: Any, transform: Callable | None = None
    ) -> Tensor:
        """Per-task gradients, vmapped when the module allows it, looped otherwise (e.g. ``higher`` inside)."""
        if self._vectorize != "loop":
            try:
                grads, _ = per_task_gradients(
                    pl_module,
                    params,
                    tasks,
                    chunk_size=self.chunk_size,
                    transform=transform,
                    vectorize="auto",
                )
                self._vectorize = "vmap"
                return grads
            except ValueError:
                raise
            except Exception as error:  # noqa: BLE001 - any failure of vmap means: use the loop path
                if self._vectorize == "vmap":
                    raise
                rank_zero_warn(
                    f"MetaInfluence: {type(pl_module).__name__}.task_loss cannot run under torch.func.vmap "
                    f"({type(error).__name__}: {error}); using the per-task loop (slower). Pass "
                    "vectorize='loop' to skip this attempt."
                )
                self._vectorize = "loop"
        grads, _ = per_task_gradients(
            pl_module, params, tasks, chunk_size=self.chunk_size, transform=transform, vectorize="loop"
        )
        return grads

    def _round_positions(self, trainer: pl.Trainer) -> Tensor:
        num_tasks = len(self._pool_ids)
        if self.max_tasks_per_round is None or self.max_tasks_per_round >= num_tasks:
            return torch.arange(num_tasks)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rounds)
        return torch.randperm(num_tasks, generator=generator)[: self.max_tasks_per_round].sort().values

    def _run_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        start = time.perf_counter()
        self.rounds += 1
        params = self._params(pl_module)
        num_tasks = len(self._pool_ids)
        with torch.enable_grad():
            if self.mode == "trajectory":
                round_scores, self_influence, scored = self._trajectory_round(trainer, pl_module, params)
            else:
                round_scores, self_influence, scored = self._periodic_round(trainer, pl_module, params)
        round_scores = _sum_over_ranks(trainer, round_scores)
        self_influence = _sum_over_ranks(trainer, self_influence)
        scored = _sum_over_ranks(trainer, scored.double()) > 0
        if self._cumulative is None:
            self._cumulative = torch.zeros(num_tasks, dtype=torch.float64)
            self._cumulative_self = torch.zeros(num_tasks, dtype=torch.float64)
            self._ever_scored = torch.zeros(num_tasks, dtype=torch.bool)
            self._rounds_scored = torch.zeros(num_tasks, dtype=torch.long)
        self._rounds_scored += scored.long()
        self._cumulative = self._combine(self._cumulative, round_scores, scored)
        self._cumulative_self = self._combine(self._cumulative_self, self_influence, scored)
        self._ever_scored |= scored
        scores, self_influence, scored = (
            self._cumulative.clone(),
            self._cumulative_self.clone(),
            self._ever_scored,
        )
        decisions = self._decide(trainer, scores, scored) if trainer.is_global_zero else None
        decisions = trainer.strategy.broadcast(decisions, src=0)
        for decision in decisions:
            if decision["action"] == "prune":
                self.task_state.prune(decision["task_ids"])
            elif decision["action"] == "weight":
                self.task_state.set_weights(decision["task_ids"], decision["weights"])
        elapsed = time.perf_counter() - start
        self.timings["round_seconds"] += elapsed
        self.result = self._make_round(trainer, scores, self_influence, decisions, elapsed)
        if trainer.is_global_zero and self.sample_top_k > 0:
            sample_start = time.perf_counter()
            with torch.enable_grad():
                self.result.sample_rows = self._sample_rows(pl_module, params, self.result)
            self.result.seconds += time.perf_counter() - sample_start
        if trainer.is_global_zero:
            self._publish(trainer, pl_module, self.result)

    def _combine(self, previous: Tensor, new: Tensor, scored: Tensor) -> Tensor:
        """Scores over rounds: TracIn sums (the path goes on), the ensemble averages its members, task-IF keeps
        each task's latest score."""
        if self.mode == "ensemble":
            return torch.where(
                scored, previous + (new - previous) / self._rounds_scored.clamp_min(1), previous
            )
        if self.mode == "task_if":
            return torch.where(scored, new, previous)
        return previous + new

    def _trajectory_round(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, params: Params
    ) -> tuple[Tensor, Tensor, Tensor]:
        num_tasks = len(self._pool_ids)
        scores = torch.zeros(num_tasks, dtype=torch.float64)
        self_influence = torch.zeros(num_tasks, dtype=torch.float64)
        scored = torch.zeros(num_tasks, dtype=torch.bool)
        contributions = self._accumulator.scores()
        if len(contributions.task_ids):
            positions = torch.tensor([self._position_of[int(t)] for t in contributions.task_ids.tolist()])
            scores[positions] = contributions.scores
            self_influence[positions] = contributions.self_influence
            scored[positions] = True
        self._accumulator = TracInAccumulator()
        self._store.flush()
        self._step_reference = self._reference(pl_module, params)  # for the steps until the next round
        return scores, self_influence, scored

    def _periodic_round(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, params: Params
    ) -> tuple[Tensor, Tensor, Tensor]:
        num_tasks = len(self._pool_ids)
        positions = self._round_positions(trainer)
        mine = positions[trainer.global_rank :: trainer.world_size]
        scores = torch.zeros(num_tasks, dtype=torch.float64)
        self_influence = torch.zeros(num_tasks, dtype=torch.float64)
        scored = torch.zeros(num_tasks, dtype=torch.bool)
        scored[positions] = True
        if len(mine) == 0:
            return scores, self_influence, scored
        tasks = self.pool.batch(mine)
        if self.mode == "task_if":
            hessian_tasks = self.pool.batch(positions)
            operator = TotalHessian(
                pl_module,
                params,
                hessian_tasks,
                l2=self.l2,
                chunk_size=self.chunk_size,
                vectorize="loop" if self._vectorize == "loop" else "auto",
            )
            grads = self._gradients(pl_module, params, tasks)
            self_influence[mine] = (grads * grads).sum(1).double()
            try:
                result = solve(
                    operator,
                    self._reference(pl_module, params),
                    method=self.solver,
                    damping=self.damping,
                    **self.solver_options,
                )
            except SolverError as error:
                if self.on_solver_error == "raise":
                    raise
                rank_zero_warn(
                    f"MetaInfluence round {self.rounds}: task-IF solve failed, scores are NaN: {error}"
                )
                scores[mine] = float("nan")
                return scores, self_influence, scored
            scores[mine] = (grads @ result.solution).double() / num_tasks
            self._solve_metrics = {
                "influence/solver_iterations": float(result.iterations),
                "influence/solver_residual": float(result.residual),
                "influence/solver_converged": float(result.converged),
            }
            if not result.converged:
                rank_zero_warn(
                    f"MetaInfluence round {self.rounds}: the {self.solver} solve stopped at relative residual "
                    f"{result.residual:.2e} after {result.iterations} iterations (not converged); scores are "
                    "approximate. Raise solver_options['max_iterations'] or the damping."
                )
        elif self.mode == "checkpoints":
            learning_rate = float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else 1.0
            rows = self._gradients(pl_module, params, tasks, transform=self._project)
            info = self._store.write_checkpoint(
                trainer.global_step, learning_rate, self._pool_ids[mine], rows
            )
            reference = self._project(self._reference(pl_module, params)[None])[0]
            scores[mine] = learning_rate * self._store.dot(info, reference).double()
            self_influence[mine] = learning_rate * (rows * rows).sum(1).double()
        else:  # ensemble: Yang et al.'s average over the current point and perturbed copies
            result = task_influence(
                pl_module,
                params,
                tasks,
                self._reference_tasks,
                utility=self.utility,
                estimator="ensemble",
                noise_copies=self.ensemble_copies,
                noise_std=self.ensemble_std,
                seed=self.seed * 7919 + self.rounds,
                projection=self._projection,
                with_self_influence=True,
                chunk_size=self.chunk_size,
                vectorize="loop" if self._vectorize == "loop" else "auto",
            )
            scores[mine] = result.scores.double()
            self_influence[mine] = result.self_influence.double()
        return scores, self_influence, scored

    def _sample_rows(
        self, pl_module: pl.LightningModule, params: Params, round_: ScoreRound
    ) -> list[SampleScore]:
        """Instance influence (inner-product form, at the current parameters) of the k most harmful tasks."""
        order = [int(i) for i in round_.order().tolist() if not bool(round_.pruned[i])][: self.sample_top_k]
        if not order:
            return []
        positions = torch.tensor(order)
        tasks = self.pool.batch(positions)
        result = instance_influence(
            pl_module,
            params,
            tasks,
            self._reference_tasks,
            utility=self.utility,
            solver="identity",
            chunk_size=self.chunk_size,
        )
        image = bool(getattr(self.pool, "is_image", False))
        rows = []
        for i, task_id in enumerate(result.task_ids.tolist()):
            task = tasks[i]
            for split, table, inputs, labels in (
                ("support", result.support_scores, task.support_x, task.support_y),
                ("query", result.query_scores, task.query_x, task.query_y),
            ):
                for j, value in enumerate(torch.as_tensor(table[i]).tolist()):
                    label = labels[j].item() if labels[j].numel() == 1 else None
                    rows.append(SampleScore(task_id, split, j, value, label, inputs[j] if image else None))
        rows.sort(key=lambda row: row.score)
        return rows

    # ------------------------------------------------------------------ acting ------------------------------

    def _decide(self, trainer: pl.Trainer, scores: Tensor, scored: Tensor) -> list[dict[str, Any]]:
        step, epoch = trainer.global_step, trainer.current_epoch
        decisions: list[dict[str, Any]] = []
        ids = self._pool_ids[scored]
        round_scores = scores[scored]
        if self.weighting is not None:
            previous = self.task_state.weights_for(ids)
            weights = self.weighting(round_scores.float(), previous)
            decisions.append(
                {
                    "action": "weight",
                    "task_ids": ids.tolist(),
                    "weights": weights.tolist(),
                    "reason": f"TaskWeighting(strength={self.weighting.strength}, min_weight={self.weighting.min_weight})",
                }
            )
        if self.pruning is not None:
            decision = self.pruning.decide(
                ids,
                round_scores,
                set(self.task_state.pruned),
                round_index=self.rounds,
                pool_size=len(self._pool_ids),
                step=step,
                epoch=epoch,
            )
            decisions.append(
                {"action": decision.action, "task_ids": decision.task_ids, "reason": decision.reason}
            )
        return decisions

    def _make_round(
        self,
        trainer: pl.Trainer,
        scores: Tensor,
        self_influence: Tensor,
        decisions: list[dict],
        seconds: float,
    ) -> ScoreRound:
        ids = self._pool_ids
        records = [
            Decision(trainer.global_step, trainer.current_epoch, d["action"], d["task_ids"], d["reason"])
            for d in decisions
        ]
        self.decisions.extend(records)
        classes = None
        if hasattr(self.pool, "task_classes") and len(ids) <= 100_000:
            try:
                classes = [list(self.pool.task_classes(int(t))) for t in ids.tolist()]
            except (NotImplementedError, TypeError, ValueError):
                classes = None
        corrupted = None
        if self.corrupted_task_ids is not None:
            corrupted = torch.tensor([int(t) in self.corrupted_task_ids for t in ids.tolist()])
        return ScoreRound(
            step=trainer.global_step,
            epoch=trainer.current_epoch,
            estimator=self.mode,
            task_ids=ids,
            scores=scores,
            self_influence=self_influence,
            weights=self.task_state.weights_for(ids),
            pruned=torch.tensor([self.task_state.is_pruned(t) for t in ids.tolist()]),
            decisions=records,
            classes=classes,
            corrupted=corrupted,
            seconds=seconds,
        )

    def _publish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, round_: ScoreRound) -> None:
        from lightning_metaif.dashboards.metrics import round_metrics

        metrics = round_metrics(round_) | self._solve_metrics
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            dashboard = self._dashboard_for(logger)
            if dashboard is not None:
                dashboard.log_round(round_, self.history, metrics=metrics)
        self.history.append(metrics)
        if self._writer is not None:
            self._writer.write(round_, metrics)
        if self.verbose:
            pruned_now = sum(len(d.task_ids) for d in round_.decisions if d.action == "prune")
            line = (
                f"[metaif] round {self.rounds} ({self.mode}) step {round_.step}: "
                f"{metrics.get('influence/fraction_harmful', float('nan')):.0%} harmful, "
                f"{pruned_now} pruned now, {int(round_.pruned.sum())} in total, {round_.seconds:.2f}s"
            )
            if "influence/auroc" in metrics:
                line += f", detection AUROC {metrics['influence/auroc']:.3f}"
            rank_zero_info(line)

    def _dashboard_for(self, logger: Any) -> Any:
        try:
            from lightning.pytorch.loggers import WandbLogger
        except ImportError:  # pragma: no cover
            return None
        if not isinstance(logger, WandbLogger):
            return None
        if id(logger) not in self._dashboards:
            from lightning_metaif.dashboards.wandb_dashboard import WandbDashboard

            self._dashboards[id(logger)] = WandbDashboard(logger)
        return self._dashboards[id(logger)]

    # ------------------------------------------------------------------ state ------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "task_state": self.task_state.state_dict(),
            "rounds": self.rounds,
            "rounds_scored": None if self._cumulative is None else self._rounds_scored.clone(),
            "cumulative": None if self._cumulative is None else self._cumulative.clone(),
            "cumulative_self": None if self._cumulative is None else self._cumulative_self.clone(),
            "ever_scored": None if self._cumulative is None else self._ever_scored.clone(),
            "pool_ids": None if self._pool_ids is None else self._pool_ids.clone(),
            "store": None if self._store is None else self._store.state_dict(),
            "store_root": None if self._root is None else str(self._root),
            "history": [dict(h) for h in self.history],
            "accumulator": self._accumulator.state_dict(),  # trajectory steps since the last round
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.task_state.load_state_dict(state_dict["task_state"])
        self.rounds = int(state_dict["rounds"])
        self._rounds_scored = state_dict.get("rounds_scored")
        self._cumulative = state_dict["cumulative"]
        self._cumulative_self = state_dict.get("cumulative_self")
        self._ever_scored = state_dict.get("ever_scored")
        self._pool_ids = state_dict["pool_ids"]
        self._restored_root = state_dict.get("store_root")
        if state_dict.get("accumulator") is not None:
            self._accumulator.load_state_dict(state_dict["accumulator"])
        self.history = [dict(h) for h in state_dict.get("history", [])]


# ---------------------------------------------------------------------- helpers ------------------------------


def _as_tasks(value: Any, name: str) -> Any:
    if isinstance(value, TaskBatch):
        return value
    if callable(getattr(value, "batch", None)) and hasattr(value, "task_ids"):
        return value.batch()
    if isinstance(value, Sequence) and len(value) > 0:
        return list(value)
    raise ValueError(
        f"`{name}` must be a TaskBatch, a task pool or a non-empty sequence of tasks; got {type(value).__name__}."
    )


def _task_ids_of_batch(batch: Any) -> Tensor:
    ids = getattr(batch, "task_ids", None)
    if ids is None and isinstance(batch, Mapping):
        ids = batch.get("task_ids")
    if ids is None:
        raise ValueError(
            f"The training batch ({type(batch).__name__}) carries no task ids. MetaInfluence needs them to know "
            "which task each gradient belongs to: yield `lightning_metaif.TaskBatch` batches (collate with "
            "`lightning_metaif.meta.collate_tasks`)."
        )
    return torch.as_tensor(ids).long().cpu()


def _is_first_optimizer(trainer: pl.Trainer, optimizer: Any) -> bool:
    if not trainer.optimizers:
        return True
    first = trainer.optimizers[0]
    return optimizer is first or getattr(optimizer, "optimizer", None) is first


def _find_task_sampler(loader: Any) -> TaskSampler | None:
    for candidate in (
        getattr(loader, "sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
    ):
        if isinstance(candidate, TaskSampler):
            return candidate
    return None


def _adam_preconditioner(
    optimizer: Any, layout: ParamLayout | None, raw_params: Mapping[str, Tensor]
) -> Tensor | None:
    """``1 / (sqrt(v̂_t) + ε)`` that an Adam-family optimizer is about to apply, flat in ``layout`` order.

    Called just before ``optimizer.step()``: ``v_t = β₂ v_{t−1} + (1 − β₂) ḡ²`` with the batch gradient ``ḡ``
    already in ``.grad``, bias-corrected, exactly as the step will compute it (LESS, Xia et al. 2024,
    preconditions per-example gradients the same way). ``None`` when the optimizer is not Adam/AdamW.
    """
    optimizer = getattr(optimizer, "optimizer", optimizer)
    if layout is None or not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return None
    group = optimizer.param_groups[0]
    beta2, eps = group["betas"][1], group["eps"]
    by_name = {}
    for name in layout.names:
        param = raw_params[name]
        state = optimizer.state.get(param) or {}
        previous = state.get("exp_avg_sq", torch.zeros_like(param))
        step = float(state.get("step", 0.0)) + 1.0
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        second_moment = beta2 * previous + (1 - beta2) * grad.detach() ** 2
        by_name[name] = 1.0 / ((second_moment / (1 - beta2**step)).sqrt() + eps)
    return layout.flatten(by_name)


def _sum_over_ranks(trainer: pl.Trainer, values: Tensor) -> Tensor:
    if trainer.world_size <= 1:
        return values
    gathered = trainer.strategy.all_gather(values.to(trainer.strategy.root_device))
    return gathered.reshape(trainer.world_size, -1).sum(0).cpu().to(values.dtype)


__all__ = ["MODES", "MetaInfluence"]
