"""Detection of corrupted tasks and mislabelled samples by each estimator.

Tasks: a digits 5-way 1-shot pool (15 queries per class) with 20% of the tasks corrupted (``corrupt_tasks``,
``shuffle_query`` by default), a small MLP (64-32-5) trained with MAML (one inner step, Adam, batch 16) in a bare
loop that keeps one checkpoint per epoch. Every estimator scores the pool at the end (TracIn / self-influence
over the epoch checkpoints); the lowest scores are flagged (self-influence: the highest). Reported: AUROC and
recall within the first 10/20/40% of the ranking, against random scores.

Samples: the same pool with 5% of all labels flipped (``corrupt_tasks(pool, 1.0, "flip_labels", rate=0.05)``);
instance-IF scores every support and query sample; AUROC / recall@k over all samples. Query samples also by
``query_losses`` (each query sample's loss after adaptation, flagged highest), with the adaptation used in
training (1 inner step) and with 3 and 10 inner steps (an evaluation-time adaptation, same meta-parameters),
and by ``query_label_outliers`` (each query loss minus the mean loss of its class-mates in the task).
Target: AUROC >= 0.95 for corrupted tasks; >= 0.85 for mislabelled query samples.

``--query-seeds N``: only the query-sample detection, over N seeds (the seed draws the tasks, the flipped labels
and the training run) and two task families (digits, MLP 64-32-5; Gaussian mixtures, MLP 16-32-5), with the
training adaptation (1 inner step) and 3 steps; ``results/bench_detection_query.json``.

Usage::

    python benchmarks/bench_detection.py                 # 100 tasks, 5 epochs
    python benchmarks/bench_detection.py --full          # 300 tasks, 10 epochs, also random_labels
    python benchmarks/bench_detection.py --query-seeds 5 # query samples, 5 seeds x 2 families, ~3 min
"""

from __future__ import annotations

import argparse

import _common as C
import torch
from sklearn.metrics import roc_auc_score

from lightning_metaif.influence.estimators import task_influence
from lightning_metaif.influence.gradients import per_task_gradients
from lightning_metaif.influence.instance import instance_influence, query_label_outliers, query_losses
from lightning_metaif.influence.problem import ParamLayout
from lightning_metaif.influence.tracin import Checkpoint
from lightning_metaif.meta.datasets import digits_splits
from lightning_metaif.meta.maml import MAML
from lightning_metaif.meta.noise import corrupt_tasks


def small_mlp(ways: int = 5) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, ways)
    )


def detection(flag_scores: torch.Tensor, positives: torch.Tensor) -> dict:
    """``flag_scores``: higher = more suspicious; ``positives``: bool ground truth."""
    s, y = flag_scores.double().reshape(-1), positives.reshape(-1).bool()
    order = torch.argsort(s, descending=True)
    out = {"auroc": float(roc_auc_score(y.numpy(), s.numpy()))}
    for k in (10, 20, 40):
        top = order[: max(1, round(len(s) * k / 100))]
        out[f"recall@{k}%"] = float(y[top].sum() / max(1, int(y.sum())))
    return out


def train(batch, epochs: int, seed: int = 0, backbone: torch.nn.Module | None = None):
    torch.manual_seed(seed)
    maml = MAML(small_mlp() if backbone is None else backbone, inner_lr=0.5, outer_lr=5e-3, num_ways=5)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in maml.meta_parameters().items()}
    layout = ParamLayout.of(params)
    opt = torch.optim.Adam(list(params.values()), lr=5e-3)
    g = torch.Generator().manual_seed(seed)
    checkpoints = []
    for _ in range(epochs):
        perm = torch.randperm(len(batch), generator=g)
        for start in range(0, len(perm), 16):
            grads, _ = per_task_gradients(maml, params, batch[perm[start : start + 16]], chunk_size=16)
            opt.zero_grad()
            for p, gk in zip(params.values(), layout.unflatten(grads.mean(0)).values()):
                p.grad = gk
            opt.step()
        checkpoints.append(
            Checkpoint({k: v.detach().clone().requires_grad_(True) for k, v in params.items()}, 5e-3)
        )
    return maml, params, checkpoints


