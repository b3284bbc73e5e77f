"""Which trajectory (TracIn) estimator keeps detecting corrupted tasks when training goes on too long?

One small MAML run per (family, optimiser, seed) in a bare loop. At every outer step the script has the
per-task meta-gradients ``g_k(λ_t)`` of the meta-batch (training needs them anyway), the reference gradient
``∇f(λ_t)`` and value ``f(λ_t)`` on the validation pool, and the optimiser's state after the step. From these it
accumulates, on the SAME run, every candidate trajectory estimator:

* ``stale_precond``: what the callback did before this study: ``∇f`` taken at the start of each epoch (round)
  and held for the epoch, Adam preconditioner ``1/(√v̂_t+ε)`` read after the step, summed over all steps.
* ``raw``: fresh ``∇f(λ_t)`` each step, plain gradients: ``Σ_t (η/B) ∇f(λ_t)ᵀ g_k(λ_t)`` (Pruthi et al.).
* ``precond``: fresh ``∇f``, Adam preconditioner read after the step.
* ``applied``: the update the optimiser actually applied, attributed exactly: Adam's step is
  ``−η m̂_t/(√v̂_t+ε)`` and ``m̂_t`` is a decayed sum of past meta-batch gradients, so task k of step s gets
  ``η (1−β₁)β₁^{t−s}/(1−β₁^t) ∇f(λ_t)ᵀ P_t g_k(λ_s) / B`` at every later step t (window of 60 steps).
* ``cosine``: per-step normalised: ``Σ_t η cos(√P ∇f, √P g_k)``.
* ``decayed``: ``precond`` with an exponential decay of half-life 2 epochs (recent steps count most).
* ``best_*``: the ModelCheckpoint(monitor=...) rule: the scores accumulated up to the epoch with the lowest
  reference loss so far, held while the reference loss is above its best.
* ``gated_*``: an epoch's contributions count only if the reference loss fell over that epoch (rounds in
  which it rose are dropped, later improving rounds count again).
* ``weighted_*``: each epoch's contributions, per step, weighted by how much the reference loss fell over the
  epoch (``max(0, f_start − f_end)``): rounds that improve the reference a lot count a lot, plateaus and rises
  count little or nothing (here every task appears once per epoch, so this equals the engine's
  ``weighting="improvement"``: the fall times each task's mean contribution in the round, up to a constant).
  ``best_weighted_cosine``: the same, held at the best reference loss (the ``Trajectory`` default).
* ``self``: trajectory self-influence ``Σ η g_kᵀ P g_k`` (flag the highest), for comparison.

Reported: the AUROC of flagging the corrupted tasks by the lowest score (self: the highest) at the end of a
short run and of an over-long run (the same run read at two horizons, constant learning rates), per family
(digits, Gaussian mixtures), optimiser (SGD, Adam) and seed, plus whether the reference loss was rising at the
end (final value above the best by more than 2%).

Usage::

    python benchmarks/bench_trajectory_variants.py           # 2 families x 2 optimisers x 3 seeds (~10 min)
    python benchmarks/bench_trajectory_variants.py --quick   # 1 seed
"""

from __future__ import annotations

import argparse
import math
import time
from collections import deque

import _common as C
import torch
from sklearn.metrics import roc_auc_score

from lightning_metaif.influence.gradients import per_task_gradients, reference_gradient
from lightning_metaif.influence.problem import ParamLayout
from lightning_metaif.meta.datasets import digits_splits, gaussian_mixture_splits
from lightning_metaif.meta.maml import MAML
from lightning_metaif.meta.noise import corrupt_tasks

VARIANTS = (
    "stale_precond",
    "raw",
    "precond",
    "applied",
    "cosine",
    "decayed",
    "best_stale_precond",
    "best_raw",
    "best_precond",
    "best_applied",
    "best_cosine",
    "gated_precond",
    "gated_cosine",
    "weighted_precond",
    "weighted_cosine",
    "best_weighted_cosine",
    "self",
)
BASE = ("stale_precond", "raw", "precond", "applied", "cosine")
RECIPES = {  # name -> (optimiser, outer lr, short epochs, long epochs)
    "sgd 0.5": ("sgd", 0.5, 10, 60),
    "adam 3e-3": ("adam", 3e-3, 10, 60),
    "adam 1e-3": ("adam", 1e-3, 20, 60),
}


