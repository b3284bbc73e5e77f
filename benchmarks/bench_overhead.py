"""Training-time overhead of the ``MetaInfluence`` callback, per mode.

MAML (small MLP 64-32-5, one inner step, Adam) on a digits 5-way 1-shot pool, trained with a real Lightning
``Trainer`` with and without the callback; runs alternate (baseline, callback, baseline, callback, ...) with the
same seeds so that load drift on a shared machine hits both alike. Reported per mode: median wall time of
``trainer.fit`` with / without the callback (ratio = amortised overhead with one scoring round per epoch), the
callback's own time split into per-step tracing and per-round scoring, the ratio without the rounds (tracing
only), and the gradient store size on disk after the run. Target: trajectory <= 1.05.

``--suite`` measures issue 12's tracing rows in one run: for the ``MAML`` module and for a user's own module
(``UserMetaModule``: manual optimisation, per-task gradients with ``torch.autograd.grad``, handed over through the
``reports_task_gradients`` contract), each repetition runs the module without the callback, then with
``trajectory`` (store off), ``trajectory`` with the per-step store (``GradientStoreConfig(trajectory=True)``, SJLT
to d = 1,024, float16) and ``checkpoints`` (store on); and the user's module *without* the contract (the callback
recomputes per-task gradients at each batch start). Runs are interleaved, ratios are medians over repetitions of
the with/without ratio of the same repetition.

Usage::

    python benchmarks/bench_overhead.py          # 200 tasks, 3 epochs, 3 pairs per mode
    python benchmarks/bench_overhead.py --full   # 1000 tasks, 5 epochs, 5 pairs per mode
    python benchmarks/bench_overhead.py --suite [--full]  # issue 12's rows, both modules, one run
    python benchmarks/bench_overhead.py --breakdown   # the time inside the callback's functions
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

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


def backbone(kind: str = "mlp") -> torch.nn.Module:
    """The suite's backbone: the 2,245-parameter MLP, or a 3-block ConvNet (16 channels) on the 8x8 digits."""
    if kind == "convnet":
        from lightning_metaif.meta.backbones import ConvNet

        return ConvNet(1, 5, hidden=16, image_size=8)
    return small_mlp()


def small_mlp(ways: int = 5) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, ways)
    )


class UserMetaModule(pl.LightningModule):
    """A user's own one-step MAML (not the library's): manual optimisation, per-task meta-gradients with a loop
    of ``torch.autograd.grad``; ``reports`` declares the ``reports_task_gradients`` contract (hand them over) or
    not (the callback recomputes them at each batch start). Reads the callback's task weights like ``MAML``."""

    def __init__(
        self, reports: bool = True, inner_lr: float = 0.5, outer_lr: float = 5e-3, kind: str = "mlp"
    ) -> None:
        super().__init__()
        self.net = backbone(kind)
        self.reports_task_gradients = reports
        self.inner_lr, self.outer_lr = inner_lr, outer_lr
        self.automatic_optimization = False
        self.task_weight_table: dict = {}

    def meta_parameters(self) -> dict[str, torch.Tensor]:
        return dict(self.net.named_parameters())

    def task_loss(self, params, task, support_weights=None, query_weights=None):
        support = torch.func.functional_call(self.net, params, (task.support_x,))
        inner = torch.nn.functional.cross_entropy(support, task.support_y)
        grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
        adapted = {n: p - self.inner_lr * g for (n, p), g in zip(params.items(), grads)}
        query = torch.func.functional_call(self.net, adapted, (task.query_x,))
        return torch.nn.functional.cross_entropy(query, task.query_y)

    def training_step(self, batch, batch_idx):
        params = self.meta_parameters()
        rows, losses = [], []
        for task in batch:
            loss = self.task_loss(params, task)
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(params.values()))]))
            losses.append(loss.detach())
        grads = torch.stack(rows)
        weights = torch.tensor([float(self.task_weight_table.get(int(t), 1.0)) for t in batch.task_ids])
        mean = (weights[:, None] * grads).sum(0) / len(rows)
        opt = self.optimizers()
        opt.zero_grad()
        offset = 0
        for p in params.values():
            p.grad = mean[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        opt.step()
        out = {"loss": (weights * torch.stack(losses)).sum() / len(rows)}
        if self.reports_task_gradients:
            out.update(task_ids=batch.task_ids, task_gradients=grads, task_weights=weights)
        return out

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.outer_lr)


def dir_size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def store_config(args, workdir: str, trajectory: bool) -> GradientStoreConfig:
    return GradientStoreConfig(
        projection_dim=args.projection_dim,
        projection=args.projection,
        dirpath=os.path.join(workdir, "metaif"),
        trajectory=trajectory,
    )


