"""Cost of per-task meta-gradients and of task-IF for a whole pool.

(a) Per-task meta-gradients of a batch of tasks with ``per_task_gradients`` (``vmap``) versus ONE summed
    meta-gradient of the same tasks, computed two ways: ``torch.func.grad`` of the mean of the vmapped task
    losses, and a plain ``torch.autograd`` MAML loop (hand-written inner step with ``create_graph=True``,
    one backward of the summed loss). Model: 4-layer ConvNet (``lightning_metaif.meta.backbones.ConvNet``),
    5-way 1-shot 28x28 synthetic images, 15 queries per class, the ``MAML`` module's ``task_loss``, one inner
    step. Target: per-task / summed <= 1.5.
(b) Task-IF for every task of a 1,000-task digits pool (5-way 1-shot, small MLP 64-32-5) versus the time of
    one training epoch on that pool (real Lightning ``Trainer``, batch 16; also a bare loop). Target:
    task-IF <= 5 epochs.

All timings: medians over repeats, the methods interleaved, measured in one process.

Usage::

    python benchmarks/bench_gradients.py          # CPU defaults, a few minutes
    python benchmarks/bench_gradients.py --full   # more tasks and repeats
"""

from __future__ import annotations

import argparse
import time

import _common as C
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from lightning_metaif.influence.estimators import task_influence
from lightning_metaif.influence.gradients import batched_task_loss, per_task_gradients, task_tensors
from lightning_metaif.influence.problem import ParamLayout, detached, trainable
from lightning_metaif.influence.tasks import TaskBatch
from lightning_metaif.meta.backbones import ConvNet
from lightning_metaif.meta.maml import MAML


