"""Scale: scoring a pool of M stored tasks, and task-IF for the whole pool versus one training run.

(1) Store scoring (reuses ``benchmarks/bench_store.py``, one fresh process per configuration): M in
    {1,000; 10,000; 100,000} projected task gradients of dimension d in {256, 1024}, float16 (the callback's
    default store dtype), written to a ``GradientStore`` and scored with its streaming ``dot`` against one
    reference vector (warm page cache, best of 3; and cold, after dropping the file's pages).
    Target: 100k tasks scored in <= 2 s.
(2) Task-IF for every task of a digits pool (small MLP 64-32-5, MAML one inner step) versus one training run of
    ``--epochs`` epochs on that pool (bare loop, batch 16, Adam), as M grows. Task-IF: CG with 10 iterations
    (damping 1e-2) over the exact total Hessian of the whole pool; also TracIn at the final parameters.
    Target: task-IF >= 10x faster than one (re)training run.

Usage::

    python benchmarks/bench_scale.py          # store grid + task-IF for M in {250, 1000}
    python benchmarks/bench_scale.py --full   # task-IF also for M = 4000
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C
from bench_detection import train

from lightning_metaif.influence.estimators import task_influence
from lightning_metaif.meta.datasets import digits_splits

HERE = Path(__file__).resolve().parent


def store_grid(threads: int | None) -> list[dict]:
    rows = []
    base = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    try:
        for d in (256, 1024):
            for m in (1_000, 10_000, 100_000):
                root = base / f"m{m}_d{d}"
                cmd = [
                    sys.executable,
                    str(HERE / "bench_store.py"),
                    "--one",
                    str(root),
                    str(m),
                    str(d),
                    "float16",
                ]
                cmd += ["--threads", str(threads or 1)]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                row = {
                    "M": m,
                    "d": d,
                    "file_MiB": r["file_mib"],
                    "write_s": r["write_s"],
                    "dot_warm_s": r["dot_ms"] / 1000,
                    "dot_cold_s": r["cold_ms"] / 1000,
                    "tracin_s": r["tracin_ms"] / 1000,
                    "mem_score_MiB": r["mem_score"],
                }
                rows.append(row)
                print(C.table([row]), flush=True)
                shutil.rmtree(root, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return rows


def influence_vs_training(sizes: list[int], epochs: int) -> list[dict]:
    rows = []
    for m in sizes:
        splits = digits_splits(num_train_tasks=m, num_val_tasks=20, num_test_tasks=5, seed=0)
        batch, ref = splits.train.batch(), splits.val.batch()
        t = time.perf_counter()
        maml, params, _ = train(batch, epochs)
        train_s = time.perf_counter() - t
        r = task_influence(
            maml,
            params,
            batch,
            ref,
            solver="cg",
            damping=0.1,
            chunk_size=64,
            solver_options={"max_iterations": 10},
        )
        ti = task_influence(maml, params, batch, ref, estimator="tracin", chunk_size=64)
        row = {
            "M": m,
            "train_run_s": train_s,
            "epochs": epochs,
            "task_if_cg10_s": r.diagnostics["seconds"],
            "hvp_products": r.diagnostics.get("hessian_products"),
            "speedup_task_if": train_s / r.diagnostics["seconds"],
            "tracin_s": ti.diagnostics["seconds"],
            "speedup_tracin": train_s / ti.diagnostics["seconds"],
        }
        rows.append(row)
        print(C.table([row]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true")
    parser.add_argument(
        "--epochs", type=int, default=10, help="epochs of the training run task-IF is compared to"
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-store", action="store_true")
    args = parser.parse_args()
    C.set_threads(args.threads)
    env = C.environment()
    store_rows = [] if args.skip_store else store_grid(args.threads)
    sizes = [250, 1000, 4000] if args.full else [250, 1000]
    if_rows = influence_vs_training(sizes, args.epochs)
    if store_rows:
        print("\nStore scoring (float16 rows, streaming dot with one reference vector)")
        print(C.table(store_rows))
    print(f"\nTask-IF for the whole pool vs one training run ({args.epochs} epochs)")
    print(C.table(if_rows))
    C.save("bench_scale", {"environment": env, "store": store_rows, "influence_vs_training": if_rows})
    plt = C.figure("bench_scale")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for d in (256, 1024):
        sub = [r for r in store_rows if r["d"] == d]
        axes[0].loglog([r["M"] for r in sub], [r["dot_warm_s"] for r in sub], "o-", label=f"d={d} warm")
        axes[0].loglog([r["M"] for r in sub], [r["dot_cold_s"] for r in sub], "x--", label=f"d={d} cold")
    axes[0].axhline(2.0, color="red", ls="--", label="target 2 s")
    axes[0].set_xlabel("stored tasks M")
    axes[0].set_ylabel("scoring seconds")
    axes[0].legend(fontsize=7)
    axes[1].plot(
        [r["M"] for r in if_rows],
        [r["train_run_s"] for r in if_rows],
        "o-",
        label=f"training run ({args.epochs} ep)",
    )
    axes[1].plot(
        [r["M"] for r in if_rows], [r["task_if_cg10_s"] for r in if_rows], "o-", label="task-IF (CG 10)"
    )
    axes[1].plot([r["M"] for r in if_rows], [r["tracin_s"] for r in if_rows], "o-", label="TracIn (1 ckpt)")
    axes[1].set_xlabel("pool size M")
    axes[1].set_ylabel("seconds")
    axes[1].legend(fontsize=7)
    C.save_figure(plt, "bench_scale")


if __name__ == "__main__":
    main()
