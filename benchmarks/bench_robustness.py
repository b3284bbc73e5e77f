"""The robustness grid: the callback at its defaults, on runs it was not tuned for.

For every cell (task family x corrupted fraction x outer optimiser and learning rate x run length x seed), two
Lightning runs of the same MAML model from the same seed (paired):

* ``MetaInfluence(ground_truth=...)`` with no action: the end-of-run detection AUROC of the corrupted tasks
  (lowest scores flagged; computed here with scikit-learn from the final round's scores) and the meta-test
  accuracy *without pruning*;
* ``MetaInfluence(actions=[PruningPolicy()], ground_truth=...)``: pruning count and precision (share of the
  pruned tasks that are corrupted) and the meta-test accuracy *with pruning*.

With ``--task-if`` a third run per cell uses ``"task_if"`` at its defaults and counts failed rounds (non-finite
scores). Families: digits (5-way 1-shot, MLP 64-32-5) and Gaussian mixtures (``gaussian_mixture_splits``, MLP
16-32-5); corruption ``shuffle_query``; meta-test accuracy on held-out classes (one inner step). A run is
"over-long" when its reference loss ends more than 2% above its best (reported per cell).

Targets (issue: robust scores): AUROC >= 0.9 in every corrupted cell; pruning precision >= 0.85 on average and
>= 0.7 in the worst cell; accuracy with pruning >= without in >= 90% of corrupted cells and within 0.5 point on
clean cells; zero failed task-IF rounds.

Usage::

    python benchmarks/bench_robustness.py --quick   # 1 seed, 0/20% corruption, 2 recipes, 10/40 epochs (~10 min)
    python benchmarks/bench_robustness.py --full    # 3 seeds, 0/20/40%, 4 recipes, 10/60 epochs, task-IF runs
"""

from __future__ import annotations

import argparse
import itertools
import math
import tempfile
import time

import _common as C
import torch
from sklearn.metrics import roc_auc_score

from lightning_metaif.influence.tasks import Task
from lightning_metaif.meta.datasets import digits_splits, gaussian_mixture_splits
from lightning_metaif.meta.maml import MAML
from lightning_metaif.meta.noise import corrupt_tasks

RECIPES = {
    "sgd 0.5": ("sgd", 0.5),
    "sgd 0.2": ("sgd", 0.2),
    "adam 3e-3": ("adam", 3e-3),
    "adam 1e-3": ("adam", 1e-3),
}


def family(name: str, seed: int, num_tasks: int):
    if name == "digits":
        splits = digits_splits(num_train_tasks=num_tasks, num_val_tasks=20, num_test_tasks=50, seed=seed)
        return splits, lambda: torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5)
        )
    splits = gaussian_mixture_splits(
        num_train_tasks=num_tasks, num_val_tasks=20, num_test_tasks=50, seed=seed
    )
    return splits, lambda: torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5)
    )


def accuracy(maml: MAML, tasks) -> float:
    params = {k: v.detach() for k, v in maml.meta_parameters().items()}
    correct = []
    for i in range(len(tasks)):
        t = tasks[i]
        with torch.enable_grad():
            adapted = maml.adapt(params, Task(t.support_x, t.support_y, t.query_x, t.query_y))
        theta, _ = maml._unpack(adapted)
        with torch.no_grad():
            correct.append(float((maml._forward(theta, t.query_x).argmax(-1) == t.query_y).double().mean()))
    return sum(correct) / len(correct)


