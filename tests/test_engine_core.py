import pytest
import torch
from problems import LinearMAML, regression_tasks

from lightning_metaif.influence.gradients import per_task_gradients, reference_gradient
from lightning_metaif.influence.hessian import TotalHessian
from lightning_metaif.influence.problem import ParamLayout
from lightning_metaif.influence.tasks import TaskBatch


@pytest.fixture
def setup():
    problem = LinearMAML(inner_lr=0.1, steps=2, hidden=4)
    return problem, regression_tasks(6), problem.init_params(3, 1)


def exact_hessian(problem, params, tasks, l2):
    layout = ParamLayout.of(params)

    def objective(flat):
        p = layout.unflatten(flat)
        return sum(problem.task_loss(p, t) for t in tasks) / len(tasks) + 0.5 * l2 * (flat**2).sum()

    flat = layout.flatten({k: v.detach() for k, v in params.items()})
    return torch.func.hessian(objective)(flat), objective, flat


def test_vmap_and_loop_gradients_agree(setup):
    problem, tasks, params = setup
    g_vmap, l_vmap = per_task_gradients(problem, params, tasks, chunk_size=4)
    g_loop, l_loop = per_task_gradients(problem, params, list(tasks), vectorize="loop")
    assert g_vmap.shape == (6, ParamLayout.of(params).numel)
    torch.testing.assert_close(g_vmap, g_loop, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(l_vmap, l_loop)


def test_gradients_match_autograd_of_each_task(setup):
    problem, tasks, params = setup
    grads, _ = per_task_gradients(problem, params, tasks)
    for row, task in zip(grads, tasks):
        loss = problem.task_loss(params, task)
        expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(params.values()))])
        torch.testing.assert_close(row, expected)


@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
def test_hvp_matches_hessian_and_finite_differences(setup, vectorize):
    problem, tasks, params = setup
    tasks_in = tasks if vectorize == "vmap" else list(tasks)
    hessian, objective, flat = exact_hessian(problem, params, tasks, l2=0.05)
    operator = TotalHessian(problem, params, tasks_in, l2=0.05, vectorize=vectorize)
    v = torch.randn(operator.dim, dtype=torch.float64)
    torch.testing.assert_close(operator.matvec(v), hessian @ v, rtol=1e-9, atol=1e-11)
    eps = 1e-5
    grad_f = torch.func.grad(objective)
    finite_difference = (grad_f(flat + eps * v) - grad_f(flat - eps * v)) / (2 * eps)
    torch.testing.assert_close(operator.matvec(v), finite_difference, rtol=1e-6, atol=1e-8)


def test_dense_and_task_weights(setup):
    problem, tasks, params = setup
    weights = torch.linspace(0.5, 1.5, len(tasks), dtype=torch.float64)
    operator = TotalHessian(problem, params, tasks, task_weights=weights)
    expected = sum(
        w * TotalHessian(problem, params, tasks[i : i + 1]).dense() for i, w in enumerate(weights)
    ) / len(tasks)
    torch.testing.assert_close(operator.dense(), expected)


def test_reference_gradient_is_mean_of_task_gradients(setup):
    problem, tasks, params = setup
    grads, losses = per_task_gradients(problem, params, tasks)
    ref, value = reference_gradient(problem, params, tasks)
    torch.testing.assert_close(ref, grads.mean(0))
    torch.testing.assert_close(value, losses.mean())
    util_grad, _ = reference_gradient(problem, params, utility=lambda p: (p["w"] ** 2).sum())
    layout = ParamLayout.of(params)
    torch.testing.assert_close(
        util_grad,
        layout.flatten({k: 2 * v.detach() if k == "w" else torch.zeros_like(v) for k, v in params.items()}),
    )


def test_bad_inputs_raise_clear_errors(setup):
    problem, tasks, params = setup

    class NonScalar:
        def task_loss(self, params, task, support_weights=None, query_weights=None):
            return params["w"].sum(0)

    with pytest.raises(ValueError, match="scalar"):
        per_task_gradients(NonScalar(), params, tasks)

    class NaNLoss:
        def task_loss(self, params, task, support_weights=None, query_weights=None):
            return problem.task_loss(params, task) * float("nan")

    with pytest.raises(ValueError, match="not finite"):
        per_task_gradients(NaNLoss(), params, tasks)
    with pytest.raises(ValueError, match="for task 2:"):
        per_task_gradients(NaNLoss(), params, tasks[2:3])
    with pytest.raises(ValueError, match="one id per task"):
        per_task_gradients(problem, params, list(tasks), task_ids=[1, 2])
    with pytest.raises(ValueError, match="Duplicate"):
        per_task_gradients(problem, params, list(tasks), task_ids=[1, 1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="empty"):
        per_task_gradients(problem, params, [])
    with pytest.raises(ValueError, match="requires grad"):
        per_task_gradients(problem, {k: v.detach() for k, v in params.items()}, tasks)
    with pytest.raises(ValueError, match="task_loss"):
        per_task_gradients(object(), params, tasks)
    with pytest.raises(ValueError, match="shape"):
        TaskBatch(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(2, 2), torch.zeros(2, 2), torch.arange(3))


def test_param_layout_handles_scalars_and_batches():
    layout = ParamLayout.of({"scale": torch.tensor(2.0), "w": torch.zeros(2, 2)})
    flat = torch.arange(5.0)
    tree = layout.unflatten(flat)
    assert tree["scale"].shape == () and tree["scale"].item() == 0.0
    torch.testing.assert_close(layout.flatten(tree), flat)
    batched = layout.unflatten(torch.arange(10.0).reshape(2, 5))
    assert batched["scale"].shape == (2,) and batched["w"].shape == (2, 2, 2)


def test_gamma_surrogate_is_gauss_newton_part_plus_gamma_identity(setup):
    problem, tasks, params = setup
    layout = ParamLayout.of(params)
    flat = layout.flatten({k: v.detach() for k, v in params.items()})
    operator = TotalHessian(problem, params, tasks, curvature="gamma")

    expected_gn = torch.zeros(layout.numel, layout.numel, dtype=torch.float64)
    expected_gamma = 0.0
    for task in tasks:
        adapt = lambda f, task=task: layout.flatten(problem.adapt(layout.unflatten(f), task))  # noqa: E731
        theta = adapt(flat)
        jacobian = torch.func.jacrev(adapt)(flat)
        outer = lambda t, task=task: problem.outer_loss(layout.unflatten(t), None, task)  # noqa: E731
        expected_gn += jacobian.T @ torch.func.hessian(outer)(theta) @ jacobian
        for i in range(task.num_query):  # sample i's share of the mean query loss
            weights = torch.zeros(task.num_query, dtype=torch.float64)
            weights[i] = 1.0
            share = lambda t, w=weights, task=task: problem.outer_loss(layout.unflatten(t), None, task, w)  # noqa: E731
            expected_gamma += torch.func.grad(share)(theta).abs().sum().item()
    expected_gn /= len(tasks)
    expected_gamma /= len(tasks)

    assert operator.gamma == pytest.approx(expected_gamma, rel=1e-9)
    v = torch.randn(layout.numel, dtype=torch.float64)
    torch.testing.assert_close(operator.matvec(v), expected_gn @ v + expected_gamma * v)
    with pytest.raises(ValueError, match="adapt"):
        TotalHessian(
            type("NoAdapt", (), {"task_loss": problem.task_loss})(), params, tasks, curvature="gamma"
        )
