"""Cost and accuracy of the sparse SJLT projection against the dense Rademacher and Gaussian ones.

For ``p`` parameters projected to ``d = 1024``: the time to project a chunk of 16 gradients (what the store
does per training step; medians of interleaved repeats after a warm-up, 1 thread), and the accuracy over 10
seeds: the spread of ``‖Pa‖²/‖a‖² − 1`` and of the inner-product error ``(⟨Pa, Pb⟩ − ⟨a, b⟩) / (‖a‖‖b‖)`` for
correlated gradient-like vectors (heavy-tailed coordinates, so sparsity is not flattered), and the Spearman
correlation of 200 projected inner products with the exact ones (a TracIn ranking).

``--detection``: does scoring from the store's projected gradients lose corrupted-task detection? For each task
family (digits, MLP 64-32-5, 2,245 parameters; Gaussian mixtures, MLP 16-64-5, 1,413 parameters) and seed, a
real Lightning run of MAML (20% of the tasks ``shuffle_query``-corrupted, outer Adam 3e-3, 10 epochs, batch 10)
with ``MetaInfluence(Trajectory(...), store=GradientStoreConfig(trajectory=True, ...))`` is repeated with the
store unprojected (float32 rows) and projected by the SJLT to d = 1,024 (the default, float16), 256 and 64.
The same seed gives the same run (checked: the callback's own unprojected scores agree across the repeats), so
the comparison is paired. The store's rows are ``w_k √D_t g_k`` (``D_t``: the step's learning rates times
Adam's preconditioner); each store is scored with :func:`~lightning_metaif.influence.tracin.store_tracin`
against ``√D_t ∇f`` per step (the reference gradient the callback used at that step and the step's scaling, both
recorded, projected with the run's own projection): plain TracIn along the path, ``Σ_t (w_k/B)⟨∇f, D_t g_k⟩``
(checked against the same sum kept in memory, unprojected, during the run). Also against ``∇f`` alone
("reference only": what can be scored from the store without ``D_t``, which the store does not keep).
Reported: AUROC of the corrupted tasks (lowest scores flagged) per run, the paired AUROC differences projected −
unprojected, and the callback's default ``Trajectory`` AUROC (unprojected, cosine / improvement / best) for
context.

Usage::

    python benchmarks/bench_projection.py              # p = 10^5 and 10^6, ~1 min
    python benchmarks/bench_projection.py --detection  # 2 families x 3 seeds x 4 stores, ~10 min
"""

from __future__ import annotations

import argparse

import _common as C
import torch
from scipy.stats import spearmanr

from lightning_metaif.influence.projection import RandomProjection

KINDS = ("sjlt", "rademacher", "gaussian")


def accuracy(p: int, d: int, seeds: int) -> dict:
    g = torch.Generator().manual_seed(0)
    # Heavy-tailed coordinates (Student-t like): a few large entries, as in real gradients.
    scale = torch.randn(p, generator=g).abs() ** 3
    a = torch.randn(p, generator=g) * scale
    b = 0.5 * a + torch.randn(p, generator=g) * scale
    queries = torch.randn(200, p, generator=g) * scale
    exact_rank = (queries @ a).numpy()
    out = {}
    for kind in KINDS:
        norm_err, inner_err, rank = [], [], []
        for seed in range(seeds):
            projection = RandomProjection(p, d, seed=seed, kind=kind)
            pa, pb = projection(torch.stack([a, b]))
            norm_err.append(float(pa @ pa / (a @ a)) - 1)
            inner_err.append(float((pa @ pb - a @ b) / (a.norm() * b.norm())))
            if seed < 3:
                rank.append(float(spearmanr((projection(queries) @ pa).numpy(), exact_rank)[0]))
        out[kind] = {
            "norm_error_std": float(torch.tensor(norm_err).std()),
            "inner_error_std": float(torch.tensor(inner_err).std()),
            "tracin_spearman": sum(rank) / len(rank),
        }
    out["jl_sigma_sqrt_2_over_d"] = (2 / d) ** 0.5
    return out


