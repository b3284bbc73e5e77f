"""Downstream value of the scores: prune tasks, retrain, measure meta-test accuracy (Ren et al.'s protocol).

Offline: a digits 5-way 1-shot pool with 20% of the tasks corrupted (``shuffle_query``); MAML (small MLP 64-32-5,
one inner step, Adam, batch 16) trained for E epochs in a bare loop; each estimator scores the pool at the end;
the 20% / 40% lowest-scoring tasks are removed and the model is retrained from scratch (same seed) on the rest.
Baselines: the full (corrupted) pool, random removal (3 seeds, mean), and the oracle that removes exactly the
corrupted tasks. Reported: meta-test accuracy (held-out classes, adapted with one inner step) and the wall time of
scoring + retraining.

Online: the ``MetaInfluence`` callback (trajectory mode, ``PruningPolicy(fraction=0.2)``) prunes during one
Lightning run, versus the same run without it; meta-test accuracy and wall time.

Usage::

    python benchmarks/bench_pruning.py          # 100 tasks, 8 epochs
    python benchmarks/bench_pruning.py --full   # 400 tasks, 15 epochs
"""

from __future__ import annotations

import argparse
import tempfile
import time

import _common as C
import torch
from bench_detection import small_mlp, train

from lightning_metaif.influence.estimators import task_influence
from lightning_metaif.meta.datasets import digits_splits
from lightning_metaif.meta.maml import MAML
from lightning_metaif.meta.noise import corrupt_tasks


def offline(splits, epochs: int) -> tuple[list[dict], dict]:
    pool, corruption = corrupt_tasks(splits.train, 0.2, mode="shuffle_query", seed=0)
    batch, ref, test = pool.batch(), splits.val.batch(), splits.test.batch()
    corrupted = corruption.mask(batch.task_ids)
    t0 = time.perf_counter()
    maml, params, checkpoints = train(batch, epochs)
    base_seconds = time.perf_counter() - t0
    rows = [
        {
            "method": "full pool (no removal)",
            "removed": "0%",
            "test_acc": C.meta_test(maml, test, params)[0],
            "corrupted_removed": 0.0,
            "seconds": base_seconds,
        }
    ]
    estimators = {
        "task_if/cg": dict(
            estimator="task_if", solver="cg", damping=0.1, solver_options={"max_iterations": 30}
        ),
        "direct_if/cg": dict(
            estimator="direct_if", solver="cg", damping=0.1, solver_options={"max_iterations": 30}
        ),
        "tracin (epoch ckpts)": dict(estimator="tracin", checkpoints=checkpoints),
        "ensemble": dict(estimator="ensemble", noise_copies=5, noise_std=0.01),
    }
    scores = {}
    errors = {}
    for name, cfg in estimators.items():
        t = time.perf_counter()
        try:
            result = task_influence(maml, params, batch, ref, chunk_size=50, **cfg)
        except Exception as error:  # noqa: BLE001 - a failed solve is a result, reported
            errors[name] = f"{type(error).__name__}: {error}"[:300]
            print(f"  {name} failed: {errors[name]}", flush=True)
            continue
        scores[name] = (result.scores, time.perf_counter() - t)
    m = len(batch)

    def retrain(keep: torch.Tensor, label: str, removed: str, score_seconds: float) -> dict:
        t = time.perf_counter()
        mm, pp, _ = train(batch[keep], epochs)
        return {
            "method": label,
            "removed": removed,
            "test_acc": C.meta_test(mm, test, pp)[0],
            "corrupted_removed": float(corrupted[~torch.isin(torch.arange(m), keep)].sum() / corrupted.sum()),
            "seconds": score_seconds + time.perf_counter() - t,
        }

    keep_oracle = torch.nonzero(~corrupted).flatten()
    rows.append(retrain(keep_oracle, "oracle (remove the corrupted)", "20%", 0.0))
    for frac in (0.2, 0.4):
        n = round(frac * m)
        for name, (s, secs) in scores.items():
            keep = torch.argsort(s, descending=True)[: m - n].sort().values
            rows.append(retrain(keep, name, f"{frac:.0%}", secs))
            print(C.table(rows[-1:]), flush=True)
        rand = [
            retrain(
                torch.randperm(m, generator=torch.Generator().manual_seed(s))[: m - n].sort().values,
                "random",
                f"{frac:.0%}",
                0.0,
            )
            for s in range(3)
        ]
        rows.append(
            {
                "method": "random (mean of 3)",
                "removed": f"{frac:.0%}",
                "test_acc": sum(r["test_acc"] for r in rand) / 3,
                "corrupted_removed": sum(r["corrupted_removed"] for r in rand) / 3,
                "seconds": sum(r["seconds"] for r in rand) / 3,
            }
        )
    return rows, {"scoring_seconds": {k: v[1] for k, v in scores.items()}, "errors": errors}


