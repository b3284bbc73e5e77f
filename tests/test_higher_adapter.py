"""HigherProblem: per-task meta-gradients through ``higher`` equal the torch.func MAML path and the plain
``higher.innerloop_ctx`` code a user writes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_metaif.influence.gradients import per_task_gradients
from lightning_metaif.influence.tasks import Task, TaskBatch
from lightning_metaif.meta.maml import MAML

higher = pytest.importorskip("higher")

from lightning_metaif.meta.higher_adapter import HigherProblem  # noqa: E402


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def tasks(num_tasks=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(
        torch.randn(num_tasks, 5, 6, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (num_tasks, 5), generator=g),
        torch.randn(num_tasks, 7, 6, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (num_tasks, 7), generator=g),
        torch.arange(num_tasks),
    )


def plain_higher_gradients(model, make_optimizer, steps, batch, first_order=False):
    """What a user writes with higher (one backward per task), with .grad read after each task."""
    rows = []
    for task in batch:
        model.zero_grad()
        inner_opt = make_optimizer(model.parameters())
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False, track_higher_grads=True) as (
            fmodel,
            diffopt,
        ):
            for _ in range(steps):
                loss = F.cross_entropy(fmodel(task.support_x), task.support_y)
                if first_order:
                    diffopt.step(loss, grad_callback=lambda gs: [g.detach() for g in gs])
                else:
                    diffopt.step(loss)
            F.cross_entropy(fmodel(task.query_x), task.query_y).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    model.zero_grad()
    return torch.stack(rows)


@pytest.mark.parametrize("first_order", [False, True])
def test_higher_matches_torch_func_maml_and_plain_higher(first_order):
    model = make_model()
    batch = tasks()
    sgd = lambda params: torch.optim.SGD(params, lr=0.3)  # noqa: E731
    problem = HigherProblem(model, sgd, inner_steps=2, first_order=first_order)
    g_higher, l_higher = per_task_gradients(problem, problem.meta_parameters(), batch, vectorize="loop")
    assert g_higher.abs().sum() > 0

    maml = MAML(model, algorithm="fomaml" if first_order else "maml", inner_steps=2, inner_lr=0.3)
    g_func, l_func = per_task_gradients(maml, maml.meta_parameters(), batch, vectorize="vmap")
    torch.testing.assert_close(g_higher, g_func, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(l_higher, l_func)

    torch.testing.assert_close(
        g_higher, plain_higher_gradients(model, sgd, 2, batch, first_order), rtol=1e-9, atol=1e-12
    )


def test_higher_with_adam_inner_optimizer_matches_plain_higher():
    model = make_model(1)
    batch = tasks(seed=1)
    adam = lambda params: torch.optim.Adam(params, lr=0.05)  # noqa: E731
    problem = HigherProblem(model, adam, inner_steps=3)
    grads, _ = per_task_gradients(problem, problem.meta_parameters(), batch, vectorize="loop")
    torch.testing.assert_close(grads, plain_higher_gradients(model, adam, 3, batch), rtol=1e-8, atol=1e-11)
    # an optimiser instance works as the reference too
    instance = HigherProblem(model, torch.optim.Adam(model.parameters(), lr=0.05), inner_steps=3)
    torch.testing.assert_close(
        per_task_gradients(instance, instance.meta_parameters(), batch, vectorize="loop")[0], grads
    )


def test_higher_starts_from_given_params_and_respects_sample_weights():
    model = make_model()
    batch = tasks()
    problem = HigherProblem(model, lambda p: torch.optim.SGD(p, lr=0.3), inner_steps=1)
    maml = MAML(model, inner_steps=1, inner_lr=0.3)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    shifted = {n: p + 0.1 for n, p in original.items()}
    task = batch[0]
    support_w = torch.rand(task.num_support, dtype=torch.float64)
    query_w = torch.rand(task.num_query, dtype=torch.float64)
    value = problem.task_loss(shifted, task, support_w, query_w)
    expected = maml.task_loss({"backbone." + n: v for n, v in shifted.items()}, task, support_w, query_w)
    torch.testing.assert_close(value, expected)
    # the module's own weights were not used and not changed
    assert not torch.allclose(value, problem.task_loss(problem.meta_parameters(), task, support_w, query_w))
    assert all(torch.equal(original[n], p.detach()) for n, p in model.named_parameters())
    # adapt / outer_loss split task_loss
    adapted = problem.adapt(shifted, task, support_w)
    torch.testing.assert_close(problem.outer_loss(adapted, shifted, task, query_w), value)


def test_higher_problem_errors():
    model = make_model()
    with pytest.raises(ValueError, match="inner_steps"):
        HigherProblem(model, lambda p: torch.optim.SGD(p, lr=0.1), inner_steps=0)
    with pytest.raises(ValueError, match="inner_optimizer"):
        HigherProblem(model, "sgd", inner_steps=1)
    with pytest.raises(ValueError, match="model.parameters"):
        HigherProblem(model, torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), inner_steps=1)
    problem = HigherProblem(
        model, lambda p: torch.optim.SGD(p, lr=0.1), inner_steps=1, loss_fn=lambda o, y, reduction: o.sum()
    )
    task = Task(
        torch.randn(4, 6, dtype=torch.float64),
        torch.zeros(4).long(),
        torch.randn(4, 6, dtype=torch.float64),
        torch.zeros(4).long(),
    )
    with pytest.raises(ValueError, match="one loss per sample"):
        problem.task_loss(problem.meta_parameters(), task)
