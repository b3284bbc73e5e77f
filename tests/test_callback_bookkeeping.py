"""The callback's numbers against independent computations, in the runs users have: automatic optimisation,
gradient accumulation, Adam, task weights, several rounds, the end of training, a resume, two DDP ranks."""

import json

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from metaif_helpers import (
    DumpRankState,
    RecordSteps,
    UserMAML,
    digits_setup,
    independent_tracin,
    seed_all,
    tiny_maml,
    trainer,
)

from lightning_metaif.actions import PruningPolicy, TaskWeighting
from lightning_metaif.callback import MetaInfluence
from lightning_metaif.estimators import Checkpoints, TaskIF, TraceTaskIF, Trajectory
from lightning_metaif.influence.estimators import task_influence
from lightning_metaif.influence.solvers import Dense
from lightning_metaif.meta.pools import SequenceTaskPool


def _by_id(round_):
    return {
        int(t): float(s)
        for t, s, ok in zip(round_.task_ids.tolist(), round_.scores.tolist(), round_.scored.tolist())
        if ok
    }


def _assert_close(got: dict, expected: dict, rtol=1e-4):
    assert set(got) == set(expected)
    scale = max(abs(v) for v in expected.values())
    for k in expected:
        assert abs(got[k] - expected[k]) <= rtol * scale, (k, got[k], expected[k])


@pytest.mark.parametrize(
    ("optimizer", "lr", "accumulate", "seed"),
    [("sgd", 0.05, 1, 0), ("sgd", 0.05, 2, 1), ("adam", 3e-3, 2, 2), ("adam", 1e-2, 1, 3)],
)
def test_user_module_trajectory_matches_an_independent_tracin(tmp_path, optimizer, lr, accumulate, seed):
    """A user's module (automatic optimisation, recomputed gradients), with gradient accumulation and Adam:
    every drawn task is scored, B counts every micro-batch, Adam's preconditioner is the one the step used,
    the round schedule follows optimizer steps, and the steps after the last round are scored at the end."""
    seed_all(seed)
    plain = Trajectory(normalize="none", weighting="none", keep="all")  # plain TracIn: exact sums
    influence = MetaInfluence(plain, every_n_train_steps=2, verbose=False)
    dm, _ = digits_setup(num_train=24, corrupt=0.25, batch_size=4, seed=seed, task_state=influence.task_state)
    record = RecordSteps()
    module = UserMAML(optimizer, lr=lr)
    t = trainer(tmp_path, [influence, record], max_epochs=1, accumulate_grad_batches=accumulate)
    t.fit(module, datamodule=dm)
    steps = t.global_step
    assert steps == 6 // accumulate  # 6 micro-batches per epoch
    drawn = {i for entry in record.steps.values() for i in entry["ids"]}
    assert len(drawn) == 24  # every task of every micro-batch is traced (not only the last micro-batch's)
    rounds_expected = steps // 2 + (1 if steps % 2 else 0)  # one per 2 optimizer steps, plus the end
    assert influence.rounds == rounds_expected
    assert [h["influence/step"] for h in influence.history] == sorted({*range(2, steps + 1, 2), steps})
    expected, expected_self = independent_tracin(
        module,
        record,
        dm.train_pool,
        dm.val_pool,
        {h["influence/step"] for h in influence.history},
        optimizer=optimizer,
        lr=lr,
    )
    # Adam keeps v in float32 where the reference recomputes it in float64: 1e-3 relative for Adam
    rtol = 1e-3 if optimizer == "adam" else 1e-4
    _assert_close(_by_id(influence.result), expected, rtol=rtol)
    self_influence = dict(zip(influence.result.task_ids.tolist(), influence.result.self_influence.tolist()))
    _assert_close({k: self_influence[k] for k in expected_self}, expected_self, rtol=rtol)  # gᵀDg, not gᵀD²g


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_scheduled_learning_rate_and_a_frozen_parameter(tmp_path, optimizer):
    """A per-step scheduler moves the rate before on_train_batch_end: the step's own rate is used; a frozen
    parameter in meta_parameters() takes no part (and Adam stays on for the others)."""
    seed_all(4)
    plain = Trajectory(normalize="none", weighting="none", keep="all")
    influence = MetaInfluence(plain, every_n_train_steps=3, verbose=False)
    dm, _ = digits_setup(num_train=20, batch_size=4, seed=4, task_state=influence.task_state)
    record = RecordSteps()
    lr = 0.05 if optimizer == "sgd" else 5e-3
    module = UserMAML(optimizer, lr=lr, decay=0.6, freeze_first_bias=True)
    trainer(tmp_path, [influence, record], max_epochs=1).fit(module, datamodule=dm)
    expected, _ = independent_tracin(
        module,
        record,
        dm.train_pool,
        dm.val_pool,
        {h["influence/step"] for h in influence.history},
        optimizer=optimizer,
        lr=lr,
        decay=0.6,
        frozen=("1.bias",),
    )
    _assert_close(_by_id(influence.result), expected, rtol=1e-3 if optimizer == "adam" else 1e-4)