def timing(p: int, d: int, rows: int, repeats: int, kinds=KINDS) -> dict:
    x = torch.randn(rows, p)
    projections = {kind: RandomProjection(p, d, seed=0, kind=kind) for kind in kinds}
    times = C.interleaved({k: (lambda pr=pr: pr(x)) for k, pr in projections.items()}, repeats=repeats)
    med = {k: C.median(v) for k, v in times.items()}
    return {
        "times_s": times,
        "median_s": med,
        "ratio_vs_rademacher": {k: med[k] / med["rademacher"] for k in med},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=10, help="projections per kind for the accuracy")
    parser.add_argument("--detection", action="store_true", help="corrupted-task AUROC from projected stores")
    parser.add_argument("--seeds-detection", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--families", nargs="*", default=["digits", "gaussian"])
    args = parser.parse_args()
    C.set_threads(args.threads)
    if args.detection:
        detection_main(args)
        return
    env = C.environment()
    results, rows = {}, []
    for p in (100_000, 1_000_000):
        kinds = (
            KINDS if p < 1_000_000 else ("sjlt", "rademacher")
        )  # a dense Gaussian P of 10^9 entries: minutes
        t = timing(p, args.dim, 16, args.repeats if p < 1_000_000 else 2, kinds)
        acc = results[100_000]["accuracy"] if p > 100_000 else accuracy(p, args.dim, args.seeds)
        results[p] = {"timing": t, "accuracy": acc}
        for kind in kinds:
            rows.append(
                {
                    "p": p,
                    "kind": kind,
                    "project 16 rows, median s": t["median_s"][kind],
                    "vs rademacher": t["ratio_vs_rademacher"][kind],
                    "norm err std": acc[kind]["norm_error_std"],
                    "inner err std": acc[kind]["inner_error_std"],
                    "TracIn Spearman": acc[kind]["tracin_spearman"],
                }
            )
    print(f"d = {args.dim}; √(2/d) = {(2 / args.dim) ** 0.5:.4f} (accuracy measured at p = 100,000)")
    print(C.table(rows))
    C.save("bench_projection", {"environment": env, "dim": args.dim, "results": results, "rows": rows})


# --- detection from the projected store ----------------------------------------------------------------------

DETECTION_DIMS = (None, 1024, 256, 64)  # None: the store keeps the gradients unprojected (float32)


def _recording_trajectory():
    """``Trajectory`` that remembers the reference gradient each traced step used (to score the store)."""
    from lightning_metaif.estimators import Trajectory
    from lightning_metaif.influence.tracin import TracInAccumulator

    class RecordingTrajectory(Trajectory):
        """Also records, per traced step, the reference gradient and √D_t (the step's learning rates times
        Adam's preconditioner), and keeps plain TracIn ``Σ_t (w_k/B)⟨∇f, D_t g_k⟩`` in memory, unprojected."""

        def __post_init__(self) -> None:
            super().__post_init__()
            self.references: list[torch.Tensor] = []
            self.reference_of_step: dict[int, int] = {}
            self.root_scaling_of_step: dict[int, torch.Tensor | None] = {}
            self.plain = TracInAccumulator(normalize="none", weighting="none", keep="all")

        def on_step(self, step, task_ids, gradients, **kwargs) -> None:
            if not self.references or self.references[-1] is not self._reference:
                self.references.append(self._reference)
            self.reference_of_step[int(step)] = len(self.references) - 1
            scaling = kwargs["scaling"]
            self.root_scaling_of_step[int(step)] = None if scaling is None else scaling.detach().sqrt().cpu()
            self.plain.update(
                step,
                1.0,
                task_ids,
                gradients,
                self._reference.to(gradients),
                batch_size=kwargs["batch_size"],
                preconditioner=None if scaling is None else scaling.to(gradients),
                task_weights=kwargs["task_weights"],
            )
            super().on_step(step, task_ids, gradients, **kwargs)

        def step_reference(self, step: int, preconditioned: bool = True) -> torch.Tensor:
            """``√D_t ∇f`` (the stored rows are ``w_k √D_t g_k``: their product is plain TracIn's ``⟨∇f, D_t
            g_k⟩``), or ``∇f`` alone (what a user without ``D_t`` can score the store with)."""
            ref = self.references[self.reference_of_step[step]].float().cpu()
            root = self.root_scaling_of_step[step]
            return ref * root.float() if preconditioned and root is not None else ref

    return RecordingTrajectory()


def _detection_family(name: str, seed: int, num_tasks: int):
    from lightning_metaif.meta.datasets import digits_splits, gaussian_mixture_splits

    if name == "digits":
        splits = digits_splits(num_train_tasks=num_tasks, num_val_tasks=20, num_test_tasks=5, seed=seed)
        return splits, lambda: torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5)
        )
    splits = gaussian_mixture_splits(num_train_tasks=num_tasks, num_val_tasks=20, num_test_tasks=5, seed=seed)
    return splits, lambda: torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 5)
    )


