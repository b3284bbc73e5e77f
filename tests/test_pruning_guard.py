"""The rollback guard with its noise-derived tolerance, on real Lightning runs and against a hand computation.

Real runs: digits, 100 training tasks, ``shuffle_query`` corruption, the MLP 64-32-5 MAML of the robustness grid,
outer SGD 0.5 (the noisiest reference loss of the grid's recipes). (i) With the default policy, correctly
pruned tasks stay pruned (the former fixed 2% tolerance, judged on one round, brought them back after a
one-round jump of the reference loss). (ii) A policy forced to prune the *clean* half of a half-corrupted pool
(the most helpful tasks) sees the reference loss rise and stay up, and the guard brings exactly those back.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from lightning_metaif import MetaInfluence, PruningPolicy
from lightning_metaif.actions.pruning import ROLLBACK_FLOOR, rollback_tolerance_of
from lightning_metaif.meta.datamodule import MetaDataModule
from lightning_metaif.meta.datasets import digits_splits
from lightning_metaif.meta.maml import MAML
from lightning_metaif.meta.noise import corrupt_tasks


def _hand_tolerance(losses: list[float], sigmas: float = 3.0) -> float:
    x = np.asarray(losses, dtype=np.float64)
    second = np.abs(x[2:] - 2 * x[1:-1] + x[:-2])
    return max(sigmas * 1.4826 * float(np.median(second)) / math.sqrt(3.0), ROLLBACK_FLOOR * abs(x[-1]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auto_tolerance_is_the_robust_scale_of_second_differences(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 12))
    sigma = float(rng.uniform(0.005, 0.1))
    losses = (1.5 - 0.04 * np.arange(n) + sigma * rng.standard_normal(n)).tolist()  # a trend plus noise
    assert rollback_tolerance_of(losses) == pytest.approx(_hand_tolerance(losses), rel=1e-12)
    assert rollback_tolerance_of(losses, sigmas=1.5) == pytest.approx(_hand_tolerance(losses, 1.5), rel=1e-12)
    # a trend adds nothing (second differences cancel it) and the noise sets the scale
    line = (2.0 - 0.1 * np.arange(n)).tolist()
    assert rollback_tolerance_of(line) == pytest.approx(ROLLBACK_FLOOR * abs(line[-1]))
    assert rollback_tolerance_of([1.0]) == pytest.approx(0.02) and rollback_tolerance_of([1.0, 0.9]) == (
        pytest.approx(3 * 1.4826 * 0.1)
    )


def _decide(policy, losses, round_index, pruned=frozenset()):
    scores = torch.ones(10)
    scores[:2] = -5.0  # tasks 0 and 1: the lowest scores
    return policy.decide(
        torch.arange(10), scores, set(pruned), round_index=round_index, reference_losses=losses
    )


BEFORE = [1.40, 1.21, 1.10, 1.00, 0.93]  # a noisy fall; second differences .08 .01 .03


def _policy(**kwargs) -> PruningPolicy:
    return PruningPolicy(
        fraction=0.2, warmup_rounds=0, max_fraction_per_round=0.2, stable_rounds=1, margin=None, **kwargs
    )


@pytest.mark.parametrize(
    "after, action",
    [
        ([1.30, 0.95], "skip"),  # one round far above, then back: noise, the prune stands
        ([1.30, 1.20], "restore"),  # above for two rounds: the tasks come back
        ([0.96, 0.94], "skip"),  # within the tolerance
    ],
)
def test_restore_needs_a_rise_above_the_noise_for_rollback_rounds(after, action):
    tolerance = _hand_tolerance(BEFORE)  # 3 x 1.4826 x 0.03 / sqrt(3) = 0.077
    assert 0.96 < 0.93 + tolerance < 1.20
    policy = _policy()
    first = _decide(policy, BEFORE, len(BEFORE))
    assert first.action == "prune" and first.task_ids == [0, 1]
    assert policy.memory.last_prune_tolerance == pytest.approx(tolerance)
    losses, decisions = list(BEFORE), []
    for value in after:
        losses.append(value)
        decisions.append(_decide(policy, losses, len(losses), pruned={0, 1}))
    assert decisions[0].action == "skip"  # never on the first round alone (rollback_rounds=2)
    assert decisions[1].action == action
    if action == "restore":
        assert decisions[1].task_ids == [0, 1] and "for 2 round(s)" in decisions[1].reason
        assert policy.memory.protected == {0, 1}
    else:
        assert policy.memory.last_prune_ids == [] and policy.memory.protected == set()


def test_a_fixed_tolerance_stays_the_users_override():
    fixed = _policy(rollback_tolerance=0.5, rollback_rounds=1)
    assert _decide(fixed, BEFORE, len(BEFORE)).action == "prune"
    assert fixed.memory.last_prune_tolerance == pytest.approx(0.5 * 0.93)
    d = _decide(fixed, [*BEFORE, 1.40], len(BEFORE) + 1, pruned={0, 1})  # 1.40 > 0.93 x 1.5, one round
    assert d.action == "restore" and d.task_ids == [0, 1] and "50% of 0.93" in d.reason
    off = _policy(rollback_tolerance=None, rollback_rounds=1)
    _decide(off, BEFORE, len(BEFORE))
    assert _decide(off, [*BEFORE, 9.0], len(BEFORE) + 1, pruned={0, 1}).action == "skip"
    with pytest.raises(ValueError, match="rollback_rounds"):
        PruningPolicy(rollback_rounds=0)
    with pytest.raises(ValueError, match="rollback_sigmas"):
        PruningPolicy(rollback_sigmas=float("nan"))
    with pytest.raises(ValueError, match="rollback_tolerance must be 'auto'"):
        PruningPolicy(rollback_tolerance="noise")


class _Inverted(PruningPolicy):
    """Prunes the *highest* scores: the policy of test (ii), forced to remove helpful tasks."""

    def decide_round(self, round, state, **kwargs):
        return super().decide_round(dataclasses.replace(round, scores=-round.scores), state, **kwargs)


def _run(policy, seed: int, corrupt: float, epochs: int):
    splits = digits_splits(num_train_tasks=100, num_val_tasks=20, num_test_tasks=5, seed=seed)
    pool, corruption = corrupt_tasks(splits.train, corrupt, mode="shuffle_query", seed=seed)
    pl.seed_everything(seed, verbose=False)
    influence = MetaInfluence(
        "trajectory", actions=[policy], ground_truth=corruption.task_ids.tolist(), verbose=False, seed=seed
    )
    dm = MetaDataModule(pool, splits.val, batch_size=10, seed=seed, task_state=influence.task_state)
    backbone = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5)
    )
    maml = MAML(backbone, inner_lr=0.5, outer_lr=0.5, optimizer="sgd", num_ways=5)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[influence],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(maml, datamodule=dm)
    return influence, set(corruption.task_ids.tolist())


@pytest.mark.parametrize("seed, epochs", [(0, 8), (3, 5)])
def test_correctly_pruned_tasks_stay_pruned_through_a_one_round_jump(seed, epochs):
    # (i) these seeds' reference losses jump by 0.06-0.13 for one round after a correct prune; the former
    # fixed tolerance (2%, one round) brought the pruned corrupted tasks back
    # (epochs: up to the round after the jump, so the new guard has seen the loss come back down)
    old, truth = _run(PruningPolicy(rollback_tolerance=0.02, rollback_rounds=1), seed, 0.2, epochs - 1)
    back = [d for d in old.decisions if d.action == "restore"]
    assert back and all(t in truth for d in back for t in d.task_ids)
    influence, truth = _run(PruningPolicy(), seed, 0.2, epochs)
    assert not [d for d in influence.decisions if d.action == "restore"]
    pruned = influence.task_state.pruned
    assert len(pruned) >= 15 and pruned <= truth  # every pruned task is corrupted, and none came back


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pruning_the_helpful_tasks_is_rolled_back(seed):
    # (ii) half the pool corrupted; the forced policy prunes the 50 highest-scoring (clean) tasks in one round
    policy = _Inverted(
        fraction=0.5, max_fraction_per_round=0.5, warmup_rounds=2, stable_rounds=1, margin=None
    )
    influence, truth = _run(policy, seed, 0.5, 5)
    prunes = [d for d in influence.decisions if d.action == "prune"]
    restores = [d for d in influence.decisions if d.action == "restore"]
    assert len(prunes) == 1 and len(prunes[0].task_ids) == 50 and not set(prunes[0].task_ids) & truth
    assert len(restores) == 1 and sorted(restores[0].task_ids) == sorted(prunes[0].task_ids)
    assert restores[0].epoch == prunes[0].epoch + 2  # judged on two rounds, not one
    losses = [h["influence/reference_loss"] for h in influence.history]
    r = prunes[0].epoch
    tolerance = _hand_tolerance(losses[: r + 1])
    assert min(losses[r + 1 : r + 3]) > losses[r] + tolerance
    assert influence.task_state.pruned == set()


def test_no_new_prune_while_the_guard_is_still_judging_the_last_one():
    """rollback_rounds=3: the loss stays above the pruning round's for three rounds but falls in the second
    (so it is not "rising" round to round); no new prune may replace the one being judged, and the third round
    brings its tasks back."""
    policy = PruningPolicy(
        fraction=0.4,
        warmup_rounds=0,
        max_fraction_per_round=0.2,
        stable_rounds=1,
        margin=None,
        rollback_rounds=3,
    )
    scores = torch.ones(10)
    scores[:2], scores[2:4] = -5.0, -4.0

    def decide(losses, pruned):
        return policy.decide(
            torch.arange(10), scores, set(pruned), round_index=len(losses), reference_losses=losses
        )

    assert decide(BEFORE, set()).task_ids == [0, 1]
    losses = list(BEFORE)
    for value in (1.30, 1.20):  # both above 0.93 + 0.077; the second below the first
        losses.append(value)
        assert decide(losses, {0, 1}).action == "skip"
    assert policy.memory.last_prune_ids == [0, 1]
    losses.append(1.15)
    restored = decide(losses, {0, 1})
    assert (
        restored.action == "restore" and restored.task_ids == [0, 1] and "for 3 round(s)" in restored.reason
    )


def test_auto_tolerance_refuses_non_finite_losses_and_bad_sigmas():
    """A NaN loss would make the tolerance NaN and silently switch the guard off: refused with a clear error."""
    with pytest.raises(ValueError, match="finite reference losses"):
        rollback_tolerance_of([1.2, float("nan"), 1.0])
    with pytest.raises(ValueError, match=r"sigmas=-1\.0"):
        rollback_tolerance_of([1.2, 1.1, 1.0], sigmas=-1.0)
    with pytest.raises(ValueError, match="at least one"):
        rollback_tolerance_of([])


def test_rollback_tolerance_true_is_refused_not_read_as_100_percent():
    from lightning_metaif import PruningPolicy

    with pytest.raises(ValueError, match="rollback_tolerance must be 'auto'"):
        PruningPolicy(rollback_tolerance=True)
