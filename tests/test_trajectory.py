"""The robust trajectory options of TracInAccumulator against hand-written computations."""

from __future__ import annotations

import pytest
import torch

from lightning_metaif.influence.tracin import TracInAccumulator


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cosine_contributions_equal_the_preconditioned_cosine(seed):
    generator = torch.Generator().manual_seed(seed)
    grads = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    ref = torch.randn(6, generator=generator, dtype=torch.float64)
    pre = torch.rand(6, generator=generator, dtype=torch.float64) + 0.1
    acc = TracInAccumulator(normalize="cosine")
    got = acc.update(3, 0.3, [1, 2, 3, 1], grads, ref, batch_size=8, preconditioner=pre)
    root = pre.sqrt()
    expected = torch.tensor(
        [
            0.3 / 8 * float(torch.dot(g * root, ref * root) / ((g * root).norm() * (ref * root).norm()))
            for g in grads
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(got, expected)
    assert acc.scores().as_dict() == pytest.approx(
        {1: float(expected[0] + expected[3]), 2: float(expected[1]), 3: float(expected[2])}
    )
    # without a preconditioner: the Euclidean cosine; a zero gradient contributes 0, not NaN
    plain = TracInAccumulator(normalize="cosine")
    rows = torch.cat([grads[:2], torch.zeros(1, 6, dtype=torch.float64)])
    got = plain.update(0, 1.0, [7, 8, 9], rows, ref)
    expected = torch.nn.functional.cosine_similarity(rows[:2], ref[None], dim=1) / 3
    torch.testing.assert_close(got, torch.cat([expected, torch.zeros(1, dtype=torch.float64)]))
    # scale invariance per step: multiplying a task's gradient by 100 does not change its score
    scaled = TracInAccumulator(normalize="cosine").update(0, 1.0, [7, 8, 9], rows * 100, ref)
    torch.testing.assert_close(scaled, got)


def test_keep_best_holds_the_scores_of_the_best_reference_loss():
    generator = torch.Generator().manual_seed(0)
    steps = [
        (torch.randint(0, 6, (3,), generator=generator), torch.randn(3, 4, generator=generator))
        for _ in range(8)
    ]
    refs = [torch.randn(4, generator=generator) for _ in range(8)]
    losses = {1: 1.0, 3: 0.7, 5: 0.8, 7: 0.75}  # observed after steps 1, 3, 5, 7: best at step 3
    best, every = TracInAccumulator(keep="best"), TracInAccumulator()
    expected_best, expected_all = {}, {}
    for step, ((ids, grads), ref) in enumerate(zip(steps, refs)):
        best.update(step, 0.1, ids, grads, ref)
        every.update(step, 0.1, ids, grads, ref)
        for k, g in zip(ids.tolist(), grads):
            value = 0.1 / 3 * float(g @ ref)
            expected_all[k] = expected_all.get(k, 0.0) + value
            if step <= 3:
                expected_best[k] = expected_best.get(k, 0.0) + value
        if step in losses:
            assert best.observe(losses[step], step=step) == (step in (1, 3))
            every.observe(losses[step], step=step)
    result = best.scores()
    got = result.as_dict()
    assert got == pytest.approx({k: expected_best.get(k, 0.0) for k in expected_all})
    assert every.scores().as_dict() == pytest.approx(expected_all)
    assert result.diagnostics["held"] and result.diagnostics["holding"] and best.holding
    assert result.diagnostics["best_step"] == 3 and result.diagnostics["best_reference_loss"] == 0.7
    assert result.diagnostics["steps"] == 4 and best.steps == 8
    assert int(result.diagnostics["counts"].sum()) == 4 * 3
    # checkpoint round trip keeps the held snapshot
    clone = TracInAccumulator(keep="best")
    clone.load_state_dict(best.state_dict())
    assert clone.scores().as_dict() == pytest.approx(got) and clone.holding
    # a new best releases the hold and snapshots everything so far
    assert best.observe(0.5, step=8) and not best.holding
    assert best.scores().as_dict() == pytest.approx(expected_all)


def test_options_and_losses_are_validated():
    with pytest.raises(ValueError, match="normalize"):
        TracInAccumulator(normalize="l2")
    with pytest.raises(ValueError, match="keep"):
        TracInAccumulator(keep="last")
    acc = TracInAccumulator(keep="best")
    with pytest.raises(ValueError, match="reference_loss must be finite"):
        acc.observe(float("nan"))
    # before any observation keep="best" returns everything accumulated
    acc.update(0, 1.0, [1], torch.ones(1, 2), torch.ones(2))
    assert acc.scores().as_dict() == pytest.approx({1: 2.0}) and not acc.holding


@pytest.mark.parametrize("seed", [0, 1])
def test_improvement_weighting_counts_each_round_by_the_fall_of_the_reference_loss(seed):
    generator = torch.Generator().manual_seed(seed)
    acc = TracInAccumulator(normalize="cosine", weighting="improvement")
    acc.observe(1.0)  # baseline before training
    rounds = [0.8, 0.9, 0.85]  # weights 0.2, 0 (rose), 0.05
    expected: dict[int, float] = {}
    previous = 1.0
    for loss in rounds:
        round_sum: dict[int, float] = {}
        round_count: dict[int, int] = {}
        for step in range(2):
            ids = torch.randint(0, 5, (3,), generator=generator)
            grads, ref = torch.randn(3, 4, generator=generator), torch.randn(4, generator=generator)
            acc.update(step, 0.5, ids, grads, ref)
            cos = torch.nn.functional.cosine_similarity(grads, ref[None], dim=1)
            for k, c in zip(ids.tolist(), cos.tolist()):
                round_sum[k] = round_sum.get(k, 0.0) + 0.5 * c
                round_count[k] = round_count.get(k, 0) + 1
        weight = max(0.0, previous - loss)
        for k, value in round_sum.items():  # the round's fall times the task's mean contribution in the round
            expected[k] = expected.get(k, 0.0) + weight * value / round_count[k]
        acc.observe(loss)
        assert acc.holding == (loss > previous)
        assert acc.last_round_weight == pytest.approx(weight)
        previous = loss
    assert acc.scores().as_dict() == pytest.approx(expected, rel=1e-5)  # float32 gradients
    clone = TracInAccumulator()
    clone.load_state_dict(acc.state_dict())
    assert clone.weighting == "improvement" and clone.scores().as_dict() == pytest.approx(expected, rel=1e-5)
    # without a baseline the first round counts 0, and the diagnostics say so
    late = TracInAccumulator(weighting="improvement")
    late.update(0, 1.0, [1], torch.ones(1, 2), torch.ones(2))
    late.observe(0.5)
    assert late.scores().as_dict() == {1: 0.0} and late.scores().diagnostics["unweighted_steps"] == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_improvement_weighting_split_over_processes_adds_up_to_the_one_process_mean(seed):
    """Two 'processes' each trace part of a round's steps (task 3 on both); with the round's occurrences over
    both, their scores add up to the one-process accumulator's (the mean over every occurrence)."""
    generator = torch.Generator().manual_seed(seed)
    reference = torch.randn(5, generator=generator, dtype=torch.float64)
    steps = [([3, 1], torch.randn(2, 5, generator=generator, dtype=torch.float64)) for _ in range(4)]
    steps += [([3, 2], torch.randn(2, 5, generator=generator, dtype=torch.float64))]
    single = TracInAccumulator(normalize="cosine", weighting="improvement")
    parts = [TracInAccumulator(normalize="cosine", weighting="improvement") for _ in range(2)]
    for acc in (single, *parts):
        acc.observe(1.0)
    for step, (ids, grads) in enumerate(steps):
        single.update(step, 0.1, ids, grads, reference)
        parts[step % 2].update(step, 0.1, ids, grads, reference, batch_size=2)
    totals: dict[int, int] = {}
    for acc in parts:
        for t, c in zip(*(x.tolist() for x in acc.round_occurrences())):
            totals[t] = totals.get(t, 0) + c
    single.observe(0.5)
    for acc in parts:
        ids, _ = acc.round_occurrences()
        acc.observe(0.5, occurrences=torch.tensor([totals[t] for t in ids.tolist()]))
    expected = dict(zip(single.scores().task_ids.tolist(), single.scores().scores.tolist()))
    summed: dict[int, float] = {}
    for acc in parts:
        out = acc.scores()
        for t, s in zip(out.task_ids.tolist(), out.scores.tolist()):
            summed[t] = summed.get(t, 0.0) + s
    assert summed.keys() == expected.keys()
    for t in expected:
        assert summed[t] == pytest.approx(expected[t], rel=1e-12), t
    # without the counts over processes, task 3 (seen on both) would count twice
    with pytest.raises(ValueError, match="occurrences"):
        TracInAccumulator(weighting="improvement").observe(0.1, occurrences=torch.tensor([1]))


@pytest.mark.parametrize(
    "normalize, weighting", [("none", "none"), ("cosine", "none"), ("cosine", "improvement")]
)
def test_queued_steps_fold_into_the_same_totals_as_per_step_updates(normalize, weighting):
    """The callback's hot path (``return_contributions=False``: products stay queued, folded in one batch when
    scores are read) gives the totals of per-step updates, also with steps lacking a reference gradient, new
    task ids appearing late, weights, a preconditioner and several rounds."""
    generator = torch.Generator().manual_seed(0)
    eager = TracInAccumulator(normalize=normalize, weighting=weighting)
    queued = TracInAccumulator(normalize=normalize, weighting=weighting)
    for acc in (eager, queued):
        acc.observe(2.0)
    loss = 2.0
    for step in range(12):
        ids = torch.randint(0, 4 + step, (3,), generator=generator)
        grads = torch.randn(3, 5, generator=generator)
        ref = None if step % 5 == 4 else torch.randn(5, generator=generator)
        pre = torch.rand(5, generator=generator) + 0.1
        weights = torch.rand(3, generator=generator, dtype=torch.float64)
        kwargs = dict(batch_size=6, preconditioner=pre, task_weights=weights)
        contributions = eager.update(step, 0.1 * (step + 1), ids, grads, ref, **kwargs)
        assert (contributions is None) == (ref is None)
        eager._fold()  # per step, as before the queue
        assert (
            queued.update(step, 0.1 * (step + 1), ids, grads, ref, **kwargs, return_contributions=False)
            is None
        )
        if step % 4 == 3:
            loss -= 0.1
            assert eager.observe(loss) == queued.observe(loss)
    a, b = eager.scores(), queued.scores()
    assert a.task_ids.tolist() == b.task_ids.tolist()
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-12, atol=0)
    torch.testing.assert_close(a.self_influence, b.self_influence, rtol=1e-12, atol=0)
    assert a.diagnostics["counts"].tolist() == b.diagnostics["counts"].tolist()
    assert eager.state_dict()["steps"] == queued.state_dict()["steps"] == 12


def test_queued_steps_keep_the_weights_of_their_step_when_the_caller_reuses_its_buffer():
    """A queued step must not alias the caller's ``task_weights`` (a module may refill one float64 buffer each
    step): the totals are those of the weights the step was given."""
    grads, ref = torch.tensor([[1.0, 2.0], [3.0, -1.0]]), torch.tensor([0.5, 1.0])
    buffer = torch.tensor([1.0, 0.25], dtype=torch.float64)
    queued = TracInAccumulator(normalize="none", weighting="none", keep="all")
    queued.update(0, 0.1, [0, 1], grads, ref, task_weights=buffer, return_contributions=False)
    buffer.fill_(7.0)  # the caller's next step
    expected = 0.1 / 2 * torch.tensor([1.0, 0.25], dtype=torch.float64) * (grads @ ref).double()
    torch.testing.assert_close(queued.scores().scores, expected, rtol=1e-12, atol=0)


def test_non_integer_task_ids_are_refused():
    with pytest.raises(ValueError, match="task_ids must be integers"):
        TracInAccumulator().update(0, 0.1, torch.tensor([3.5]), torch.ones(1, 2), torch.ones(2))
