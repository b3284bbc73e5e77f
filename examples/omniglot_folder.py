"""MAML on Omniglot from a local folder, with MetaInfluence scoring the training tasks.

Nothing is downloaded: unzip ``images_background.zip`` and ``images_evaluation.zip`` of Omniglot
(github.com/brendenlake/omniglot) into one folder, or point ``--root`` at torchvision's ``omniglot-py`` folder:

    ROOT/images_background/<Alphabet>/<characterXX>/*.png
    ROOT/images_evaluation/<Alphabet>/<characterXX>/*.png

    python examples/omniglot_folder.py --root ~/data/omniglot
    python examples/omniglot_folder.py --root ~/data/omniglot --fast   # CI; or METAIF_EXAMPLES_FAST=1
"""

import argparse
import os
import sys

import lightning.pytorch as pl

from lightning_metaif import MAML, ConvNet, MetaDataModule, MetaInfluence, omniglot_splits
from lightning_metaif.quiet import quiet_lightning


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--root",
        default=os.environ.get("OMNIGLOT_ROOT", "data/omniglot"),
        help="folder with images_background/ and images_evaluation/ (or $OMNIGLOT_ROOT)",
    )
    parser.add_argument(
        "--train-characters",
        type=float,
        default=1200,
        help="characters for training (count, or a fraction of all characters)",
    )
    parser.add_argument("--val-characters", type=float, default=100, help="characters for validation")
    parser.add_argument("--fast", action="store_true", help="tiny run for CI")
    parser.add_argument("--output-dir", default="runs/omniglot_folder")
    args = parser.parse_args(argv)
    quiet_lightning()  # no Lightning tips or warnings you cannot act on (see lightning_metaif.quiet)
    fast = args.fast or os.environ.get("METAIF_EXAMPLES_FAST") == "1"

    def count(value):
        return int(value) if value >= 1 else value

    try:
        splits = omniglot_splits(
            args.root,
            ways=5,
            shots=1,
            queries=5,
            image_size=28,
            num_train_tasks=20 if fast else 2000,
            num_val_tasks=5 if fast else 50,
            num_test_tasks=5 if fast else 200,
            num_train_characters=count(args.train_characters),
            num_val_characters=count(args.val_characters),
        )
    except (FileNotFoundError, ValueError) as error:
        print(f"omniglot_folder.py: {error}", file=sys.stderr)
        raise SystemExit(2) from error

    pl.seed_everything(0)
    influence = MetaInfluence("trajectory")
    dm = MetaDataModule(
        splits.train, splits.val, splits.test, batch_size=5 if fast else 16, task_state=influence.task_state
    )
    model = MAML(
        ConvNet(1, 5, hidden=8 if fast else 64, image_size=28), inner_lr=0.4, outer_lr=1e-3, num_ways=5
    )
    trainer = pl.Trainer(
        log_every_n_steps=2,  # a few batches per epoch here: log every other step
        max_epochs=1 if fast else 10,
        callbacks=[influence],
        accelerator="auto",
        default_root_dir=args.output_dir,
        limit_val_batches=1,
        enable_progress_bar=not fast,
    )
    trainer.fit(model, datamodule=dm)
    result = influence.result
    print("most harmful tasks:", result.task_ids[result.order()[:5]].tolist())
    return influence


if __name__ == "__main__":
    main()
