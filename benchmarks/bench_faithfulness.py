"""Faithfulness of every estimator against retraining (docs/maths.md §7).

Ground truth: leave-one-task-out (LOO) retraining with ``lightning_metaif.influence.retraining``: float64,
damped Newton with the exact Hessian to a gradient norm < 1e-10, L2 term so that the total Hessian is clearly
positive definite at λ*, each retraining warm-started from λ*; truth_k = f(λ*_{-k}) − f(λ*) on held-out
reference tasks. Estimators: task-IF at its defaults (Gauss–Newton curvature, damping="auto", CG), task-IF with the
Gauss–Newton curvature and no damping (dense), with the exact total Hessian (dense / CG / LiSSA / Arnoldi
solvers), EK-FAC of the Gauss–Newton curvature (problems b and c: nn.Module networks; (a) is a functional problem
without layers, reported as an error row) and Ren et al.'s Γ surrogate (CG), direct-IF (dense), TracIn at
λ* (one checkpoint, η = 1: inner-product influence) and its ensemble (λ* plus 5 Gaussian copies, σ = 0.01).
Reported: Pearson, Spearman and sign agreement with the truth.

Problems:
(a) implicit (iMAML-proximal) logistic regression: ``tests/problems.ProximalMAML`` (30 unrolled steps of the
    proximal inner problem, γ = 1), 3-way Gaussian-blob tasks, 3 of them with shuffled query labels;
(b) MAML (one inner step) on sinusoids with a 1-10-1 MLP (``MAML`` module, mse);
(c) MAML on digits 5-way 1-shot with a linear 64→5 network (``MAML`` module), a small pool so that LOO is
    feasible.
Plus the linear datamodeling score (LDS) on (b): random 50% subsets retrained from scratch (Newton from the
seeded initialisation), several seeds; LDS = Spearman between the measured f(S) and f* + Σ_{k∉S} score_k (a score is the predicted increase
of f when its task is removed).
Targets: Spearman >= 0.9 on (a), >= 0.7 on (b).

Usage::

    python benchmarks/bench_faithfulness.py          # ~minutes on 2 cores
    python benchmarks/bench_faithfulness.py --full   # bigger pools, more LDS subsets and seeds
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import _common as C
import torch
from scipy.stats import pearsonr, spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from problems import ProximalMAML, classification_tasks  # noqa: E402

from lightning_metaif.influence.estimators import task_influence  # noqa: E402
from lightning_metaif.influence.problem import ParamLayout, trainable  # noqa: E402
from lightning_metaif.influence.retraining import (  # noqa: E402
    leave_one_task_out,
    reference_value,
    train_to_convergence,
)
from lightning_metaif.meta.maml import MAML  # noqa: E402
from lightning_metaif.meta.pools import SinusoidTaskPool  # noqa: E402

L2 = 0.1


def agreement(scores, truth) -> dict:
    s, t = torch.as_tensor(scores).double().reshape(-1), torch.as_tensor(truth).double().reshape(-1)
    return {
        "pearson": float(pearsonr(s, t)[0]),
        "spearman": float(spearmanr(s, t)[0]),
        "signs": float(((s > 0) == (t > 0)).double().mean()),
    }


def problem_a(m: int):
    problem = ProximalMAML(inner_lr=0.2, steps=30, gamma=1.0, kind="classification")
    train = classification_tasks(m, seed=1, corrupt=(0, 5, 11))
    ref = classification_tasks(10, seed=2, id_offset=1000)
    return problem, problem.init_params(4, 3, seed=0), train, ref


def _module_params(module: torch.nn.Module, seed: int) -> dict:
    torch.manual_seed(seed)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.3) if p.dim() > 1 else torch.nn.init.zeros_(p)
    return {k: v.detach().clone().requires_grad_(True) for k, v in module.meta_parameters().items()}


def problem_b(m: int, seed: int = 0):
    net = torch.nn.Sequential(torch.nn.Linear(1, 10), torch.nn.Tanh(), torch.nn.Linear(10, 1))
    problem = MAML(net, loss="mse", inner_lr=0.01, inner_steps=1).double()
    train = SinusoidTaskPool(m, shots=10, queries=10, seed=1, dtype=torch.float64).batch()
    ref = SinusoidTaskPool(20, shots=10, queries=10, seed=2, id_offset=10_000, dtype=torch.float64).batch()
    return problem, _module_params(problem, seed), train, ref


def problem_c(m: int):
    from lightning_metaif.meta.datasets import digits_splits

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5))
    problem = MAML(net, inner_lr=0.5, inner_steps=1, num_ways=5).double()
    splits = digits_splits(num_train_tasks=m, num_val_tasks=10, num_test_tasks=5, seed=0)
    train, ref = splits.train.batch(), splits.val.batch()
    train = type(train)(
        train.support_x.double(), train.support_y, train.query_x.double(), train.query_y, train.task_ids
    )
    ref = type(ref)(ref.support_x.double(), ref.support_y, ref.query_x.double(), ref.query_y, ref.task_ids)
    return problem, _module_params(problem, 0), train, ref


ESTIMATORS = {
    "task_if/defaults (GN, auto δ)": dict(estimator="task_if"),
    "task_if/GN dense δ=0": dict(estimator="task_if", curvature="gauss_newton", solver="dense", damping=0.0),
    "task_if/exact dense": dict(estimator="task_if", curvature="exact", solver="dense", damping=0.0),
    "task_if/exact cg": dict(
        estimator="task_if",
        curvature="exact",
        solver="cg",
        damping=1e-6,
        solver_options={"tolerance": 1e-10, "max_iterations": 500},
    ),
    "task_if/exact lissa": dict(
        estimator="task_if",
        curvature="exact",
        solver="lissa",
        damping=1e-3,
        solver_options={"iterations": 1000},
    ),
    "task_if/exact arnoldi": dict(
        estimator="task_if", curvature="exact", solver="arnoldi", damping=1e-3, solver_options={"rank": 20}
    ),
    "task_if/GN ekfac": dict(estimator="task_if", solver="ekfac"),
    "task_if/gamma cg": dict(estimator="task_if", curvature="gamma", solver="cg", damping=1e-3),
    "direct_if/dense": dict(estimator="direct_if", curvature="exact", solver="dense", damping=0.0),
    "tracin (IP at λ*)": dict(estimator="tracin"),
    "ensemble (λ*+5 noisy)": dict(estimator="ensemble", noise_copies=5, noise_std=0.01),
}


def evaluate(name: str, problem, params, train, ref) -> dict:
    t0 = time.perf_counter()
    fit = train_to_convergence(problem, params, train, l2=L2, max_iter=200)
    loo = leave_one_task_out(problem, fit.params, train, ref, l2=L2, max_iter=100)
    truth_s = time.perf_counter() - t0
    rows = []
    for est, cfg in ESTIMATORS.items():
        try:
            res = task_influence(problem, fit.params, train, ref, l2=L2, **cfg)
            row = {
                "problem": name,
                "estimator": est,
                **agreement(res.scores, loo.deltas),
                "seconds": res.diagnostics["seconds"],
            }
        except Exception as error:  # noqa: BLE001 - a failing solver is a result, reported as such
            row = {
                "problem": name,
                "estimator": est,
                "pearson": float("nan"),
                "spearman": float("nan"),
                "signs": float("nan"),
                "seconds": float("nan"),
                "error": f"{type(error).__name__}: {error}"[:200],
            }
        rows.append(row)
        print(C.table([row], ["problem", "estimator", "pearson", "spearman", "signs", "seconds"]), flush=True)
    info = {
        "num_tasks": len(train),
        "num_params": ParamLayout.of(trainable(params)).numel,
        "base_grad_norm": fit.grad_norm,
        "base_converged": fit.converged,
        "min_eigenvalue": fit.min_eigenvalue,
        "loo_max_grad_norm": max(loo.grad_norms),
        "loo_max_iterations": max(loo.iterations),
        "loo_all_converged": bool(max(loo.grad_norms) < 1e-9),
        "truth_seconds": truth_s,
        "truth_abs_mean": float(loo.deltas.abs().mean()),
    }
    return {"rows": rows, "info": info, "truth": loo.deltas.tolist(), "fit": fit}


def lds(m: int, subsets: int, seeds: int, scores_by: dict) -> dict:
    """LDS on problem (b): random 50% subsets retrained from scratch, per init seed."""
    out = {}
    for seed in range(seeds):
        problem, params, train, ref = problem_b(m, seed=seed)
        full = train_to_convergence(problem, params, train, l2=L2, max_iter=300)
        f_star = reference_value(problem, full.params, ref)
        results = {
            est: task_influence(problem, full.params, train, ref, l2=L2, **ESTIMATORS[est]).scores
            for est in scores_by
        }
        g = torch.Generator().manual_seed(100 + seed)
        measured, predicted = [], {est: [] for est in scores_by}
        converged = 0
        for _ in range(subsets):
            mask = (torch.rand(m, generator=g) < 0.5).double()
            fit = train_to_convergence(
                problem, params, train, l2=L2, task_weights=mask, max_iter=300, final_eigenvalue=False
            )
            converged += int(fit.converged)
            measured.append(reference_value(problem, fit.params, ref))
            for est in scores_by:
                predicted[est].append(f_star + float(((1 - mask) * results[est]).sum()))
        out[seed] = {
            "full_converged": full.converged,
            "subsets_converged": converged,
            **{est: float(spearmanr(predicted[est], measured)[0]) for est in scores_by},
        }
        print(
            f"  LDS seed {seed}: "
            + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in out[seed].items()),
            flush=True,
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)"
    )
    parser.add_argument("--skip-lds", action="store_true")
    args = parser.parse_args()
    C.set_threads(args.threads)
    m_a, m_b, m_c = (60, 60, 40) if args.full else (30, 30, 20)
    subsets, seeds = (50, 5) if args.full else (16, 3)
    env = C.environment()
    results = {}
    for name, build in (
        ("a: iMAML-proximal logreg", lambda: problem_a(m_a)),
        ("b: MAML sinusoid MLP", lambda: problem_b(m_b)),
        ("c: MAML digits linear", lambda: problem_c(m_c)),
    ):
        results[name] = evaluate(name, *build())
        print(f"  truth for {name}: {results[name]['info']}", flush=True)
    lds_out = None
    if not args.skip_lds:
        lds_out = lds(
            m_b,
            subsets,
            seeds,
            [
                "task_if/defaults (GN, auto δ)",
                "task_if/exact dense",
                "direct_if/dense",
                "tracin (IP at λ*)",
                "ensemble (λ*+5 noisy)",
            ],
        )
    rows = [r for v in results.values() for r in v["rows"]]
    print("\nAgreement with leave-one-task-out retraining")
    print(C.table(rows, ["problem", "estimator", "pearson", "spearman", "signs", "seconds"]))
    if lds_out:
        lds_rows = [
            {
                "estimator": est,
                **{f"seed{s}": v[est] for s, v in lds_out.items()},
                "mean": sum(v[est] for v in lds_out.values()) / len(lds_out),
            }
            for est in next(iter(lds_out.values()))
            if est not in ("full_converged", "subsets_converged")
        ]
        print(f"\nLDS on (b), {subsets} random 50% subsets per seed, retrained from scratch")
        print(C.table(lds_rows))
    else:
        lds_rows = []
    C.save(
        "bench_faithfulness",
        {
            "environment": env,
            "l2": L2,
            "rows": rows,
            "lds": lds_out,
            "lds_rows": lds_rows,
            "truth": {k: {"info": v["info"], "deltas": v["truth"]} for k, v in results.items()},
        },
    )
    plt = C.figure("bench_faithfulness")
    names = list(ESTIMATORS)
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / len(results)
    for i, (prob, v) in enumerate(results.items()):
        vals = [next(r["spearman"] for r in v["rows"] if r["estimator"] == n) for n in names]
        ax.bar([j + i * width for j in range(len(names))], vals, width=width, label=prob)
    ax.set_xticks([j + width for j in range(len(names))], names, rotation=20, fontsize=8)
    ax.axhline(0.9, color="red", ls="--", lw=0.8)
    ax.axhline(0.7, color="orange", ls="--", lw=0.8)
    ax.set_ylabel("Spearman vs LOO retraining")
    ax.legend(fontsize=8)
    C.save_figure(plt, "bench_faithfulness")


if __name__ == "__main__":
    main()
