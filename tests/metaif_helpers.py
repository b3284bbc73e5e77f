"""Small real meta-learning set-ups shared by the callback tests (importable: DDP workers need that)."""

from __future__ import annotations

import json
import os

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_metaif.callback import MetaInfluence
from lightning_metaif.meta.datamodule import MetaDataModule
from lightning_metaif.meta.datasets import digits_splits
from lightning_metaif.meta.maml import MAML
from lightning_metaif.meta.noise import corrupt_tasks


def tiny_backbone(ways: int = 5) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, ways))


def digits_setup(num_train=40, corrupt=0.2, batch_size=8, seed=0, task_state=None, mode="random_labels"):
    splits = digits_splits(num_train_tasks=num_train, num_val_tasks=10, num_test_tasks=20, seed=seed)
    train, corruption = splits.train, None
    if corrupt:
        train, corruption = corrupt_tasks(splits.train, corrupt, mode=mode, seed=seed)
    dm = MetaDataModule(
        train, splits.val, splits.test, batch_size=batch_size, task_state=task_state, seed=seed
    )
    return dm, corruption


def tiny_maml(**kwargs) -> MAML:
    defaults = dict(inner_lr=0.5, outer_lr=5e-3, num_ways=5)
    defaults.update(kwargs)
    return MAML(tiny_backbone(), **defaults)


def trainer(tmp_path, callbacks, max_epochs=3, logger=None, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
    )
    defaults.update(kwargs)
    return pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, logger=logger, **defaults)


class RecordSampledIds(pl.Callback):
    """Records the task ids of every training batch, per epoch."""

    def __init__(self) -> None:
        self.by_epoch: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.by_epoch.setdefault(trainer.current_epoch, []).extend(batch.task_ids.tolist())


class DumpRankState(pl.Callback):
    """Writes what each DDP rank saw and decided to ``<out>/rank<r>.json`` (workers' state does not come back)."""

    def __init__(self, out: str, influence_index: int = 0) -> None:
        self.out = out
        self.sampled: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.sampled.setdefault(trainer.current_epoch, []).extend(batch.task_ids.tolist())

    def on_train_end(self, trainer, pl_module):
        influence = next(c for c in trainer.callbacks if isinstance(c, MetaInfluence))
        payload = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "pruned": sorted(influence.task_state.pruned),
            "sampled": {str(k): v for k, v in self.sampled.items()},
            "scores": influence.result.scores.tolist(),
            "task_ids": influence.result.task_ids.tolist(),
            "rounds": influence.rounds,
        }
        with open(os.path.join(self.out, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(payload, f)


def seed_all(seed: int = 0) -> None:
    pl.seed_everything(seed, verbose=False)
    torch.manual_seed(seed)


class HigherUserModule(pl.LightningModule):
    """A user's existing higher-based MAML module (automatic optimisation), made scoreable via HigherProblem."""

    def __init__(self) -> None:
        super().__init__()
        from lightning_metaif.meta.higher_adapter import HigherProblem

        self.net = tiny_backbone()
        self.problem = HigherProblem(self.net, lambda p: torch.optim.SGD(p, lr=0.5), inner_steps=1)

    def meta_parameters(self):  # the names task_loss expects (those of self.net, not "net.*")
        return self.problem.meta_parameters()

    def task_loss(self, params, task, support_weights=None, query_weights=None):
        return self.problem.task_loss(params, task, support_weights, query_weights)

    def training_step(self, batch, batch_idx):
        params = self.meta_parameters()
        return torch.stack([self.task_loss(params, task) for task in batch]).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=5e-3)