def synthetic_images(
    num_tasks: int, ways: int = 5, shots: int = 1, queries: int = 15, size: int = 28, seed=0
):
    """Class prototypes (random images) plus noise; labels 0..ways-1."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(num_tasks, ways, 1, size, size, generator=g)
    sy = torch.arange(ways).repeat_interleave(shots).expand(num_tasks, -1).clone()
    qy = torch.arange(ways).repeat_interleave(queries).expand(num_tasks, -1).clone()

    def draw(labels):
        idx = labels[..., None, None, None].expand(-1, -1, 1, size, size)
        base = protos.gather(1, idx)
        return base + 0.3 * torch.randn(base.shape, generator=g)

    return TaskBatch(draw(sy), sy, draw(qy), qy, torch.arange(num_tasks))


def part_a(args) -> dict:
    torch.manual_seed(0)
    maml = MAML(ConvNet(1, 5, hidden=args.hidden, layers=4, image_size=28), inner_steps=1, inner_lr=0.4)
    params = trainable(maml.meta_parameters())
    layout = ParamLayout.of(params)
    batch = synthetic_images(args.tasks)
    names = list(maml.backbone.state_dict().keys())

    def per_task():
        return per_task_gradients(maml, params, batch, chunk_size=args.tasks)[0]

    loss_fn = vmap(batched_task_loss(maml), in_dims=(None, 0, 0, 0, 0))

    def summed_func():
        return layout.flatten(grad(lambda p: loss_fn(p, *task_tensors(batch)).mean())(detached(params)))

    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    backbone = maml.backbone

    def summed_autograd():  # the usual hand-written MAML step
        total = 0.0
        plain = {n: leaves["backbone." + n] for n in names}
        for i in range(len(batch)):
            inner = F.cross_entropy(
                functional_call(backbone, plain, (batch.support_x[i],)), batch.support_y[i]
            )
            g = torch.autograd.grad(inner, list(plain.values()), create_graph=True)
            fast = {n: w - 0.4 * gi for (n, w), gi in zip(plain.items(), g)}
            total = total + F.cross_entropy(
                functional_call(backbone, fast, (batch.query_x[i],)), batch.query_y[i]
            )
        g = torch.autograd.grad(total / len(batch), list(leaves.values()))
        return torch.cat([x.reshape(-1) for x in g])

    ref = per_task().mean(0)
    err_func = float((summed_func() - ref).abs().max() / ref.abs().max())
    err_autograd = float((summed_autograd() - ref).abs().max() / ref.abs().max())
    times = C.interleaved(
        {"per_task_vmap": per_task, "summed_func_grad": summed_func, "summed_autograd_loop": summed_autograd},
        repeats=args.repeats,
    )
    med = {k: C.median(v) for k, v in times.items()}
    rows = [
        {
            "method": k,
            "median_s": med[k],
            "min_s": min(v),
            "ratio_per_task_vs_this": med["per_task_vmap"] / med[k],
        }
        for k, v in times.items()
    ]
    return {
        "num_params": layout.numel,
        "tasks": args.tasks,
        "hidden": args.hidden,
        "times_s": times,
        "median_s": med,
        "rows": rows,
        "max_rel_error_vs_mean_per_task": {
            "summed_func_grad": err_func,
            "summed_autograd_loop": err_autograd,
        },
        "ratio_vs_best_summed": med["per_task_vmap"]
        / min(med["summed_func_grad"], med["summed_autograd_loop"]),
    }


def small_mlp(ways: int = 5) -> torch.nn.Module:
    """Flatten 8x8 digits, 64-32-ways MLP (the network of tests/metaif_helpers.py)."""
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, ways)
    )


class EpochTimer:
    def __init__(self):
        import lightning.pytorch as pl

        class _T(pl.Callback):
            def __init__(s):
                s.times = []

            def on_train_epoch_start(s, trainer, module):
                s.t = time.perf_counter()

            def on_train_epoch_end(s, trainer, module):
                s.times.append(time.perf_counter() - s.t)

        self.cb = _T()


def part_b(args) -> dict:
    import lightning.pytorch as pl

    from lightning_metaif.meta.datamodule import MetaDataModule
    from lightning_metaif.meta.datasets import digits_splits

    splits = digits_splits(num_train_tasks=args.pool, num_val_tasks=20, num_test_tasks=20, seed=0)
    pool, val = splits.train, splits.val
    pl.seed_everything(0, verbose=False)
    maml = MAML(small_mlp(), inner_lr=0.5, outer_lr=5e-3)
    timer = EpochTimer().cb
    dm = MetaDataModule(pool, val, batch_size=16, seed=0)
    C.fit_quietly(maml, dm, max_epochs=args.epochs, callbacks=[timer])
    lightning_epochs = timer.times[1:] if len(timer.times) > 1 else timer.times  # first epoch warms up
    train_batch = pool.batch()
    ref_batch = val.batch()
    params = trainable(maml.meta_parameters())

    # bare epoch: per-task gradients + Adam step per batch of 16 (what training_step does, minus Lightning)
    bare_params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.Adam(list(bare_params.values()), lr=5e-3)
    layout = ParamLayout.of(bare_params)

    def bare_epoch():
        perm = torch.randperm(len(train_batch), generator=torch.Generator().manual_seed(0))
        for start in range(0, len(perm), 16):
            chunk = train_batch[perm[start : start + 16]]
            g, _ = per_task_gradients(maml, bare_params, chunk, chunk_size=16)
            opt.zero_grad()
            for p, gk in zip(bare_params.values(), layout.unflatten(g.mean(0)).values()):
                p.grad = gk
            opt.step()

    configs = {
        "tracin_1ckpt": dict(estimator="tracin"),
        "task_if_cg5": dict(estimator="task_if", solver="cg", solver_options={"max_iterations": 5}),
        "task_if_lissa": dict(
            estimator="task_if",
            solver="lissa",
            solver_options={"iterations": 50, "batch_size": 16, "power_iterations": 3, "scale": None},
        ),
    }
    if args.full:
        configs["task_if_cg20"] = dict(
            estimator="task_if", solver="cg", solver_options={"max_iterations": 20}
        )
        configs["task_if_arnoldi10"] = dict(
            estimator="task_if", solver="arnoldi", solver_options={"rank": 10}
        )
    fns = {"bare_epoch": bare_epoch}
    diag = {}

    def make(name, cfg):
        def run():
            res = task_influence(maml, params, train_batch, ref_batch, damping=1e-2, chunk_size=64, **cfg)
            diag[name] = {k: v for k, v in res.diagnostics.items() if isinstance(v, (int, float, str, bool))}
            print(
                f"  {name}: {res.diagnostics.get('seconds', 0):.2f} s, products={res.diagnostics.get('hessian_products')}",
                flush=True,
            )
            return res

        return run

    for name, cfg in configs.items():
        fns[name] = make(name, cfg)
    times = C.interleaved(fns, repeats=args.repeats_b, warmup=0)
    med = {k: C.median(v) for k, v in times.items()}
    epoch = C.median(lightning_epochs)
    rows = [
        {
            "method": "one epoch (Lightning Trainer)",
            "median_s": epoch,
            "epochs": 1.0,
            "epochs_vs_bare": med["bare_epoch"] and epoch / med["bare_epoch"],
        },
        {
            "method": "one epoch (bare loop)",
            "median_s": med["bare_epoch"],
            "epochs": med["bare_epoch"] / epoch,
            "epochs_vs_bare": 1.0,
        },
    ]
    for name in configs:
        rows.append(
            {
                "method": name,
                "median_s": med[name],
                "epochs": med[name] / epoch,
                "epochs_vs_bare": med[name] / med["bare_epoch"],
            }
        )
    return {
        "pool": args.pool,
        "num_params": layout.numel,
        "lightning_epoch_s": timer.times,
        "times_s": times,
        "median_s": med,
        "rows": rows,
        "diagnostics": diag,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="more tasks and repeats")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-a", action="store_true", help="only part (b)")
    parser.add_argument("--skip-b", action="store_true", help="only part (a)")
    args = parser.parse_args()
    C.set_threads(args.threads)
    args.tasks, args.hidden, args.repeats = (16, 64, 7) if args.full else (8, 32, 3)
    args.pool, args.epochs, args.repeats_b = (1000, 3, 3) if args.full else (1000, 2, 1)
    env = C.environment()
    a = None if args.skip_a else part_a(args)
    if a:
        print(
            f"(a) per-task vs summed meta-gradient, ConvNet ({a['num_params']} params), {a['tasks']} tasks 5-way 1-shot 28x28"
        )
        print(C.table(a["rows"]))
        print(f"agreement (max rel. error vs mean of per-task grads): {a['max_rel_error_vs_mean_per_task']}")
        print(f"ratio per-task / best summed = {a['ratio_vs_best_summed']:.3f} (target <= 1.5)")
    b = None
    if not args.skip_b:
        b = part_b(args)
        print(
            f"\n(b) task-IF for a {b['pool']}-task digits pool ({b['num_params']} params) vs one training epoch"
        )
        print(C.table(b["rows"]))
    C.save("bench_gradients", {"environment": env, "a": a, "b": b})
    plt = C.figure("bench_gradients")
    panels = [x for x in (a, b) if x]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    axes = list(axes[0])
    if not a:
        axes.insert(0, None)
    if a:
        axes[0].bar(list(a["median_s"]), list(a["median_s"].values()), color=["C0", "C1", "C2"])
        axes[0].set_ylabel("seconds (median)")
        axes[0].set_title(f"(a) {a['tasks']} tasks, ConvNet")
        axes[0].tick_params(axis="x", rotation=20)
    if b:
        names = [r["method"] for r in b["rows"]]
        axes[1].barh(names, [r["epochs"] for r in b["rows"]])
        axes[1].axvline(5, color="red", ls="--", label="target 5 epochs")
        axes[1].set_xlabel("time in Lightning epochs")
        axes[1].set_title(f"(b) {b['pool']}-task pool")
        axes[1].legend()
    C.save_figure(plt, "bench_gradients")


if __name__ == "__main__":
    main()
