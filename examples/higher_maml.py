"""An existing ``higher``-based MAML LightningModule, made scoreable by MetaInfluence with a few lines.

The module below is the usual ``higher.innerloop_ctx`` MAML with automatic optimisation. What is added for
lightning-metaif is marked "added": ``meta_parameters`` and ``task_loss`` (through
``lightning_metaif.HigherProblem``, which starts ``higher``'s inner loop from given parameter tensors).

``higher`` cannot run under ``torch.func.vmap``, so the engine must take its loop path: the batches are a
``TaskList`` (a plain list of tasks that carries task ids) instead of a stacked ``TaskBatch``, and the reference
tasks are passed as a list.

    python examples/higher_maml.py          # measured times: docs/times.md
    python examples/higher_maml.py --fast   # tiny run for CI; or METAIF_EXAMPLES_FAST=1
"""

import argparse
import os

import higher
import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_metaif import (
    HigherProblem,
    MetaInfluence,
    PruningPolicy,
    TaskSampler,
    corrupt_tasks,
    digits_splits,
)
from lightning_metaif.quiet import quiet_lightning


class HigherMAML(pl.LightningModule):
    """Second-order MAML written with ``higher`` (5-way classification of 8x8 digits)."""

    def __init__(self, ways=5, inner_lr=0.5, inner_steps=1, outer_lr=5e-3):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, ways))
        # added: the same inner loop as an influence-engine problem
        self.problem = HigherProblem(
            self.net,
            lambda p: torch.optim.SGD(p, lr=inner_lr),
            inner_steps=inner_steps,
            loss_fn=F.cross_entropy,
        )

    def training_step(self, tasks, batch_idx):
        inner_opt = torch.optim.SGD(self.net.parameters(), lr=self.hparams.inner_lr)
        losses = []
        for task in tasks:
            with higher.innerloop_ctx(self.net, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
                for _ in range(self.hparams.inner_steps):
                    diffopt.step(F.cross_entropy(fnet(task.support_x), task.support_y))
                losses.append(F.cross_entropy(fnet(task.query_x), task.query_y))
        loss = torch.stack(losses).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(tasks))
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), lr=self.hparams.outer_lr)

    # added for lightning-metaif --------------------------------------------------------------------------
    def meta_parameters(self):
        return self.problem.meta_parameters()

    def task_loss(self, params, task, support_weights=None, query_weights=None):
        return self.problem.task_loss(params, task, support_weights, query_weights)


class TaskList(list):
    """A meta-batch as a plain list of tasks (the loop path: no vmap) that carries its task ids."""

    @property
    def task_ids(self):
        return torch.tensor([t.task_id for t in self], dtype=torch.long)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fast", action="store_true", help="tiny run for CI")
    parser.add_argument("--output-dir", default="runs/higher_maml")
    args = parser.parse_args(argv)
    quiet_lightning()  # no Lightning tips or warnings you cannot act on (see lightning_metaif.quiet)
    fast = args.fast or os.environ.get("METAIF_EXAMPLES_FAST") == "1"

    pl.seed_everything(0)
    splits = digits_splits(num_train_tasks=20 if fast else 60, num_val_tasks=5, num_test_tasks=5)
    train, corruption = corrupt_tasks(splits.train, 0.2, mode="random_labels")
    influence = MetaInfluence(
        "trajectory",
        reference=list(splits.val),  # a list: the loop path
        pool=train,
        actions=[PruningPolicy(fraction=0.2, warmup_rounds=1)],
        ground_truth=corruption.task_ids,
    )
    loader = DataLoader(
        train,
        batch_size=5,
        sampler=TaskSampler(train, state=influence.task_state),
        collate_fn=TaskList,
        drop_last=True,
    )
    trainer = pl.Trainer(
        log_every_n_steps=2,  # a few batches per epoch here: log every other step
        max_epochs=2 if fast else 8,
        callbacks=[influence],
        default_root_dir=args.output_dir,
        accelerator="cpu",
        enable_progress_bar=not fast,
        enable_model_summary=False,
    )
    trainer.fit(HigherMAML(), train_dataloaders=loader)

    result = influence.result
    print("most harmful tasks:", result.task_ids[result.order()[:5]].tolist())
    print("corrupted tasks:   ", corruption.task_ids.tolist())
    print("pruned:            ", sorted(influence.task_state.pruned))
    return influence


if __name__ == "__main__":
    main()
