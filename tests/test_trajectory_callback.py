"""The callback's default Trajectory: scores held at the best reference loss, flagged in metrics and round line."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import torch
from metaif_helpers import digits_setup, seed_all, tiny_maml, trainer

from lightning_metaif.callback import MetaInfluence
from lightning_metaif.meta.noise import corrupt_tasks


class RecordRounds(pl.Callback):
    def __init__(self, influence):
        self.influence, self.rounds = influence, {}

    def on_train_batch_end(self, *args, **kwargs):
        if self.influence.rounds and self.influence.rounds not in self.rounds:
            self.rounds[self.influence.rounds] = self.influence.result.scores.clone()


def test_default_trajectory_holds_the_scores_of_the_best_reference_loss(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    # the round line goes through Lightning's rank-zero logger, which quiet_lightning() (e.g. its doctest, run
    # earlier in the same process) sets to WARNING
    caplog.set_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero")
    seed_all(0)
    dm, _ = digits_setup(num_train=16, batch_size=4)
    # a reference the training does not improve for long: validation tasks with random labels
    reference, _ = corrupt_tasks(dm.val_pool, 1.0, mode="random_labels", seed=0)
    influence = MetaInfluence(reference=reference.batch(), every_n_train_steps=2, verbose=True)
    dm.task_state = influence.task_state
    record = RecordRounds(influence)
    trainer(tmp_path, [influence, record], max_epochs=4).fit(tiny_maml(outer_lr=0.05), datamodule=dm)
    losses = [h["influence/reference_loss"] for h in influence.history]
    held = [h["influence/scores_held"] for h in influence.history]
    best = [min(losses[: k + 1]) for k in range(len(losses))]
    assert held == [float(loss > b) for loss, b in zip(losses, best)]
    assert 0 < sum(held) < len(held)  # the reference loss rose in some rounds, not all
    assert "scores held at the best round" in caplog.text
    final = influence.result.scores
    k_best = losses.index(min(losses)) + 1
    assert k_best in record.rounds and k_best < len(losses)
    torch.testing.assert_close(final, record.rounds[k_best], equal_nan=True)  # held since the best round
    changed = 0
    for k in range(2, len(losses) + 1):  # a held round changes no score; a new best changes some
        seen = ~torch.isnan(record.rounds[k - 1])
        same = torch.equal(record.rounds[k][seen], record.rounds[k - 1][seen])
        assert same or not held[k - 1]
        changed += not same
    assert changed >= 1
