"""Quickstart: MAML on sinusoid regression, with MetaInfluence scoring every training task in one line.

python examples/sinusoid_quickstart.py          # measured times: docs/times.md
python examples/sinusoid_quickstart.py --fast   # tiny run for CI; or METAIF_EXAMPLES_FAST=1
"""

import argparse
import os

import lightning.pytorch as pl

from lightning_metaif import MAML, MLP, MetaDataModule, MetaInfluence, sinusoid_splits
from lightning_metaif.quiet import quiet_lightning


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fast", action="store_true", help="tiny run for CI")
    parser.add_argument("--output-dir", default="runs/sinusoid_quickstart")
    args = parser.parse_args(argv)
    quiet_lightning()  # no Lightning tips or warnings you cannot act on (see lightning_metaif.quiet)
    fast = args.fast or os.environ.get("METAIF_EXAMPLES_FAST") == "1"

    pl.seed_everything(0)
    train, val, test = sinusoid_splits(
        num_train_tasks=40 if fast else 200, num_val_tasks=10, num_test_tasks=10
    )
    influence = MetaInfluence("trajectory")  # <- the one line: score every training task while it trains
    trainer = pl.Trainer(
        log_every_n_steps=2,  # a few batches per epoch here: log every other step
        max_epochs=2 if fast else 30,
        callbacks=[influence],
        default_root_dir=args.output_dir,
        accelerator="cpu",
        enable_progress_bar=not fast,
        limit_val_batches=1,
    )
    model = MAML(MLP(1, 1, hidden=(40, 40)), loss="mse", inner_lr=0.01, outer_lr=1e-3)
    trainer.fit(model, datamodule=MetaDataModule(train, val, test, batch_size=10))

    result = influence.result  # ScoreRound: task_ids, scores (negative = harmful), weights, pruned
    order = result.order()  # most harmful first
    print("most harmful tasks:", result.task_ids[order[:5]].tolist())
    print("most helpful tasks:", result.task_ids[order.flip(0)[:5]].tolist())
    print("score files:", os.path.join(trainer.log_dir, "metaif"))
    return influence


if __name__ == "__main__":
    main()