def test_maml_with_task_weighting_matches_an_independent_tracin(tmp_path):
    """The module steps with weighted task gradients: contributions carry the weights it used."""
    seed_all(0)
    plain = Trajectory(normalize="none", weighting="none", keep="all")
    influence = MetaInfluence(plain, actions=[TaskWeighting(strength=2.0)], verbose=False)
    dm, _ = digits_setup(num_train=24, batch_size=6, task_state=influence.task_state)
    record = RecordSteps()
    module = tiny_maml(outer_lr=0.05, optimizer="sgd")
    trainer(tmp_path, [influence, record], max_epochs=3).fit(module, datamodule=dm)
    weights_used = [w for entry in record.steps.values() for w in entry["weights"]]
    assert min(weights_used) < 0.9  # the weighting acted from the second epoch on
    expected, _ = independent_tracin(
        module, record, dm.train_pool, dm.val_pool, {4, 8, 12}, optimizer="sgd", lr=0.05
    )
    _assert_close(_by_id(influence.result), expected)


def test_task_weighting_changes_what_the_module_optimises(tmp_path):
    """After a weighting decision, MAML's step is exactly −η Σ_k w_k g_k / B with the decided weights."""
    seed_all(0)
    influence = MetaInfluence(
        "trajectory", actions=[TaskWeighting(strength=3.0, min_weight=0.2)], verbose=False
    )
    dm, _ = digits_setup(num_train=16, batch_size=4, task_state=influence.task_state)
    record = RecordSteps()
    module = tiny_maml(outer_lr=0.1, optimizer="sgd")
    trainer(tmp_path, [influence, record], max_epochs=2).fit(module, datamodule=dm)
    entry = record.steps[4]  # the first step after the first round
    assert entry["weights"] != [1.0] * 4
    from metaif_helpers import _flat_grad

    pool = dm.train_pool
    tasks = [pool[pool.task_ids.tolist().index(i)] for i in entry["ids"]]
    grads = _flat_grad(module, entry["params"], tasks)
    step = (torch.tensor(entry["weights"])[:, None] * grads).sum(0) / 4
    before = torch.cat([p.reshape(-1) for p in entry["params"].values()])
    after = torch.cat([p.reshape(-1) for p in record.steps[5]["params"].values()])
    torch.testing.assert_close(after, before - 0.1 * step, rtol=1e-5, atol=1e-6)