def one_run(splits, backbone, pool, corruption, recipe: str, epochs: int, seed: int, mode: str) -> dict:
    import lightning.pytorch as pl

    from lightning_metaif import MetaInfluence, PruningPolicy
    from lightning_metaif.meta.datamodule import MetaDataModule

    optimizer, lr = RECIPES[recipe]
    pl.seed_everything(seed, verbose=False)
    truth = corruption.task_ids.tolist()
    actions = [PruningPolicy()] if mode == "prune" else []
    influence = MetaInfluence(
        "task_if" if mode == "task_if" else "trajectory",
        actions=actions,
        ground_truth=truth or None,
        verbose=False,
        seed=seed,
    )
    dm = MetaDataModule(pool, splits.val, batch_size=10, seed=seed, task_state=influence.task_state)
    maml = MAML(backbone(), inner_lr=0.5, outer_lr=lr, optimizer=optimizer, num_ways=5)
    _, seconds = C.fit_quietly(
        maml, dm, max_epochs=epochs, callbacks=[influence], default_root_dir=tempfile.mkdtemp()
    )
    out: dict = {"seconds": seconds, "test_acc": accuracy(maml, splits.test.batch())}
    result = influence.result
    losses = [h.get("influence/reference_loss", math.nan) for h in influence.history]
    finite = [x for x in losses if math.isfinite(x)]
    out["rising"] = bool(finite) and finite[-1] > 1.02 * min(finite)
    if mode == "task_if":
        out["failed_rounds"] = sum(
            1 for h in influence.history if not math.isfinite(h.get("influence/score_median", 0.0))
        )
        out["rounds"] = len(influence.history)
        return out
    scored = (
        result.scored
        if getattr(result, "scored", None) is not None
        else torch.ones(len(result.task_ids), dtype=torch.bool)
    )
    if truth and mode == "score":
        ids, scores = result.task_ids[scored], result.scores[scored].double()
        positives = corruption.mask(ids)
        if 0 < int(positives.sum()) < len(ids) and torch.isfinite(scores).all():
            out["auroc"] = float(roc_auc_score(positives.numpy(), (-scores).numpy()))
    if mode == "prune":
        pruned = torch.tensor(sorted(influence.task_state.pruned), dtype=torch.long)
        out["pruned"] = len(pruned)
        out["precision"] = (
            float(corruption.mask(pruned).double().mean()) if len(pruned) and truth else math.nan
        )
        out["restored"] = sum(1 for d in influence.decisions if d.action == "restore")
    return out


def cell(
    fam: str, corrupt: float, recipe: str, epochs: int, seed: int, num_tasks: int, task_if: bool
) -> dict:
    splits, backbone = family(fam, seed, num_tasks)
    pool, corruption = corrupt_tasks(splits.train, corrupt, mode="shuffle_query", seed=seed)
    row = {"family": fam, "corrupt": corrupt, "recipe": recipe, "epochs": epochs, "seed": seed}
    plain = one_run(splits, backbone, pool, corruption, recipe, epochs, seed, "score")
    pruned = one_run(splits, backbone, pool, corruption, recipe, epochs, seed, "prune")
    row.update(
        auroc=plain.get("auroc", math.nan),
        rising=plain["rising"],
        acc_no_prune=plain["test_acc"],
        acc_prune=pruned["test_acc"],
        delta_acc=pruned["test_acc"] - plain["test_acc"],
        pruned=pruned["pruned"],
        precision=pruned["precision"],
        restored=pruned["restored"],
        seconds=plain["seconds"] + pruned["seconds"],
    )
    if task_if:
        tif = one_run(splits, backbone, pool, corruption, recipe, epochs, seed, "task_if")
        row.update(task_if_failed=tif["failed_rounds"], task_if_rounds=tif["rounds"])
    return row


def mean(values) -> float:
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