OFFLINE = {  # projections applied here to the unprojected store's float32 rows (same run, same references)
    "offline: float16 rows, unprojected": (None, None),
    "offline: sjlt d=1024, the store's seed, float32": ("sjlt-same-seed", 1024),
    "offline: sjlt d=1024, float32": ("sjlt", 1024),
    "offline: rademacher d=1024, float32": ("rademacher", 1024),
    "offline: gaussian d=1024, float32": ("gaussian", 1024),
}


def _offline_variants(store, estimator, ids: torch.Tensor, seed: int) -> dict:
    """Plain TracIn from the unprojected store's rows under other projections / storage precision: separates the
    projection's error from float16 storage, and SJLT from dense projections at the same d."""
    from lightning_metaif.influence.projection import RandomProjection

    out = {}
    position = {int(t): i for i, t in enumerate(ids.tolist())}
    for name, (kind, dim) in OFFLINE.items():
        # another draw (seed + 1) than the store's, except "the store's seed" (must reproduce the d = 1024 store)
        projection = (
            None
            if kind is None
            else RandomProjection(
                store.dim, dim, seed=seed if kind == "sjlt-same-seed" else seed + 1, kind=kind.split("-")[0]
            )
        )
        step_list = sorted(estimator.reference_of_step)
        refs = torch.stack([estimator.step_reference(t) for t in step_list])
        refs = refs if projection is None else projection(refs)
        row_of = {t: i for i, t in enumerate(step_list)}
        scores = torch.zeros(len(ids), dtype=torch.float64)
        for info in store.checkpoints():
            for _, _, block, block_ids, steps, lrs in store.iter_blocks(info, columns=True):
                rows = block.clone()
                rows = rows.half().float() if projection is None else projection(rows)
                which = torch.tensor([row_of[int(t)] for t in steps])
                contrib = (rows * refs[which]).sum(1).double() * torch.from_numpy(lrs).double()
                index = torch.tensor([position[int(t)] for t in block_ids])
                scores.index_add_(0, index, contrib)
        out[name] = scores
    return out


def _detection_run(splits, backbone, pool, truth, dim, seed: int, epochs: int) -> dict:
    import tempfile

    import lightning.pytorch as pl
    from sklearn.metrics import roc_auc_score

    from lightning_metaif import GradientStoreConfig, MetaInfluence
    from lightning_metaif.influence.store import GradientStore
    from lightning_metaif.influence.tracin import store_tracin
    from lightning_metaif.meta.datamodule import MetaDataModule
    from lightning_metaif.meta.maml import MAML

    pl.seed_everything(seed, verbose=False)
    estimator = _recording_trajectory()
    config = GradientStoreConfig(
        projection_dim=dim, trajectory=True, dtype="float32" if dim is None else "float16"
    )
    influence = MetaInfluence(estimator, store=config, verbose=False, seed=seed)
    dm = MetaDataModule(pool, splits.val, batch_size=10, seed=seed, task_state=influence.task_state)
    maml = MAML(backbone(), inner_lr=0.5, outer_lr=3e-3, optimizer="adam", num_ways=5)
    with tempfile.TemporaryDirectory() as root:
        _, seconds = C.fit_quietly(maml, dm, max_epochs=epochs, callbacks=[influence], default_root_dir=root)
        projection = influence._projection  # the run's own projection (None: d >= p, kept unprojected)
        if dim is not None and dim < influence._layout.numel:
            assert projection is not None, "the store should project"
        store = GradientStore.open(influence._root / "store" / "rank0", readonly=True)
        ids = torch.as_tensor(truth["ids"])
        stored, reference_only = (
            store_tracin(
                store,
                lambda step, pre=pre: (lambda r: r if projection is None else projection(r[None])[0])(
                    estimator.step_reference(step, preconditioned=pre)
                ),
                task_ids=ids,
            ).scores
            for pre in (True, False)
        )
        store_dim, store_dtype = store.dim, str(store.dtype)
        offline = _offline_variants(store, estimator, ids, seed) if dim is None else {}
        store.close()
    result = influence.result
    plain = estimator.plain.scores()
    plain_of = dict(zip(plain.task_ids.tolist(), plain.scores.double().tolist()))
    plain = torch.tensor([plain_of.get(int(t), 0.0) for t in ids], dtype=torch.float64)
    positives = torch.isin(ids, torch.as_tensor(truth["corrupted"]))
    callback_scores = result.scores[torch.searchsorted(result.task_ids, ids)].double()
    return {
        "store_dim": store_dim,
        "store_dtype": store_dtype,
        "num_params": influence._layout.numel,
        "auroc_store": float(roc_auc_score(positives.numpy(), (-stored).numpy())),
        "auroc_store_reference_only": float(roc_auc_score(positives.numpy(), (-reference_only).numpy())),
        "store_vs_in_memory_plain_rel_diff": float((stored - plain).abs().max() / plain.abs().max()),
        "auroc_callback_default": float(roc_auc_score(positives.numpy(), (-callback_scores).numpy())),
        "offline_auroc": {
            name: float(roc_auc_score(positives.numpy(), (-v).numpy())) for name, v in offline.items()
        },
        "offline_scores": offline,
        "callback_scores": callback_scores,
        "store_scores": stored,
        "seconds": seconds,
    }


