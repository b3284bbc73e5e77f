import pickle

import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_metaif.actions import PruningPolicy, TaskSampler, TaskState, TaskWeighting


def test_policy_respects_every_limit():
    ids = torch.arange(100, 120)
    scores = torch.linspace(-1.0, 1.0, 20)  # ids 100..109 harmful
    policy = PruningPolicy(
        fraction=0.3, warmup_rounds=1, max_fraction_per_round=0.1, min_pool_size=15, margin=None
    )
    pruned: set[int] = set()
    assert policy.decide(ids, scores, pruned, round_index=1).action == "skip"  # warm-up
    first = policy.decide(ids, scores, pruned, round_index=2)
    assert first.task_ids == [100, 101]  # lowest two (10% of 20)
    pruned |= set(first.task_ids)
    second = policy.decide(ids, scores, pruned, round_index=3)
    assert second.task_ids == [102, 103]
    pruned |= set(second.task_ids)
    third = policy.decide(ids, scores, pruned, round_index=4)
    assert third.task_ids == [104]  # min_pool_size 15 leaves room for one more (target would allow 2)
    pruned |= set(third.task_ids)
    assert policy.decide(ids, scores, pruned, round_index=5).action == "skip"


def test_policy_never_prunes_on_non_finite_or_helpful_scores():
    policy = PruningPolicy(fraction=0.5, warmup_rounds=0, max_fraction_per_round=1.0, margin=None)
    scores = torch.tensor([-3.0, float("nan"), -1.0, 2.0])
    decision = policy.decide(torch.arange(4), scores, set(), round_index=1)
    assert decision.action == "skip" and decision.task_ids == [] and "non-finite" in decision.reason
    helpful = policy.decide(torch.arange(4), torch.tensor([1.0, 2.0, 3.0, 4.0]), set(), round_index=1)
    assert helpful.task_ids == []
    threshold = PruningPolicy(
        fraction=None,
        threshold=2.5,
        only_harmful=False,
        warmup_rounds=0,
        max_fraction_per_round=1.0,
        stable_rounds=1,
        margin=None,
    )
    assert threshold.decide(
        torch.arange(4), torch.tensor([1.0, 2.0, 3.0, 4.0]), set(), round_index=1
    ).task_ids == [0, 1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"fraction": None}, "fraction"),
        ({"fraction": 1.5}, "fraction"),
        ({"max_fraction_per_round": 0}, "per_round"),
        ({"min_pool_size": 0}, "min_pool_size"),
        ({"threshold": float("inf")}, "threshold"),
    ],
)
def test_policy_validates_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruningPolicy(**kwargs)


def test_weighting_is_monotone_floored_and_keeps_previous_on_nan():
    rule = TaskWeighting(strength=1.0, min_weight=0.2, normalize=False)
    scores = torch.tensor([-10.0, -1.0, -0.1, 0.0, 5.0])
    weights = rule(scores)
    assert torch.all(weights[1:] >= weights[:-1])
    assert weights.min() == pytest.approx(0.2) and weights[3:].eq(1.0).all()
    previous = torch.full((5,), 0.7)
    kept = rule(torch.tensor([float("nan"), -1.0, 0.1, 0.2, 0.3]), previous)
    assert kept[0] == pytest.approx(0.7)
    assert TaskWeighting()(scores).mean() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="min_weight"):
        TaskWeighting(min_weight=0.0)


def test_task_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    state = TaskState()
    state.set_weights([1, 2], [0.5, 1.5])
    state.prune([7, 9])
    torch.save({"s": state.state_dict()}, tmp_path / "c.pt")
    restored = TaskState()
    restored.load_state_dict(torch.load(tmp_path / "c.pt", weights_only=True)["s"])
    assert restored.weights == {1: 0.5, 2: 1.5} and restored.pruned == {7, 9}
    assert restored.get(7) == 0.0 and restored.get(1) == 0.5 and restored.get(3) == 1.0
    with pytest.raises(ValueError, match="finite"):
        state.set_weights([1], [float("nan")])


class IdDataset(TensorDataset):
    def __init__(self, n):
        super().__init__(torch.zeros(n))
        self.task_ids = torch.arange(1000, 1000 + n)


@pytest.mark.parametrize("num_replicas", [1, 2])
def test_sampler_excludes_exactly_the_pruned_ids_on_every_rank(num_replicas):
    dataset = IdDataset(10)
    state = TaskState()
    samplers = [
        TaskSampler(dataset, state=state, num_replicas=num_replicas, rank=r, seed=3)
        for r in range(num_replicas)
    ]
    before = [list(s) for s in samplers]
    assert sorted(sum(before, [])) == list(range(10))  # a permutation, split across ranks
    state.prune([1002, 1005, 1007])
    for s in samplers:
        s.set_epoch(1)
    after = [list(s) for s in samplers]
    drawn_ids = {int(dataset.task_ids[p]) for p in sum(after, [])}
    assert drawn_ids == set(range(1000, 1010)) - {1002, 1005, 1007}
    assert all(len(a) == len(b) for a, b in zip(before, after))  # fixed epoch length
    # identical seeding on every rank: the union is the same whether computed on rank 0 or 1
    again = [list(s) for s in samplers]
    assert again == after
    pickle.loads(pickle.dumps(samplers[0]))
