"""Gauss–Newton total curvature and automatic damping: explicit Jᵀ H_ℓ J, PSD, both paths, defaults over seeds."""

import pytest
import torch
from problems import LinearMAML, classification_tasks, regression_tasks

from lightning_metaif.influence.curvature import AUTO_DAMPING_FRACTION, DampedCurvature, mean_eigenvalue
from lightning_metaif.influence.estimators import task_influence
from lightning_metaif.influence.gauss_newton import GaussNewton
from lightning_metaif.influence.hessian import TotalHessian
from lightning_metaif.influence.problem import ParamLayout
from lightning_metaif.meta.backbones import MLP
from lightning_metaif.meta.maml import MAML


def explicit_gauss_newton(problem, params, tasks, weights, l2):
    """Σ_k w_k J_kᵀ H_ℓ,k J_k / M + l2·I from torch.autograd.functional Jacobians and Hessians."""
    layout = ParamLayout.of(params)
    flat = layout.flatten({k: v.detach() for k, v in params.items()})
    total = torch.zeros(flat.numel(), flat.numel(), dtype=flat.dtype)
    for k, task in enumerate(tasks):
        outputs = problem.query_outputs(layout.unflatten(flat), task).detach()
        jacobian = torch.autograd.functional.jacobian(
            lambda v, task=task: problem.query_outputs(layout.unflatten(v), task).reshape(-1), flat
        )
        hessian = torch.autograd.functional.hessian(
            lambda o, task=task, shape=outputs.shape: problem.output_loss(o.reshape(shape), task),
            outputs.reshape(-1),
        )
        total += weights[k] * jacobian.T @ hessian @ jacobian
    return total / len(tasks) + l2 * torch.eye(flat.numel(), dtype=flat.dtype)


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_gauss_newton_equals_explicit_product_on_both_paths_and_is_psd(kind):
    problem = LinearMAML(inner_lr=0.5, steps=2, kind=kind, hidden=4)
    if kind == "classification":
        tasks, params = classification_tasks(5, seed=1), problem.init_params(4, 3, seed=0)
    else:
        tasks, params = regression_tasks(5, seed=1), problem.init_params(3, 1, seed=0)
    weights = torch.linspace(0.5, 1.5, 5, dtype=torch.float64)
    expected = explicit_gauss_newton(problem, params, tasks, weights, l2=0.1)
    vmapped = GaussNewton(problem, params, tasks, task_weights=weights, l2=0.1, chunk_size=2).dense()
    looped = GaussNewton(problem, params, list(tasks), task_weights=weights, l2=0.1).dense()
    torch.testing.assert_close(vmapped, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(looped, expected, rtol=1e-10, atol=1e-12)
    # PSD (+ l2) where the exact total Hessian at this random point is indefinite
    assert float(torch.linalg.eigvalsh(vmapped).min()) >= 0.1 - 1e-10
    exact = TotalHessian(problem, params, tasks, task_weights=weights, l2=0.1).dense()
    assert float(torch.linalg.eigvalsh(exact).min()) < 0
    # a mini-batch is the same operator over a subset of the tasks
    sub = GaussNewton(problem, params, tasks, l2=0.1).subsample(2, torch.Generator().manual_seed(0))
    assert len(sub.tasks) == 2 and sub.dense().shape == expected.shape


def test_maml_module_exposes_outputs_consistent_with_task_loss():
    torch.manual_seed(0)
    for algorithm, loss in (("maml", "mse"), ("fomaml", "mse"), ("anil", "cross_entropy"), ("imaml", "mse")):
        out_dim = 3 if loss == "cross_entropy" else 1
        model = MAML(MLP(2, out_dim, hidden=(5,)), algorithm=algorithm, loss=loss, inner_lr=0.1).double()
        sy = torch.randint(0, 3, (6,)) if loss == "cross_entropy" else torch.randn(6, 1, dtype=torch.float64)
        qy = torch.randint(0, 3, (4,)) if loss == "cross_entropy" else torch.randn(4, 1, dtype=torch.float64)
        from lightning_metaif.influence.tasks import Task

        task = Task(torch.randn(6, 2, dtype=torch.float64), sy, torch.randn(4, 2, dtype=torch.float64), qy)
        params = model.meta_parameters()
        weights = torch.rand(4, dtype=torch.float64)
        via_outputs = model.output_loss(model.query_outputs(params, task), task, query_weights=weights)
        torch.testing.assert_close(via_outputs, model.task_loss(params, task, query_weights=weights))


def test_higher_problem_gauss_newton_matches_the_functional_maml():
    pytest.importorskip("higher")
    from lightning_metaif.meta.higher_adapter import HigherProblem

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 3)).double()
    higher_problem = HigherProblem(net, lambda p: torch.optim.SGD(p, lr=0.3), inner_steps=1)
    maml = MAML(net, inner_lr=0.3, inner_steps=1).double()
    tasks = classification_tasks(3, seed=2)
    params_h = higher_problem.meta_parameters()
    params_m = {"backbone." + k: v for k, v in params_h.items()}
    looped = GaussNewton(higher_problem, params_h, list(tasks), l2=0.0).dense()
    vmapped = GaussNewton(maml, params_m, tasks, l2=0.0).dense()
    torch.testing.assert_close(looped, vmapped, rtol=1e-8, atol=1e-10)