def test_task_if_scores_only_the_round_sample_with_the_kept_objective(tmp_path):
    """With max_tasks, each round reports (and prunes on) its own sample only; never-scored tasks are not 0;
    the Hessian is that of the kept tasks with their weights, as the engine computes it."""
    seed_all(0)
    estimator = TaskIF(solver=Dense(), damping=1.0, l2=0.01, curvature="exact", max_tasks=10)
    policy = PruningPolicy(
        fraction=0.2, warmup_rounds=1, max_fraction_per_round=0.1, only_harmful=False, margin=None
    )
    dm, corruption = digits_setup(num_train=20, batch_size=5)
    influence = MetaInfluence(estimator, actions=[policy], ground_truth=corruption.task_ids, verbose=False)
    dm.task_state = influence.task_state
    module = tiny_maml()
    trainer(tmp_path, [influence], max_epochs=3).fit(module, datamodule=dm)
    r = influence.result
    assert int(r.scored.sum()) == 10 and bool(torch.isnan(r.scores[~r.scored]).all())
    assert influence.history[-1]["influence/num_scored"] == 10
    assert [row["rank"] for row in r.to_rows() if not row["scored"]] == [None] * 10
    pruned_in_round = [d for d in r.decisions if d.action == "prune"]
    for decision in pruned_in_round:
        assert all(bool(r.scored[r.task_ids.tolist().index(t)]) for t in decision.task_ids)
    # the last round against the engine on the same sample: pruned tasks are not in it
    kept_sample = r.task_ids[r.scored]
    assert not set(kept_sample.tolist()) & (
        influence.task_state.pruned - {t for d in pruned_in_round for t in d.task_ids}
    )
    pool = dm.train_pool
    params = {n: p.detach().requires_grad_(True) for n, p in module.meta_parameters().items()}
    reference = task_influence(
        module,
        params,
        pool.batch([pool.task_ids.tolist().index(t) for t in kept_sample.tolist()]),
        dm.val_pool.batch(),
        estimator="task_if",
        solver="dense",
        damping=1.0,
        l2=0.01,
        curvature="exact",
    )
    got = r.scores[r.scored]
    pruned_now = {t for d in pruned_in_round for t in d.task_ids}
    kept = 20 - len(
        influence.task_state.pruned - pruned_now
    )  # M of the round's objective (the sample: H only)
    torch.testing.assert_close(got, reference.scores.double() * 10 / kept, rtol=1e-4, atol=1e-7)


def test_checkpoints_with_adam_uses_the_step_preconditioner(tmp_path):
    """TracInCP with Adam scores ⟨∇f, D g_k⟩ with D = lr/(√v̂+ε) read after the last step (as trajectory does)."""
    seed_all(0)
    influence = MetaInfluence(Checkpoints(), verbose=False)
    dm, _ = digits_setup(num_train=16, batch_size=4, task_state=influence.task_state)
    module = UserMAML("adam", lr=1e-2)
    record = RecordSteps()
    trainer(tmp_path, [influence, record], max_epochs=1).fit(module, datamodule=dm)
    from metaif_helpers import _flat_grad

    params = record.final
    optimizer = torch.optim.Adam([torch.nn.Parameter(p.clone()) for p in params.values()], lr=1e-2)
    v, beta2 = None, 0.999
    for t, s in enumerate(sorted(record.steps), start=1):  # noqa: B007 - t is used after the loop
        entry = record.steps[s]
        pool = dm.train_pool
        g = _flat_grad(module, entry["params"], [pool[pool.task_ids.tolist().index(i)] for i in entry["ids"]])
        mean = g.double().mean(0)
        v = (1 - beta2) * mean**2 if v is None else beta2 * v + (1 - beta2) * mean**2
    del optimizer
    d = 1e-2 / ((v / (1 - beta2**t)).sqrt() + 1e-8)
    ref = _flat_grad(module, params, list(dm.val_pool)).double().mean(0)
    grads = _flat_grad(module, params, list(dm.train_pool)).double()
    expected = dict(zip(dm.train_pool.task_ids.tolist(), ((grads * d) @ ref).tolist()))
    _assert_close(_by_id(influence.result), expected, rtol=1e-3)


def test_a_list_of_tasks_works_as_pool_and_reference(tmp_path):
    seed_all(0)
    dm, _ = digits_setup(num_train=12, corrupt=0, batch_size=4)
    tasks = list(dm.train_pool)
    influence = MetaInfluence("checkpoints", pool=tasks, reference=list(dm.val_pool), verbose=False)
    trainer(tmp_path, [influence], max_epochs=1).fit(tiny_maml(), datamodule=dm)
    assert isinstance(influence.pool, SequenceTaskPool)
    assert int(influence.result.scored.sum()) == 12
    with pytest.raises(ValueError, match="not a lightning_metaif.Task"):
        SequenceTaskPool([1, 2, 3])


