"""PruningPolicy: stable signal, no pruning while the reference rises, rollback, intents, precision."""

from __future__ import annotations

import pytest
import torch

from lightning_metaif.actions import PruningPolicy, TaskState


def scores_of(values: dict[int, float], size: int = 10) -> torch.Tensor:
    out = torch.ones(size)
    for k, v in values.items():
        out[k] = v
    return out


def run_rounds(policy, rounds, losses=None, truth=None):
    pruned: set[int] = set()
    decisions = []
    for r, values in enumerate(rounds, start=1):
        d = policy.decide(
            torch.arange(10),
            scores_of(values),
            pruned,
            round_index=r,
            reference_losses=None if losses is None else losses[:r],
            ground_truth=truth,
        )
        if d.action == "prune":
            pruned |= set(d.task_ids)
        elif d.action == "restore":
            pruned -= set(d.task_ids)
        decisions.append(d)
    return decisions, pruned


ROUNDS = [
    {0: -5.0, 1: -4.0, 2: -3.0},
    {7: -10.0, 0: -5.0, 1: -4.0},  # task 7 dips once into the bottom set, task 2 leaves it
    {0: -5.0, 1: -4.0, 2: -3.0},
    {0: -5.0, 1: -4.0, 2: -3.0},
]


def test_a_one_round_dip_is_ignored_and_a_stable_bottom_set_is_pruned():
    kwargs = dict(fraction=0.3, warmup_rounds=1, max_fraction_per_round=0.3)
    decisions, pruned = run_rounds(PruningPolicy(**kwargs, stable_rounds=2), ROUNDS)
    assert [d.action for d in decisions] == ["skip", "prune", "skip", "prune"]
    assert decisions[1].task_ids == [0, 1]  # in the bottom 3 in rounds 1 and 2
    assert "consecutive" in decisions[2].reason  # task 2's streak restarted in round 3
    assert decisions[3].task_ids == [2] and pruned == {0, 1, 2}
    # the single-round rule acts on the dip: this is what stable_rounds prevents
    _, eager = run_rounds(PruningPolicy(**kwargs, stable_rounds=1), ROUNDS)
    assert 7 in eager


def test_no_pruning_while_the_reference_loss_rises():
    policy = PruningPolicy(fraction=0.3, warmup_rounds=0, max_fraction_per_round=0.3)
    decisions, pruned = run_rounds(policy, ROUNDS[:1] * 3, losses=[1.0, 1.1, 1.05])
    assert decisions[1].action == "skip" and "rising" in decisions[1].reason  # stable, but 1.0 -> 1.1
    assert decisions[2].action == "prune" and pruned == {0, 1, 2}


@pytest.mark.parametrize("after, restored", [(0.95, True), (0.91, False)])
def test_rollback_restores_exactly_the_pruned_ids_and_protects_them(after, restored):
    policy = PruningPolicy(
        fraction=0.3, warmup_rounds=0, max_fraction_per_round=0.2, rollback_tolerance=0.02, rollback_rounds=1
    )
    same = {0: -5.0, 1: -4.0, 2: -3.0}
    decisions, pruned = run_rounds(policy, [same] * 5, losses=[1.0, 0.9, after, after - 0.01, after - 0.02])
    assert decisions[1].action == "prune" and decisions[1].task_ids == [0, 1]  # 20% per round
    if restored:  # 0.95 > 0.9 * 1.02: the pruned ids come back, and are never pruned again
        assert decisions[2].action == "restore" and decisions[2].task_ids == [0, 1]
        assert "0.9 -> 0.95" in decisions[2].reason
        assert decisions[3].action == "skip" and "consecutive" in decisions[3].reason  # task 2 restarts
        assert decisions[4].task_ids == [2] and pruned == {2}
    else:  # 0.91 is within 2% of 0.9: the prune stands (but nothing more is pruned while the loss rises)
        assert decisions[2].action == "skip" and "rising" in decisions[2].reason
        assert decisions[3].action == "prune" and decisions[3].task_ids == [2] and pruned == {0, 1, 2}


def test_pruning_precision_is_reported_against_ground_truth():
    policy = PruningPolicy(fraction=0.3, warmup_rounds=0, max_fraction_per_round=0.3)
    decisions, _ = run_rounds(policy, ROUNDS[:1] * 2, truth={0, 5})
    assert decisions[1].task_ids == [0, 1, 2] and "precision 1/3 = 0.33" in decisions[1].reason
    assert policy.memory.precision == [pytest.approx(1 / 3)]
    clone = PruningPolicy(fraction=0.3, warmup_rounds=0, max_fraction_per_round=0.3)
    clone.load_state_dict(policy.state_dict())
    assert clone.memory == policy.memory
    policy.reset()
    assert policy.memory.precision == [] and policy.memory.streaks == {}