def task_detection(splits, mode: str, epochs: int) -> list[dict]:
    pool, corruption = corrupt_tasks(splits.train, 0.2, mode=mode, seed=0)
    batch, ref = pool.batch(), splits.val.batch()
    positives = corruption.mask(batch.task_ids)
    maml, params, checkpoints = train(batch, epochs)
    configs = {
        "task_if/cg": dict(
            estimator="task_if", solver="cg", damping=0.1, solver_options={"max_iterations": 30}
        ),
        "task_if/lissa": dict(
            estimator="task_if",
            solver="lissa",
            damping=0.1,
            solver_options={"iterations": 200, "batch_size": 16, "power_iterations": 5},
        ),
        "task_if/arnoldi": dict(
            estimator="task_if", solver="arnoldi", damping=0.1, solver_options={"rank": 20}
        ),
        "direct_if/cg": dict(
            estimator="direct_if", solver="cg", damping=0.1, solver_options={"max_iterations": 30}
        ),
        "tracin (epoch ckpts)": dict(estimator="tracin", checkpoints=checkpoints),
        "ensemble (λ+5 noisy)": dict(estimator="ensemble", noise_copies=5, noise_std=0.01),
    }
    rows = []
    for name, cfg in configs.items():
        try:
            res = task_influence(maml, params, batch, ref, chunk_size=50, **cfg)
            row = {
                "corruption": mode,
                "estimator": name,
                **detection(-res.scores, positives),
                "seconds": res.diagnostics["seconds"],
            }
        except Exception as error:  # noqa: BLE001 - a failed solve is a result
            row = {"corruption": mode, "estimator": name, "auroc": float("nan"), "error": str(error)[:300]}
            print(f"  {name} failed: {row['error']}", flush=True)
        rows.append(row)
        print(
            C.table(
                [row],
                ["corruption", "estimator", "auroc", "recall@10%", "recall@20%", "recall@40%", "seconds"],
            ),
            flush=True,
        )
    selfinf = task_influence(
        maml, params, batch, estimator="self", solver="identity", checkpoints=checkpoints, chunk_size=50
    )
    rows.append(
        {
            "corruption": mode,
            "estimator": "self-influence (TracIn)",
            **detection(selfinf.self_influence, positives),
            "seconds": selfinf.diagnostics["seconds"],
        }
    )
    rnd = torch.rand(len(batch), generator=torch.Generator().manual_seed(1))
    rows.append({"corruption": mode, "estimator": "random", **detection(rnd, positives), "seconds": 0.0})
    return rows


def sample_detection(splits, epochs: int) -> list[dict]:
    pool, corruption = corrupt_tasks(splits.train, 1.0, mode="flip_labels", seed=0, rate=0.05)
    batch, ref = pool.batch(), splits.val.batch()
    maml, params, _ = train(batch, epochs)
    try:
        res = instance_influence(
            maml,
            params,
            batch,
            ref,
            solver="cg",
            damping=0.1,
            solver_options={"max_iterations": 30},
            chunk_size=50,
        )
    except Exception as error:  # noqa: BLE001 - a failed solve is a result, reported
        return [
            {
                "corruption": "flip_labels",
                "estimator": "instance_if/cg",
                "auroc": float("nan"),
                "error": f"{type(error).__name__}: {error}"[:300],
            }
        ]
    s_mask = torch.stack(
        [corruption.sample_mask(int(t), "support", batch.support_x.shape[1]) for t in batch.task_ids]
    )
    q_mask = torch.stack(
        [corruption.sample_mask(int(t), "query", batch.query_x.shape[1]) for t in batch.task_ids]
    )
    scores = torch.cat([res.support_scores.reshape(-1), res.query_scores.reshape(-1)])
    truth = torch.cat([s_mask.reshape(-1), q_mask.reshape(-1)])
    rnd = torch.rand(len(scores), generator=torch.Generator().manual_seed(1))
    frac = float(truth.double().mean())
    return [
        {
            "corruption": f"flip_labels 5% ({frac:.1%} of samples)",
            "estimator": "instance_if/cg",
            **detection(-scores, truth),
            "seconds": res.diagnostics.get("seconds", float("nan")),
        },
        {
            "corruption": "flip_labels (support only)",
            "estimator": "instance_if/cg",
            **detection(-res.support_scores.reshape(-1), s_mask.reshape(-1)),
        },
        {
            "corruption": "flip_labels (query only)",
            "estimator": "instance_if/cg",
            **detection(-res.query_scores.reshape(-1), q_mask.reshape(-1)),
        },
        *(
            {
                "corruption": "flip_labels (query only)",
                "estimator": f"query_losses ({steps} inner step{'s' if steps > 1 else ''})",
                **detection(
                    query_losses(
                        MAML(maml.backbone, inner_lr=0.5, inner_steps=steps, num_ways=5),
                        params,
                        batch,
                        chunk_size=50,
                    ),
                    q_mask,
                ),
            }
            for steps in (1, 3, 10)
        ),
        {
            "corruption": "flip_labels (query only)",
            "estimator": "query_label_outliers (1 inner step)",
            **detection(query_label_outliers(maml, params, batch, chunk_size=50), q_mask),
        },
        {"corruption": "flip_labels", "estimator": "random", **detection(rnd, truth)},
    ]


