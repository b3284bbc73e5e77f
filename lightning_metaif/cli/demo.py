"""``lightning-metaif demo``: MAML on noisy digits tasks, scored and pruned, compared with an unpruned run."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_metaif.cli import ESTIMATORS
from lightning_metaif.cli.components import FlatMLP
from lightning_metaif.meta.datamodule import MetaDataModule
from lightning_metaif.quiet import quiet_lightning, wandb_logger


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
    sample_top_k: int = 8
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
            # rounds are numbered from 0, as in the score files (scores_round_0000.csv) and the report
            line = (
                f"[{label}] round {influence.rounds - 1:>2} (of 0-{total_rounds - 1}) step {result.step:>4}: "
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
    from lightning_metaif.config import GradientStoreConfig
    from lightning_metaif.estimators import Ensemble, SampleInfluence, TaskIF, as_estimator
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
    estimator = {
        "task_if": TaskIF(damping=1.0, l2=1e-3),  # MAML's meta-Hessian is indefinite: H + δI must be PD
        "ensemble": Ensemble(copies=2),
    }.get(cfg.mode) or as_estimator(cfg.mode)
    influence = MetaInfluence(
        estimator,
        actions=[pruning] if pruning is not None else None,
        store=GradientStoreConfig(projection_dim=cfg.projection_dim, dirpath=run_dir / "metaif"),
        ground_truth=data["corrupted"] or None,
        samples=SampleInfluence(top_k=cfg.sample_top_k) if cfg.sample_top_k > 0 else None,
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
        logger: Any = wandb_logger(
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


def _relative(path: str | None, cfg: DemoConfig) -> str | None:
    """``path`` relative to the output folder (where ``summary.json`` lives), ``/``-separated."""
    if path is None:
        return None
    assert cfg.output_dir is not None
    return Path(os.path.relpath(Path(path).resolve(), Path(cfg.output_dir).resolve())).as_posix()


def _sample_rows(result: Any, k: int) -> list[dict[str, Any]]:
    rows = sorted((s for s in result.sample_rows or [] if math.isfinite(s.score)), key=lambda s: s.score)
    classes = {} if result.classes is None else dict(zip(result.task_ids.tolist(), result.classes))

    def label_class(s: Any) -> int | None:  # the class the (possibly corrupted) label names
        task_classes = classes.get(s.task_id)
        if isinstance(s.label, int) and task_classes and 0 <= s.label < len(task_classes):
            return int(task_classes[s.label])
        return None

    return [
        {
            "task_id": s.task_id,
            "split": s.split,
            "index": s.index,
            "label": s.label,
            "label_class": label_class(s),
            "score": s.score,
        }
        for s in rows[:k]
    ]


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the demo (both training runs, the report) and return the summary (also written to ``summary.json``)."""
    from lightning_metaif.dashboards.metrics import round_metrics
    from lightning_metaif.meta.datasets import digits_splits
    from lightning_metaif.meta.noise import corrupt_tasks

    cfg = cfg.resolved()
    _check_demo_config(cfg)
    if cfg.logger == "wandb" and not _wandb_available():
        raise ValueError("--logger wandb needs the wandb package: pip install 'lightning-metaif[wandb]'.")
    quiet_lightning()
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
    # rounds are numbered from 0 (as in scores_round_0000.csv): the round of a decision is the history row
    # (one per round, in order) logged at the decision's step
    history_steps = [h.get("influence/step") for h in pruned_run.influence.history]
    prune_rounds = sorted(
        {i for d in prune_decisions for i, step in enumerate(history_steps) if step == float(d.step)}
    )
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
        "paths": "relative to the folder of this file",
        "runs": {
            "with_pruning": {"metaif": "with_pruning/metaif", "wandb": _relative(pruned_run.wandb_dir, cfg)},
            "without_pruning": {
                "metaif": "without_pruning/metaif",
                "wandb": _relative(baseline.wandb_dir, cfg),
            },
        },
        "corrupted_task_ids": corrupted,
        "pruned_task_ids": pruned_ids,
        "pruned_corrupted": len(set(pruned_ids) & corrupted_set),
        "prune_rounds": prune_rounds,
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
        "most_harmful_samples": _sample_rows(final, 5) if final is not None else [],
        "class_names": {str(c): n for c, n in sorted((splits.class_names or {}).items())},
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
    summary["report"] = _relative(str(report_path), cfg)
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


__all__ = ["DemoConfig", "run_demo"]
