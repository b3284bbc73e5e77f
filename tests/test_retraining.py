"""Influence scores against the truth: leave-one-task-out and leave-one-sample-out retraining (docs/maths.md §7).

A 3-step MAML MLP classifier (inner lr 0.5, 43 parameters) on Gaussian-blob tasks, L2 = 0.1 so the total
Hessian is clearly PD at the optimum, trained in float64 with damped Newton to a gradient norm < 1e-10; every
retraining is warm-started from λ* and converged the same way. The heaviest file of the estimator tests:
about 25 s of CPU on an idle machine (run with ``-s`` to see the correlations).
"""

import pytest
import torch
from problems import LinearMAML, ProximalMAML, classification_tasks
from scipy.stats import pearsonr, spearmanr

from lightning_metaif.influence.estimators import parameter_change, task_influence
from lightning_metaif.influence.instance import instance_influence
from lightning_metaif.influence.problem import ParamLayout
from lightning_metaif.influence.retraining import (
    leave_one_sample_out,
    leave_one_task_out,
    train_to_convergence,
)

L2 = 0.1


def agreement(scores, truth):
    scores, truth = torch.as_tensor(scores).reshape(-1), torch.as_tensor(truth).reshape(-1)
    return (
        float(pearsonr(scores, truth)[0]),
        float(spearmanr(scores, truth)[0]),
        float(((scores > 0) == (truth > 0)).double().mean()),
    )


@pytest.fixture(scope="module")
def trained():
    problem = LinearMAML(inner_lr=0.5, steps=3, kind="classification", hidden=5)
    train = classification_tasks(24, seed=1, corrupt=(0, 5, 11))
    ref = classification_tasks(10, seed=2, id_offset=1000)
    fit = train_to_convergence(problem, problem.init_params(4, 3, seed=0), train, l2=L2)
    assert fit.converged and fit.grad_norm < 1e-10
    assert fit.min_eigenvalue > 1e-2, "the truth needs a strict local minimum"
    return problem, train, ref, fit


@pytest.fixture(scope="module")
def loo(trained):
    problem, train, ref, fit = trained
    truth = leave_one_task_out(problem, fit.params, train, ref, l2=L2)
    assert max(truth.grad_norms) < 1e-9 and max(truth.iterations) <= 10
    return truth


def test_task_if_matches_leave_one_task_out_and_beats_direct_if(trained, loo):
    problem, train, ref, fit = trained
    assert loo.task_ids.tolist() == train.task_ids.tolist()
    lines, numbers = [], {}
    for estimator, solver in (
        ("task_if", "dense"),
        ("task_if", "cg"),
        ("direct_if", "dense"),
        ("tracin", "identity"),
    ):
        result = task_influence(
            problem, fit.params, train, ref, estimator=estimator, solver=solver, damping=0.0 if solver == "dense" else 1e-6,
            l2=L2, solver_options={"tolerance": 1e-12, "max_iterations": 300} if solver == "cg" else None,
            curvature="exact",
        )  # fmt: skip
        numbers[estimator, solver] = agreement(result.scores, loo.deltas)
        lines.append(
            f"{estimator:>9} ({solver:>8}): Pearson {numbers[estimator, solver][0]:.3f}  "
            f"Spearman {numbers[estimator, solver][1]:.3f}  signs {numbers[estimator, solver][2]:.0%}"
        )
    print(
        f"\nleave-one-task-out ({len(loo.deltas)} tasks, {loo.seconds:.1f} s of retraining):\n"
        + "\n".join(lines)
    )
    # the defaults: Gauss–Newton curvature (PSD), damping="auto", CG
    default = task_influence(problem, fit.params, train, ref, l2=L2)
    assert default.diagnostics["curvature"] == "gauss_newton" and default.diagnostics["converged"]
    numbers["task_if", "defaults"] = agreement(default.scores, loo.deltas)
    print(f"  task_if (defaults: Gauss–Newton, damping auto {default.diagnostics['damping']:.2e}): "
          f"Spearman {numbers['task_if', 'defaults'][1]:.3f}")  # fmt: skip
    for solver in ("dense", "cg"):
        pearson, spearman, signs = numbers["task_if", solver]
        assert spearman >= 0.9 and signs >= 0.9, (solver, numbers["task_if", solver])
    # Gauss–Newton drops the tanh network's curvature times the query residuals: 0.89 here, where the exact
    # Hessian reaches 0.99 (BENCHMARKS.md); it stays far above direct-IF.
    assert numbers["task_if", "defaults"][1] >= 0.85, numbers["task_if", "defaults"]
    assert numbers["direct_if", "dense"][1] < numbers["task_if", "dense"][1] - 0.1
    # the shifted-label tasks are harmful in truth and in the prediction
    assert (loo.deltas[[0, 5, 11]] < 0).all()