def query_detection(seeds: int, num_tasks: int, epochs: int) -> tuple[list[dict], list[dict]]:
    """Mislabelled query samples (5% of all labels flipped), per family and seed: AUROC of the raw query losses
    and of ``query_label_outliers``, with the training adaptation (1 inner step) and 3 steps."""
    from lightning_metaif.meta.datasets import gaussian_mixture_splits

    families = {
        "digits": (
            lambda s: digits_splits(num_train_tasks=num_tasks, num_val_tasks=5, num_test_tasks=5, seed=s),
            small_mlp,
        ),
        "gaussian": (
            lambda s: gaussian_mixture_splits(
                num_train_tasks=num_tasks, num_val_tasks=5, num_test_tasks=5, seed=s
            ),
            lambda: torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5)),
        ),
    }
    rows = []
    for family, (make_splits, backbone) in families.items():
        for seed in range(seeds):
            pool, corruption = corrupt_tasks(
                make_splits(seed).train, 1.0, mode="flip_labels", seed=seed, rate=0.05
            )
            batch = pool.batch()
            maml, params, _ = train(batch, epochs, seed=seed, backbone=backbone())
            q_mask = torch.stack(
                [corruption.sample_mask(int(t), "query", batch.query_x.shape[1]) for t in batch.task_ids]
            )
            row = {"family": family, "seed": seed, "flipped_queries": int(q_mask.sum())}
            for steps in (1, 3):
                adapted = MAML(maml.backbone, inner_lr=0.5, inner_steps=steps, num_ways=5)
                raw = query_losses(adapted, params, batch, chunk_size=50)
                outliers = query_label_outliers(adapted, params, batch, chunk_size=50)
                row[f"query_losses {steps} step"] = detection(raw, q_mask)["auroc"]
                row[f"query_label_outliers {steps} step"] = detection(outliers, q_mask)["auroc"]
            rows.append(row)
            print(C.table([row]), flush=True)
    keys = [k for k in rows[0] if k.startswith("query")]
    summary = []
    for family in families:
        sub = [r for r in rows if r["family"] == family]
        for key in keys:
            values = [r[key] for r in sub]
            summary.append(
                {
                    "family": family,
                    "score": key,
                    "seeds": len(values),
                    "mean_auroc": sum(values) / len(values),
                    "min_auroc": min(values),
                    "max_auroc": max(values),
                }
            )
    return rows, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--query-seeds", type=int, default=0, help="only the query-sample detection, N seeds")
    args = parser.parse_args()
    C.set_threads(args.threads)
    if args.query_seeds:
        env = C.environment()
        rows, summary = query_detection(args.query_seeds, 100, 5)
        print(C.table(rows))
        print(C.table(summary))
        C.save(
            "bench_detection_query",
            {"environment": env, "num_tasks": 100, "epochs": 5, "rows": rows, "summary": summary},
        )
        return
    m, epochs = (300, 10) if args.full else (100, 5)
    modes = ("shuffle_query", "random_labels") if args.full else ("shuffle_query",)
    env = C.environment()
    splits = digits_splits(num_train_tasks=m, num_val_tasks=20, num_test_tasks=5, seed=0)
    rows = []
    for mode in modes:
        rows += task_detection(splits, mode, epochs)
    sample_rows = sample_detection(splits, epochs)
    cols = ["corruption", "estimator", "auroc", "recall@10%", "recall@20%", "recall@40%", "seconds"]
    print(f"\nCorrupted-task detection: {m} digits tasks, 20% corrupted, {epochs} epochs of MAML")
    print(C.table(rows, cols))
    print("\nMislabelled-sample detection (instance-IF)")
    print(C.table(sample_rows, cols))
    C.save(
        "bench_detection",
        {"environment": env, "num_tasks": m, "epochs": epochs, "rows": rows, "sample_rows": sample_rows},
    )
    plt = C.figure("bench_detection")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    sub = [r for r in rows if r["corruption"] == modes[0]]
    ax.barh([r["estimator"] for r in sub], [r.get("auroc", float("nan")) for r in sub])
    ax.axvline(0.95, color="red", ls="--", label="target 0.95")
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"AUROC, corrupted tasks ({modes[0]})")
    ax.legend(fontsize=8)
    C.save_figure(plt, "bench_detection")


if __name__ == "__main__":
    main()