def detection(seeds: int, num_tasks: int, epochs: int, families: list[str]) -> tuple[list[dict], list[dict]]:
    from lightning_metaif.meta.noise import corrupt_tasks

    runs = []
    for family in families:
        for seed in range(seeds):
            splits, backbone = _detection_family(family, seed, num_tasks)
            pool, corruption = corrupt_tasks(splits.train, 0.2, mode="shuffle_query", seed=seed)
            truth = {"ids": pool.batch().task_ids.sort().values, "corrupted": corruption.task_ids}
            base = None
            for dim in DETECTION_DIMS:
                out = _detection_run(splits, backbone, pool, truth, dim, seed, epochs)
                if base is None:
                    base = out
                same_run = float((out["callback_scores"] - base["callback_scores"]).abs().max())
                rho = float(spearmanr(out["store_scores"].numpy(), base["store_scores"].numpy())[0])
                row = {
                    "family": family,
                    "seed": seed,
                    "dim": "unprojected" if dim is None else dim,
                    "store_dim": out["store_dim"],
                    "p": out["num_params"],
                    "auroc": out["auroc_store"],
                    "delta_vs_unprojected": out["auroc_store"] - base["auroc_store"],
                    "auroc_reference_only": out["auroc_store_reference_only"],
                    "delta_reference_only": out["auroc_store_reference_only"]
                    - base["auroc_store_reference_only"],
                    "store_vs_in_memory_plain": out["store_vs_in_memory_plain_rel_diff"],
                    "spearman_vs_unprojected": rho,
                    "callback_default_auroc": out["auroc_callback_default"],
                    "callback_scores_max_diff": same_run,
                    "seconds": out["seconds"],
                }
                runs.append(row)
                print(C.table([row]), flush=True)
                for name, auroc in out["offline_auroc"].items():
                    rho = float(
                        spearmanr(out["offline_scores"][name].numpy(), base["store_scores"].numpy())[0]
                    )
                    extra = {
                        "family": family,
                        "seed": seed,
                        "dim": name,
                        "auroc": auroc,
                        "delta_vs_unprojected": auroc - base["auroc_store"],
                        "spearman_vs_unprojected": rho,
                    }
                    runs.append(extra)
                    print(C.table([extra]), flush=True)
    summary = []
    for family in families:
        for label in ["unprojected", *DETECTION_DIMS[1:], *OFFLINE]:
            sub = [r for r in runs if r["family"] == family and r["dim"] == label]
            deltas = torch.tensor([r["delta_vs_unprojected"] for r in sub])
            summary.append(
                {
                    "family": family,
                    "dim": label,
                    "seeds": len(sub),
                    "mean_auroc": sum(r["auroc"] for r in sub) / len(sub),
                    "min_auroc": min(r["auroc"] for r in sub),
                    "mean_delta": float(deltas.mean()),
                    "worst_delta": float(deltas.min()),
                    "mean_spearman_vs_unprojected": sum(r["spearman_vs_unprojected"] for r in sub) / len(sub),
                    **(
                        {
                            "mean_auroc_reference_only": sum(r["auroc_reference_only"] for r in sub)
                            / len(sub),
                            "mean_delta_reference_only": sum(r["delta_reference_only"] for r in sub)
                            / len(sub),
                            "worst_delta_reference_only": min(r["delta_reference_only"] for r in sub),
                        }
                        if "auroc_reference_only" in sub[0]
                        else {}
                    ),
                }
            )
    return runs, summary


def detection_main(args) -> None:
    env = C.environment()
    runs, summary = detection(args.seeds_detection, args.tasks, args.epochs, args.families)
    print(C.table(runs))
    print(C.table(summary))
    C.save(
        "bench_projection_detection",
        {
            "environment": env,
            "num_tasks": args.tasks,
            "epochs": args.epochs,
            "dims": [d for d in DETECTION_DIMS],
            "runs": runs,
            "summary": summary,
        },
    )


if __name__ == "__main__":
    main()
