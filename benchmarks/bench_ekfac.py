"""EK-FAC task-IF at scale: a ConvNet with >= 1M meta-parameters, a task pool, cost as a ratio of a training epoch.

One process measures, in this order: one MAML training epoch over the pool (meta-batches of 16 tasks: vmapped
per-task meta-gradients, Adam step), then task-IF for every task of the pool with ``solver="ekfac"`` (fit on a
seeded subset of at most 256 tasks, one solve for the reference gradient, every task's meta-gradient reduced to
its score as it is computed), and, for comparison on the same model, task-IF with Gauss–Newton CG at its
defaults (``--cg``). Reported: parameter count, seconds, the ratio task-IF / epoch (target <= 2), the factors'
memory, the process's peak RSS, and the agreement (Spearman) between the EK-FAC and CG scores.

Model: ``ConvNet(1, 5, hidden=240, norm="none")`` on 8×8 digits (3 conv blocks + linear head: 1.04M
parameters), MAML with one inner step, 5-way 1-shot, 5 queries per class.

Usage::

    python benchmarks/bench_ekfac.py --quick     # 100-task pool (minutes on 2 cores)
    python benchmarks/bench_ekfac.py             # 1,000-task pool
"""

from __future__ import annotations

import argparse
import resource
import time

import _common as C
import torch
from scipy.stats import spearmanr

from lightning_metaif.influence.estimators import task_influence
from lightning_metaif.influence.gradients import per_task_gradients
from lightning_metaif.influence.problem import ParamLayout
from lightning_metaif.meta.backbones import ConvNet
from lightning_metaif.meta.datasets import digits_splits
from lightning_metaif.meta.maml import MAML


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="100-task pool")
    parser.add_argument("--tasks", type=int, default=None, help="pool size (default 1000, --quick 100)")
    parser.add_argument("--hidden", type=int, default=240)
    parser.add_argument(
        "--fit-tasks", type=int, default=None, help="EKFAC(fit_tasks=...) (default: engine's)"
    )
    parser.add_argument("--cg", action="store_true", help="also run Gauss–Newton CG task-IF (slow)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    C.set_threads(args.threads)
    num_tasks = args.tasks or (100 if args.quick else 1000)
    env = C.environment()
    torch.manual_seed(0)
    splits = digits_splits(ways=5, shots=1, queries=5, num_train_tasks=num_tasks, num_val_tasks=20, seed=0)
    pool, reference = splits.train.batch(), splits.val.batch()
    model = MAML(ConvNet(1, 5, hidden=args.hidden, image_size=8, norm="none"), inner_lr=0.1, chunk_size=16)
    params = model.meta_parameters()
    num_params = ParamLayout.of(params).numel
    print(f"ConvNet: {num_params:,} meta-parameters; pool of {num_tasks} tasks", flush=True)
    rss_start = peak_rss_mib()

    optimizer = torch.optim.Adam(
        params.values(), lr=1e-4
    )  # 1e-3 diverged to NaN weights for this no-norm net
    layout = ParamLayout.of(params)
    t0 = time.perf_counter()
    for start in range(0, num_tasks, 16):
        grads, _ = per_task_gradients(model, params, pool[start : start + 16], chunk_size=16)
        optimizer.zero_grad()
        for value, g in zip(params.values(), layout.unflatten(grads.mean(0)).values()):
            value.grad = g
        optimizer.step()
    epoch_seconds = time.perf_counter() - t0
    if not all(torch.isfinite(v).all() for v in params.values()):
        raise SystemExit("the training epoch produced non-finite weights: lower the outer learning rate")
    print(f"one training epoch: {epoch_seconds:.1f} s", flush=True)
    rss_epoch = peak_rss_mib()

    t0 = time.perf_counter()
    options = {} if args.fit_tasks is None else {"fit_tasks": args.fit_tasks}
    ekfac = task_influence(model, params, pool, reference, solver="ekfac", solver_options=options)
    ekfac_seconds = time.perf_counter() - t0
    d = ekfac.diagnostics
    extra = d["solver_extra"]
    rss_ekfac = peak_rss_mib()
    row = {
        "solver": "ekfac",
        "tasks": num_tasks,
        "params": num_params,
        "seconds": ekfac_seconds,
        "epoch_seconds": epoch_seconds,
        "ratio_to_epoch": ekfac_seconds / epoch_seconds,
        "fit_seconds": extra["fit_seconds"],
        "fit_tasks": extra["fit_tasks"],
        "draws": extra["draws"],
        "gradient_seconds": d["gradient_seconds"],
        "factor_MiB": extra["factor_bytes"] / 2**20,
        "peak_rss_MiB": rss_ekfac,
    }
    print(C.table([row]), flush=True)
    rows = [row]
    if args.cg:
        t0 = time.perf_counter()
        cg = task_influence(model, params, pool, reference)
        cg_seconds = time.perf_counter() - t0
        rows.append(
            {
                "solver": "cg (GN, defaults)",
                "tasks": num_tasks,
                "params": num_params,
                "seconds": cg_seconds,
                "epoch_seconds": epoch_seconds,
                "ratio_to_epoch": cg_seconds / epoch_seconds,
                "iterations": cg.diagnostics["iterations"],
                "residual": cg.diagnostics["residual"],
                "spearman_vs_ekfac": float(spearmanr(cg.scores, ekfac.scores)[0]),
                "peak_rss_MiB": peak_rss_mib(),
            }
        )
        print(C.table(rows[-1:]), flush=True)
    print("\nEK-FAC task-IF at scale")
    print(C.table(rows))
    target = "met" if row["ratio_to_epoch"] <= 2 else "missed"
    print(f"target task-IF <= 2 training epochs: {target} ({row['ratio_to_epoch']:.2f} epochs)")
    C.save(
        ("bench_ekfac_quick" if args.quick else "bench_ekfac")
        + ("" if args.fit_tasks is None else f"_fit{args.fit_tasks}"),
        {
            "environment": env,
            "rows": rows,
            "rss_MiB": {"start": rss_start, "after_epoch": rss_epoch, "after_ekfac": rss_ekfac},
            "diagnostics": {k: v for k, v in d.items() if k != "solver_extra"},
        },
    )


if __name__ == "__main__":
    main()