def test_efficiency_drops_well_learned_tasks_and_keeps_the_expected_weight():
    generator = torch.Generator().manual_seed(0)
    ids = torch.arange(100, 200)
    losses = torch.rand(100, generator=generator)
    well = set(ids[losses < losses.mean()].tolist())
    policy = PruningPolicy(intent="efficiency", drop_ratio=0.25, anneal_fraction=0.2)
    state = TaskState()
    kept_weight = {t: 0.0 for t in well}
    rounds = 400
    for r in range(1, rounds + 1):
        d = policy.decide(
            ids, torch.zeros(100), set(), round_index=r, losses=losses, max_epochs=1000, epoch=r
        )
        dropped = {t for t, w in zip(d.task_ids, d.weights) if w == 0.0}
        kept = {t: w for t, w in zip(d.task_ids, d.weights) if w != 0.0}
        assert d.action == "resample" and set(d.task_ids) == well  # only well-learned tasks are touched
        assert set(kept) == well - dropped and all(w == pytest.approx(4 / 3) for w in kept.values())
        d.apply(state)
        assert state.pruned == dropped  # the previous round's dropped tasks are back
        for t in well:
            kept_weight[t] += state.weight(t) / rounds
        assert all(state.weight(t) == 1.0 for t in set(ids.tolist()) - well)
    # E[weight] = (1 - r) / (1 - r) = 1 for every well-learned task: the expected meta-gradient is unchanged
    mean_weight = sum(kept_weight.values()) / len(kept_weight)
    assert mean_weight == pytest.approx(1.0, abs=0.03)
    assert max(abs(w - 1.0) for w in kept_weight.values()) < 0.3
    # the last 20% of training: nothing dropped, everything back at weight 1
    end = policy.decide(
        ids, torch.zeros(100), set(), round_index=rounds + 1, losses=losses, max_epochs=10, epoch=8
    )
    assert end.task_ids == [] and "annealing" in end.reason
    end.apply(state)
    assert state.pruned == set() and all(state.weight(t) == 1.0 for t in ids.tolist())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"intent": "speed"}, "intent"),
        ({"stable_rounds": 0}, "stable_rounds"),
        ({"rollback_tolerance": -0.1}, "rollback_tolerance"),
        ({"drop_ratio": 1.0}, "drop_ratio"),
        ({"anneal_fraction": 1.0}, "anneal_fraction"),
    ],
)
def test_new_arguments_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruningPolicy(**kwargs)


def test_efficiency_needs_losses_and_reference_losses_must_be_finite():
    with pytest.raises(ValueError, match="losses"):
        PruningPolicy(intent="efficiency").decide(torch.arange(3), torch.zeros(3), set(), round_index=1)
    with pytest.raises(ValueError, match="reference_losses must be finite"):
        PruningPolicy().decide(
            torch.arange(3), torch.zeros(3), set(), round_index=1, reference_losses=[1.0, float("nan")]
        )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_margin_prunes_outliers_not_the_low_tail_of_a_clean_pool(seed):
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randn(100, generator=generator)  # a clean pool: no task is far below the others
    ids = torch.arange(100)
    policy = PruningPolicy(warmup_rounds=0, max_fraction_per_round=0.2)  # defaults: margin 3, 2 rounds
    for r in (1, 2):
        d = policy.decide(ids, clean, set(), round_index=r)
    expected_outliers = (clean < clean.median() - 3 * 1.4826 * (clean - clean.median()).abs().median()).sum()
    assert (
        d.task_ids
        == ids[clean < clean.median() - 3 * 1.4826 * (clean - clean.median()).abs().median()].tolist()
    )
    assert len(d.task_ids) == int(expected_outliers) <= 1
    # 20 corrupted tasks well below the others are pruned, and only they
    corrupted = clean.clone()
    corrupted[:20] -= 8.0
    policy = PruningPolicy(warmup_rounds=0, max_fraction_per_round=0.2)
    for r in (1, 2):
        d = policy.decide(ids, corrupted, set(), round_index=r)
    assert set(d.task_ids) == set(range(20))
    # without the margin the default fraction is filled from the clean tail
    eager = PruningPolicy(warmup_rounds=0, max_fraction_per_round=0.2, margin=None)
    for r in (1, 2):
        d = eager.decide(ids, clean, set(), round_index=r)
    assert len(d.task_ids) == 20


def test_the_skip_reason_says_when_harmful_tasks_are_held_back_by_the_margin():
    """A bimodal round (40% clearly harmful tasks): the MAD spans the gap, so none is 3 robust s.d. out; the skip
    says so (it used to say 'no kept task is harmful'), with the lowest score and the bar."""
    scores = torch.cat([torch.linspace(-0.08, -0.03, 40), torch.linspace(0.02, 0.08, 60)])
    ids = torch.arange(100)
    policy = PruningPolicy(warmup_rounds=0)
    for r in (1, 2):
        d = policy.decide(ids, scores, set(), round_index=r)
    assert d.action == "skip" and d.task_ids == []
    assert "40 kept tasks are harmful, none below the median by > 3 robust s.d." in d.reason
    centre = scores.median()
    bar = float(centre - 3 * 1.4826 * (scores - centre).abs().median())
    assert f"lowest score {-0.08:.3g}, bar {bar:.3g}" in d.reason
