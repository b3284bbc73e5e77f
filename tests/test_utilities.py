"""Fairness and robustness utilities: values by hand, and task-IF against leave-one-task-out retraining of them."""

import pytest
import torch
from problems import classification_tasks
from scipy.stats import spearmanr
from torch import nn

from lightning_metaif.influence.estimators import task_influence
from lightning_metaif.influence.retraining import leave_one_task_out, train_to_convergence
from lightning_metaif.influence.utilities import adversarial_loss, class_fairness_gap, fairness_gap
from lightning_metaif.meta.maml import MAML

L2 = 0.1


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    problem = MAML(nn.Linear(4, 3), inner_lr=0.5, inner_steps=1).double()
    train = classification_tasks(24, seed=1, corrupt=(0, 5, 11))
    ref = classification_tasks(10, seed=2, id_offset=1000)
    fit = train_to_convergence(problem, problem.meta_parameters(), train, l2=L2)
    assert fit.converged
    return problem, train, ref, fit


def test_utility_values_match_their_definitions(trained):
    problem, _, ref, fit = trained
    params = fit.params
    losses = torch.stack([problem.task_loss(params, t) for t in ref])
    torch.testing.assert_close(
        fairness_gap(problem, ref[:4], ref[4:])(params), losses[:4].mean() - losses[4:].mean()
    )
    # class groups: per-class mean query losses of the adapted model, by hand
    gaps = []
    for task in ref:
        adapted = problem.adapt(params, task)
        per_sample = problem.sample_losses(problem._unpack(adapted)[0], task.query_x, task.query_y)
        gaps.append(per_sample[task.query_y == 0].mean() - per_sample[task.query_y != 0].mean())
    torch.testing.assert_close(
        class_fairness_gap(problem, ref, [0], [1, 2])(params), torch.stack(gaps).mean()
    )
    clean = losses.mean()
    fgsm = adversarial_loss(problem, ref, epsilon=0.3)(params)
    pgd = adversarial_loss(problem, ref, epsilon=0.3, steps=10, step_size=0.05)(params)
    assert clean < fgsm and clean < pgd
    with pytest.raises(ValueError, match="disjoint"):
        class_fairness_gap(problem, ref, [0], [0, 1])
    with pytest.raises(ValueError, match="epsilon"):
        adversarial_loss(problem, ref, epsilon=0.0)


@pytest.mark.parametrize("name", ["class_fairness_gap", "adversarial_loss"])
def test_task_if_of_a_utility_matches_leave_one_task_out(trained, name):
    problem, train, ref, fit = trained
    utility = (
        class_fairness_gap(problem, ref, [0], [1, 2])
        if name == "class_fairness_gap"
        else adversarial_loss(problem, ref, epsilon=1.0)
    )
    truth = leave_one_task_out(problem, fit.params, train, utility=utility, l2=L2)
    result = task_influence(problem, fit.params, train, utility=utility, l2=L2)
    spearman = float(spearmanr(result.scores, truth.deltas)[0])
    print(f"\n{name}: task-IF (defaults) vs leave-one-task-out Spearman {spearman:.3f}")
    assert spearman >= 0.9