def family(name: str, seed: int, num_tasks: int):
    if name == "digits":
        splits = digits_splits(num_train_tasks=num_tasks, num_val_tasks=20, num_test_tasks=5, seed=seed)
        backbone = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5)
        )
    else:
        splits = gaussian_mixture_splits(
            num_train_tasks=num_tasks, num_val_tasks=20, num_test_tasks=5, seed=seed
        )
        backbone = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
    return splits, backbone


def auroc(flag: torch.Tensor, positives: torch.Tensor) -> float:
    flag = flag.double()
    if not torch.isfinite(flag).all():
        return float("nan")
    return float(roc_auc_score(positives.numpy(), flag.numpy()))


def run(fam: str, recipe: str, seed: int, num_tasks: int, batch_size: int) -> list[dict]:
    optimiser, lr, short, long = RECIPES[recipe]
    torch.manual_seed(seed)  # the backbone's initialisation
    splits, backbone = family(fam, seed, num_tasks)
    pool, corruption = corrupt_tasks(splits.train, 0.2, mode="shuffle_query", seed=seed)
    batch, ref_tasks = pool.batch(), splits.val.batch()
    positives = corruption.mask(batch.task_ids)
    maml = MAML(backbone, inner_lr=0.5, num_ways=5)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in maml.meta_parameters().items()}
    layout = ParamLayout.of(params)
    opt = (
        torch.optim.Adam(list(params.values()), lr=lr)
        if optimiser == "adam"
        else torch.optim.SGD(list(params.values()), lr=lr)
    )
    beta1 = 0.9
    m = len(batch)
    zeros = lambda: torch.zeros(m, dtype=torch.float64)  # noqa: E731
    acc = {v: zeros() for v in (*BASE, "decayed", "self")}
    best = {v: zeros() for v in VARIANTS if v.startswith("best_")}
    gated = {v: zeros() for v in VARIANTS if v.startswith(("gated_", "weighted_"))}
    round_auroc: dict[str, list[float]] = {"precond": [], "cosine": []}
    cur = {v: zeros() for v in BASE}  # this epoch's contributions
    best_loss, ref_curve, previous = math.inf, [], None
    window: deque = deque(maxlen=60)  # (positions, grads) of recent steps, for the exact Adam attribution
    steps_per_epoch = math.ceil(m / batch_size)
    decay = 0.5 ** (1.0 / (2 * steps_per_epoch))
    g = torch.Generator().manual_seed(seed)
    rows, step = [], 0
    stale_ref = None
    for epoch in range(long):
        perm = torch.randperm(m, generator=g)
        for start in range(0, m, batch_size):
            pos = perm[start : start + batch_size]
            grads, _ = per_task_gradients(maml, params, batch[pos], chunk_size=batch_size)
            grads = grads.detach().double()
            ref, ref_value = reference_gradient(maml, params, ref_tasks, chunk_size=20)
            ref = ref.detach().double()
            if stale_ref is None:
                stale_ref, previous = ref, float(ref_value)
            opt.zero_grad()
            for p, gk in zip(params.values(), layout.unflatten(grads.mean(0).float()).values()):
                p.grad = gk
            opt.step()
            step += 1
            if optimiser == "adam":
                states = [opt.state[p] for p in params.values()]
                t = float(states[0]["step"])
                v_hat = layout.flatten(
                    {n: s["exp_avg_sq"] / (1 - 0.999**t) for n, s in zip(params, states)}
                ).double()
                pre = 1.0 / (v_hat.sqrt() + 1e-8)
            else:
                t, pre = float(step), torch.ones(grads.shape[1], dtype=torch.float64)
            b = len(pos)
            pg = grads * pre
            cur["stale_precond"].index_add_(0, pos, lr / b * (pg @ stale_ref))
            cur["raw"].index_add_(0, pos, lr / b * (grads @ ref))
            fresh = lr / b * (pg @ ref)
            cur["precond"].index_add_(0, pos, fresh)
            root = pre.sqrt()
            cos = (grads * root) @ (ref * root) / ((grads * root).norm(dim=1) * (ref * root).norm() + 1e-30)
            cur["cosine"].index_add_(0, pos, lr * cos)
            acc["decayed"].mul_(decay).index_add_(0, pos, fresh)
            acc["self"].index_add_(0, pos, lr * (grads * pg).sum(1))
            if optimiser == "adam":
                window.append((pos, grads))
                bias = 1 - beta1**t
                for age, (old_pos, old_grads) in enumerate(reversed(window)):
                    weight = lr * (1 - beta1) * beta1**age / bias / len(old_pos)
                    cur["applied"].index_add_(0, old_pos, weight * ((old_grads * pre) @ ref))
            else:
                cur["applied"].index_add_(0, pos, fresh)
        # end of epoch = a scoring round: reference loss, best-so-far snapshot, fresh stale reference
        with torch.enable_grad():
            stale_ref_t, value = reference_gradient(maml, params, ref_tasks, chunk_size=20)
        stale_ref = stale_ref_t.detach().double()
        value = float(value)
        ref_curve.append(value)
        steps_in_epoch = math.ceil(m / batch_size)
        for name in round_auroc:
            round_auroc[name].append(round(auroc(-cur[name], positives), 3))
        for name in BASE:
            acc[name] += cur[name]
            if f"weighted_{name}" in gated:
                gated[f"weighted_{name}"] += max(0.0, previous - value) / steps_in_epoch * cur[name]
            if f"gated_{name}" in gated and value < previous:
                gated[f"gated_{name}"] += cur[name]
            cur[name].zero_()
        previous = value
        if value < best_loss:
            best_loss = value
            for name in best:
                best[name] = {**acc, **gated}[name[len("best_") :]].clone()
        if epoch + 1 in (short, long):
            row = {
                "family": fam,
                "recipe": recipe,
                "lr": lr,
                "seed": seed,
                "epochs": epoch + 1,
                "steps": step,
                "ref_first": ref_curve[0],
                "ref_best": best_loss,
                "ref_best_epoch": 1 + ref_curve.index(best_loss),
                "ref_end": value,
                "rising": value > best_loss * 1.02,
                "round_auroc": {k: list(v) for k, v in round_auroc.items()},
            }
            for name in VARIANTS:
                scores = {**acc, **best, **gated}[name]
                row[name] = auroc(scores if name == "self" else -scores, positives)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    C.set_threads(args.threads)
    env = C.environment()
    seeds = range(1 if args.quick else args.seeds)
    rows = []
    for fam in ("digits", "gaussian"):
        for recipe in RECIPES:
            for seed in seeds:
                start = time.perf_counter()
                new = run(fam, recipe, seed, args.tasks, args.batch_size)
                rows += new
                cols = ["family", "recipe", "seed", "epochs", "ref_best_epoch", "rising", *VARIANTS]
                print(
                    C.table(new, cols, floatfmt=".2f"), f"({time.perf_counter() - start:.0f} s)", flush=True
                )
    summary = []
    for horizon in ("short", "long"):
        for recipe, (_, _, short, long) in RECIPES.items():
            sub = [
                r
                for r in rows
                if r["recipe"] == recipe and r["epochs"] == (short if horizon == "short" else long)
            ]
            entry = {
                "run": f"{recipe}, {short if horizon == 'short' else long} ep",
                "n": len(sub),
                "rising": sum(r["rising"] for r in sub),
            }
            for name in VARIANTS:
                values = [r[name] for r in sub]
                entry[name] = sum(values) / len(values)
                entry[f"{name}_min"] = min(values)
            summary.append(entry)
    print(
        "\nMean end-of-run AUROC (both families, all seeds); rising = runs whose reference loss ended >2% above best"
    )
    print(C.table(summary, ["run", "n", "rising", *VARIANTS], floatfmt=".2f"))
    print("\nWorst run")
    print(C.table(summary, ["run", *(f"{v}_min" for v in VARIANTS)], floatfmt=".2f"))
    C.save(
        "bench_trajectory_variants",
        {"environment": env, "recipes": RECIPES, "rows": rows, "summary": summary},
    )
    plt = C.figure("bench_trajectory_variants")
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / len(summary)
    for i, entry in enumerate(summary):
        xs = [j + i * width for j in range(len(VARIANTS))]
        ax.bar(xs, [entry[v] for v in VARIANTS], width, label=entry["run"])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(VARIANTS))])
    ax.set_xticklabels(VARIANTS, rotation=35, ha="right", fontsize=8)
    ax.axhline(0.9, color="red", ls="--", lw=1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("AUROC, corrupted tasks")
    ax.legend(fontsize=7, ncol=4)
    C.save_figure(plt, "bench_trajectory_variants")


if __name__ == "__main__":
    main()
