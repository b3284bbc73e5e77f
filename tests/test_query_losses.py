"""query_losses: each query sample's adapted loss, from the problem contract, against MAML's own adaptation."""

from __future__ import annotations

import pytest
import torch

from lightning_metaif.influence.instance import query_losses
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