def test_metrics_reach_callback_metrics_once_per_round_and_hparams(tmp_path):
    """Scalars through the module's logging (ModelCheckpoint can monitor them), one logger row per round,
    the callback's settings in the logger's hyperparameters."""
    seed_all(0)
    influence = MetaInfluence("trajectory", verbose=False)
    dm, _ = digits_setup(num_train=16, batch_size=4, task_state=influence.task_state)
    logger = CSVLogger(tmp_path, name="csv")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="influence/score_median", mode="max")
    trainer(tmp_path, [influence, checkpoint], max_epochs=2, logger=logger, enable_checkpointing=True).fit(
        tiny_maml(), datamodule=dm
    )
    assert checkpoint.best_model_score is not None
    assert float(checkpoint.best_model_score) == pytest.approx(
        max(h["influence/score_median"] for h in influence.history), rel=1e-6
    )
    import csv

    with open(logger.log_dir + "/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("influence/score_median")]
    assert len(rows) == influence.rounds == 2  # once per round, not twice
    hparams = (tmp_path / "csv" / "version_0" / "hparams.yaml").read_text()
    assert "metaif" in hparams and "trajectory" in hparams


def test_resumed_run_scores_like_an_uninterrupted_one(tmp_path):
    seed_all(0)
    policy = PruningPolicy(
        fraction=0.2, warmup_rounds=1, max_fraction_per_round=0.1, only_harmful=False, margin=None
    )

    def run(max_epochs, ckpt_path=None, folder="a"):
        seed_all(0)
        influence = MetaInfluence("trajectory", actions=[policy], verbose=False)
        dm, _ = digits_setup(num_train=20, batch_size=5, task_state=influence.task_state)
        save = ModelCheckpoint(dirpath=tmp_path / folder, save_last=True, every_n_epochs=1)
        t = trainer(tmp_path / folder, [influence, save], max_epochs=max_epochs, enable_checkpointing=True)
        t.fit(tiny_maml(), datamodule=dm, ckpt_path=ckpt_path)
        return influence

    straight = run(3, folder="straight")
    run(2, folder="killed")
    resumed = run(3, ckpt_path=str(tmp_path / "killed" / "last.ckpt"), folder="killed")
    assert resumed.task_state.pruned == straight.task_state.pruned
    torch.testing.assert_close(resumed.result.scores, straight.result.scores, rtol=1e-5, atol=1e-9)
    assert [d.to_state() for d in resumed.decisions] == [d.to_state() for d in straight.decisions]


def test_ddp_spawn_matches_a_single_process_run_with_the_same_global_batch(tmp_path):
    seed_all(0)
    out = tmp_path / "ranks"
    out.mkdir()
    influence = MetaInfluence("trajectory", verbose=False)
    dm, _ = digits_setup(num_train=16, batch_size=2, task_state=influence.task_state)
    t = trainer(
        tmp_path / "ddp", [influence, DumpRankState(str(out))], max_epochs=2, strategy="ddp_spawn", devices=2
    )
    t.fit(tiny_maml(), datamodule=dm)
    ddp = json.loads((out / "rank0.json").read_text())

    seed_all(0)
    single = MetaInfluence("trajectory", verbose=False)
    dm1, _ = digits_setup(num_train=16, batch_size=4, task_state=single.task_state)  # 2 ranks x 2 tasks
    trainer(tmp_path / "single", [single], max_epochs=2).fit(tiny_maml(), datamodule=dm1)
    assert ddp["rounds"] == single.rounds == 2
    torch.testing.assert_close(
        torch.tensor(ddp["scores"], dtype=torch.float64), single.result.scores, rtol=1e-4, atol=1e-8
    )


def test_ddp_task_seen_on_both_ranks_in_a_round_counts_once(tmp_path):
    """Rounds of two epochs: a task drawn on rank 0 in one epoch and rank 1 in the next must get the mean of its
    two contributions (weighting="improvement" averages a task's occurrences in a round), exactly as in the
    single-process run with the same global batches, not one mean per rank summed."""
    seed_all(0)
    out = tmp_path / "ranks"
    out.mkdir()
    influence = MetaInfluence("trajectory", every_n_epochs=2, verbose=False)
    dm, _ = digits_setup(num_train=16, batch_size=2, task_state=influence.task_state)
    t = trainer(
        tmp_path / "ddp", [influence, DumpRankState(str(out))], max_epochs=4, strategy="ddp_spawn", devices=2
    )
    t.fit(tiny_maml(), datamodule=dm)
    ddp = json.loads((out / "rank0.json").read_text())

    seed_all(0)
    single = MetaInfluence("trajectory", every_n_epochs=2, verbose=False)
    dm1, _ = digits_setup(num_train=16, batch_size=4, task_state=single.task_state)
    trainer(tmp_path / "single", [single], max_epochs=4).fit(tiny_maml(), datamodule=dm1)
    assert ddp["rounds"] == single.rounds == 2
    torch.testing.assert_close(
        torch.tensor(ddp["scores"], dtype=torch.float64), single.result.scores, rtol=1e-4, atol=1e-8
    )


@pytest.mark.parametrize("epochs", [1, 2])
def test_ddp_fisher_trace_task_if_matches_a_single_process_run(tmp_path, epochs):
    """TraceTaskIF(curvature="fisher") under DDP sums the p x p Fisher over ranks, each task once: with a round of
    two epochs a task may hold a row on both ranks (an older one where it was drawn first); only the newest
    counts, as in one process with the same global batches (where the newer row replaces the older)."""
    seed_all(0)
    out = tmp_path / "ranks"
    out.mkdir()
    influence = MetaInfluence(
        TraceTaskIF(curvature="fisher", projection_dim=64), every_n_epochs=epochs, verbose=False
    )
    dm, _ = digits_setup(num_train=16, batch_size=2, task_state=influence.task_state)
    t = trainer(
        tmp_path / "ddp",
        [influence, DumpRankState(str(out))],
        max_epochs=epochs,
        strategy="ddp_spawn",
        devices=2,
    )
    t.fit(tiny_maml(), datamodule=dm)
    ddp = json.loads((out / "rank0.json").read_text())

    seed_all(0)
    single = MetaInfluence(
        TraceTaskIF(curvature="fisher", projection_dim=64), every_n_epochs=epochs, verbose=False
    )
    dm1, _ = digits_setup(num_train=16, batch_size=4, task_state=single.task_state)
    trainer(tmp_path / "single", [single], max_epochs=epochs).fit(tiny_maml(), datamodule=dm1)
    assert ddp["rounds"] == single.rounds == 1
    assert bool(torch.isfinite(single.result.scores).all())
    torch.testing.assert_close(
        torch.tensor(ddp["scores"], dtype=torch.float64), single.result.scores, rtol=1e-4, atol=1e-8
    )


def test_trace_task_if_equals_an_independent_solve_on_the_traced_gradients(tmp_path):
    """TraceTaskIF: s = (H + δI)^{-1} ∇f by an explicit Hessian (torch.autograd.functional.hessian), scores
    (1/M) ⟨g_k, s⟩ with g_k recomputed at the parameters of the last step that trained on task k."""
    from metaif_helpers import _flat_grad

    from lightning_metaif.estimators import TraceTaskIF

    seed_all(0)
    estimator = TraceTaskIF(hessian_tasks=None, solver=Dense(), damping=1.0, l2=0.01, curvature="exact")
    influence = MetaInfluence(estimator, verbose=False)
    dm, _ = digits_setup(num_train=12, batch_size=4, task_state=influence.task_state)
    record = RecordSteps()
    from lightning_metaif.meta.maml import MAML

    backbone = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 3), torch.nn.ReLU(), torch.nn.Linear(3, 5)
    )
    module = MAML(backbone, inner_lr=0.5, outer_lr=0.05, num_ways=5, optimizer="sgd")  # 215 parameters
    trainer(tmp_path, [influence, record], max_epochs=2).fit(module, datamodule=dm)

    pool, names = dm.train_pool, list(record.final)
    shapes = [record.final[n].shape for n in names]
    flat_final = torch.cat([record.final[n].reshape(-1) for n in names]).double()
    tasks = list(pool)

    def objective(flat):
        params, offset = {}, 0
        for n, shape in zip(names, shapes):
            size = int(torch.tensor(shape).prod())
            params[n] = flat[offset : offset + size].reshape(shape).float()
            offset += size
        return torch.stack([module.task_loss(params, t) for t in tasks]).mean().double()

    hessian = torch.autograd.functional.hessian(objective, flat_final, vectorize=True)
    system = hessian + (0.01 + 1.0) * torch.eye(len(flat_final), dtype=torch.float64)
    reference = _flat_grad(module, record.final, list(dm.val_pool)).double().mean(0)
    s = torch.linalg.solve(system, reference)
    last_seen = {}
    for step in sorted(record.steps):
        for task_id in record.steps[step]["ids"]:
            last_seen[task_id] = step
    expected = {}
    for task_id, step in last_seen.items():
        g = _flat_grad(module, record.steps[step]["params"], [pool[pool.task_ids.tolist().index(task_id)]])[0]
        expected[task_id] = float(g.double() @ s) / 12
    _assert_close(_by_id(influence.result), expected, rtol=2e-3)
    assert influence.history[-1]["influence/solver_converged"] == 1.0


