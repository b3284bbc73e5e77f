"""This project's estimators next to dattri's and kronfluence's on the faithfulness problems.

Each task's MAML query loss (adapted from λ on its support set) is handed to the peers as a single-level
per-example loss: the "examples" are tasks, the loss of an example is ``problem.task_loss(params, task)``,
so a peer's influence of example k is its estimate of task k's influence. Ground truth: leave-one-task-out
retraining (``bench_faithfulness.py``: damped Newton to convergence, L2 = 0.1). Reported per estimator:
Spearman with the truth (scores oriented so that positive = the task helps) and seconds. The same damping
``δ = 1e-3`` and the L2 term (as ``regularization`` for dattri) are used everywhere.

Peers, run only when installed (see BENCHMARKS.md for the install command that keeps the CPU torch):

* dattri 0.3: ``IFAttributorExplicit`` (IF), ``IFAttributorCG``, ``IFAttributorArnoldi``, ``TracInAttributor``,
  ``TRAKAttributor``;
* kronfluence 1.0: EK-FAC (``Analyzer.fit_all_factors`` + ``compute_pairwise_scores``).

A peer that cannot run on a problem is reported with its error.

``--tracin-audit``: why TracIn differed from dattri's on problem (b). For several seeds of problem (b) (seed 0
is the main table's problem; seed s > 0 draws another pool of 30 training tasks and another initial λ, hence
another optimum λ* and retraining truth), both libraries are run on the
*same* checkpoint λ* and the same per-task loss, and their inputs are compared before their outputs: the
per-task gradients and the reference gradients each computes, against an independent ``torch.autograd.grad``
loop over tasks. Then the scores: ours, dattri's ``TracInAttributor`` as the benchmark called it (dattri 0.3
always projects the gradients, by default with a seeded Gaussian matrix to 512 dimensions, even when
``projector_kwargs`` is not given), dattri with ``proj_type="identity"``, and dattri's default projection
with other projection seeds; Spearman of each with leave-one-task-out retraining.

Usage::

    python benchmarks/bench_peers.py                       # problems (a)-(c), ~3 min
    python benchmarks/bench_peers.py --tracin-audit        # problem (b), 5 seeds, ~2 min
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import traceback
from pathlib import Path

import _common as C
import torch
from scipy.stats import spearmanr
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_faithfulness as BF  # noqa: E402

from lightning_metaif.influence.estimators import task_influence  # noqa: E402
from lightning_metaif.influence.retraining import leave_one_task_out, train_to_convergence  # noqa: E402
from lightning_metaif.influence.tasks import Task  # noqa: E402

DAMPING = 1e-3


class Holder(nn.Module):
    """The meta-parameters as an ``nn.Module`` (names with ``.`` become ``__``), for libraries that need one."""

    def __init__(self, params: dict) -> None:
        super().__init__()
        self.names = {name.replace(".", "__"): name for name in params}
        for safe, name in self.names.items():
            self.register_parameter(safe, nn.Parameter(params[name].detach().clone()))

    def original(self, params: dict) -> dict:
        return {self.names[k]: v for k, v in params.items()}


def task_loss_fn(problem, holder: Holder, task_dims: int):
    """``loss(params, (sx, sy, qx, qy))`` of one task, or the mean over a stacked batch of tasks."""

    def loss(params, data):
        sx, sy, qx, qy = data
        original = holder.original(params)
        if sx.dim() == task_dims:
            return problem.task_loss(original, Task(sx, sy, qx, qy))
        losses = [problem.task_loss(original, Task(*(t[i] for t in data))) for i in range(sx.shape[0])]
        return torch.stack(losses).mean()

    return loss


def loaders(train, ref, batch: int):
    from torch.utils.data import DataLoader, TensorDataset

    def make(tasks, size):
        data = TensorDataset(tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y)
        return DataLoader(data, batch_size=size, shuffle=False)

    return make(train, batch), make(ref, batch), make(train, len(train))


def dattri_estimators(problem, params, train, ref, l2):
    from dattri.algorithm.influence_function import IFAttributorArnoldi, IFAttributorCG, IFAttributorExplicit
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    holder = Holder(params)
    loss = task_loss_fn(problem, holder, train.support_x.dim() - 1)
    task = AttributionTask(loss_func=loss, model=holder, checkpoints=holder.state_dict())
    train_loader, test_loader, full_loader = loaders(train, ref, 8)
    reg = l2 + DAMPING
    holder32 = Holder({k: v.float() for k, v in params.items()})
    task32 = AttributionTask(
        loss_func=task_loss_fn(problem, holder32, train.support_x.dim() - 1),
        model=holder32,
        checkpoints=holder32.state_dict(),
    )
    loaders32 = loaders(train.to(torch.float32), ref.to(torch.float32), 8)

    def influence(attributor, loaders=(train_loader, test_loader, full_loader)):
        train_loader, test_loader, full_loader = loaders
        attributor.cache(full_loader)
        # dattri's IF score = -∇L_testᵀ H⁻¹ ∇L_train summed as "influence on the test loss"; its sign is
        # checked against the truth below, we report the orientation that makes positive = helps.
        return attributor.attribute(train_loader, test_loader).sum(1)

    def trak():
        def correct_probability(params, data):
            return torch.exp(-loss(params, data))

        from dattri.func.utils import flatten_func

        attributor = TRAKAttributor(
            task=task,
            correct_probability_func=flatten_func(holder)(correct_probability),
            device="cpu",
            projector_kwargs={"proj_dim": 64, "device": "cpu"},
        )
        attributor.cache(full_loader)
        return attributor.attribute(test_loader).sum(1)

    def tracin():
        attributor = TracInAttributor(
            task=task, weight_list=torch.ones(1), normalized_grad=False, device="cpu"
        )
        return attributor.attribute(train_loader, test_loader).sum(1)

    return {
        "dattri IF (explicit)": lambda: influence(IFAttributorExplicit(task=task, regularization=reg)),
        "dattri IF (CG)": lambda: influence(IFAttributorCG(task=task, regularization=reg, max_iter=100)),
        # dattri's Arnoldi works in float32 internally: run it on a float32 copy of the problem.
        "dattri Arnoldi (float32)": lambda: influence(
            IFAttributorArnoldi(task=task32, regularization=reg, max_iter=40, proj_dim=20), loaders32
        ),
        "dattri TracIn": tracin,
        "dattri TRAK": trak,
    }


def kronfluence_estimators(problem, params, train, ref, l2):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.task import Task as KTask

    def ekfac():
        model = problem if isinstance(problem, nn.Module) else None
        if model is None or not any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules()):
            raise TypeError(
                f"{type(problem).__name__} has no nn.Linear/nn.Conv2d modules: EK-FAC factors are per supported "
                "layer, and this problem is a pure function of its parameters."
            )

        class MetaTask(KTask):
            def compute_train_loss(self, batch, model, sample=False):
                sx, sy, qx, qy = batch
                meta = {k: v for k, v in model.named_parameters()}
                losses = [
                    problem.task_loss(meta, Task(sx[i], sy[i], qx[i], qy[i])) for i in range(sx.shape[0])
                ]
                return torch.stack(losses).sum()

            def compute_measurement(self, batch, model):
                return self.compute_train_loss(batch, model)

        import tempfile

        from torch.utils.data import TensorDataset

        model.load_state_dict({k: v.detach() for k, v in params.items()}, strict=False)
        model = prepare_model(model, MetaTask())
        with tempfile.TemporaryDirectory() as root:
            analyzer = Analyzer(
                analysis_name="metaif", model=model, task=MetaTask(), output_dir=root, cpu=True
            )
            train_data = TensorDataset(train.support_x, train.support_y, train.query_x, train.query_y)
            ref_data = TensorDataset(ref.support_x, ref.support_y, ref.query_x, ref.query_y)
            analyzer.fit_all_factors(factors_name="ekfac", dataset=train_data, per_device_batch_size=8)
            analyzer.compute_pairwise_scores(
                scores_name="s",
                factors_name="ekfac",
                query_dataset=ref_data,
                train_dataset=train_data,
                per_device_query_batch_size=8,
                per_device_train_batch_size=8,
            )
            scores = analyzer.load_pairwise_scores("s")["all_modules"]
        return scores.sum(0)

    return {"kronfluence EK-FAC": ekfac}


def ours(problem, params, train, ref, l2):
    same = dict(l2=l2, damping=DAMPING, curvature="exact")
    return {
        "ours task-IF (dense)": lambda: (
            task_influence(problem, params, train, ref, solver="dense", **same).scores
        ),
        "ours task-IF (CG)": lambda: task_influence(problem, params, train, ref, solver="cg", **same).scores,
        "ours task-IF (Arnoldi)": lambda: (
            task_influence(
                problem, params, train, ref, solver="arnoldi", solver_options={"rank": 20}, **same
            ).scores
        ),
        "ours TracIn (IP at λ*)": lambda: (
            task_influence(problem, params, train, ref, estimator="tracin").scores
        ),
        "ours TracIn, SJLT d=64": lambda: (
            task_influence(
                problem,
                params,
                train,
                ref,
                estimator="tracin",
                projection=__import__(
                    "lightning_metaif.influence.projection", fromlist=["RandomProjection"]
                ).RandomProjection(
                    sum(v.numel() for v in params.values()), 64, kind="sjlt", dtype=torch.float64
                ),
            ).scores
        ),
    }


def run(name, problem, params, train, ref) -> list[dict]:
    fit = train_to_convergence(problem, params, train, l2=BF.L2, max_iter=200)
    truth = leave_one_task_out(problem, fit.params, train, ref, l2=BF.L2, max_iter=100).deltas
    estimators = dict(ours(problem, fit.params, train, ref, BF.L2))
    if importlib.util.find_spec("dattri"):
        estimators.update(dattri_estimators(problem, fit.params, train, ref, BF.L2))
    if importlib.util.find_spec("kronfluence"):
        estimators.update(kronfluence_estimators(problem, fit.params, train, ref, BF.L2))
    rows = []
    for est, fn in estimators.items():
        start = time.perf_counter()
        try:
            scores = torch.as_tensor(fn()).detach().double().reshape(-1)
            seconds = time.perf_counter() - start
            rho = float(spearmanr(scores, truth)[0])
            # Libraries differ in sign convention (influence on the test loss vs on its decrease): orient
            # every peer's scores so that positive = the task helps, and say when that flipped them.
            flipped = est.startswith(("dattri", "kronfluence")) and rho < 0
            row = {
                "problem": name,
                "estimator": est,
                "spearman": abs(rho) if flipped else rho,
                "sign_flipped": flipped,
                "seconds": seconds,
            }
        except Exception as error:  # noqa: BLE001 - a peer that cannot run is a result
            row = {
                "problem": name,
                "estimator": est,
                "spearman": float("nan"),
                "sign_flipped": False,
                "seconds": float("nan"),
                "error": f"{type(error).__name__}: {error}"[:300],
            }
            traceback.print_exc(limit=2)
        rows.append(row)
        print(C.table([row]), flush=True)
    return rows


def autograd_gradients(problem, params: dict, tasks) -> torch.Tensor:
    """Independent per-task gradients: one ``torch.autograd.grad`` of ``task_loss`` per task, flattened."""
    leaves = list(params.values())
    rows = []
    for i in range(len(tasks)):
        task = Task(tasks.support_x[i], tasks.support_y[i], tasks.query_x[i], tasks.query_y[i])
        grads = torch.autograd.grad(problem.task_loss(params, task), leaves)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def dattri_tracin(
    problem, params: dict, train, ref, **projector
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dattri's TracIn pair matrix [train, ref] at one checkpoint, and the per-task gradients it used."""
    import dattri.algorithm.tracin as dattri_tracin_module
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask

    # dattri updates its module-level default projector settings in place: restore them for every call
    dattri_tracin_module.DEFAULT_PROJECTOR_KWARGS.update(
        {"proj_dim": 512, "proj_max_batch_size": 32, "proj_seed": 0, "device": "cpu", "proj_type": "normal"}
    )
    holder = Holder(params)
    loss = task_loss_fn(problem, holder, train.support_x.dim() - 1)
    task = AttributionTask(loss_func=loss, model=holder, checkpoints=holder.state_dict())
    train_loader, test_loader, _ = loaders(train, ref, 8)
    attributor = TracInAttributor(
        task=task,
        weight_list=torch.ones(1),
        normalized_grad=False,
        device="cpu",
        projector_kwargs=projector or None,
    )
    pairs = attributor.attribute(train_loader, test_loader)
    parameters, _ = task.get_param(ckpt_idx=0)
    data = (train.support_x, train.support_y, train.query_x, train.query_y)
    ref_data = (ref.support_x, ref.support_y, ref.query_x, ref.query_y)
    return (
        pairs,
        attributor.grad_loss_func(parameters, data),
        attributor.grad_target_func(parameters, ref_data),
    )


