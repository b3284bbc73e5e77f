"""Why does pruning the corrupted digits tasks cost meta-test accuracy? Paired runs that separate the causes.

For digits (5-way 1-shot, MLP 64-32-5, 100 training tasks, 20% ``shuffle_query``), outer SGD 0.5 / 10 epochs
and Adam 3e-3 / 40 epochs, seeds 0-2, the same model from the same seed trained in a real Lightning ``Trainer``
under these conditions:

* ``none``: ``MetaInfluence`` with no action (the grid's "without pruning" run);
* ``reshuffled``: the same, with a different sampler seed (only the order of the tasks changes): the noise
  floor of a paired difference;
* ``policy``: ``actions=[PruningPolicy()]`` (the grid's "with pruning" run);
* ``oracle``: no action, but exactly the corrupted tasks are pruned at the end of the epoch in which the
  policy first pruned (same round, perfect precision);
* ``oracle_start``: the corrupted tasks pruned before the first epoch (the sampler keeps the number of steps);
* ``never_had``: a pool of the 80 clean tasks only (fewer steps per epoch);
* ``clean_labels``: the same 100 tasks with their true labels (does the corruption hurt at all?).

Each run reports meta-test accuracy and meta-test query loss (cross-entropy after one inner step, 50 tasks of
held-out classes), the final reference (validation) loss, the optimiser steps taken and the restores.

With ``--guard`` it measures the rollback guard instead (``results/bench_pruning_guard.json``): the automatic
tolerance (default), the former fixed one (``rollback_tolerance=0.02, rollback_rounds=1``) and no guard, on

* ``grid``: digits 20% ``shuffle_query``, outer SGD 0.5, 10 epochs (the grid's noisiest reference loss);
* ``forced``: digits 50% ``shuffle_query``, outer SGD 0.5, 6 epochs, a policy forced to prune the 50
  highest-scoring tasks (the clean half) after 2 warm-up rounds: a prune the guard should undo;
* ``demo``: the README demo's run (digits 20% ``random_labels``, MLP 64-128-128-5, inner lr 1.0, outer Adam 3e-3,
  40 epochs, ``PruningPolicy(fraction=0.2, warmup_rounds=5, max_fraction_per_round=0.1)``), seed 1 by default,
  without the store and sample scores; meta-test on 200 tasks.

Usage::

    python benchmarks/bench_pruning_accuracy.py            # 3 seeds x 2 recipes x 7 conditions
    python benchmarks/bench_pruning_accuracy.py --seeds 0  # one seed
    python benchmarks/bench_pruning_accuracy.py --guard    # the rollback guard (grid seeds 0-5, forced 0-2, demo 1)
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time

import _common as C
import torch
from bench_robustness import RECIPES, family

from lightning_metaif.meta.maml import MAML
from lightning_metaif.meta.noise import corrupt_tasks

CONDITIONS = ("none", "reshuffled", "policy", "oracle", "oracle_start", "never_had", "clean_labels")
SETTINGS = (("sgd 0.5", 10), ("adam 3e-3", 40))


class _Subset:
    """The tasks of ``pool`` with the given ids (keeps their ids, so the sampler and callback see them)."""

    def __init__(self, pool, task_ids: list[int]) -> None:
        self.pool, self.positions = pool, [pool.position(t) for t in task_ids]
        self.task_ids = torch.tensor(task_ids, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, position: int):
        return self.pool[self.positions[position]]


def run(splits, backbone, condition: str, recipe: str, epochs: int, seed: int, prune_epoch: int | None):
    import lightning.pytorch as pl

    from lightning_metaif import MetaInfluence, PruningPolicy
    from lightning_metaif.meta.datamodule import MetaDataModule

    pool, corruption = corrupt_tasks(splits.train, 0.2, mode="shuffle_query", seed=seed)
    bad = corruption.task_ids.tolist()
    if condition == "clean_labels":
        pool = splits.train
    elif condition == "never_had":
        pool = _Subset(pool, [t for t in pool.task_ids.tolist() if t not in set(bad)])
    optimizer, lr = RECIPES[recipe]
    pl.seed_everything(seed, verbose=False)
    influence = MetaInfluence(
        "trajectory",
        actions=[PruningPolicy()] if condition == "policy" else [],
        ground_truth=bad if condition not in ("clean_labels", "never_had") else None,
        verbose=False,
        seed=seed,
    )
    if condition == "oracle_start":
        influence.task_state.prune(bad)
    callbacks: list = [influence]
    if condition == "oracle":

        class Oracle(pl.Callback):
            def on_train_epoch_end(self, trainer, module) -> None:
                if trainer.current_epoch == prune_epoch:
                    influence.task_state.prune(bad)

        callbacks.append(Oracle())
    sampler_seed = seed + 1000 if condition == "reshuffled" else seed
    dm = MetaDataModule(pool, splits.val, batch_size=10, seed=sampler_seed, task_state=influence.task_state)
    maml = MAML(backbone(), inner_lr=0.5, outer_lr=lr, optimizer=optimizer, num_ways=5)
    trainer, seconds = C.fit_quietly(
        maml, dm, max_epochs=epochs, callbacks=callbacks, default_root_dir=tempfile.mkdtemp()
    )
    acc, loss = C.meta_test(maml, splits.test.batch())
    refs = [h.get("influence/reference_loss", math.nan) for h in influence.history]
    prunes = [d for d in influence.decisions if d.action == "prune"]
    return {
        "condition": condition,
        "recipe": recipe,
        "epochs": epochs,
        "seed": seed,
        "test_acc": acc,
        "test_loss": loss,
        "ref_loss_end": refs[-1] if refs else math.nan,
        "ref_loss_best": min((x for x in refs if math.isfinite(x)), default=math.nan),
        "steps": int(trainer.global_step),
        "pruned": len(influence.task_state.pruned),
        "first_prune_epoch": prunes[0].epoch if prunes else None,
        "restores": sum(1 for d in influence.decisions if d.action == "restore"),
        "seconds": seconds,
    }


GUARDS = {
    "auto": {},
    "fixed 2%, 1 round": {"rollback_tolerance": 0.02, "rollback_rounds": 1},
    "off": {"rollback_tolerance": None},
}


def guard_run(setting: str, guard: str, seed: int) -> dict:
    """One run of the guard comparison (see the module docstring for the settings)."""
    import dataclasses

    import lightning.pytorch as pl

    from lightning_metaif import MetaInfluence, PruningPolicy
    from lightning_metaif.cli.demo import FlatMLP
    from lightning_metaif.meta.datamodule import MetaDataModule
    from lightning_metaif.meta.datasets import digits_splits

    class Inverted(PruningPolicy):
        def decide_round(self, round, state, **kwargs):
            return super().decide_round(dataclasses.replace(round, scores=-round.scores), state, **kwargs)

    extra = GUARDS[guard]
    if setting == "demo":
        splits = digits_splits(
            ways=5, shots=1, queries=15, num_train_tasks=100, num_val_tasks=20, num_test_tasks=200, seed=seed
        )
        pool, corruption = corrupt_tasks(splits.train, 0.2, mode="random_labels", seed=seed)
        policy = PruningPolicy(fraction=0.2, warmup_rounds=5, max_fraction_per_round=0.1, **extra)
        epochs = 40

        def build() -> MAML:
            return MAML(FlatMLP(64, 5, hidden=(128, 128)), inner_lr=1.0, outer_lr=3e-3, num_ways=5)

    else:
        splits, backbone = family("digits", seed, 100)
        fraction = 0.5 if setting == "forced" else 0.2
        pool, corruption = corrupt_tasks(splits.train, fraction, mode="shuffle_query", seed=seed)
        if setting == "forced":
            policy = Inverted(
                fraction=0.5,
                max_fraction_per_round=0.5,
                warmup_rounds=2,
                stable_rounds=1,
                margin=None,
                **extra,
            )
            epochs = 6
        else:
            policy, epochs = PruningPolicy(**extra), 10

        def build() -> MAML:
            return MAML(backbone(), inner_lr=0.5, outer_lr=0.5, optimizer="sgd", num_ways=5)

    pl.seed_everything(seed, verbose=False)
    truth = set(corruption.task_ids.tolist())
    influence = MetaInfluence(
        "trajectory", actions=[policy], ground_truth=sorted(truth), verbose=False, seed=seed
    )
    dm = MetaDataModule(pool, splits.val, batch_size=10, seed=seed, task_state=influence.task_state)
    model = build()  # after seeding, in the same order as bench_robustness.one_run
    _, seconds = C.fit_quietly(
        model, dm, max_epochs=epochs, callbacks=[influence], default_root_dir=tempfile.mkdtemp()
    )
    acc, loss = C.meta_test(model, splits.test.batch())
    prunes = [d for d in influence.decisions if d.action == "prune"]
    restores = [d for d in influence.decisions if d.action == "restore"]
    refs = [h.get("influence/reference_loss", math.nan) for h in influence.history]
    ever = sorted({t for d in prunes for t in d.task_ids})
    return {
        "setting": setting,
        "guard": guard,
        "seed": seed,
        "pruned_ever": len(ever),
        "pruned_corrupted": sum(t in truth for t in ever),
        "restored": sum(len(d.task_ids) for d in restores),
        "restored_corrupted": sum(t in truth for d in restores for t in d.task_ids),
        "restore_epochs": [d.epoch for d in restores],
        "pruned_end": len(influence.task_state.pruned),
        "test_acc": acc,
        "test_loss": loss,
        "ref_losses": refs,
        "ref_mean_last_half": statistics.fmean(refs[len(refs) // 2 :]),
        "restore_reasons": [d.reason for d in restores],
        "seconds": seconds,
    }


def guard_main(args) -> None:
    plan = (
        [("grid", s) for s in range(6)]
        + [("forced", s) for s in range(3)]
        + [("demo", s) for s in args.demo_seeds]
    )
    env = C.environment()
    rows = []
    start = time.perf_counter()
    for setting, seed in plan:
        for guard in GUARDS:
            if setting == "forced" and guard == "fixed 2%, 1 round":
                continue
            row = guard_run(setting, guard, seed)
            rows.append(row)
            show = {k: v for k, v in row.items() if k not in ("ref_losses", "restore_reasons")}
            print(
                C.table([show], floatfmt=".3f"), f"({time.perf_counter() - start:.0f} s so far)", flush=True
            )
    summary = []
    for setting in ("grid", "forced", "demo"):
        for guard in GUARDS:
            sub = [r for r in rows if r["setting"] == setting and r["guard"] == guard]
            if not sub:
                continue
            summary.append(
                {
                    "setting": setting,
                    "guard": guard,
                    "runs": len(sub),
                    "runs_restoring": sum(r["restored"] > 0 for r in sub),
                    "restored": sum(r["restored"] for r in sub),
                    "restored_corrupted": sum(r["restored_corrupted"] for r in sub),
                    "pruned_end": statistics.fmean(r["pruned_end"] for r in sub),
                    "test_acc": statistics.fmean(r["test_acc"] for r in sub),
                    "ref_mean_last_half": statistics.fmean(r["ref_mean_last_half"] for r in sub),
                }
            )
    print("\nGuards (sums / means over seeds)")
    print(C.table(summary, floatfmt=".3f"))
    C.save("bench_pruning_guard", {"environment": env, "rows": rows, "summary": summary})


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for recipe, epochs in SETTINGS:
        base = {r["seed"]: r for r in rows if r["recipe"] == recipe and r["condition"] == "none"}
        for condition in CONDITIONS:
            sub = [r for r in rows if r["recipe"] == recipe and r["condition"] == condition]
            if not sub:
                continue
            d_acc = [100 * (r["test_acc"] - base[r["seed"]]["test_acc"]) for r in sub if r["seed"] in base]
            d_loss = [r["test_loss"] - base[r["seed"]]["test_loss"] for r in sub if r["seed"] in base]
            out.append(
                {
                    "recipe": f"{recipe} / {epochs} ep",
                    "condition": condition,
                    "seeds": len(sub),
                    "test_acc": statistics.fmean(r["test_acc"] for r in sub),
                    "d_acc_pts": statistics.fmean(d_acc) if d_acc else math.nan,
                    "d_acc_per_seed": " ".join(f"{x:+.1f}" for x in d_acc),
                    "test_loss": statistics.fmean(r["test_loss"] for r in sub),
                    "d_loss": statistics.fmean(d_loss) if d_loss else math.nan,
                    "ref_end": statistics.fmean(r["ref_loss_end"] for r in sub),
                    "ref_best": statistics.fmean(r["ref_loss_best"] for r in sub),
                    "steps": statistics.fmean(r["steps"] for r in sub),
                    "pruned": statistics.fmean(r["pruned"] for r in sub),
                    "restores": sum(r["restores"] for r in sub),
                }
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="bench_pruning_accuracy")
    parser.add_argument("--guard", action="store_true", help="measure the rollback guard instead")
    parser.add_argument("--demo-seeds", type=int, nargs="+", default=[1])
    args = parser.parse_args()
    C.set_threads(args.threads)
    if args.guard:
        guard_main(args)
        return
    env = C.environment()
    rows: list[dict] = []
    start = time.perf_counter()
    for recipe, epochs in SETTINGS:
        for seed in args.seeds:
            splits, backbone = family("digits", seed, 100)
            first = None
            for condition in ("policy", *[c for c in args.conditions if c != "policy"]):
                if condition not in args.conditions and condition != "policy":
                    continue
                if condition == "oracle" and first is None:
                    continue  # the policy never pruned: no round to copy
                row = run(splits, backbone, condition, recipe, epochs, seed, first)
                if condition == "policy":
                    first = row["first_prune_epoch"]
                rows.append(row)
                print(
                    C.table([row], floatfmt=".3f"),
                    f"({time.perf_counter() - start:.0f} s so far)",
                    flush=True,
                )
    table = summarise(rows)
    print("\nMeans over seeds; d_* = paired difference to `none` (same seed)")
    print(C.table(table, floatfmt=".3f"))
    C.save(args.name, {"environment": env, "rows": rows, "summary": table})


if __name__ == "__main__":
    main()