@pytest.mark.parametrize("seed", [1, 2])
def test_trace_task_if_with_fisher_curvature_equals_an_explicit_solve_on_the_traced_gradients(tmp_path, seed):
    """TraceTaskIF(curvature="fisher"): F = (1/n) Σ g_k g_kᵀ over the traced rows (each task's gradient at the
    last step that trained on it), s = (F + δI)^{-1} ∇f by an explicit p x p solve, scores (1/M) ⟨g_k, s⟩."""
    from metaif_helpers import _flat_grad

    from lightning_metaif.estimators import TraceTaskIF

    seed_all(seed)
    influence = MetaInfluence(TraceTaskIF(curvature="fisher", damping=0.05), verbose=False)
    dm, _ = digits_setup(num_train=12, batch_size=4, task_state=influence.task_state)
    record = RecordSteps()
    module = tiny_maml()
    trainer(tmp_path, [influence, record], max_epochs=2).fit(module, datamodule=dm)

    pool = dm.train_pool
    last_seen = {}
    for step in sorted(record.steps):
        for task_id in record.steps[step]["ids"]:
            last_seen[task_id] = step
    ids = sorted(last_seen)
    rows = torch.stack(
        [
            _flat_grad(module, record.steps[last_seen[t]]["params"], [pool[pool.task_ids.tolist().index(t)]])[
                0
            ]
            for t in ids
        ]
    ).double()
    fisher = rows.T @ rows / len(ids)
    reference = _flat_grad(module, record.final, list(dm.val_pool)).double().mean(0)
    s = torch.linalg.solve(fisher + 0.05 * torch.eye(fisher.shape[0], dtype=torch.float64), reference)
    expected = {t: float(rows[i] @ s) / 12 for i, t in enumerate(ids)}
    _assert_close(_by_id(influence.result), expected, rtol=2e-3)
    assert influence.history[-1]["influence/solver_converged"] == 1.0
    assert influence.history[-1]["influence/solver_iterations"] == 0.0


