"""Find and prune corrupted tasks while meta-training MAML on digits, then compare with no pruning.

The library-level version of ``lightning-metaif demo``: 5-way 1-shot tasks from scikit-learn's digits, a share
of the training tasks with random labels, MetaInfluence scoring every task each epoch (TracIn along the
training path) and a PruningPolicy removing the most harmful ones from the next epoch on.

    python examples/noisy_digits_pruning.py                 # measured times: docs/times.md
    python examples/noisy_digits_pruning.py --noise 0.3
    python examples/noisy_digits_pruning.py --fast          # CI; or METAIF_EXAMPLES_FAST=1
"""

import argparse
import os

import lightning.pytorch as pl
import torch

from lightning_metaif import MAML, MetaDataModule, MetaInfluence, PruningPolicy, corrupt_tasks, digits_splits
from lightning_metaif.cli import FlatMLP
from lightning_metaif.quiet import quiet_lightning


def train(splits, train_pool, corrupted, *, prune, epochs, output_dir, seed=0):
    pl.seed_everything(seed)
    influence = MetaInfluence(
        "trajectory",
        actions=[PruningPolicy(fraction=0.2, warmup_rounds=max(1, epochs // 8))] if prune else None,
        ground_truth=corrupted,  # only for the detection metrics
        verbose=False,
    )
    # task_state: the datamodule's sampler skips the tasks the callback prunes, from the next epoch on
    dm = MetaDataModule(train_pool, splits.val, splits.test, batch_size=10, task_state=influence.task_state)
    model = MAML(FlatMLP(64, 5, hidden=(128, 128)), inner_lr=1.0, outer_lr=3e-3, num_ways=5)
    trainer = pl.Trainer(
        log_every_n_steps=2,  # a few batches per epoch here: log every other step
        max_epochs=epochs,
        callbacks=[influence],
        accelerator="cpu",
        default_root_dir=output_dir,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.fit(model, datamodule=dm)
    accuracy = trainer.test(model, datamodule=dm, verbose=False)[0]["test/accuracy"]
    return influence, accuracy


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--noise", type=float, default=0.2, help="share of training tasks with random labels")
    parser.add_argument("--fast", action="store_true", help="tiny run for CI")
    parser.add_argument("--output-dir", default="runs/noisy_digits_pruning")
    args = parser.parse_args(argv)
    quiet_lightning()  # no Lightning tips or warnings you cannot act on (see lightning_metaif.quiet)
    fast = args.fast or os.environ.get("METAIF_EXAMPLES_FAST") == "1"
    torch.set_num_threads(1)  # tiny networks: one thread is fastest

    splits = digits_splits(
        num_train_tasks=40 if fast else 100,
        num_val_tasks=10 if fast else 20,
        num_test_tasks=40 if fast else 200,
    )
    train_pool, corruption = corrupt_tasks(splits.train, args.noise, mode="random_labels")
    corrupted = corruption.task_ids.tolist()
    epochs = 4 if fast else 40

    pruned_run, acc_pruned = train(
        splits,
        train_pool,
        corrupted,
        prune=True,
        epochs=epochs,
        output_dir=os.path.join(args.output_dir, "with_pruning"),
    )
    baseline, acc_baseline = train(
        splits,
        train_pool,
        corrupted,
        prune=False,
        epochs=epochs,
        output_dir=os.path.join(args.output_dir, "without_pruning"),
    )

    pruned = pruned_run.task_state.pruned
    metrics = baseline.history[-1]
    print(
        f"detection AUROC (no pruning, last round): {metrics['influence/auroc']:.3f}, "
        f"recall@20%: {metrics['influence/recall@20%']:.2f}"
    )
    print(f"pruned {len(pruned)} tasks, {len(pruned & set(corrupted))} of them corrupted")
    print(f"meta-test accuracy: without pruning {acc_baseline:.1%}, with pruning {acc_pruned:.1%}")
    return acc_baseline, acc_pruned


if __name__ == "__main__":
    main()