def fit(splits, args, make_model, influence: MetaInfluence | None, workdir: str) -> dict:
    """One seeded fit (the model built after the data module, as before); times and the callback's timings."""
    dm = MetaDataModule(
        splits.train,
        splits.val,
        batch_size=16,
        seed=0,
        task_state=None if influence is None else influence.task_state,
    )
    model = make_model()
    cpu = time.process_time()
    trainer, seconds = C.fit_quietly(
        model,
        dm,
        max_epochs=args.epochs,
        callbacks=[] if influence is None else [influence],
        default_root_dir=workdir,
    )
    out = {"seconds": seconds, "cpu_seconds": time.process_time() - cpu, "steps": trainer.global_step}
    if influence is not None:
        out.update(
            rounds=influence.rounds,
            trace_seconds=influence.timings["trace_seconds"],
            round_seconds=influence.timings["round_seconds"],
            setup_seconds=influence.timings.get("setup_seconds", float("nan")),
            store_bytes=dir_size(os.path.join(workdir, "metaif", "store")),
            files_bytes=dir_size(os.path.join(workdir, "metaif")),
        )
    return out


def one_run(splits, args, mode: str | None, workdir: str) -> dict:
    pl.seed_everything(0, verbose=False)
    torch.manual_seed(0)
    influence = None
    if mode is not None:
        estimator = TaskIF(solver=CG(max_iterations=args.cg_iterations)) if mode == "task_if" else mode
        store = None if args.no_store else store_config(args, workdir, args.store_trajectory)
        influence = MetaInfluence(estimator, store=store, verbose=False)
    return fit(
        splits, args, lambda: MAML(small_mlp(), inner_lr=0.5, outer_lr=5e-3, num_ways=5), influence, workdir
    )


SUITE = (  # (module, estimator or None = without the callback, store)
    ("maml", None, "off"),
    ("maml", "trajectory", "off"),
    ("maml", "trajectory", "per-step"),
    ("maml", "checkpoints", "on"),
    ("user", None, "off"),
    ("user", "trajectory", "off"),
    ("user", "trajectory", "per-step"),
    ("user", "checkpoints", "on"),
    ("user-recompute", None, "off"),
    ("user-recompute", "trajectory", "off"),
)


def suite_run(splits, args, module: str, mode: str | None, store: str, workdir: str) -> dict:
    pl.seed_everything(0, verbose=False)
    torch.manual_seed(0)
    influence = None
    if mode is not None:
        config = None if store == "off" else store_config(args, workdir, store == "per-step")
        influence = MetaInfluence(mode, store=config, verbose=False)

    def make_model():
        if module == "maml":
            return MAML(backbone(args.backbone), inner_lr=0.5, outer_lr=5e-3, num_ways=5)
        return UserMetaModule(reports=module == "user", kind=args.backbone)

    return fit(splits, args, make_model, influence, workdir)


