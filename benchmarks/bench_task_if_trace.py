"""Task-IF that reuses the trace (``TraceTaskIF``) against a full task-IF round and one training epoch.

A MAML (MLP 64-32-5, one inner step, outer Adam) trains on a digits pool of ``--tasks`` tasks (20% with random
labels) with the ``TraceTaskIF`` estimator at its defaults (32-task curvature subsample, Gauss–Newton, automatic
damping, CG to relative residual 1e-3, warm-started, one round per epoch) or with ``--curvature fisher`` (the
empirical Fisher of the traced gradients, an exact direct solve). Measured in one run:

* the cost of a round (``influence/seconds``, including the reference gradient) as a fraction of a training
  epoch without the callback (target: <= 0.2), and whether every solve converged (relative residual <= 1e-3);
* at the end, the same parameters scored by the full ``TaskIF`` at the same settings (a fresh pass of per-task
  gradients over the pool, the curvature of every kept task): its time as a fraction of an epoch, and the
  Spearman correlation of the two score vectors; detection AUROC of the corrupted tasks for both.

Usage::

    python benchmarks/bench_task_if_trace.py            # 1,000 tasks, 3 epochs
    python benchmarks/bench_task_if_trace.py --quick    # 300 tasks, 2 epochs
    python benchmarks/bench_task_if_trace.py --curvature fisher   # TraceTaskIF(curvature="fisher")
"""

from __future__ import annotations

import argparse
import tempfile
import time

import _common as C
import torch
from torch import nn
from torchmetrics.functional.classification import binary_auroc

from lightning_metaif.callback import MetaInfluence
from lightning_metaif.estimators import RoundContext, TaskIF, TraceTaskIF
from lightning_metaif.meta.datamodule import MetaDataModule
from lightning_metaif.meta.datasets import digits_splits
from lightning_metaif.meta.maml import MAML
from lightning_metaif.meta.noise import corrupt_tasks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def model() -> MAML:
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5))
    return MAML(backbone, inner_lr=0.5, outer_lr=3e-3, num_ways=5)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tasks", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--solver", default=None, help="solver of TraceTaskIF (default: its default, 'cg')")
    parser.add_argument("--hessian-tasks", type=int, default=None, help="curvature subsample (default: 32)")
    parser.add_argument("--curvature", default=None, help="curvature of TraceTaskIF, e.g. 'fisher'")
    parser.add_argument("--damping", type=float, default=None, help="damping of TraceTaskIF (default: auto)")
    args = parser.parse_args()
    C.set_threads(args.threads)
    num_tasks = args.tasks or (300 if args.quick else 1000)
    epochs = args.epochs or (2 if args.quick else 3)
    splits = digits_splits(num_train_tasks=num_tasks, num_val_tasks=20, num_test_tasks=20, seed=0)
    pool, corruption = corrupt_tasks(splits.train, 0.2, mode="random_labels", seed=0)

    torch.manual_seed(0)
    bare = model()
    _, bare_seconds = C.fit_quietly(
        bare, MetaDataModule(pool, splits.val, batch_size=16, seed=0), max_epochs=epochs
    )
    epoch_seconds = bare_seconds / epochs

    torch.manual_seed(0)
    traced = model()
    settings = {}
    if args.solver:
        settings["solver"] = args.solver
    if args.hessian_tasks:
        settings["hessian_tasks"] = args.hessian_tasks
    if args.curvature:
        settings["curvature"] = args.curvature
    if args.damping is not None:
        settings["damping"] = args.damping
    estimator = TraceTaskIF(**settings)
    influence = MetaInfluence(estimator, ground_truth=corruption.task_ids, verbose=False)
    dm = MetaDataModule(pool, splits.val, batch_size=16, seed=0, task_state=influence.task_state)
    with tempfile.TemporaryDirectory() as tmp:
        C.fit_quietly(traced, dm, max_epochs=epochs, callbacks=[influence], default_root_dir=tmp)
    rounds = influence.history
    round_seconds = [h["influence/seconds"] for h in rounds]
    residuals = [h["influence/solver_residual"] for h in rounds]
    converged = all(h["influence/solver_converged"] == 1.0 for h in rounds) and max(residuals) <= 1e-3
    trace_scores = influence.result.scores

    # the full task-IF at the same parameters and settings, for time and agreement
    params = {n: p.detach().requires_grad_(True) for n, p in traced.meta_parameters().items()}
    positions = torch.arange(num_tasks)
    ctx = RoundContext(
        problem=traced,
        params=params,
        pool=pool,
        positions=positions,
        weights=torch.ones(num_tasks, dtype=torch.float64),
        objective_positions=positions,
        objective_weights=torch.ones(num_tasks, dtype=torch.float64),
        reference=splits.val.batch(),
        utility=None,
        engine={"chunk_size": 16, "vectorize": "auto"},
    )
    start = time.perf_counter()
    full = TaskIF().score(ctx)
    full_seconds = time.perf_counter() - start
    truth = torch.tensor([int(t) in set(corruption.task_ids.tolist()) for t in pool.task_ids.tolist()])
    finite = torch.isfinite(trace_scores)
    result = {
        "tasks": num_tasks,
        "estimator": repr(estimator),
        "epochs": epochs,
        "epoch_seconds_without_callback": epoch_seconds,
        "trace_round_seconds": round_seconds,
        "trace_round_over_epoch": max(round_seconds) / epoch_seconds,
        "solver_residuals": residuals,
        "solver_iterations": [h["influence/solver_iterations"] for h in rounds],
        "damping": [h["influence/damping"] for h in rounds],
        "all_converged_below_1e-3": converged,
        "full_task_if_seconds": full_seconds,
        "full_task_if_over_epoch": full_seconds / epoch_seconds,
        "spearman_trace_vs_full": spearman(trace_scores[finite], full.scores[finite]),
        "auroc_trace": float(binary_auroc(-trace_scores[finite], truth[finite].long())),
        "auroc_full": float(binary_auroc(-full.scores, truth.long())),
        "scored_tasks": int(finite.sum()),
    }
    print(C.table([{k: v for k, v in result.items() if not isinstance(v, list)}]))
    print(
        "round seconds:", [round(s, 3) for s in round_seconds], "residuals:", [f"{r:.1e}" for r in residuals]
    )
    target = result["trace_round_over_epoch"] <= 0.2 and converged
    print(f"target (round <= 0.2 epoch, converged): {'met' if target else 'MISSED'}")
    C.save(
        "task_if_trace"
        + ("_quick" if args.quick else "")
        + (f"_{args.curvature}" if args.curvature else "")
        + (f"_damping{args.damping:g}" if args.damping is not None else ""),
        {"environment": C.environment(), "result": result},
    )


if __name__ == "__main__":
    main()
