"""query_losses: each query sample's adapted loss, from the problem contract, against MAML's own adaptation;
query_label_outliers: those losses against the other query samples of the task with the same label."""

from __future__ import annotations

import pytest
import torch

from lightning_metaif.influence.instance import query_label_outliers, query_losses
from lightning_metaif.influence.tasks import Task
from lightning_metaif.meta.datasets import gaussian_mixture_splits
from lightning_metaif.meta.maml import MAML


@pytest.mark.parametrize("seed, algorithm, steps", [(0, "maml", 1), (1, "maml", 3), (2, "fomaml", 2)])
def test_query_losses_equal_the_adapted_per_sample_losses(seed, algorithm, steps):
    torch.manual_seed(seed)
    splits = gaussian_mixture_splits(
        num_train_tasks=6, num_val_tasks=3, num_test_tasks=3, queries=4, seed=seed
    )
    backbone = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5))
    maml = MAML(backbone, algorithm=algorithm, inner_steps=steps, inner_lr=0.3)
    params = maml.meta_parameters()
    batch = splits.train.batch()
    expected = []
    for task in batch:
        theta = maml.adapt(params, task)
        weights = {k[len("backbone.") :]: v for k, v in theta.items()}
        expected.append(maml.sample_losses(weights, task.query_x, task.query_y).detach())
    expected = torch.stack(expected)
    got = query_losses(maml, params, batch, chunk_size=4)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    looped = query_losses(maml, params, list(batch), vectorize="loop")
    torch.testing.assert_close(looped, expected, rtol=1e-5, atol=1e-6)
    assert got.shape == (6, 20) and (got > 0).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_query_label_outliers_subtract_the_other_same_label_losses(seed):
    """Against an independent computation: MAML's own adaptation and per-sample losses, then, with plain Python
    loops, each loss minus the mean of the task's other query samples with the same label; a sample whose label
    no other query shares is compared with all other query samples. Also for ragged tasks (the list path)."""
    torch.manual_seed(seed)
    splits = gaussian_mixture_splits(
        num_train_tasks=5, num_val_tasks=3, num_test_tasks=3, queries=3, seed=seed
    )
    maml = MAML(
        torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5)), inner_lr=0.3
    )
    params = maml.meta_parameters()
    batch = splits.train.batch()
    # one task with a label no other query shares: relabel all but one query of class 4 as class 3
    query_y = batch.query_y.clone()
    fours = (query_y[0] == 4).nonzero().reshape(-1)
    query_y[0, fours[1:]] = 3
    batch = type(batch)(batch.support_x, batch.support_y, batch.query_x, query_y, batch.task_ids)

    def reference(task):
        theta = maml.adapt(params, task)
        weights = {k[len("backbone.") :]: v for k, v in theta.items()}
        losses = maml.sample_losses(weights, task.query_x, task.query_y).detach().tolist()
        labels = task.query_y.tolist()
        out = []
        for z, (loss, label) in enumerate(zip(losses, labels)):
            mates = [losses[j] for j in range(len(losses)) if j != z and labels[j] == label]
            if not mates:
                mates = [losses[j] for j in range(len(losses)) if j != z]
            out.append(loss - sum(mates) / len(mates))
        return torch.tensor(out, dtype=torch.float32)

    expected = torch.stack([reference(task) for task in batch])
    got = query_label_outliers(maml, params, batch, chunk_size=2)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert got.shape == (5, 15) and got.abs().max() > 0.01 and len(fours) > 1
    ragged = [batch[i] for i in range(3)]
    ragged[1] = Task(ragged[1].support_x, ragged[1].support_y, ragged[1].query_x[:7], ragged[1].query_y[:7])
    looped = query_label_outliers(maml, params, ragged, vectorize="loop")
    for i, task in enumerate(ragged):
        torch.testing.assert_close(looped[i], reference(task), rtol=1e-4, atol=1e-5)
