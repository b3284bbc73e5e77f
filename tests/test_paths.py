"""The fast paths: equal-shape task lists vmapped, vmap/loop chosen by measurement, kept Hessian graphs.

Every number is checked against an independent ``torch.func`` computation of the same quantity.
"""

import logging
import time

import pytest
import torch
from problems import LinearMAML, regression_tasks

from lightning_metaif.influence.gradients import per_task_gradients
from lightning_metaif.influence.hessian import TotalHessian
from lightning_metaif.influence.paths import choose_path, forget_choices, remembered_choice
from lightning_metaif.influence.problem import ParamLayout
from lightning_metaif.influence.tasks import Task, stackable


def func_reference(problem, params, tasks, l2=0.0, weights=None):
    """Per-task gradients and the total Hessian of the weighted mean loss by ``torch.func``, task by task."""
    layout = ParamLayout.of(params)
    flat = layout.flatten({k: v.detach() for k, v in params.items()})
    weights = torch.ones(len(tasks), dtype=flat.dtype) if weights is None else weights

    def task_loss(vector, task):
        return problem.task_loss(layout.unflatten(vector), task)

    grads = torch.stack([torch.func.grad(task_loss)(flat, task) for task in tasks])

    def objective(vector):
        total = sum(w * task_loss(vector, task) for w, task in zip(weights, tasks))
        return total / len(tasks) + 0.5 * l2 * (vector**2).sum()

    return grads, torch.func.hessian(objective)(flat)


class Counting:
    """Wraps a problem and counts ``task_loss`` calls (forward passes through the inner loop)."""

    def __init__(self, problem):
        self.problem, self.calls = problem, 0

    def task_loss(self, params, task, support_weights=None, query_weights=None):
        self.calls += 1
        return self.problem.task_loss(params, task, support_weights, query_weights)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equal_shape_task_list_is_stacked_and_matches_torch_func(seed):
    problem = LinearMAML(inner_lr=0.1, steps=2, hidden=4)
    batch = regression_tasks(7, seed=seed)
    params = problem.init_params(3, 1, seed=seed)
    tasks = list(batch)
    assert all(type(t) is Task for t in tasks)
    assert torch.equal(stackable(tasks).task_ids, batch.task_ids)
    expected, _ = func_reference(problem, params, tasks)
    for vectorize in ("auto", "vmap", "loop"):
        grads, _ = per_task_gradients(problem, params, tasks, chunk_size=3, vectorize=vectorize)
        torch.testing.assert_close(grads, expected, rtol=1e-10, atol=1e-12)