def test_clear_error_when_the_problem_lacks_outputs():
    class OnlyTaskLoss:
        def task_loss(self, params, task, support_weights=None, query_weights=None):
            return ((params["w"] - task.query_x.mean()) ** 2).sum()

    tasks = classification_tasks(3, seed=1)
    params = {"w": torch.zeros(2, dtype=torch.float64, requires_grad=True)}
    with pytest.raises(ValueError, match="query_outputs.*output_loss"):
        task_influence(OnlyTaskLoss(), params, tasks, tasks, curvature="gauss_newton")
    # "auto" falls back to the exact total Hessian for such a problem
    result = task_influence(OnlyTaskLoss(), params, tasks, tasks, solver="dense")
    assert result.diagnostics["curvature"] == "exact"
    with pytest.raises(ValueError, match="damping"):
        task_influence(OnlyTaskLoss(), params, tasks, tasks, damping="large")


def test_auto_damping_is_a_fraction_of_the_mean_eigenvalue():
    problem = LinearMAML(inner_lr=0.5, steps=1, kind="classification", hidden=3)
    tasks, params = classification_tasks(6, seed=1), problem.init_params(4, 3, seed=0)
    dense = DampedCurvature(problem, params, tasks, solver="dense", damping="auto", l2=0.1)
    matrix = GaussNewton(problem, params, tasks, l2=0.1).dense()
    true_mean = float(torch.diagonal(matrix).mean())
    assert dense.damping == pytest.approx(AUTO_DAMPING_FRACTION * true_mean, rel=1e-10)
    probed = DampedCurvature(problem, params, tasks, solver="cg", damping="auto", l2=0.1)
    info = probed.damping_info
    assert (
        info["damping_rule"] == "auto" and probed.damping == AUTO_DAMPING_FRACTION * info["mean_eigenvalue"]
    )
    # Hutchinson's estimate agrees with the trace within a few of its standard errors (seeded: reproducible)
    assert abs(info["mean_eigenvalue"] - true_mean) <= 4 * info["mean_eigenvalue_stderr"] + 1e-12
    again = DampedCurvature(problem, params, tasks, solver="cg", damping="auto", l2=0.1)
    assert again.damping == probed.damping
    assert mean_eigenvalue(probed.operator, probes=4, seed=1)[0] != info["mean_eigenvalue"]
    user = task_influence(problem, params, tasks, tasks, damping=0.5, solver="dense")
    assert user.diagnostics["damping"] == 0.5 and user.diagnostics["damping_rule"] == "user"


def test_engine_snippet_defaults_never_fail_over_seeds():
    """The README engine snippet at its defaults (no damping given): a converged, finite solve for every seed.

    Away from an optimum and without L2 the exact total Hessian is indefinite (fixed damping failed for 3 of
    40 seeds); the Gauss–Newton curvature is PSD, so CG cannot meet negative curvature.
    """
    from lightning_metaif.influence.gradients import per_task_gradients
    from lightning_metaif.meta.datasets import sinusoid_splits

    failures = []
    for seed in range(10):
        torch.manual_seed(seed)
        splits = sinusoid_splits(
            shots=10, queries=10, num_train_tasks=16, num_val_tasks=4, num_test_tasks=4, seed=seed
        )
        model = MAML(MLP(1, 1, hidden=(16, 16)), loss="mse", inner_lr=0.01).double()
        params = model.meta_parameters()
        train, reference = splits.train.batch().to(torch.float64), splits.val.batch().to(torch.float64)
        optimizer = torch.optim.Adam(params.values(), lr=1e-2)
        for _ in range(15):
            grads, _ = per_task_gradients(model, params, train)
            optimizer.zero_grad()
            for value, g in zip(params.values(), ParamLayout.of(params).unflatten(grads.mean(0)).values()):
                value.grad = g
            optimizer.step()
        result = task_influence(model, params, train, reference, estimator="task_if")
        d = result.diagnostics
        if not (torch.isfinite(result.scores).all() and d["converged"] and d["curvature"] == "gauss_newton"):
            failures.append((seed, d["residual"], d["iterations"]))
    assert not failures, failures
