"""Why LiSSA needs many more products than CG on problem (b): products against the condition number.

On each faithfulness problem (``bench_faithfulness.py`` (a)-(c), at λ* of the L2-regularised objective) the
exact total Hessian ``H`` is built once (``TotalHessian.dense``), and for a sweep of dampings ``δ`` both
solvers run at their defaults (LiSSA: full batch, scale ``0.6·(ρ̂ + δ)`` from 8 Lanczos products, tolerance
1e-3; CG: tolerance 1e-5) on ``(H + δI)x = ∇f`` with the iteration caps raised so that both converge. Both run
on ``DenseMatrix(H)``: the products a solver needs depend only on the matrix and the right-hand side, and a
product with the dense ``H`` costs microseconds instead of milliseconds (the script checks on the real
operator, for (b) at δ = 1e-3 with the default caps, that the counts are those of ``bench_speed.py`` row 3).

Reported per (problem, δ): the eigenvalue range of ``H + δI`` and its condition number κ; the products each
solver used to reach relative residual 1e-3 (LiSSA's default tolerance) and LiSSA's to reach CG's default
1e-5; the LiSSA steps predicted by the contraction of the scaled Neumann series, ``ln(1/tol) / −ln(1 − (λ_min
+ δ)/scale)``; the agreement of each solution's scores with the exact solve's (Spearman). Then a least-squares
slope of log(products) against log(κ) per solver over the dampings with κ ≥ 10 (only (b) has them): the
worst case is 1 for LiSSA (a stationary iteration contracts the error by 1 − O(1/κ) per step) and 0.5 for CG
(O(√κ), and never more than the dimension).

Usage::

    python benchmarks/bench_lissa.py        # (a)-(c) x 6 dampings, ~1 min
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import _common as C
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_faithfulness as BF  # noqa: E402

from lightning_metaif.influence.estimators import task_influence  # noqa: E402
from lightning_metaif.influence.gradients import per_task_gradients, reference_gradient  # noqa: E402
from lightning_metaif.influence.hessian import TotalHessian  # noqa: E402
from lightning_metaif.influence.retraining import train_to_convergence  # noqa: E402
from lightning_metaif.influence.solvers.base import DenseMatrix  # noqa: E402
from lightning_metaif.influence.solvers.cg import cg_solve  # noqa: E402
from lightning_metaif.influence.solvers.lissa import FULL_BATCH_SCALE, lissa_solve  # noqa: E402

DAMPINGS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
PROBLEMS = {
    "a: iMAML-proximal logreg": lambda: BF.problem_a(30),
    "b: MAML sinusoid MLP": lambda: BF.problem_b(30),
    "c: MAML digits linear": lambda: BF.problem_c(20),
}


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(ys) against log(xs)."""
    lx = torch.tensor([math.log(x) for x in xs], dtype=torch.float64)
    ly = torch.tensor([math.log(y) for y in ys], dtype=torch.float64)
    lx, ly = lx - lx.mean(), ly - ly.mean()
    return float((lx * ly).sum() / (lx * lx).sum())


