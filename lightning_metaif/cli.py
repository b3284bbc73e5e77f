"""The ``lightning-metaif`` command: ``demo``, ``report RUN_DIR`` and ``fit --config config.yaml``.

* ``lightning-metaif demo``: meta-trains MAML on scikit-learn's bundled digits (5-way 1-shot tasks) with a
  share of the training tasks corrupted, scores every task with :class:`~lightning_metaif.MetaInfluence`
  and prunes the harmful ones; then trains the same run (same seed) without pruning and compares meta-test
  accuracy. Logs to W&B offline (CSV without wandb), writes a self-contained HTML report and ``summary.json``.
* ``lightning-metaif report RUN_DIR``: rebuilds the HTML report from the files of any run that used the
  callback (the ``metaif/`` folders under ``RUN_DIR``).
* ``lightning-metaif fit|validate|test ...``: Lightning's ``LightningCLI`` with
  :class:`~lightning_metaif.MAML` and a :class:`~lightning_metaif.MetaDataModule` subclass (e.g.
  :class:`DigitsDataModule`) built from a YAML config; ``MetaInfluence`` goes in ``trainer.callbacks``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_metaif.meta.datamodule import MetaDataModule

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
ESTIMATORS = ("trajectory", "checkpoints", "task_if", "ensemble")

# --------------------------------------------------------------------------------------------------------------
# Building blocks usable from configs: a flat MLP for small images, a digits datamodule
# --------------------------------------------------------------------------------------------------------------


class FlatMLP(nn.Module):
    """``Flatten`` → ReLU MLP → linear ``head``: a fast few-shot backbone for small images (8x8 digits).

    Stateless (no normalisation, no dropout), so :class:`~lightning_metaif.MAML` can ``vmap`` its inner loop.

    Args:
        in_dim: flattened input size (64 for 8x8 digits).
        num_classes: outputs (the number of ways N).
        hidden: widths of the hidden layers.

    Example:
        >>> FlatMLP(64, 5, hidden=(16,))(torch.zeros(3, 1, 8, 8)).shape
        torch.Size([3, 5])
    """

    def __init__(self, in_dim: int = 64, num_classes: int = 5, hidden: Sequence[int] = (128, 128)) -> None:
        super().__init__()
        if in_dim < 1 or num_classes < 1 or any(h < 1 for h in hidden):
            raise ValueError(
                f"FlatMLP sizes must be positive, got in_dim={in_dim}, num_classes={num_classes}, hidden={hidden}."
            )
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            width = int(h)
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class DigitsDataModule(MetaDataModule):
    """A :class:`~lightning_metaif.MetaDataModule` over :func:`~lightning_metaif.digits_splits`, with label noise.

    Everything is built from plain arguments, so it works in a ``LightningCLI`` YAML config. With ``noise > 0``
    a seeded share of the training tasks is corrupted (:func:`~lightning_metaif.corrupt_tasks`);
    :attr:`corrupted_task_ids` holds the ground truth (the ``lightning-metaif fit`` command hands it to a
    ``MetaInfluence`` callback that has none, which adds detection AUROC / recall to its metrics).

    Pruning with a separately built callback (as in a config): the callback binds its ``task_state`` into the
    :class:`~lightning_metaif.TaskSampler` of the train loader at ``on_train_start``.

    Args:
        num_tasks: training tasks in the pool.
        num_val_tasks: validation tasks (the callback's default reference set).
        num_test_tasks: meta-test tasks.
        ways, shots, queries: the N-way K-shot task shape (queries per class).
        noise: share of training tasks to corrupt, in ``[0, 1)``.
        noise_mode: ``"random_labels"``, ``"shuffle_query"`` or ``"flip_labels"``.
        batch_size: tasks per meta-batch.
        seed: seed of the class split, of the tasks, of the corruption and of the sampler.

    Example:
        >>> dm = DigitsDataModule(num_tasks=20, num_val_tasks=4, num_test_tasks=4, noise=0.25, batch_size=5)
        >>> len(dm.train_pool), len(dm.corrupted_task_ids)
        (20, 5)
    """

    def __init__(
        self,
        num_tasks: int = 100,
        num_val_tasks: int = 20,
        num_test_tasks: int = 100,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        noise: float = 0.2,
        noise_mode: str = "random_labels",
        batch_size: int = 10,
        seed: int = 0,
    ) -> None:
        from lightning_metaif.meta.datasets import digits_splits
        from lightning_metaif.meta.noise import corrupt_tasks

        if not 0.0 <= noise < 1.0:
            raise ValueError(f"noise must be in [0, 1) (share of training tasks to corrupt), got {noise}.")
        splits = digits_splits(
            ways=ways,
            shots=shots,
            queries=queries,
            num_train_tasks=num_tasks,
            num_val_tasks=num_val_tasks,
            num_test_tasks=num_test_tasks,
            seed=seed,
        )
        train, self.corruption = splits.train, None
        if noise > 0:
            train, self.corruption = corrupt_tasks(splits.train, noise, mode=noise_mode, seed=seed)
        super().__init__(train, splits.val, splits.test, batch_size=batch_size, seed=seed)
        self.splits = splits

    @property
    def corrupted_task_ids(self) -> list[int] | None:
        """Ids of the corrupted training tasks (``None`` without noise)."""
        return None if self.corruption is None else [int(t) for t in self.corruption.task_ids.tolist()]


# --------------------------------------------------------------------------------------------------------------
# LightningCLI
# --------------------------------------------------------------------------------------------------------------


def lightning_cli(args: Sequence[str] | None = None, *, run: bool = True) -> Any:
    """Build (and by default run) ``LightningCLI`` with MAML and a MetaDataModule subclass on ``args``.

    ``args`` are LightningCLI arguments such as ``["fit", "--config", "examples/config_digits.yaml"]`` (``None``:
    ``sys.argv[1:]``). The model
    and datamodule are given by ``class_path`` in the config (``lightning_metaif.MAML`` or a subclass;
    ``lightning_metaif.cli.DigitsDataModule`` or any ``MetaDataModule`` subclass); ``MetaInfluence`` goes in
    ``trainer.callbacks``. Corrupted-task ground truth of the datamodule (``corrupted_task_ids``) is handed to
    ``MetaInfluence`` callbacks that have none. Returns the ``LightningCLI`` object (``.trainer``,
    ``.model``, ``.datamodule``).
    """
    try:
        import jsonargparse  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "`lightning-metaif fit` uses Lightning's LightningCLI, which needs jsonargparse: "
            "pip install 'lightning-metaif[cli]' (or 'jsonargparse[signatures]>=4.27')"
        ) from error
    from lightning.pytorch.cli import LightningCLI

    from lightning_metaif.meta.maml import MAML

    class MetaInfluenceCLI(LightningCLI):
        def before_fit(self) -> None:
            _hand_over_ground_truth(self.trainer, self.datamodule)

    return MetaInfluenceCLI(
        MAML,
        MetaDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=None if args is None else list(args),
        run=run,
        save_config_kwargs={"overwrite": True},
    )


def run_lightning_cli(args: Sequence[str] | None = None) -> int:
    """:func:`lightning_cli` for the console script: returns an exit code instead of raising."""
    try:
        lightning_cli(args)
    except ImportError as error:
        print(f"lightning-metaif: {error}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # argument errors, --help, --print_config
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    return 0


def _hand_over_ground_truth(trainer: Any, datamodule: Any) -> None:
    from lightning_metaif.callback import MetaInfluence

    truth = getattr(datamodule, "corrupted_task_ids", None)
    if truth is None:
        return
    for callback in trainer.callbacks:
        if isinstance(callback, MetaInfluence) and callback.corrupted_task_ids is None:
            callback.corrupted_task_ids = {int(t) for t in truth}


# --------------------------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------------------------


@dataclass
class DemoConfig:
    """Settings of ``lightning-metaif demo`` (the command-line defaults; ``fast`` shrinks them for CI)."""

    num_tasks: int = 100
    noise: float = 0.2
    mode: str = "trajectory"
    epochs: int = 40
    seed: int = 0
    output_dir: Path | None = None
    fast: bool = False
    logger: str = "auto"
    num_val_tasks: int = 20
    num_test_tasks: int = 200
    batch_size: int = 10
    hidden: tuple[int, ...] = (128, 128)
    inner_lr: float = 1.0
    outer_lr: float = 3e-3
    projection_dim: int = 256
    warmup_rounds: int | None = None
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> DemoConfig:
        """Apply ``fast`` and fill the derived defaults (output dir, warm-up rounds)."""
        cfg = DemoConfig(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        if cfg.fast:
            cfg.num_tasks = min(cfg.num_tasks, 40)
            cfg.epochs = min(cfg.epochs, 6)
            cfg.num_test_tasks = min(cfg.num_test_tasks, 40)
            cfg.num_val_tasks = min(cfg.num_val_tasks, 10)
            cfg.hidden = (32,)
            cfg.inner_lr, cfg.outer_lr = 0.5, 1e-2
            cfg.projection_dim = min(cfg.projection_dim, 64)
        if cfg.output_dir is None:
            cfg.output_dir = Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
        cfg.output_dir = Path(cfg.output_dir)
        if cfg.warmup_rounds is None:
            cfg.warmup_rounds = max(1, cfg.epochs // 8)
        return cfg


def _check_demo_config(cfg: DemoConfig) -> None:
    if cfg.num_tasks < cfg.batch_size:
        raise ValueError(
            f"--num-tasks must be at least the batch size ({cfg.batch_size}), got {cfg.num_tasks}."
        )
    if not 0.0 <= cfg.noise < 1.0:
        raise ValueError(f"--noise must be in [0, 1) (share of corrupted training tasks), got {cfg.noise}.")
    if cfg.mode not in ESTIMATORS:
        raise ValueError(f"--mode must be one of {ESTIMATORS}, got {cfg.mode!r}.")
    if cfg.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {cfg.epochs}.")
    if cfg.logger not in ("auto", "wandb", "csv"):
        raise ValueError(f"--logger must be 'auto', 'wandb' or 'csv', got {cfg.logger!r}.")


def _wandb_available() -> bool:
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


def _quiet_lightning() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch.accelerators.cuda").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*Checkpoint directory.*exists and is not empty.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")


def _round_progress_callback(label: str, total_rounds: int, enabled: bool) -> Any:
    """A callback that writes one line per scoring round (through ``tqdm.write`` so progress bars survive)."""
    import lightning.pytorch as pl

    from lightning_metaif.callback import MetaInfluence

    class RoundProgress(pl.Callback):
        def __init__(self) -> None:
            self.lines: list[str] = []

        def _influence(self, trainer: pl.Trainer) -> MetaInfluence | None:
            return next((c for c in trainer.callbacks if isinstance(c, MetaInfluence)), None)

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            influence = self._influence(trainer)
            if influence is None or not influence.history or influence.result is None:
                return
            metrics, result = influence.history[-1], influence.result
            if len(self.lines) >= influence.rounds:
                return
            pruned_now = sum(len(d.task_ids) for d in result.decisions if d.action == "prune")
            line = (
                f"[{label}] scoring round {influence.rounds:>3}/{total_rounds} step {result.step:>4}: "
                f"{metrics.get('influence/fraction_harmful', math.nan):4.0%} harmful"
            )
            if "influence/auroc" in metrics:
                line += (
                    f" | detection AUROC {metrics['influence/auroc']:.3f}"
                    f" recall@20% {metrics.get('influence/recall@20%', math.nan):.2f}"
                )
            line += f" | pruned {pruned_now:+d} -> {int(result.pruned.sum())} | {result.seconds:.2f}s"
            self.lines.append(line)
            if enabled:
                _write_line(line)

    return RoundProgress()


def _write_line(line: str) -> None:
    try:
        from tqdm.auto import tqdm

        tqdm.write(line)
    except ImportError:  # pragma: no cover
        print(line, flush=True)


@dataclass
class _RunResult:
    label: str
    influence: Any
    accuracy: float
    batch_accuracies: list[float]
    fit_seconds: float
    test_seconds: float
    log_dir: Path
    wandb_dir: str | None


class _CollectTestAccuracy:
    """Per-batch meta-test accuracies (for an error bar and a paired comparison)."""

    def __new__(cls) -> Any:
        import lightning.pytorch as pl

        class Collect(pl.Callback):
            def __init__(self) -> None:
                self.values: list[float] = []
                self.sizes: list[int] = []

            def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
                if isinstance(outputs, dict) and "accuracy" in outputs:
                    self.values.append(float(outputs["accuracy"]))
                    self.sizes.append(len(batch))

        return Collect()


def _train_once(cfg: DemoConfig, label: str, prune: bool, data: dict[str, Any]) -> _RunResult:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger

    from lightning_metaif.actions.pruning import PruningPolicy
    from lightning_metaif.callback import MetaInfluence
    from lightning_metaif.meta.maml import MAML

    pl.seed_everything(cfg.seed, verbose=False)
    run_dir = cfg.output_dir / label
    run_dir.mkdir(parents=True, exist_ok=True)
    pruning = None
    if prune:
        pruning = PruningPolicy(
            fraction=cfg.noise if cfg.noise > 0 else 0.1,
            warmup_rounds=cfg.warmup_rounds,
            max_fraction_per_round=0.1,
            only_harmful=True,
        )
    influence = MetaInfluence(
        mode=cfg.mode,
        pruning=pruning,
        projection_dim=cfg.projection_dim,
        corrupted_task_ids=data["corrupted"] or None,
        store_dir=run_dir / "metaif",
        damping=1.0,  # task_if only: MAML's meta-Hessian is indefinite; CG needs H + δI positive definite
        l2=1e-3,
        ensemble_copies=2,
        max_tasks_per_round=None,
        seed=cfg.seed,
        verbose=False,
    )
    dm = MetaDataModule(
        data["train"],
        data["val"],
        data["test"],
        batch_size=cfg.batch_size,
        task_state=influence.task_state,
        seed=cfg.seed,
    )
    model = MAML(
        FlatMLP(64, 5, hidden=cfg.hidden),
        inner_lr=cfg.inner_lr,
        outer_lr=cfg.outer_lr,
        num_ways=5,
    )
    use_wandb = cfg.logger == "wandb" or (cfg.logger == "auto" and _wandb_available())
    if use_wandb:
        from lightning.pytorch.loggers import WandbLogger

        logger: Any = WandbLogger(
            project="lightning-metaif-demo",
            name=f"{cfg.output_dir.name}-{label}",
            save_dir=str(run_dir),
            mode="offline",
            config={**_jsonable(cfg), "run": label},
        )
    else:
        logger = CSVLogger(save_dir=str(cfg.output_dir), name=label, version="csv")
    progress = _round_progress_callback(label, cfg.epochs, cfg.progress)
    collect = _CollectTestAccuracy()
    callbacks: list[Any] = [influence, progress, collect]
    if cfg.progress:
        callbacks.append(TQDMProgressBar(leave=False))
    trainer = pl.Trainer(
        max_epochs=cfg.epochs,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=cfg.progress,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(run_dir),
        log_every_n_steps=max(1, min(5, cfg.num_tasks // cfg.batch_size)),
    )
    wandb_dir = None
    try:
        start = time.perf_counter()
        trainer.fit(model, datamodule=dm)
        fit_seconds = time.perf_counter() - start
        start = time.perf_counter()
        tested = trainer.test(model, datamodule=dm, verbose=False)
        test_seconds = time.perf_counter() - start
        accuracy = float(tested[0]["test/accuracy"])
        if use_wandb:
            logger.experiment.summary["demo/test_accuracy"] = accuracy
            wandb_dir = str(Path(logger.experiment.dir).parent)
    finally:
        if use_wandb:
            import wandb

            wandb.finish()
    return _RunResult(
        label,
        influence,
        accuracy,
        collect.values,
        fit_seconds,
        test_seconds,
        run_dir,
        wandb_dir,
    )


def _jsonable(cfg: DemoConfig) -> dict[str, Any]:
    out = {}
    for key in cfg.__dataclass_fields__:
        value = getattr(cfg, key)
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[key] = value
    return out


def _mean_se(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    t = torch.tensor(values, dtype=torch.float64)
    se = float(t.std() / math.sqrt(len(values))) if len(values) > 1 else math.nan
    return float(t.mean()), se


def _task_rows(result: Any, k: int, harmful: bool) -> list[dict[str, Any]]:
    rows = result.to_rows()
    order = result.order().tolist()
    if not harmful:
        finite = [p for p in order if math.isfinite(rows[p]["score"])]
        order = list(reversed(finite))
    return [rows[p] for p in order[:k]]


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the demo (both training runs, the report) and return the summary (also written to ``summary.json``)."""
    from lightning_metaif.dashboards.metrics import round_metrics
    from lightning_metaif.meta.datasets import digits_splits
    from lightning_metaif.meta.noise import corrupt_tasks

    cfg = cfg.resolved()
    _check_demo_config(cfg)
    if cfg.logger == "wandb" and not _wandb_available():
        raise ValueError("--logger wandb needs the wandb package: pip install 'lightning-metaif[wandb]'.")
    _quiet_lightning()
    os.environ.setdefault("WANDB_SILENT", "true")
    torch.set_num_threads(1)  # tiny networks: one thread is fastest (and no spinning on a busy machine)
    total_start = time.perf_counter()
    cfg.output_dir.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    splits = digits_splits(
        ways=5,
        shots=1,
        queries=15,
        num_train_tasks=cfg.num_tasks,
        num_val_tasks=cfg.num_val_tasks,
        num_test_tasks=cfg.num_test_tasks,
        seed=cfg.seed,
    )
    train, corruption = splits.train, None
    if cfg.noise > 0:
        train, corruption = corrupt_tasks(splits.train, cfg.noise, mode="random_labels", seed=cfg.seed)
    corrupted = [] if corruption is None else [int(t) for t in corruption.task_ids.tolist()]
    data = {"train": train, "val": splits.val, "test": splits.test, "corrupted": corrupted}
    data_seconds = time.perf_counter() - start

    if cfg.progress:
        print(
            f"lightning-metaif demo: MAML on digits, 5-way 1-shot, {cfg.num_tasks} training tasks "
            f"({len(corrupted)} with random labels), estimator '{cfg.mode}', {cfg.epochs} epochs, seed {cfg.seed}",
            flush=True,
        )
        print("1/2 training WITH pruning", flush=True)
    pruned_run = _train_once(cfg, "with_pruning", True, data)
    if cfg.progress:
        print("2/2 training WITHOUT pruning (same seed)", flush=True)
    baseline = _train_once(cfg, "without_pruning", False, data)

    # Scores of the run without pruning: every task trained to the end, nothing removed.
    final = baseline.influence.result
    detection = round_metrics(final) if final is not None else {}
    prune_decisions = [d for d in pruned_run.influence.decisions if d.action == "prune"]
    pruned_ids = sorted(pruned_run.influence.task_state.pruned)
    corrupted_set = set(corrupted)
    at_pruning = None
    if prune_decisions:
        last_step = prune_decisions[-1].step
        rows = [h for h in pruned_run.influence.history if h.get("influence/step") == float(last_step)]
        at_pruning = rows[-1] if rows else None

    acc_with, se_with = _mean_se(pruned_run.batch_accuracies)
    acc_without, se_without = _mean_se(baseline.batch_accuracies)
    diffs = [a - b for a, b in zip(pruned_run.batch_accuracies, baseline.batch_accuracies)]
    diff, se_diff = _mean_se(diffs)

    report_start = time.perf_counter()
    summary: dict[str, Any] = {
        "kind": "lightning-metaif demo",
        "config": _jsonable(cfg),
        "primary": "with_pruning",
        "runs": {
            "with_pruning": {"metaif": "with_pruning/metaif", "wandb": pruned_run.wandb_dir},
            "without_pruning": {"metaif": "without_pruning/metaif", "wandb": baseline.wandb_dir},
        },
        "corrupted_task_ids": corrupted,
        "pruned_task_ids": pruned_ids,
        "pruned_corrupted": len(set(pruned_ids) & corrupted_set),
        "prune_rounds": sorted({d.epoch + 1 for d in prune_decisions}),
        "detection": {
            "source": "without_pruning, last round",
            "auroc": detection.get("influence/auroc", math.nan),
            "recall@10%": detection.get("influence/recall@10%", math.nan),
            "recall@20%": detection.get("influence/recall@20%", math.nan),
            "recall@40%": detection.get("influence/recall@40%", math.nan),
            "auroc_at_pruning": None if at_pruning is None else at_pruning.get("influence/auroc"),
        },
        "most_harmful": _task_rows(final, 5, True) if final is not None else [],
        "most_helpful": _task_rows(final, 5, False) if final is not None else [],
        "accuracy": {
            "without_pruning": acc_without,
            "with_pruning": acc_with,
            "without_pruning_se": se_without,
            "with_pruning_se": se_with,
            "difference": diff,
            "difference_se": se_diff,
            "trainer_without_pruning": baseline.accuracy,
            "trainer_with_pruning": pruned_run.accuracy,
            "num_test_tasks": cfg.num_test_tasks,
        },
        "seconds": {
            "data": data_seconds,
            "train_with_pruning": pruned_run.fit_seconds,
            "trace_with_pruning": pruned_run.influence.timings["trace_seconds"],
            "scoring_with_pruning": pruned_run.influence.timings["round_seconds"],
            "train_without_pruning": baseline.fit_seconds,
            "trace_without_pruning": baseline.influence.timings["trace_seconds"],
            "scoring_without_pruning": baseline.influence.timings["round_seconds"],
            "meta_test": pruned_run.test_seconds + baseline.test_seconds,
        },
        "logger": "wandb" if pruned_run.wandb_dir else "csv",
        "num_nonfinite_scores": 0 if final is None else int((~torch.isfinite(final.scores)).sum()),
    }
    pruned_in_run = set(pruned_ids)
    for row in summary["most_harmful"] + summary["most_helpful"]:
        row["pruned_in_pruning_run"] = row["id"] in pruned_in_run
    (cfg.output_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))

    from lightning_metaif.dashboards.report import build_report

    report_path = build_report(cfg.output_dir)
    summary["seconds"]["report"] = time.perf_counter() - report_start
    summary["seconds"]["total"] = time.perf_counter() - total_start
    summary["report"] = str(report_path)
    (cfg.output_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    return summary


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, set):
        return sorted(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def format_summary(summary: dict[str, Any]) -> str:
    """The demo's closing text (readable in ten seconds)."""
    cfg, det, acc, sec = summary["config"], summary["detection"], summary["accuracy"], summary["seconds"]
    corrupted = summary["corrupted_task_ids"]
    lines = [
        "",
        "=" * 100,
        f"lightning-metaif demo  |  MAML, digits 5-way 1-shot  |  {cfg['num_tasks']} training tasks, "
        f"{len(corrupted)} corrupted (random labels)  |  estimator '{cfg['mode']}'  |  seed {cfg['seed']}",
        "=" * 100,
    ]

    def table(title: str, rows: list[dict[str, Any]]) -> list[str]:
        out = [title, f"  {'task':>6} {'score':>11}  {'corrupted':<9} {'pruned':<6} classes"]
        for r in rows:
            cls = " ".join(str(c) for c in (r.get("classes") or []))
            out.append(
                f"  {r['id']:>6} {r['score']:>11.3e}  {'YES' if r.get('corrupted') else 'no':<9} "
                f"{'yes' if r.get('pruned_in_pruning_run') else '-':<6} {cls}"
            )
        return out

    lines += table(
        "Most harmful tasks (lowest scores; run without pruning, all tasks trained to the end):",
        summary["most_harmful"],
    )
    lines += table("Most helpful tasks:", summary["most_helpful"])
    if corrupted:
        m = len(corrupted)
        lines.append(
            f"Detection of the {m} corrupted tasks: AUROC {det['auroc']:.3f}  |  recall@10% {det['recall@10%']:.2f}"
            f"  @20% {det['recall@20%']:.2f}  @40% {det['recall@40%']:.2f}  "
            f"(random ranking: AUROC 0.5, recall@k = k)"
        )
    nonfinite = summary.get("num_nonfinite_scores", 0)
    if nonfinite:
        lines.append(
            f"WARNING: {nonfinite} tasks have no finite score (the estimator failed in some rounds; see the "
            "warnings above): they rank as least harmful and are never pruned."
        )
    n_pruned = len(summary["pruned_task_ids"])
    if n_pruned:
        rounds = summary["prune_rounds"]
        when = f"round{'s' if len(rounds) > 1 else ''} {', '.join(str(r) for r in rounds)}"
        line = f"Pruning: {n_pruned} tasks pruned ({when})"
        if corrupted:
            line += f", {summary['pruned_corrupted']} of them corrupted ({summary['pruned_corrupted'] / n_pruned:.0%})"
        if det.get("auroc_at_pruning") is not None:
            line += f"; AUROC when the last ones were pruned {det['auroc_at_pruning']:.3f}"
        lines.append(line)
    else:
        lines.append("Pruning: nothing was pruned (no task scored as harmful after the warm-up rounds)")
    verdict = (
        "helped"
        if acc["difference"] > 2 * acc["difference_se"]
        else ("hurt" if acc["difference"] < -2 * acc["difference_se"] else "made no clear difference")
    )
    lines.append(
        f"Meta-test accuracy ({acc['num_test_tasks']} unseen-class tasks): without pruning "
        f"{acc['without_pruning']:.1%} ± {acc['without_pruning_se']:.1%}  |  with pruning {acc['with_pruning']:.1%}"
        f" ± {acc['with_pruning_se']:.1%}  |  difference {100 * acc['difference']:+.1f} points "
        f"(paired s.e. {100 * acc['difference_se']:.1f}): pruning {verdict}"
    )
    lines.append(
        f"Time: data {sec['data']:.1f}s | training with pruning {sec['train_with_pruning']:.1f}s (tracing "
        f"{sec['trace_with_pruning']:.1f}s, scoring {sec['scoring_with_pruning']:.1f}s) | without pruning "
        f"{sec['train_without_pruning']:.1f}s | meta-test {sec['meta_test']:.1f}s | report "
        f"{sec.get('report', math.nan):.1f}s | total {sec.get('total', math.nan):.0f}s"
    )
    lines.append(f"Report: {summary.get('report')}")
    wandb_dirs = [r["wandb"] for r in summary["runs"].values() if r.get("wandb")]
    if wandb_dirs:
        lines.append("W&B offline runs (upload with `wandb sync <dir>`):")
        lines += [f"  {d}" for d in wandb_dirs]
    else:
        lines.append(f"CSV logs and score files: {Path(summary['config']['output_dir'])}/*/metaif/")
    lines.append("=" * 100)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-metaif",
        description="Task influence for meta-learning with PyTorch Lightning: demo, HTML report, LightningCLI.",
        epilog="`lightning-metaif fit --config config.yaml` runs Lightning's LightningCLI "
        "(see examples/config_digits.yaml); `lightning-metaif fit --help` lists its options.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="meta-train MAML on noisy digits tasks, find and prune the harmful ones, compare with no pruning",
        description="Meta-trains MAML on scikit-learn's digits (5-way 1-shot) with corrupted tasks, scores every "
        "task with MetaInfluence and prunes the harmful ones, then trains the same run without pruning and "
        "compares meta-test accuracy. Writes an HTML report and summary.json into the output directory.",
    )
    demo.add_argument("--num-tasks", type=int, default=100, help="training tasks (default 100)")
    demo.add_argument(
        "--noise", type=float, default=0.2, help="share of corrupted training tasks (default 0.2)"
    )
    demo.add_argument("--mode", choices=ESTIMATORS, default="trajectory", help="influence estimator")
    demo.add_argument("--epochs", type=int, default=40, help="training epochs (default 40; one round each)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--output-dir", type=Path, default=None, help="default ./runs/demo-<timestamp>")
    demo.add_argument("--fast", action="store_true", help="tiny settings for CI (under a minute)")
    demo.add_argument(
        "--logger",
        choices=("auto", "wandb", "csv"),
        default="auto",
        help="auto: W&B offline if wandb is installed, CSV otherwise",
    )
    demo.add_argument("--quiet", action="store_true", help="no progress output, only the summary")
    report = sub.add_parser("report", help="rebuild the HTML report of a run directory")
    report.add_argument(
        "run_dir", type=Path, help="a demo output dir or any folder holding metaif/ score files"
    )
    report.add_argument("--output", type=Path, default=None, help="default RUN_DIR/report.html")
    for name in LIGHTNING_COMMANDS:
        sub.add_parser(
            name, help=f"LightningCLI {name} (e.g. --config examples/config_digits.yaml)", add_help=False
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-metaif`` console script; returns the exit code.

    Example:
        >>> main(["report", "/nonexistent-folder"])
        Traceback (most recent call last):
        ...
        SystemExit: 2
    """
    from_console = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        return run_lightning_cli(None if from_console else argv)
    args = _parser().parse_args(argv)
    if args.command == "report":
        from lightning_metaif.dashboards.report import build_report

        try:
            path = build_report(args.run_dir, output=args.output)
        except (FileNotFoundError, ValueError) as error:
            print(f"lightning-metaif report: {error}", file=sys.stderr)
            raise SystemExit(2) from error
        print(f"Report: {path}")
        return 0
    cfg = DemoConfig(
        num_tasks=args.num_tasks,
        noise=args.noise,
        mode=args.mode,
        epochs=args.epochs,
        seed=args.seed,
        output_dir=args.output_dir,
        fast=args.fast,
        logger=args.logger,
        progress=not args.quiet,
    )
    try:
        summary = run_demo(cfg)
    except ValueError as error:
        print(f"lightning-metaif demo: {error}", file=sys.stderr)
        return 2
    print(format_summary(summary), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


__all__ = [
    "DemoConfig",
    "DigitsDataModule",
    "FlatMLP",
    "format_summary",
    "lightning_cli",
    "main",
    "run_demo",
    "run_lightning_cli",
]
