"""Which training tasks make the meta-learned model less fair? Task influence on a fairness gap.

Fairness here is across tasks: after meta-training MAML on digits (5-way 1-shot, a share of the training
tasks with random labels), the held-out tasks are split into the half the model adapts worst to (group A)
and the rest (group B). The utility is the gap ``f = loss(A) − loss(B)`` of the adapted query losses
(``fairness_gap``); a training task's score is the predicted increase of ``f`` if it were removed, so the
lowest scores are the tasks that widen the gap. The check: continue meta-training without the 10% lowest
tasks, without 10% random tasks, and with all tasks, from the same point with the same seed, and compare
the gaps. The plot (``fairness.png``) shows the scores (corrupted tasks in red) and the three gaps.

    python examples/fairness.py             # measured times: docs/times.md
    python examples/fairness.py --fast      # CI; or METAIF_EXAMPLES_FAST=1
"""

import argparse
import os
from pathlib import Path

import torch

from lightning_metaif import MAML, corrupt_tasks, digits_splits, task_influence
from lightning_metaif.cli import FlatMLP
from lightning_metaif.influence.gradients import per_task_gradients
from lightning_metaif.influence.problem import ParamLayout
from lightning_metaif.influence.utilities import fairness_gap


def meta_train(model, params, pool, steps, *, exclude=(), seed=0, batch=8, lr=3e-3):
    """Adam on the mean meta-gradient of random meta-batches of the kept tasks (in place)."""
    kept = torch.tensor([i for i in range(len(pool)) if int(pool.task_ids[i]) not in set(exclude)])
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    layout = ParamLayout.of(params)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        chosen = kept[torch.randperm(len(kept), generator=generator)[:batch]]
        grads, _ = per_task_gradients(model, params, pool[chosen])
        optimizer.zero_grad()
        for value, g in zip(params.values(), layout.unflatten(grads.mean(0)).values()):
            value.grad = g
        optimizer.step()


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--noise", type=float, default=0.2, help="share of training tasks with random labels")
    parser.add_argument("--fast", action="store_true", help="tiny run for CI")
    parser.add_argument("--output-dir", default="runs/fairness")
    args = parser.parse_args(argv)
    fast = args.fast or os.environ.get("METAIF_EXAMPLES_FAST") == "1"
    torch.set_num_threads(1)
    torch.manual_seed(0)
    num_tasks, steps, more = (24, 20, 10) if fast else (100, 300, 100)
    splits = digits_splits(ways=5, shots=1, queries=5, num_train_tasks=num_tasks, num_val_tasks=20, seed=0)
    train_pool, corruption = corrupt_tasks(splits.train, args.noise, mode="random_labels", seed=0)
    corrupted = set(corruption.task_ids.tolist())
    train, reference = train_pool.batch(), splits.val.batch()
    model = MAML(FlatMLP(64, 5, hidden=(64,)), inner_lr=1.0, num_ways=5)
    params = model.meta_parameters()
    meta_train(model, params, train, steps)

    losses = torch.stack([model.task_loss(params, task).detach() for task in reference])
    order = torch.argsort(losses, descending=True)
    worst, rest = reference[order[: len(order) // 2]], reference[order[len(order) // 2 :]]
    gap = fairness_gap(model, worst, rest)  # f = loss(worst half) - loss(rest): 0 would be fair
    print(f"fairness gap after meta-training: {float(gap(params).detach()):.3f}")

    result = task_influence(model, params, train, utility=gap, l2=1e-3)  # Gauss–Newton, damping="auto"
    ranking = result.ranking().tolist()
    top = max(1, len(ranking) // 10)
    print(f"the {top} tasks that widen the gap most (lowest scores):")
    scores = result.as_dict()
    for task_id in ranking[:top]:
        print(
            f"  task {task_id:4d}  score {scores[task_id]:+.5f}  {'corrupted' if task_id in corrupted else ''}"
        )

    start = {k: v.detach().clone() for k, v in params.items()}
    random_ids = torch.randperm(len(ranking), generator=torch.Generator().manual_seed(1))[:top]
    choices = {
        "all tasks": (),
        f"without {top} random": [int(train.task_ids[i]) for i in random_ids],
        f"without {top} lowest": ranking[:top],
    }
    gaps = {}
    for name, exclude in choices.items():
        continued = {k: v.clone().requires_grad_(True) for k, v in start.items()}
        meta_train(model, continued, train, more, exclude=exclude, seed=2)
        gaps[name] = float(gap(continued).detach())
        print(f"gap after {more} more steps, {name}: {gaps[name]:.3f}")

    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [3, 1]})
    sorted_scores = [scores[t] for t in ranking]
    colours = ["tab:red" if t in corrupted else "tab:grey" for t in ranking]
    left.bar(range(len(ranking)), sorted_scores, color=colours)
    left.axhline(0, color="black", lw=0.6)
    left.set_xlabel("training tasks, from most gap-widening (left)")
    left.set_ylabel("predicted change of the gap if removed")
    left.set_title("task influence on the fairness gap (red: random labels)")
    right.bar(range(len(gaps)), list(gaps.values()), color=["tab:grey", "tab:blue", "tab:green"])
    right.set_xticks(range(len(gaps)), list(gaps), rotation=20, fontsize=8)
    right.set_ylabel("gap after continuing")
    fig.tight_layout()
    fig.savefig(output / "fairness.png", dpi=120)
    plt.close(fig)
    print(f"plot: {output / 'fairness.png'}")
    return result, gaps


if __name__ == "__main__":
    main()