def sweep(name: str, problem, params, train, ref, cap: int) -> list[dict]:
    fit = train_to_convergence(problem, params, train, l2=BF.L2, max_iter=200)
    lam = fit.params
    hessian = TotalHessian(problem, lam, train, l2=BF.L2).dense()
    hessian = 0.5 * (hessian + hessian.T)
    eig = torch.linalg.eigvalsh(hessian)
    rhs, _ = reference_gradient(problem, lam, ref)
    grads, _ = per_task_gradients(problem, lam, train)
    operator = DenseMatrix(hessian)
    rows = []
    for damping in DAMPINGS:
        shifted = eig + damping
        exact_solution = torch.linalg.solve(hessian + damping * torch.eye(len(eig), dtype=hessian.dtype), rhs)
        exact = -(grads @ exact_solution)
        row = {
            "problem": name,
            "damping": damping,
            "p": len(eig),
            "lambda_min": float(shifted.min()),
            "lambda_max": float(shifted.max()),
            "kappa": float(shifted.max() / shifted.min()) if shifted.min() > 0 else math.inf,
        }
        for tol in (1e-3, 1e-5):
            cg = cg_solve(operator, rhs, damping=damping, max_iterations=cap, tolerance=tol)
            row[f"cg_products@{tol:g}"] = cg.extra.get("products", cg.iterations)
            row[f"cg_spearman@{tol:g}"] = float(spearmanr(-(grads @ cg.solution), exact)[0])
            try:
                lissa = lissa_solve(operator, rhs, damping=damping, iterations=cap, tolerance=tol)
            except Exception as error:  # noqa: BLE001 - a diverging solve is a result
                row[f"lissa_error@{tol:g}"] = f"{type(error).__name__}: {error}"[:200]
                continue
            row[f"lissa_products@{tol:g}"] = lissa.extra["products"]
            row[f"lissa_converged@{tol:g}"] = lissa.converged
            row[f"lissa_spearman@{tol:g}"] = float(spearmanr(-(grads @ lissa.solution), exact)[0])
            scale = lissa.extra["scale"]
            # the series contracts the error by ρ(I − (H + δI)/scale) per step
            contraction = max(abs(1 - float(shifted.min()) / scale), abs(1 - float(shifted.max()) / scale))
            row[f"lissa_predicted_steps@{tol:g}"] = (
                math.log(1 / tol) / -math.log(contraction) if 0 < contraction < 1 else math.inf
            )
        row["lissa/cg products@1e-3"] = row.get("lissa_products@0.001", math.nan) / row["cg_products@0.001"]
        row["lissa@1e-5 / cg@1e-5"] = row.get("lissa_products@1e-05", math.nan) / row["cg_products@1e-05"]
        row["scale/(lambda_max)"] = (
            scale / float(shifted.max()) if "lissa_products@1e-05" in row else math.nan
        )
        rows.append(row)
        print(
            C.table(
                [row],
                [
                    "problem",
                    "damping",
                    "kappa",
                    "cg_products@0.001",
                    "lissa_products@0.001",
                    "lissa_predicted_steps@0.001",
                    "cg_products@1e-05",
                    "lissa_products@1e-05",
                ],
            ),
            flush=True,
        )
    return rows


def operator_check() -> dict:
    """On the real operator: LiSSA and CG at their defaults on (b), δ = 1e-3 (``bench_speed.py`` row 3)."""
    problem, params, train, ref = BF.problem_b(30)
    fit = train_to_convergence(problem, params, train, l2=BF.L2, max_iter=200)
    out = {}
    for solver in ("cg", "lissa"):
        result = task_influence(
            problem, fit.params, train, ref, solver=solver, l2=BF.L2, damping=1e-3, curvature="exact"
        )
        out[f"{solver}_products_real_operator"] = result.diagnostics["hessian_products"]
    hessian = TotalHessian(problem, fit.params, train, l2=BF.L2).dense()
    rhs, _ = reference_gradient(problem, fit.params, ref)
    operator = DenseMatrix(0.5 * (hessian + hessian.T))
    out["cg_products_dense"] = cg_solve(
        operator, rhs, damping=1e-3, max_iterations=100, tolerance=1e-5
    ).extra.get("products")
    out["lissa_products_dense"] = lissa_solve(operator, rhs, damping=1e-3).extra["products"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cap", type=int, default=200_000, help="iteration cap of both solvers")
    args = parser.parse_args()
    C.set_threads(args.threads)
    env = C.environment()
    rows = []
    for name, build in PROBLEMS.items():
        rows += sweep(name, *build(), cap=args.cap)
    fits = []
    for name in PROBLEMS:
        # κ ≥ 10 only: below it LiSSA's count is its fixed cost (the scale's Lanczos products and the ~17 steps
        # that a scale of 0.6·λ_max needs even at κ = 1), not the conditioning
        sub = [r for r in rows if r["problem"] == name and math.isfinite(r["kappa"]) and r["kappa"] >= 10]
        if len(sub) < 2:
            continue
        fit = {"problem": name}
        for solver in ("lissa", "cg"):
            for tol in ("0.001", "1e-05"):
                ok = [r for r in sub if f"{solver}_products@{tol}" in r]
                fit[f"{solver} slope@{tol}"] = slope(
                    [r["kappa"] for r in ok], [r[f"{solver}_products@{tol}"] for r in ok]
                )
        fits.append(fit)
    check = operator_check()
    cols = [
        "problem",
        "damping",
        "p",
        "lambda_min",
        "lambda_max",
        "kappa",
        "cg_products@0.001",
        "lissa_products@0.001",
        "lissa_predicted_steps@0.001",
        "lissa/cg products@1e-3",
        "cg_products@1e-05",
        "lissa_products@1e-05",
        "lissa@1e-5 / cg@1e-5",
        "lissa_spearman@0.001",
        "cg_spearman@1e-05",
    ]
    print(C.table(rows, cols))
    print(C.table(fits))
    print(check)
    C.save(
        "bench_lissa",
        {
            "environment": env,
            "full_batch_scale": FULL_BATCH_SCALE,
            "rows": rows,
            "slopes": fits,
            "check": check,
        },
    )


if __name__ == "__main__":
    main()
