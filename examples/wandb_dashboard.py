"""Walkthrough: the MetaInfluence dashboard in Weights & Biases (offline: no account, no network needed).

1. Run this script. It meta-trains MAML on noisy digits tasks with a ``WandbLogger(mode="offline")``:

       python examples/wandb_dashboard.py            # or --fast (CI; or METAIF_EXAMPLES_FAST=1)

2. What the callback logs each scoring round (keys under ``influence/``):

   * scalars: ``influence/score_median`` and other quantiles, ``influence/fraction_harmful``,
     ``influence/num_pruned``, ``influence/seconds``; with ground truth ``influence/auroc`` and
     ``influence/recall@10%`` / ``@20%`` / ``@40%``;
   * ``influence/tasks``: a table with one row per task (id, score, rank, weight, pruned, classes, corrupted):
     sort it by ``score`` to see the most harmful tasks;
   * ``influence/top_harmful`` and ``influence/top_helpful``: bar charts; ``influence/score_hist``: histogram;
   * ``influence/score_stats`` and ``influence/detection``: line charts over the rounds;
   * ``influence/harmful_samples``: a table of the most harmful support and query samples, with their images.

   This script turns every panel on: ground truth (``corrupted_task_ids``) for the detection panel, pruning for
   the pruned counts, and sample influence for the harmful-samples table. ``docs/make_figures.py`` draws the
   pictures of the documentation's dashboard page from this run's logged data.

3. The run is in ``<output-dir>/wandb/offline-run-<time>-<id>/`` (the script prints it). Upload it with

       wandb login            # once
       wandb sync <output-dir>/wandb/offline-run-<time>-<id>

   then open the run page: the charts above appear as panels, the tables under "Tables". Without uploading,
   the score files are also in ``<output-dir>/metaif/`` as CSV, and
   ``lightning-metaif report <output-dir>`` turns them into an HTML report.
"""

import argparse
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
import wandb

from lightning_metaif import (
    MAML,
    MetaDataModule,
    MetaInfluence,
    PruningPolicy,
    SampleInfluence,
    corrupt_tasks,
    digits_splits,
)
from lightning_metaif.cli import FlatMLP
from lightning_metaif.quiet import quiet_lightning, wandb_logger


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fast", action="store_true", help="tiny run for CI")
    parser.add_argument("--output-dir", default="runs/wandb_dashboard")
    args = parser.parse_args(argv)
    quiet_lightning()  # no Lightning tips or warnings you cannot act on (see lightning_metaif.quiet)
    fast = args.fast or os.environ.get("METAIF_EXAMPLES_FAST") == "1"
    torch.set_num_threads(1)

    pl.seed_everything(0)
    splits = digits_splits(num_train_tasks=40 if fast else 100, num_val_tasks=10, num_test_tasks=40)
    train_pool, corruption = corrupt_tasks(splits.train, 0.2, mode="random_labels")
    influence = MetaInfluence(
        "trajectory",
        actions=[PruningPolicy(fraction=0.2, warmup_rounds=1 if fast else 4)],
        ground_truth=corruption.task_ids,  # ground truth: turns on the detection panel
        samples=SampleInfluence(
            top_k=8
        ),  # instance influence of the 8 most harmful tasks: samples with images
    )
    dm = MetaDataModule(train_pool, splits.val, splits.test, batch_size=10, task_state=influence.task_state)
    logger = wandb_logger(  # Lightning's WandbLogger, minus a deprecated setting wandb warns about
        project="lightning-metaif", name="wandb-dashboard", save_dir=args.output_dir, mode="offline"
    )
    trainer = pl.Trainer(
        log_every_n_steps=2,  # a few batches per epoch here: log every other step
        max_epochs=3 if fast else 30,
        callbacks=[influence],
        logger=logger,
        accelerator="cpu",
        limit_val_batches=1,
        enable_progress_bar=not fast,
    )
    try:
        trainer.fit(MAML(FlatMLP(64, 5), inner_lr=1.0, outer_lr=3e-3, num_ways=5), datamodule=dm)
        run_dir = Path(logger.experiment.dir).parent
    finally:
        wandb.finish()  # the logger never finishes the run itself
    print(f"offline W&B run: {run_dir}")
    print(f"upload it with:  wandb sync {run_dir}")
    print(f"HTML report:     lightning-metaif report {args.output_dir}")
    return run_dir


if __name__ == "__main__":
    main()