def test_non_tracing_estimator_scores_the_end_when_no_round_was_due(tmp_path):
    seed_all(0)
    influence = MetaInfluence(Checkpoints(), every_n_epochs=5, verbose=False)
    dm, _ = digits_setup(num_train=12, corrupt=0, batch_size=4, task_state=influence.task_state)
    trainer(tmp_path, [influence], max_epochs=2).fit(tiny_maml(), datamodule=dm)
    assert influence.rounds == 1 and influence.result.step == 6  # the end of training, 2 epochs x 3 steps


def test_checkpoints_with_max_tasks_sums_an_unbiased_estimate():
    """A sampled round stands for the kept pool: each sampled task's term is scaled by kept / sampled."""
    import dataclasses

    from test_estimators_objects import _context

    ctx = _context(20)
    whole = Checkpoints().score(ctx)
    sample = ctx.positions[::4]
    sampled = Checkpoints().score(
        dataclasses.replace(
            ctx, positions=sample, weights=ctx.weights[sample], objective_positions=sample, num_kept=20
        )
    )
    torch.testing.assert_close(sampled.scores, whole.scores[sample] * 4, rtol=1e-6, atol=1e-9)


def test_a_second_fit_starts_over(tmp_path):
    seed_all(0)
    influence = MetaInfluence(
        "trajectory", actions=[PruningPolicy(fraction=0.2, warmup_rounds=0)], verbose=False
    )
    dm, _ = digits_setup(num_train=12, batch_size=4, task_state=influence.task_state)
    trainer(tmp_path, [influence], max_epochs=1).fit(tiny_maml(), datamodule=dm)
    assert influence.rounds == 1
    with pytest.warns(UserWarning, match="starting over"):
        trainer(tmp_path, [influence], max_epochs=2).fit(tiny_maml(), datamodule=dm)
    assert influence.rounds == 2 and [h["influence/round"] for h in influence.history] == [1.0, 2.0]


