"""Training-time overhead of the ``MetaInfluence`` callback, per mode.

MAML (small MLP 64-32-5, one inner step, Adam) on a digits 5-way 1-shot pool, trained with a real Lightning
``Trainer`` with and without the callback; runs alternate (baseline, callback, baseline, callback, ...) with the
same seeds so that load drift on a shared machine hits both alike. Reported per mode: median wall time of
``trainer.fit`` with / without the callback (ratio = amortised overhead with one scoring round per epoch), the
callback's own time split into per-step tracing and per-round scoring, the ratio without the rounds (tracing
only), and the gradient store size on disk after the run. Target: trajectory <= 1.05.

Usage::

    python benchmarks/bench_overhead.py          # 200 tasks, 3 epochs, 3 pairs per mode
    python benchmarks/bench_overhead.py --full   # 1000 tasks, 5 epochs, 5 pairs per mode
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import _common as C
import lightning.pytorch as pl
import torch

from lightning_metaif.callback import MetaInfluence
from lightning_metaif.config import GradientStoreConfig
from lightning_metaif.estimators import TaskIF
from lightning_metaif.influence.solvers import CG
from lightning_metaif.meta.datamodule import MetaDataModule
from lightning_metaif.meta.datasets import digits_splits
from lightning_metaif.meta.maml import MAML

MODES = ("trajectory", "checkpoints", "task_if", "ensemble")


def small_mlp(ways: int = 5) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, ways)
    )


def dir_size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def one_run(splits, args, mode: str | None, workdir: str) -> dict:
    pl.seed_everything(0, verbose=False)
    torch.manual_seed(0)
    influence = None
    callbacks = []
    if mode is not None:
        estimator = TaskIF(solver=CG(max_iterations=args.cg_iterations)) if mode == "task_if" else mode
        influence = MetaInfluence(
            estimator,
            store=None
            if args.no_store
            else GradientStoreConfig(
                projection_dim=args.projection_dim,
                projection=args.projection,
                dirpath=os.path.join(workdir, "metaif"),
                trajectory=args.store_trajectory,
            ),
            verbose=False,
        )
        callbacks.append(influence)
    dm = MetaDataModule(
        splits.train,
        splits.val,
        batch_size=16,
        seed=0,
        task_state=None if influence is None else influence.task_state,
    )
    maml = MAML(small_mlp(), inner_lr=0.5, outer_lr=5e-3, num_ways=5)
    trainer, seconds = C.fit_quietly(
        maml, dm, max_epochs=args.epochs, callbacks=callbacks, default_root_dir=workdir
    )
    out = {"seconds": seconds, "steps": trainer.global_step}
    if influence is not None:
        out.update(
            rounds=influence.rounds,
            trace_seconds=influence.timings["trace_seconds"],
            round_seconds=influence.timings["round_seconds"],
            store_bytes=dir_size(os.path.join(workdir, "metaif", "store")),
            files_bytes=dir_size(os.path.join(workdir, "metaif")),
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--modes", nargs="*", default=list(MODES))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--projection-dim", type=int, default=1024, help="0: store unprojected gradients")
    parser.add_argument(
        "--store-trajectory", action="store_true", help="trajectory mode also writes each step to the store"
    )
    parser.add_argument("--tag", default="", help="suffix of the result files (keep several runs)")
    parser.add_argument(
        "--projection", default="sjlt", help="projection kind of the store (sjlt, rademacher)"
    )
    parser.add_argument("--no-store", action="store_true", help="run the callback without a gradient store")
    args = parser.parse_args()
    C.set_threads(args.threads)
    args.pool, args.epochs, args.pairs = (1000, 5, 5) if args.full else (200, 3, 3)
    args.projection_dim, args.cg_iterations = (args.projection_dim or None), 20
    name = "bench_overhead" + (f"_{args.tag}" if args.tag else "")
    env = C.environment()
    splits = digits_splits(num_train_tasks=args.pool, num_val_tasks=20, num_test_tasks=10, seed=0)
    num_params = sum(p.numel() for p in small_mlp().parameters())
    rows, raw = [], {}
    tmp = tempfile.mkdtemp(prefix="bench_overhead_")
    try:
        one_run(splits, args, None, os.path.join(tmp, "warm"))  # warm-up (imports, first vmap trace)
        for mode in args.modes:
            base, withcb = [], []
            for pair in range(args.pairs):
                for m, bucket in ((None, base), (mode, withcb)):
                    work = os.path.join(tmp, f"{mode}_{pair}_{m}")
                    bucket.append(one_run(splits, args, m, work))
                    shutil.rmtree(work, ignore_errors=True)
            t0 = C.median([r["seconds"] for r in base])
            t1 = C.median([r["seconds"] for r in withcb])
            rounds = withcb[0]["rounds"]
            per_round = C.median([r["round_seconds"] / max(1, r["rounds"]) for r in withcb])
            trace = C.median([r["trace_seconds"] for r in withcb])
            steps = withcb[0]["steps"]
            rows.append(
                {
                    "mode": mode,
                    "without_s": t0,
                    "with_s": t1,
                    "ratio": t1 / t0,
                    "ratio_min_pair": min(w["seconds"] / b["seconds"] for w, b in zip(withcb, base)),
                    "rounds": rounds,
                    "per_round_s": per_round,
                    "trace_ms_per_step": 1000 * trace / max(1, steps),
                    "ratio_without_rounds": (t1 - rounds * per_round) / t0,
                    "store_MiB": withcb[0]["store_bytes"] / 2**20,
                }
            )
            raw[mode] = {"without": base, "with": withcb}
            print(C.table(rows[-1:]), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"\nMetaInfluence overhead: digits pool of {args.pool} tasks, MLP ({num_params} params), batch 16, "
        f"{args.epochs} epochs, one round per epoch, projection d={args.projection_dim}, float16 store"
    )
    print(C.table(rows))
    C.save(
        name,
        {"environment": env, "config": vars(args), "num_params": num_params, "rows": rows, "raw": raw},
    )
    plt = C.figure(name)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([r["mode"] for r in rows], [r["ratio"] for r in rows], label="with rounds (amortised)")
    ax.bar(
        [r["mode"] for r in rows], [r["ratio_without_rounds"] for r in rows], width=0.4, label="tracing only"
    )
    ax.axhline(1.05, color="red", ls="--", label="target 1.05 (trajectory)")
    ax.axhline(1.0, color="black", lw=0.5)
    ax.set_ylabel("time with / without callback")
    ax.set_title(f"MetaInfluence overhead ({args.pool} tasks, {args.epochs} epochs)")
    ax.legend(fontsize=8)
    C.save_figure(plt, name)


if __name__ == "__main__":
    main()
