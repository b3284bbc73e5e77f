"""Label-noise injection: the recorded ground truth must equal the labels that actually changed."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_metaif.influence.tasks import TaskBatch
from lightning_metaif.meta.datasets import digits_splits
from lightning_metaif.meta.noise import MODES, CorruptedTaskPool, Corruption, corrupt_tasks
from lightning_metaif.meta.pools import ClassificationTaskPool, SinusoidTaskPool, collate_tasks


@pytest.fixture(scope="module")
def digits_pool():
    return digits_splits(
        ways=5, shots=2, queries=4, num_train_tasks=60, num_val_tasks=5, num_test_tasks=5
    ).train


def changed(old, new):
    diff = old != new
    if diff.dim() > 1:
        diff = diff.reshape(diff.shape[0], -1).any(dim=1)
    return diff.nonzero().flatten().tolist()


def check_ground_truth(pool, noisy, corruption):
    """Every task: inputs identical; labels change exactly where the ground truth says; clean tasks untouched."""
    assert torch.equal(noisy.task_ids, pool.task_ids) and len(noisy) == len(pool)
    corrupted = set(corruption.task_ids.tolist())
    assert set(corruption.sample_indices) == corrupted
    for position in range(len(pool)):
        clean, dirty = pool[position], noisy[position]
        tid = clean.task_id
        assert dirty.task_id == tid
        assert torch.equal(clean.support_x, dirty.support_x) and torch.equal(clean.query_x, dirty.query_x)
        truth = corruption.sample_indices.get(tid, {"support": [], "query": []})
        assert changed(clean.support_y, dirty.support_y) == truth["support"]
        assert changed(clean.query_y, dirty.query_y) == truth["query"]
        if tid not in corrupted:
            assert torch.equal(clean.support_y, dirty.support_y) and torch.equal(clean.query_y, dirty.query_y)
        labels_s, labels_q = noisy.task_labels(tid)
        assert torch.equal(labels_s, dirty.support_y) and torch.equal(labels_q, dirty.query_y)
        assert (
            dirty.support_y.dtype == clean.support_y.dtype and dirty.support_y.shape == clean.support_y.shape
        )


@pytest.mark.parametrize("mode", MODES)
def test_classification_ground_truth_matches_changed_labels(digits_pool, mode):
    noisy, corruption = corrupt_tasks(digits_pool, 0.3, mode=mode, seed=4, rate=0.25)
    assert isinstance(noisy, CorruptedTaskPool) and isinstance(corruption, Corruption)
    assert corruption.task_ids.numel() == 18 and corruption.task_ids.dtype == torch.long
    assert torch.equal(corruption.task_ids, torch.sort(corruption.task_ids).values)
    check_ground_truth(digits_pool, noisy, corruption)
    mask = corruption.mask(digits_pool.task_ids)
    assert mask.dtype == torch.bool and int(mask.sum()) == 18
    assert torch.equal(digits_pool.task_ids[mask], corruption.task_ids)
    for tid in corruption.task_ids.tolist():
        clean, dirty = digits_pool.task(tid), noisy.task(tid)
        truth = corruption.sample_indices[tid]
        assert dirty.support_y.min() >= 0 and dirty.query_y.max() < 5
        if mode == "shuffle_query":
            assert truth["support"] == [] and truth["query"] == list(range(20))  # every query label is wrong
            assert Counter(dirty.query_y.tolist()) == Counter(clean.query_y.tolist())  # a permutation
        elif mode == "random_labels":
            assert len(truth["support"]) + len(truth["query"]) >= 1
        else:
            assert len(truth["support"]) + len(truth["query"]) == round(0.25 * 30)


def test_random_labels_changes_about_four_fifths(digits_pool):
    _, corruption = corrupt_tasks(digits_pool, 1.0, mode="random_labels", seed=2)
    share = corruption.num_changed / (60 * 30)
    assert 0.7 < share < 0.9  # 1 - 1/ways = 0.8 expected


def test_flip_labels_where_and_rate(digits_pool):
    noisy, corruption = corrupt_tasks(digits_pool, 0.5, mode="flip_labels", rate=1.0, where="support", seed=1)
    check_ground_truth(digits_pool, noisy, corruption)
    for tid in corruption.task_ids.tolist():
        assert corruption.sample_indices[tid] == {"support": list(range(10)), "query": []}
    noisy, corruption = corrupt_tasks(digits_pool, 0.5, mode="flip_labels", rate=0.01, where="query", seed=1)
    check_ground_truth(digits_pool, noisy, corruption)
    for tid in corruption.task_ids.tolist():  # at least one sample per corrupted task
        assert (
            corruption.sample_indices[tid]["support"] == []
            and len(corruption.sample_indices[tid]["query"]) == 1
        )
    mask = corruption.sample_mask(int(corruption.task_ids[0]), "query", 20)
    assert int(mask.sum()) == 1 and mask.dtype == torch.bool


def test_shuffle_query_with_two_ways_swaps_every_label():
    pool = ClassificationTaskPool(
        torch.randn(40, 2), torch.arange(40) % 2, ways=2, shots=1, queries=5, num_tasks=8
    )
    noisy, corruption = corrupt_tasks(pool, 1.0, mode="shuffle_query")
    for tid in pool.task_ids.tolist():
        assert torch.equal(noisy.task(tid).query_y, 1 - pool.task(tid).query_y)
        assert corruption.sample_indices[tid]["query"] == list(range(10))


@pytest.mark.parametrize("mode", MODES)
def test_regression_ground_truth(mode):
    pool = SinusoidTaskPool(30, shots=5, queries=8, seed=3)
    noisy, corruption = corrupt_tasks(pool, 0.5, mode=mode, seed=9, rate=0.5, scale=4.0)
    assert corruption.task_ids.numel() == 15
    check_ground_truth(pool, noisy, corruption)
    for tid in corruption.task_ids.tolist():
        clean, dirty = pool.task(tid), noisy.task(tid)
        truth = corruption.sample_indices[tid]
        if mode == "shuffle_query":
            assert truth["query"] == list(range(8)) and truth["support"] == []
            assert torch.equal(
                torch.sort(dirty.query_y.flatten()).values, torch.sort(clean.query_y.flatten()).values
            )
        elif mode == "random_labels":
            assert len(truth["support"]) == 5 and len(truth["query"]) == 8
        else:
            assert len(truth["support"]) + len(truth["query"]) == round(0.5 * 13)
            offsets = (
                torch.cat([dirty.support_y - clean.support_y, dirty.query_y - clean.query_y]).abs().flatten()
            )
            moved = offsets[offsets > 0]
            assert bool((moved >= 4.0 - 1e-5).all() and (moved <= 8.0 + 1e-5).all())


def test_corruption_is_deterministic_and_order_independent(digits_pool):
    a, ca = corrupt_tasks(digits_pool, 0.4, mode="random_labels", seed=3)
    b, cb = corrupt_tasks(digits_pool, 0.4, mode="random_labels", seed=3)
    assert torch.equal(ca.task_ids, cb.task_ids) and ca.sample_indices == cb.sample_indices
    forward = [a[i] for i in range(len(a))]
    for i in reversed(range(len(b))):
        assert torch.equal(b[i].support_y, forward[i].support_y) and torch.equal(
            b[i].query_y, forward[i].query_y
        )
    c, cc = corrupt_tasks(digits_pool, 0.4, mode="random_labels", seed=4)
    assert not torch.equal(ca.task_ids, cc.task_ids) or ca.sample_indices != cc.sample_indices
    clone = pickle.loads(pickle.dumps(a))
    assert clone.ways == 5 and clone.shots == 2  # forwarded attributes survive pickling
    for tid in ca.task_ids.tolist()[:5]:
        assert torch.equal(clone.task(tid).query_y, a.task(tid).query_y)
    assert clone.task_classes(3) == digits_pool.task_classes(3)
    assert clone.is_image


SUBPROCESS_SCRIPT = """
import sys, torch
from lightning_metaif.meta.datasets import digits_splits
from lightning_metaif.meta.noise import corrupt_tasks
pool = digits_splits(ways=5, shots=2, queries=4, num_train_tasks=60, num_val_tasks=5, num_test_tasks=5).train
noisy, corruption = corrupt_tasks(pool, 0.5, mode="flip_labels", seed=8, rate=0.3)
tid = int(corruption.task_ids[-1])
torch.save({"ids": corruption.task_ids, "truth": corruption.sample_indices, "tid": tid,
            "y": noisy.task(tid).support_y}, sys.argv[1])