def summarise(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    keys = sorted({(r["family"], r["corrupt"], r["recipe"], r["epochs"]) for r in rows}, key=str)
    cells = []
    for fam, corrupt, recipe, epochs in keys:
        sub = [
            r
            for r in rows
            if (r["family"], r["corrupt"], r["recipe"], r["epochs"]) == (fam, corrupt, recipe, epochs)
        ]
        entry = {
            "family": fam,
            "corrupt": f"{corrupt:.0%}",
            "recipe": recipe,
            "epochs": epochs,
            "seeds": len(sub),
            "rising": sum(r["rising"] for r in sub),
            "auroc": mean(r["auroc"] for r in sub),
            "auroc_min": min((r["auroc"] for r in sub if math.isfinite(r["auroc"])), default=math.nan),
            "pruned": mean(r["pruned"] for r in sub),
            "precision": mean(r["precision"] for r in sub),
            "acc_no_prune": mean(r["acc_no_prune"] for r in sub),
            "acc_prune": mean(r["acc_prune"] for r in sub),
            "delta_acc": mean(r["delta_acc"] for r in sub),
        }
        if "task_if_failed" in sub[0]:
            entry["task_if_failed"] = sum(r["task_if_failed"] for r in sub)
        cells.append(entry)
    corrupted = [r for r in rows if r["corrupt"] > 0]
    clean = [r for r in rows if r["corrupt"] == 0]
    precisions = [r["precision"] for r in corrupted if math.isfinite(r["precision"])]
    targets = [
        {
            "target": "end-of-run AUROC >= 0.9 in every corrupted cell",
            "result": f"mean {mean(r['auroc'] for r in corrupted):.3f}, worst run "
            f"{min((r['auroc'] for r in corrupted), default=math.nan):.3f}, "
            f"{sum(r['auroc'] >= 0.9 for r in corrupted)}/{len(corrupted)} runs >= 0.9",
        },
        {
            "target": "pruning precision >= 0.85 on average, >= 0.7 in the worst cell",
            "result": f"mean {mean(precisions):.3f}, worst {min(precisions, default=math.nan):.3f} "
            f"({len(precisions)} runs that pruned, of {len(corrupted)})",
        },
        {
            "target": "accuracy with pruning >= without in >= 90% of corrupted cells",
            "result": f"{sum(r['delta_acc'] >= 0 for r in corrupted)}/{len(corrupted)} runs",
        },
        {
            "target": "within 0.5 point on clean cells",
            "result": f"{sum(abs(r['delta_acc']) <= 0.005 for r in clean)}/{len(clean)} runs, "
            f"mean change {100 * mean(r['delta_acc'] for r in clean):+.2f} points, "
            f"{sum(r['pruned'] > 0 for r in clean)} runs pruned something",
        },
    ]
    if rows and "task_if_failed" in rows[0]:
        targets.append(
            {
                "target": "zero failed task-IF rounds",
                "result": f"{sum(r['task_if_failed'] for r in rows)} of {sum(r['task_if_rounds'] for r in rows)}",
            }
        )
    return cells, targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 0/20%%, 2 recipes, 10/40 epochs")
    parser.add_argument(
        "--full", action="store_true", help="3 seeds, 0/20/40%%, 4 recipes, 10/60 epochs, task-IF"
    )
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    C.set_threads(args.threads)
    if args.full:
        grid = dict(
            corrupt=(0.0, 0.2, 0.4), recipes=tuple(RECIPES), lengths=(10, 60), seeds=(0, 1, 2), task_if=True
        )
    else:
        grid = dict(
            corrupt=(0.0, 0.2), recipes=("sgd 0.5", "adam 3e-3"), lengths=(10, 40), seeds=(0,), task_if=False
        )
    env = C.environment()
    rows = []
    start = time.perf_counter()
    for fam, corrupt, recipe, epochs, seed in itertools.product(
        ("digits", "gaussian"), grid["corrupt"], grid["recipes"], grid["lengths"], grid["seeds"]
    ):
        row = cell(fam, corrupt, recipe, epochs, seed, args.tasks, grid["task_if"])
        rows.append(row)
        print(C.table([row], floatfmt=".3f"), f"({time.perf_counter() - start:.0f} s so far)", flush=True)
    cells, targets = summarise(rows)
    print("\nPer cell (mean over seeds; rising = runs whose reference loss ended > 2% above its best)")
    print(C.table(cells, floatfmt=".3f"))
    print("\nTargets")
    print(C.table(targets))
    name = "bench_robustness" if args.full else "bench_robustness_quick"
    C.save(name, {"environment": env, "grid": grid, "rows": rows, "cells": cells, "targets": targets})
    plt = C.figure(name)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    corrupted = [c for c in cells if c["corrupt"] != "0%"]
    labels = [f"{c['family'][:3]} {c['corrupt']} {c['recipe']} {c['epochs']}ep" for c in corrupted]
    axes[0].barh(labels, [c["auroc"] for c in corrupted])
    axes[0].axvline(0.9, color="red", ls="--", lw=1)
    axes[0].set_xlim(0, 1)
    axes[0].set_xlabel("end-of-run AUROC (corrupted tasks)")
    axes[0].tick_params(axis="y", labelsize=6)
    labels = [f"{c['family'][:3]} {c['corrupt']} {c['recipe']} {c['epochs']}ep" for c in cells]
    axes[1].barh(labels, [100 * c["delta_acc"] for c in cells])
    axes[1].axvline(0, color="black", lw=1)
    axes[1].set_xlabel("accuracy with - without pruning (points)")
    axes[1].tick_params(axis="y", labelsize=6)
    C.save_figure(plt, name)


if __name__ == "__main__":
    main()
