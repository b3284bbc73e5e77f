"""Bad numeric settings, empty references and impossible `num_ways` fail at once, naming the argument and the fix."""

from __future__ import annotations

import math

import pytest
import torch
from problems import LinearMAML, regression_tasks
from torch import nn

from lightning_metaif.influence.gradients import reference_gradient
from lightning_metaif.influence.hessian import TotalHessian
from lightning_metaif.influence.solvers import DenseMatrix, solve
from lightning_metaif.influence.solvers.arnoldi import LowRankInverse
from lightning_metaif.influence.tasks import TaskBatch
from lightning_metaif.meta.backbones import MLP
from lightning_metaif.meta.maml import MAML

BAD = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("bad", BAD)
def test_non_finite_damping_and_solver_settings_are_refused(bad: float) -> None:
    H = DenseMatrix(torch.eye(2, dtype=torch.float64))
    rhs = torch.ones(2, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"damping must be a finite number >= 0.0, got {bad}"):
        solve(H, rhs, method="cg", damping=bad)
    with pytest.raises(ValueError, match=rf"solver 'cg' setting tol={bad} must be a finite number"):
        solve(H, rhs, method="cg", damping=0.1, tol=bad)
    with pytest.raises(ValueError, match="damping must be a finite number"):
        LowRankInverse(torch.ones(1, dtype=torch.float64), torch.eye(2, 1, dtype=torch.float64), damping=bad)
    problem = LinearMAML()
    params = problem.init_params(3, 1)
    with pytest.raises(ValueError, match=rf"l2 must be a finite number >= 0.0, got {bad}"):
        TotalHessian(problem, params, regression_tasks(4), l2=bad)
    assert solve(H, rhs, method="cg", damping=1.0).solution.tolist() == pytest.approx([0.5, 0.5])


def test_empty_references_are_refused_for_every_accepted_type() -> None:
    problem = LinearMAML()
    params = problem.init_params(3, 1)
    tasks = regression_tasks(3)
    empty_batch = TaskBatch(
        tasks.support_x[:0], tasks.support_y[:0], tasks.query_x[:0], tasks.query_y[:0], tasks.task_ids[:0]
    )
    for empty, kind in ((empty_batch, "TaskBatch"), ([], "list"), ((), "tuple")):
        with pytest.raises(
            ValueError, match=rf"`reference_tasks` is empty \({kind} with 0 tasks\).*at least one"
        ):
            reference_gradient(problem, params, empty)
    grad, loss = reference_gradient(problem, params, tasks)  # non-empty still works
    assert grad.shape == (4,) and bool(torch.isfinite(loss))


@pytest.mark.parametrize("bad", [*BAD, 0.0, -0.1])
def test_maml_float_settings_are_refused(bad: float) -> None:
    for name in ("inner_lr", "outer_lr"):
        with pytest.raises(ValueError, match=rf"{name} must be a finite number > 0, got {bad}"):
            MAML(MLP(2, 3), **{name: bad})
    with pytest.raises(ValueError, match="imaml_lambda must be a finite number > 0"):
        MAML(MLP(2, 3), algorithm="imaml", imaml_lambda=bad)


def test_num_ways_above_the_backbone_outputs_is_refused_naming_the_fix() -> None:
    with pytest.raises(ValueError, match=r"num_ways=5\) but the backbone outputs 3 logits.*MLP\(in_dim, 5\)"):
        MAML(MLP(2, 3), num_ways=5)
    # a backbone whose output size is only known when it runs: refused at the first forward
    maml = MAML(nn.Sequential(nn.Linear(2, 3)), num_ways=5)
    theta = dict(maml.backbone.named_parameters())
    with pytest.raises(ValueError, match=r"num_ways=5\) but the backbone outputs 3 logits.*num_ways <= 3"):
        maml.sample_losses(theta, torch.randn(4, 2), torch.tensor([0, 1, 2, 4]))
    ok = MAML(nn.Sequential(nn.Linear(2, 6)), num_ways=5)  # more outputs than ways: the first 5 are used
    losses = ok.sample_losses(
        dict(ok.backbone.named_parameters()), torch.randn(4, 2), torch.tensor([0, 1, 2, 4])
    )
    assert losses.shape == (4,) and bool(torch.isfinite(losses).all())