def test_parameter_change_matches_retrained_parameters(trained, loo):
    problem, train, ref, fit = trained
    layout = ParamLayout.of(fit.params)
    cosines, ratios = [], []
    for position in (3, 11):  # a clean task and a shifted-label one (a larger, less linear effect)
        task_id = int(train.task_ids[position])
        change = parameter_change(
            problem, fit.params, train, [task_id], solver="cg", damping=0.0, l2=L2, curvature="exact",
            solver_options={"tolerance": 1e-10, "max_iterations": 200},
        )  # fmt: skip
        predicted = layout.flatten(change)
        actual = loo.param_changes[position]
        cosines.append(float(torch.nn.functional.cosine_similarity(predicted, actual, dim=0)))
        ratios.append(float(predicted.norm() / actual.norm()))
    print(
        f"\nparameter change vs retraining: cosine {[round(c, 3) for c in cosines]}, norm ratio {[round(r, 3) for r in ratios]}"
    )
    assert min(cosines) > 0.85 and all(0.7 < r < 1.3 for r in ratios)


def test_instance_if_matches_leave_one_sample_out(trained):
    problem, train, ref, fit = trained
    positions = [0, 2]  # a shifted-label task and a clean one: 2 x (6 support + 12 query) retrainings
    truth = leave_one_sample_out(problem, fit.params, train, ref, l2=L2, positions=positions)
    assert truth.max_grad_norm < 1e-9
    inst = instance_influence(
        problem, fit.params, train, ref, solver="dense", damping=0.0, l2=L2, curvature="exact"
    )
    support = agreement(inst.support_scores[positions], truth.support_deltas[positions])
    query = agreement(inst.query_scores[positions], truth.query_deltas[positions])
    print(
        f"\nleave-one-sample-out ({truth.seconds:.1f} s): support Pearson {support[0]:.3f} Spearman {support[1]:.3f} "
        f"signs {support[2]:.0%}; query Pearson {query[0]:.3f} Spearman {query[1]:.3f} signs {query[2]:.0%}"
    )
    assert support[1] >= 0.8 and query[1] >= 0.8


def test_task_if_on_proximal_imaml_like_problem():
    """Many unrolled steps approximating the proximal (iMAML) inner solution: task-IF still tracks LOO."""
    problem = ProximalMAML(inner_lr=0.3, steps=15, gamma=1.0, kind="classification", hidden=0)
    train = classification_tasks(10, seed=3, corrupt=(1,), corrupt_mode="shift")
    ref = classification_tasks(6, seed=4, id_offset=1000)
    fit = train_to_convergence(problem, problem.init_params(4, 3, seed=0), train, l2=L2)
    assert fit.converged
    truth = leave_one_task_out(problem, fit.params, train, ref, l2=L2)
    result = task_influence(
        problem, fit.params, train, ref, solver="dense", damping=0.0, l2=L2, curvature="exact"
    )
    pearson, spearman, signs = agreement(result.scores, truth.deltas)
    print(f"\nproximal (15 inner steps): Pearson {pearson:.3f} Spearman {spearman:.3f} signs {signs:.0%}")
    assert spearman >= 0.9 and signs >= 0.9
    default = task_influence(problem, fit.params, train, ref, l2=L2)  # Gauss–Newton, damping="auto"
    gn = agreement(default.scores, truth.deltas)
    print(f"proximal, defaults (Gauss–Newton): Spearman {gn[1]:.3f} signs {gn[2]:.0%}")
    assert gn[1] >= 0.85 and gn[2] >= 0.9  # exact 0.93, Gauss–Newton 0.90 on these 10 tasks