def tracin_audit(seeds: int, projection_seeds: int) -> dict:
    from lightning_metaif.influence.gradients import per_task_gradients

    rows, per_seed = [], []
    for seed in range(seeds):
        problem, params, train, ref = BF.problem_b(30, seed=seed)
        if seed > 0:  # another pool of training tasks (seed 0: the pool of the main table)
            from lightning_metaif.meta.pools import SinusoidTaskPool

            train = SinusoidTaskPool(30, shots=10, queries=10, seed=100 + seed, dtype=torch.float64).batch()
        fit = train_to_convergence(problem, params, train, l2=BF.L2, max_iter=200)
        lam = fit.params
        truth = leave_one_task_out(problem, lam, train, ref, l2=BF.L2, max_iter=100).deltas
        # inputs: per-task and reference gradients, three ways, at the same λ*
        independent = autograd_gradients(problem, lam, train)
        independent_ref = autograd_gradients(problem, lam, ref)
        engine, _ = per_task_gradients(problem, lam, train)
        engine_ref, _ = per_task_gradients(problem, lam, ref)
        _, d_train, d_ref = dattri_tracin(problem, lam, train, ref, proj_type="identity")

        def rel(a, b):
            return float((a.double() - b.double()).abs().max() / b.double().abs().max())

        ours_scores = task_influence(problem, lam, train, ref, estimator="tracin").scores
        exact = independent @ independent_ref.mean(0)  # TracIn at λ*: ⟨∇f, g_k⟩, f = mean reference loss
        scores = {
            "ours (task_influence tracin)": ours_scores,
            "independent autograd ⟨∇f, g_k⟩": exact,
            "dattri, proj_type=identity": dattri_tracin(problem, lam, train, ref, proj_type="identity")[
                0
            ].sum(1),
            "dattri as benchmarked (Gaussian 512, seed 0)": dattri_tracin(problem, lam, train, ref)[0].sum(1),
        }
        projected = [
            float(spearmanr(dattri_tracin(problem, lam, train, ref, proj_seed=s)[0].sum(1), truth)[0])
            for s in range(projection_seeds)
        ]
        rhos = {name: float(spearmanr(v.detach().double(), truth)[0]) for name, v in scores.items()}
        record = {
            "seed": seed,
            "grad_rel_diff_engine_vs_autograd": rel(engine, independent),
            "grad_rel_diff_dattri_vs_autograd": rel(d_train, independent),
            "ref_grad_rel_diff_engine_vs_autograd": rel(engine_ref, independent_ref),
            "ref_grad_rel_diff_dattri_vs_autograd": rel(d_ref, independent_ref),
            "scores_rel_diff_ours_vs_independent": rel(ours_scores, exact),
            "scores_rel_diff_dattri_identity_vs_independent": rel(
                scores["dattri, proj_type=identity"] / len(ref), exact
            ),
            "spearman": rhos,
            "spearman_dattri_default_projection_seeds": projected,
        }
        per_seed.append(record)
        row = {"seed": seed, **{k: v for k, v in rhos.items()}}
        row["dattri Gaussian 512, mean over proj. seeds"] = sum(projected) / len(projected)
        row["min"], row["max"] = min(projected), max(projected)
        rows.append(row)
        print(C.table([row]), flush=True)
        print({k: v for k, v in record.items() if "diff" in k}, flush=True)
    return {"rows": rows, "per_seed": per_seed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--problems", nargs="*", default=["a", "b", "c"])
    parser.add_argument("--name", default="bench_peers", help="results file name")
    parser.add_argument(
        "--tracin-audit", action="store_true", help="ours vs dattri's TracIn on (b), per seed"
    )
    parser.add_argument("--seeds", type=int, default=5, help="problem (b) seeds for --tracin-audit")
    parser.add_argument("--projection-seeds", type=int, default=10, help="dattri projection seeds")
    args = parser.parse_args()
    C.set_threads(args.threads)
    env = C.environment()
    if args.tracin_audit:
        env["dattri"] = _version("dattri")
        audit = tracin_audit(args.seeds, args.projection_seeds)
        print(C.table(audit["rows"]))
        C.save("bench_peers_tracin_audit", {"environment": env, **audit})
        return
    env["dattri"] = _version("dattri")
    env["kronfluence"] = _version("kronfluence")
    builders = {
        "a: iMAML-proximal logreg": lambda: BF.problem_a(30),
        "b: MAML sinusoid MLP": lambda: BF.problem_b(30),
        "c: MAML digits linear": lambda: BF.problem_c(20),
    }
    rows = []
    for name, build in builders.items():
        if name[0] in args.problems:
            rows += run(name, *build())
    print(C.table(rows, ["problem", "estimator", "spearman", "sign_flipped", "seconds", "error"]))
    C.save(args.name, {"environment": env, "rows": rows})


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    main()