def test_vmap_refuses_only_tasks_it_cannot_stack():
    problem = LinearMAML(inner_lr=0.1, steps=1)
    params = problem.init_params(3, 1)
    tasks = list(regression_tasks(3))
    ragged = tasks + [
        Task(tasks[0].support_x[:2], tasks[0].support_y[:2], tasks[0].query_x, tasks[0].query_y, 99)
    ]
    with pytest.raises(ValueError, match="vectorize='vmap' needs the tasks"):
        per_task_gradients(problem, params, ragged, vectorize="vmap")
    grads, _ = per_task_gradients(problem, params, ragged)  # auto: loops over the ragged list
    expected, _ = func_reference(problem, params, ragged)
    torch.testing.assert_close(grads, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("vectorize", ["auto", "vmap", "loop"])
@pytest.mark.parametrize("as_list", [False, True])
def test_hessian_products_blocks_and_dense_match_torch_func(seed, vectorize, as_list):
    problem = LinearMAML(inner_lr=0.1, steps=2, hidden=4)
    batch = regression_tasks(7, seed=seed)
    params = problem.init_params(3, 1, seed=seed)
    weights = torch.linspace(0.5, 1.5, 7, dtype=torch.float64)
    _, hessian = func_reference(problem, params, list(batch), l2=0.05, weights=weights)
    tasks = list(batch) if as_list else batch
    operator = TotalHessian(
        problem, params, tasks, l2=0.05, task_weights=weights, chunk_size=3, vectorize=vectorize
    )
    generator = torch.Generator().manual_seed(seed)
    vectors = torch.randn(5, operator.dim, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(operator.matvec(vectors[0]), hessian @ vectors[0], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(operator.matmat(vectors), vectors @ hessian, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(operator.dense(chunk=4), hessian, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
def test_kept_graph_means_no_forward_per_product(vectorize):
    problem = Counting(LinearMAML(inner_lr=0.1, steps=2, hidden=4))
    batch = regression_tasks(6)
    params = problem.problem.init_params(3, 1)
    operator = TotalHessian(problem, params, batch, chunk_size=4, vectorize=vectorize)
    vector = torch.randn(operator.dim, dtype=torch.float64)
    first = operator.matvec(vector)
    after_first = problem.calls
    for _ in range(3):
        torch.testing.assert_close(operator.matvec(vector), first, rtol=0, atol=0)
    assert problem.calls == after_first  # the later products re-ran no forward pass
    assert operator.graph_bytes > 0

    # Without room for kept graphs the products rebuild them: same numbers, one forward per task and product.
    rebuilt = TotalHessian(problem, params, batch, chunk_size=4, vectorize=vectorize, graph_memory=0)
    problem.calls = 0
    torch.testing.assert_close(rebuilt.matvec(vector), first, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(rebuilt.matvec(vector), first, rtol=1e-12, atol=1e-14)
    loops = 2 * len(batch) if vectorize == "loop" else 2 * 2  # vmap: one call traced per chunk
    assert problem.calls == loops


def test_choose_path_keeps_the_faster_logs_both_times_once_and_survives_a_failing_path(caplog):
    class Problem:
        pass

    problem = Problem()
    runs = {"vmap": 0, "loop": 0}

    def slow():
        runs["vmap"] += 1
        time.sleep(0.03)
        return 1.0

    def fast():
        runs["loop"] += 1
        return 1.0

    with caplog.at_level(logging.INFO, logger="lightning_metaif"):
        for _ in range(3):
            name, value = choose_path(problem, "key", {"vmap": slow, "loop": fast}, what="demo")
            assert (name, value) == ("loop", 1.0)
    assert runs == {"vmap": 1, "loop": 3}
    messages = [r.getMessage() for r in caplog.records if "demo" in r.getMessage()]
    assert len(messages) == 1 and "vmap" in messages[0] and "loop" in messages[0] and "ms" in messages[0]
    assert remembered_choice(problem, "key") == "loop"
    forget_choices(problem)
    assert remembered_choice(problem, "key") is None

    def broken():
        raise RuntimeError("cannot vmap this")

    assert choose_path(problem, "other", {"vmap": broken, "loop": fast}, what="demo")[0] == "loop"
    with pytest.raises(RuntimeError, match="loop broke"):
        choose_path(
            problem,
            "third",
            {"vmap": broken, "loop": lambda: (_ for _ in ()).throw(RuntimeError("loop broke"))},
            what="demo",
        )


@pytest.mark.parametrize("seed", [0, 1])
def test_self_influence_is_one_block_solve_and_matches_torch_func(seed):
    from lightning_metaif.influence.estimators import task_influence

    problem = Counting(LinearMAML(inner_lr=0.1, steps=2, hidden=4))
    batch = regression_tasks(9, seed=seed)
    params = problem.problem.init_params(3, 1, seed=seed)
    l2, damping = 20.0, 0.1  # l2 makes the total Hessian positive definite (min eigenvalue of H alone: -15)
    grads, hessian = func_reference(problem.problem, params, list(batch), l2=l2)
    system = hessian + damping * torch.eye(hessian.shape[0], dtype=hessian.dtype)
    exact = (grads * torch.linalg.solve(system, grads.T).T).sum(1)
    for solver, options, tol in (
        ("cg", {"tolerance": 1e-12, "max_iterations": 200}, 1e-9),
        ("lissa", {"tolerance": 1e-9, "iterations": 5000}, 1e-6),
        ("arnoldi", {"rank": hessian.shape[0]}, 1e-9),
    ):
        problem.calls = 0
        result = task_influence(
            problem,
            params,
            batch,
            estimator="self",
            solver=solver,
            damping=damping,
            l2=l2,
            solver_options=options,
        )
        torch.testing.assert_close(result.self_influence, exact, rtol=tol, atol=1e-12)
        # One kept graph per chunk of tasks for the whole block (plus the gradients): no forward pass per solve.
        assert problem.calls <= 3 * len(batch)
