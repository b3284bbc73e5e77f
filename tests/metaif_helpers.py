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


class UserMAML(pl.LightningModule):
    """A user's own one-step MAML with *automatic* optimisation (no gradient reporting): the callback recomputes
    per-task gradients. Reads the callback's task weights through ``task_weight_table`` like ``MAML`` does."""

    def __init__(
        self,
        optimizer: str = "sgd",
        lr: float = 0.05,
        inner_lr: float = 0.5,
        decay: float | None = None,
        freeze_first_bias: bool = False,
    ) -> None:
        super().__init__()
        self.net = tiny_backbone()
        if freeze_first_bias:
            self.net[1].bias.requires_grad_(False)
        self.optimizer_name, self.lr, self.inner_lr, self.decay = optimizer, lr, inner_lr, decay
        self.task_weight_table: dict = {}

    def meta_parameters(self):
        return dict(self.net.named_parameters())

    def task_loss(self, params, task, support_weights=None, query_weights=None):
        support = torch.func.functional_call(self.net, params, (task.support_x,))
        inner = nn.functional.cross_entropy(support, task.support_y)
        free = {n: p for n, p in params.items() if p.requires_grad}
        grads = torch.autograd.grad(inner, list(free.values()), create_graph=True)
        adapted = dict(params) | {n: p - self.inner_lr * g for (n, p), g in zip(free.items(), grads)}
        query = torch.func.functional_call(self.net, adapted, (task.query_x,))
        return nn.functional.cross_entropy(query, task.query_y)

    def training_step(self, batch, batch_idx):
        params = self.meta_parameters()
        weights = torch.tensor([float(self.task_weight_table.get(int(t), 1.0)) for t in batch.task_ids])
        losses = torch.stack([self.task_loss(params, task) for task in batch])
        return (weights * losses).sum() / len(losses)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "adam":
            optimizer = torch.optim.Adam(params, lr=self.lr)
        else:
            optimizer = torch.optim.SGD(params, lr=self.lr)
        if self.decay is None:
            return optimizer
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.decay**step)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class RecordSteps(pl.Callback):
    """Records, for every optimizer step, the parameters before it and the task ids and weights it trained on
    (all micro-batches of an accumulated step), plus the parameters at the end of training."""

    def __init__(self) -> None:
        self.steps: dict[int, dict] = {}
        self.final: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        params = {n: p.detach().clone() for n, p in MetaInfluence._raw_params(pl_module).items()}
        table = pl_module.task_weight_table
        weights = [float(table.get(int(t), 1.0)) for t in batch.task_ids]
        entry = self.steps.setdefault(step, {"params": params, "ids": [], "weights": []})
        entry["ids"].extend(batch.task_ids.tolist())
        entry["weights"].extend(weights)

    def on_train_end(self, trainer, pl_module):
        self.final = {n: p.detach().clone() for n, p in MetaInfluence._raw_params(pl_module).items()}


def _flat_grad(module, params, tasks, frozen=()) -> torch.Tensor:
    """Per-task loss gradients at ``params`` (all but ``frozen`` names), by plain autograd, one task at a time."""
    leaves = {n: p.detach().clone().requires_grad_(n not in frozen) for n, p in params.items()}
    free = [v for n, v in leaves.items() if n not in frozen]
    rows = []
    for task in tasks:
        grads = torch.autograd.grad(module.task_loss(leaves, task), free)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def independent_tracin(
    module,
    record: RecordSteps,
    pool,
    reference,
    round_steps,
    *,
    optimizer,
    lr,
    betas=(0.9, 0.999),
    eps=1e-8,
    world_size=1,
    decay=None,
    frozen=(),
):
    """TracIn along the recorded path, written from the formulas (no engine or callback code):
    score_k = Σ_t (w_k / B_t) ⟨∇f(λ_r(t)), D_t g_k(λ_t)⟩ with ``D_t = lr`` (SGD) or Adam's
    ``lr / (√v̂_t + ε)`` recomputed from the weighted batch gradients; ∇f refreshed after each round step;
    ``lr_t = lr · decay^(t-1)`` with a per-step decay; ``frozen`` parameter names take no part.
    Returns ({task_id: score}, {task_id: self-influence g_kᵀ D_t g_k w_k summed})."""
    steps = sorted(record.steps)
    ref_tasks = list(reference)
    ids_in_order = pool.task_ids.tolist()
    reference_grad = _flat_grad(module, record.steps[steps[0]]["params"], ref_tasks, frozen).mean(0).double()
    scores, selfs = {}, {}
    v = None
    for t, s in enumerate(steps, start=1):
        entry = record.steps[s]
        tasks = [pool[ids_in_order.index(i)] for i in entry["ids"]]
        grads = _flat_grad(module, entry["params"], tasks, frozen).double()
        rate = lr if decay is None else lr * decay ** (t - 1)
        weights = torch.tensor(entry["weights"], dtype=torch.float64)
        b = len(entry["ids"]) * world_size
        if optimizer == "adam":
            mean = (weights[:, None] * grads).sum(0) / b
            v = (1 - betas[1]) * mean**2 if v is None else betas[1] * v + (1 - betas[1]) * mean**2
            d = rate / ((v / (1 - betas[1] ** t)).sqrt() + eps)
        else:
            d = torch.full((grads.shape[1],), float(rate), dtype=torch.float64)
        for k, task_id in enumerate(entry["ids"]):
            scores[task_id] = scores.get(task_id, 0.0) + float(
                weights[k] / b * (grads[k] * d) @ reference_grad
            )
            selfs[task_id] = selfs.get(task_id, 0.0) + float(weights[k] * (grads[k] * d) @ grads[k])
        if s + 1 in round_steps:  # the callback refreshes ∇f at each round, at the parameters after the step
            after = record.steps[s + 1]["params"] if s + 1 in record.steps else record.final
            reference_grad = _flat_grad(module, after, ref_tasks, frozen).mean(0).double()
    return scores, selfs