def test_settings_that_cannot_apply_are_refused(tmp_path):
    from lightning_metaif.config import GradientStoreConfig
    from lightning_metaif.estimators import TraceTaskIF

    with pytest.raises(ValueError, match="only the 'trajectory' estimator traces"):
        MetaInfluence(Checkpoints(), store=GradientStoreConfig(trajectory=True))
    with pytest.raises(ValueError, match=r"TraceTaskIF\(hessian_tasks=0\)"):
        TraceTaskIF(hessian_tasks=0)
    with pytest.raises(ValueError, match=r"TraceTaskIF\(damping=nan\)"):  # names the class the user built
        TraceTaskIF(damping=float("nan"))
    with pytest.raises(ValueError, match=r"TaskIF\(curvature='gauss-newton'\)"):
        TaskIF(curvature="gauss-newton")
    with pytest.raises(ValueError, match=r"TraceTaskIF\(curvature='fisher', l2=0.1\): l2 does not apply"):
        TraceTaskIF(curvature="fisher", l2=0.1)
    with pytest.raises(ValueError, match=r"TraceTaskIF\(curvature='fisher', solver='lissa'\)"):
        TraceTaskIF(curvature="fisher", solver="lissa")
    assert TraceTaskIF(curvature="fisher", damping=0.01, projection_dim=64).curvature == "fisher"
    from metaif_helpers import HigherUserModule

    module = HigherUserModule()  # reads no task_weight_table
    influence = MetaInfluence(actions=[TaskWeighting()], verbose=False)
    dm, _ = digits_setup(num_train=8, corrupt=0, task_state=influence.task_state)
    with pytest.raises(ValueError, match="has no `task_weight_table`"):
        trainer(tmp_path, [influence], max_epochs=1).fit(module, datamodule=dm)


def test_chunk_size_by_default_bounds_one_chunk_of_gradients():
    """chunk_size=None: as many tasks per engine call as keep their float32 gradients within 16 MiB (16-256)."""
    from lightning_metaif.influence.problem import ParamLayout

    influence = MetaInfluence(verbose=False)
    for numel, expected in ((2_245, 256), (100_000, 41), (1_040_885, 16)):
        influence._layout = ParamLayout(("w",), (torch.Size([numel]),))
        assert influence._engine()["chunk_size"] == expected
    assert MetaInfluence(chunk_size=8, verbose=False)._engine()["chunk_size"] == 8
    with pytest.raises(ValueError, match="chunk_size must be a positive integer or None"):
        MetaInfluence(chunk_size=0)