"""


def test_corruption_is_identical_in_another_process(tmp_path, digits_pool):
    path = tmp_path / "noise.pt"
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SUBPROCESS_SCRIPT), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    theirs = torch.load(path)
    noisy, corruption = corrupt_tasks(digits_pool, 0.5, mode="flip_labels", seed=8, rate=0.3)
    assert torch.equal(theirs["ids"], corruption.task_ids)
    assert theirs["truth"] == corruption.sample_indices
    assert torch.equal(theirs["y"], noisy.task(theirs["tid"]).support_y)


def test_dataloader_over_corrupted_pool(digits_pool):
    noisy, corruption = corrupt_tasks(digits_pool, 0.5, mode="shuffle_query")
    batches = list(DataLoader(noisy, batch_size=16, collate_fn=collate_tasks))
    assert all(isinstance(b, TaskBatch) for b in batches)
    ids = torch.cat([b.task_ids for b in batches])
    assert torch.equal(ids, digits_pool.task_ids)
    assert int(corruption.mask(ids).sum()) == 30
    whole = noisy.batch()
    assert torch.equal(whole.query_y, torch.cat([b.query_y for b in batches]))
    differs = (whole.query_y != digits_pool.batch().query_y).any(dim=1)
    assert torch.equal(differs, corruption.mask(whole.task_ids))


def test_zero_fraction_and_composition(digits_pool):
    noisy, corruption = corrupt_tasks(digits_pool, 0.0)
    assert (
        corruption.task_ids.numel() == 0 and corruption.sample_indices == {} and corruption.num_changed == 0
    )
    assert not corruption.mask(digits_pool.task_ids).any()
    assert torch.equal(noisy[4].query_y, digits_pool[4].query_y)
    # Corrupting an already corrupted pool works; its ground truth is relative to the pool it wraps.
    once, _ = corrupt_tasks(digits_pool, 1.0, mode="flip_labels", rate=0.1)
    twice, second = corrupt_tasks(once, 0.5, mode="shuffle_query", seed=1)
    check_ground_truth(once, twice, second)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(fraction=-0.1), "fraction"),
        (dict(fraction=1.5), "fraction"),
        (dict(fraction="half"), "fraction"),
        (dict(fraction=0.5, mode="swap"), "Unknown corruption mode 'swap'"),
        (dict(fraction=0.5, mode="flip_labels", rate=0.0), "rate"),
        (dict(fraction=0.5, mode="flip_labels", rate=1.5), "rate"),
        (dict(fraction=0.5, where="labels"), "where"),
        (dict(fraction=0.5, mode="shuffle_query", where="support"), "query set"),
        (dict(fraction=0.5, seed=-1), "seed"),
        (dict(fraction=0.5, scale=0.0), "scale"),
    ],
)
def test_bad_arguments(digits_pool, kwargs, match):
    with pytest.raises(ValueError, match=match):
        corrupt_tasks(digits_pool, **kwargs)


def test_one_way_pool_cannot_flip():
    pool = ClassificationTaskPool(
        torch.randn(10, 2), torch.zeros(10).long(), ways=1, shots=1, queries=1, num_tasks=2
    )
    with pytest.raises(ValueError, match="at least 2 classes"):
        corrupt_tasks(pool, 0.5, mode="flip_labels")
    with pytest.raises(ValueError, match="must be a TaskPool"):
        corrupt_tasks([pool[0]], 0.5)


def test_large_pool_corruption_is_cheap_enough():
    pool = ClassificationTaskPool(
        torch.randn(2000, 2), torch.arange(2000) % 100, ways=5, shots=1, queries=15, num_tasks=100_000
    )
    noisy, corruption = corrupt_tasks(pool, 0.01, mode="shuffle_query")
    assert corruption.task_ids.numel() == 1000 and noisy[-1].task_id == 99_999
    tid = int(corruption.task_ids[-1])
    assert changed(pool.task(tid).query_y, noisy.task(tid).query_y) == corruption.sample_indices[tid]["query"]