def online(splits, epochs: int) -> list[dict]:
    import lightning.pytorch as pl

    from lightning_metaif.actions import PruningPolicy
    from lightning_metaif.callback import MetaInfluence
    from lightning_metaif.config import GradientStoreConfig
    from lightning_metaif.meta.datamodule import MetaDataModule

    pool, corruption = corrupt_tasks(splits.train, 0.2, mode="shuffle_query", seed=0)
    test = splits.test.batch()
    rows = []
    for with_cb in (False, True):
        pl.seed_everything(0, verbose=False)
        torch.manual_seed(0)
        cbs, influence = [], None
        if with_cb:
            influence = MetaInfluence(
                "trajectory",
                actions=[PruningPolicy(fraction=0.2, warmup_rounds=1, max_fraction_per_round=0.1)],
                ground_truth=corruption.task_ids.tolist(),
                verbose=False,
                store=GradientStoreConfig(dirpath=tempfile.mkdtemp()),
            )
            cbs.append(influence)
        dm = MetaDataModule(
            pool,
            splits.val,
            batch_size=16,
            seed=0,
            task_state=None if influence is None else influence.task_state,
        )
        maml = MAML(small_mlp(), inner_lr=0.5, outer_lr=5e-3, num_ways=5)
        _, secs = C.fit_quietly(
            maml, dm, max_epochs=epochs, callbacks=cbs, default_root_dir=tempfile.mkdtemp()
        )
        row = {
            "method": "online pruning (trajectory)" if with_cb else "no callback",
            "test_acc": C.meta_test(maml, test, maml.meta_parameters())[0],
            "seconds": secs,
        }
        if influence is not None:
            pruned = torch.tensor(sorted(influence.task_state.pruned), dtype=torch.long)
            row["pruned"] = len(pruned)
            row["pruned_precision"] = (
                float(corruption.mask(pruned).double().mean()) if len(pruned) else float("nan")
            )
            row["corrupted_removed"] = (
                float(corruption.mask(pruned).sum() / len(corruption.task_ids)) if len(pruned) else 0.0
            )
        rows.append(row)
        print(C.table([row]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    C.set_threads(args.threads)
    m, epochs = (400, 15) if args.full else (100, 8)
    env = C.environment()
    splits = digits_splits(num_train_tasks=m, num_val_tasks=20, num_test_tasks=50, seed=0)
    rows, extra = offline(splits, epochs)
    online_rows = online(splits, epochs)
    print(
        f"\nOffline pruning: {m} digits tasks (20% corrupted), {epochs} epochs, retrain from scratch, 50 test tasks"
    )
    print(C.table(rows))
    print("\nOnline pruning during one Lightning run")
    print(C.table(online_rows))
    C.save(
        "bench_pruning",
        {"environment": env, "num_tasks": m, "epochs": epochs, "rows": rows, "online": online_rows, **extra},
    )
    plt = C.figure("bench_pruning")
    fig, ax = plt.subplots(figsize=(8, 3.8))
    labels = [f"{r['method']} ({r['removed']})" for r in rows]
    ax.barh(labels, [r["test_acc"] for r in rows])
    ax.set_xlabel("meta-test accuracy")
    ax.tick_params(axis="y", labelsize=7)
    C.save_figure(plt, "bench_pruning")


if __name__ == "__main__":
    main()