def suite(args, splits, env, name: str) -> None:
    """Issue 12's tracing rows, every configuration interleaved in each repetition (see the module docstring)."""
    raw: dict[str, list[dict]] = {f"{m}|{e}|{s}": [] for m, e, s in SUITE}
    tmp = tempfile.mkdtemp(prefix="bench_overhead_")
    loads = [C.load()]
    try:
        for module in ("maml", "user", "user-recompute"):  # warm-up: imports, first vmap trace, path choice
            suite_run(splits, args, module, "trajectory", "off", os.path.join(tmp, "warm"))
        for rep in range(args.pairs):
            for m, e, s in SUITE:
                work = os.path.join(tmp, f"{rep}_{m}_{e}_{s}")
                raw[f"{m}|{e}|{s}"].append(suite_run(splits, args, m, e, s, work))
                shutil.rmtree(work, ignore_errors=True)
            loads.append(C.load())
            print(f"repetition {rep + 1}/{args.pairs} done, load {loads[-1]}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for m, e, s in SUITE:
        if e is None:
            continue
        base, runs = raw[f"{m}|None|off"], raw[f"{m}|{e}|{s}"]
        ratios = [r["seconds"] / b["seconds"] for r, b in zip(runs, base)]
        cpu_ratios = [r["cpu_seconds"] / b["cpu_seconds"] for r, b in zip(runs, base)]
        steps = runs[0]["steps"]
        tracing = [(r["seconds"] - r["round_seconds"]) / b["seconds"] for r, b in zip(runs, base)]
        rows.append(
            {
                "module": m,
                "estimator": e,
                "store": s,
                "without_s": C.median([b["seconds"] for b in base]),
                "with_s": C.median([r["seconds"] for r in runs]),
                "ratio": C.median(ratios),
                "ratio_min": min(ratios),
                "ratio_without_rounds": C.median(tracing),
                "cpu_ratio": C.median(cpu_ratios),
                # the callback's own seconds on the training thread against the rest of the same run: no
                # difference of two noisy runs (what the ratio would be if nothing else moved)
                "attributed_ratio": C.median(
                    [
                        r["seconds"]
                        / (
                            r["seconds"]
                            - r["trace_seconds"]
                            - r["round_seconds"]
                            - r.get("setup_seconds", 0.0)
                        )
                        for r in runs
                    ]
                ),
                "attributed_tracing_ratio": C.median(
                    [r["seconds"] / (r["seconds"] - r["trace_seconds"]) for r in runs]
                ),
                "setup_s": C.median([r.get("setup_seconds", float("nan")) for r in runs]),
                "cpu_ratio_min": min(cpu_ratios),
                "rounds": runs[0]["rounds"],
                "per_round_s": C.median([r["round_seconds"] / max(1, r["rounds"]) for r in runs]),
                "trace_ms_per_step": C.median([1000 * r["trace_seconds"] / max(1, steps) for r in runs]),
                "base_ms_per_step": C.median([1000 * b["seconds"] / max(1, steps) for b in base]),
                "store_MiB": runs[0]["store_bytes"] / 2**20,
            }
        )
    print(
        f"\nMetaInfluence overhead suite: digits pool of {args.pool} tasks, {args.backbone}, batch 16, {args.epochs} epochs, "
        f"one round per epoch, {args.pairs} interleaved repetitions, loads {loads}"
    )
    print(C.table(rows))
    C.save(name, {"environment": env, "config": vars(args), "loads": loads, "rows": rows, "raw": raw})


BREAKDOWN = (  # (module, attribute path) of the functions timed by --breakdown; missing ones are skipped
    ("lightning_metaif.callback", "MetaInfluence.on_train_start"),
    ("lightning_metaif.callback", "MetaInfluence.on_train_batch_end"),
    ("lightning_metaif.callback", "MetaInfluence._trace_step"),
    ("lightning_metaif.callback", "MetaInfluence._scaling"),
    ("lightning_metaif.estimators", "Trajectory.on_step"),
    ("lightning_metaif.influence.tracin", "TracInAccumulator.update"),
    ("lightning_metaif.influence.projection", "RandomProjection.__call__"),
    ("lightning_metaif.influence.store.store", "GradientStore.append_step"),
    ("lightning_metaif.influence.store.store", "GradientStore.flush"),
    ("lightning_metaif.callback", "MetaInfluence._run_round"),
    ("lightning_metaif.estimators", "_reference"),
    ("lightning_metaif.callback", "MetaInfluence._make_round"),
    ("lightning_metaif.callback", "MetaInfluence._publish"),
    ("lightning.pytorch.core.module", "LightningModule.log_dict"),
    ("lightning_metaif.dashboards.files", "RoundFileWriter.write"),
)


def breakdown(args, splits, env, name: str) -> None:
    """Where the callback's time goes: wall seconds inside each function of BREAKDOWN, per call and per run
    (MAML, trajectory with the per-step store, the suite's configuration), for this checkout's code."""
    import collections
    import functools
    import importlib

    spent: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()
    for module_name, path in BREAKDOWN:
        owner = importlib.import_module(module_name)
        *parents, attribute = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent, None)
        if owner is None or not hasattr(owner, attribute):
            continue
        original = getattr(owner, attribute)

        def timed(*a, __original=original, __path=path, **k):
            start = time.perf_counter()
            try:
                return __original(*a, **k)
            finally:
                spent[__path] += time.perf_counter() - start
                calls[__path] += 1

        setattr(owner, attribute, functools.wraps(original)(timed))
    tmp = tempfile.mkdtemp(prefix="bench_overhead_")
    try:
        suite_run(splits, args, "maml", "trajectory", "per-step", os.path.join(tmp, "warm"))
        spent.clear()
        calls.clear()
        for rep in range(args.pairs):
            suite_run(splits, args, "maml", "trajectory", "per-step", os.path.join(tmp, str(rep)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [
        {
            "function": path,
            "ms_per_run": 1000 * spent[path] / args.pairs,
            "ms_per_call": 1000 * spent[path] / calls[path],
            "calls_per_run": calls[path] / args.pairs,
        }
        for path in sorted(spent, key=spent.__getitem__, reverse=True)
    ]
    print(f"\nWhere the callback's time goes ({args.pairs} runs, load {C.load()}):")
    print(C.table(rows))
    C.save(name, {"environment": env, "config": vars(args), "rows": rows})


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
    parser.add_argument(
        "--suite", action="store_true", help="issue 12's rows: both modules, all stores, one run"
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="time inside the callback's functions (trajectory, per-step store)",
    )
    parser.add_argument("--backbone", default="mlp", choices=("mlp", "convnet"), help="--suite's backbone")
    parser.add_argument("--pairs", type=int, default=None, help="repetitions (default 3, --full 5)")
    args = parser.parse_args()
    C.set_threads(args.threads)
    pairs = args.pairs
    args.pool, args.epochs, args.pairs = (1000, 5, 5) if args.full else (200, 3, 3)
    args.pairs = pairs or args.pairs
    args.projection_dim, args.cg_iterations = (args.projection_dim or None), 20
    name = "bench_overhead" + (f"_{args.tag}" if args.tag else "")
    env = C.environment()
    splits = digits_splits(num_train_tasks=args.pool, num_val_tasks=20, num_test_tasks=10, seed=0)
    if args.suite:
        suite(args, splits, env, name.replace("bench_overhead", "bench_overhead_suite"))
        return
    if args.breakdown:
        breakdown(args, splits, env, name.replace("bench_overhead", "bench_overhead_breakdown"))
        return
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
