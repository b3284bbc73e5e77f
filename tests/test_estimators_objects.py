"""The callback's estimator objects used directly: one engine call each, the same numbers as the engine."""

import pytest
import torch
from metaif_helpers import tiny_maml

from lightning_metaif.estimators import Checkpoints, Ensemble, RoundContext, TaskIF, as_estimator
from lightning_metaif.influence.estimators import task_influence
from lightning_metaif.meta.datasets import digits_splits


def _context(num_tasks, progress=None):
    splits = digits_splits(num_train_tasks=num_tasks, num_val_tasks=5, num_test_tasks=5, seed=1)
    module = tiny_maml()
    params = {n: p.detach().requires_grad_(True) for n, p in module.meta_parameters().items()}
    positions = torch.arange(num_tasks)
    weights = torch.linspace(0.5, 1.5, num_tasks, dtype=torch.float64)
    return RoundContext(
        problem=module,
        params=params,
        pool=splits.train,
        positions=positions,
        weights=weights,
        objective_positions=positions,
        objective_weights=weights,
        reference=splits.val.batch(),
        utility=None,
        engine={"chunk_size": 16, "vectorize": "auto"},
        round_index=3,
        seed=5,
        progress=progress,
        position_of={int(t): i for i, t in enumerate(splits.train.task_ids.tolist())},
    )


@pytest.mark.parametrize("estimator", [Checkpoints(), Ensemble(copies=1)])
def test_scoring_in_slices_with_progress_equals_one_pass(estimator):
    import dataclasses

    calls = []
    ctx = _context(300)
    whole = estimator.score(ctx)
    sliced = estimator.score(
        dataclasses.replace(ctx, progress=lambda done, total: calls.append((done, total)))
    )
    assert calls[-1] == (300, 300) and len(calls) == 2  # 256 + 44 tasks
    torch.testing.assert_close(sliced.scores, whole.scores, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(sliced.self_influence, whole.self_influence, rtol=1e-6, atol=1e-9)


def test_task_if_object_equals_the_engine_with_weights():
    ctx = _context(12)
    out = TaskIF(solver="dense", damping=1.0, l2=0.01, curvature="exact").score(ctx)
    engine = task_influence(
        ctx.problem,
        ctx.params,
        ctx.pool.batch(),
        ctx.reference,
        estimator="task_if",
        solver="dense",
        damping=1.0,
        l2=0.01,
        curvature="exact",
        task_weights=ctx.weights,
    )
    torch.testing.assert_close(out.scores, engine.scores.double(), rtol=1e-6, atol=1e-9)
    assert out.diagnostics["solver_converged"] == 1.0


def test_estimator_names_and_settings():
    assert as_estimator("ensemble").settings() == {
        "name": "ensemble",
        "copies": 4,
        "std": 0.01,
        "max_tasks": None,
    }
    settings = TaskIF(solver="cg").settings()
    assert settings["name"] == "task_if" and settings["solver"] == "cg"
    with pytest.raises(ValueError, match=r"Checkpoints\(max_tasks=0\)"):
        Checkpoints(max_tasks=0)


def test_trajectory_held_at_the_best_round_leaves_later_tasks_unscored():
    """keep="best": while the reference loss is above its best, tasks first seen after the best round have no
    score in the held snapshot, so they are not reported (never as a score of 0)."""
    import dataclasses

    from lightning_metaif.estimators import Trajectory

    ctx = _context(6)
    estimator = Trajectory()
    estimator.start(ctx)
    dim = sum(p.numel() for p in ctx.params.values())
    grads = torch.randn(2, dim)
    ids = ctx.pool.task_ids
    estimator.on_step(1, ids[:2], grads, task_weights=torch.ones(2), scaling=None, batch_size=2)
    first = estimator.score(ctx)
    assert sorted(first.positions.tolist()) == [0, 1]
    worse = {n: (p.detach() + 0.5 * torch.randn_like(p)).requires_grad_(True) for n, p in ctx.params.items()}
    estimator.on_step(2, ids[2:4], grads, task_weights=torch.ones(2), scaling=None, batch_size=2)
    second = estimator.score(dataclasses.replace(ctx, params=worse))
    assert second.diagnostics["scores_held"] == 1.0
    assert not {2, 3} & set(second.positions.tolist())


def test_trajectory_refuses_to_resume_with_other_settings():
    from lightning_metaif.estimators import Trajectory

    ctx = _context(4)
    saved = Trajectory()
    saved.start(ctx)
    with pytest.raises(ValueError, match=r"Trajectory\(normalize='cosine'\).*Trajectory\(normalize='none'\)"):
        Trajectory(normalize="none").load_state_dict(saved.state_dict())
    Trajectory().load_state_dict(saved.state_dict())  # the same settings resume
