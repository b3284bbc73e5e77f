"""The MetaInfluence callback in real Lightning Trainers (CPU, small digits pools)."""

import csv
import json

import pytest
import torch
import wandb
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from metaif_helpers import (
    DumpRankState,
    HigherUserModule,
    RecordSampledIds,
    digits_setup,
    seed_all,
    tiny_maml,
    trainer,
)
from wandb_reader import read_run

from lightning_metaif.actions import PruningPolicy, TaskWeighting
from lightning_metaif.callback import MetaInfluence
from lightning_metaif.config import GradientStoreConfig
from lightning_metaif.estimators import Checkpoints, Ensemble, SampleInfluence, TaskIF
from lightning_metaif.influence.solvers import CG
from lightning_metaif.influence.store import GradientStore


def test_constructor_validates_arguments():
    with pytest.raises(ValueError, match="estimator='magic' is not an estimator"):
        MetaInfluence("magic")
    with pytest.raises(ValueError, match="at most one of every_n_epochs"):
        MetaInfluence(every_n_epochs=1, every_n_train_steps=5)
    with pytest.raises(ValueError, match=r"TaskIF\(solver=...\)='newton' is not a solver"):
        TaskIF(solver="newton")
    with pytest.raises(ValueError, match=r"TaskIF\(damping=nan\)"):
        TaskIF(damping=float("nan"))
    with pytest.raises(ValueError, match=r"actions\[0\] is a float"):
        MetaInfluence(actions=[0.2])
    with pytest.raises(ValueError, match="not both"):
        MetaInfluence(reference=[1], utility=lambda p: p)
    with pytest.raises(ValueError, match="holds no tasks"):
        MetaInfluence(reference=[])
    with pytest.raises(TypeError, match="pruning"):
        MetaInfluence(
            pruning=PruningPolicy()
        )  # the old keyword: actions=[PruningPolicy(..., margin=None)] now
    # Lightning's trigger defaults: every_n_train_steps alone is enough (every_n_epochs defaults to None)
    assert MetaInfluence(every_n_train_steps=50).every_n_train_steps == 50


def test_setup_rejects_a_module_without_task_loss(tmp_path):
    class Plain(LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm, _ = digits_setup(corrupt=0)
    with pytest.raises(ValueError, match="task_loss"):
        trainer(tmp_path, [MetaInfluence()]).fit(Plain(), datamodule=dm)


def test_missing_reference_and_missing_task_ids_say_how_to_fix(tmp_path):
    dm, _ = digits_setup(corrupt=0)
    dm.val_pool = None
    with pytest.raises(ValueError, match="no reference set"):
        trainer(tmp_path, [MetaInfluence()]).fit(tiny_maml(), datamodule=dm)

    class NoIds(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.zeros(3)

    dm2, _ = digits_setup(corrupt=0)
    influence = MetaInfluence(pool=dm2.train_pool, reference=dm2.val_pool)
    loader = torch.utils.data.DataLoader(NoIds(), batch_size=2)
    with pytest.raises(ValueError, match="carries no task ids"):
        trainer(tmp_path, [influence], max_epochs=1).fit(tiny_maml(), train_dataloaders=loader)


def test_higher_module_with_automatic_optimization_falls_back_to_the_loop(tmp_path):
    seed_all(0)
    influence = MetaInfluence("trajectory", verbose=False)
    dm, _ = digits_setup(corrupt=0, task_state=influence.task_state)
    with pytest.warns(UserWarning, match="per-task loop"):
        trainer(tmp_path, [influence], max_epochs=1, limit_train_batches=3).fit(
            HigherUserModule(), datamodule=dm
        )
    assert influence._engine_vectorize == "loop"
    assert int(influence.result.scored.sum()) == 24  # 3 batches of 8 tasks
    assert torch.isfinite(influence.result.scores[influence.result.scored]).all()


def test_csv_logger_and_files_and_pruned_ids_never_sampled_again(tmp_path):
    seed_all(0)
    influence = MetaInfluence(
        "trajectory",
        store=GradientStoreConfig(projection_dim=64),
        actions=[
            TaskWeighting(),
            PruningPolicy(
                fraction=0.2,
                warmup_rounds=1,
                max_fraction_per_round=0.2,
                only_harmful=False,
                stable_rounds=1,
                margin=None,
            ),
        ],
        verbose=False,
    )
    dm, corruption = digits_setup(task_state=influence.task_state)
    recorder = RecordSampledIds()
    logger = CSVLogger(tmp_path, name="csv")
    trainer(tmp_path, [influence, recorder], max_epochs=3, logger=logger).fit(tiny_maml(), datamodule=dm)

    result = influence.result
    assert result is not None and len(result.task_ids) == 40
    assert torch.isfinite(result.scores).all()
    pruned = set(influence.task_state.pruned)
    assert len(pruned) == 8  # 20% of 40, pruned at round 2 (after one warm-up round)
    assert set(result.task_ids[result.pruned].tolist()) == pruned
    assert (result.weights[result.pruned] == 0).all()
    # the epoch after the pruning round draws exactly the kept tasks
    assert set(recorder.by_epoch[2]) == set(dm.train_pool.task_ids.tolist()) - pruned
    assert set(recorder.by_epoch[0]) == set(dm.train_pool.task_ids.tolist())
    # scalars in the CSV logger
    with open(logger.log_dir + "/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {k for row in rows for k, v in row.items() if v}
    assert {
        "influence/score_median",
        "influence/fraction_harmful",
        "influence/num_pruned",
        "influence/auroc",
    } - logged == {"influence/auroc"}  # no ground truth given here
    # round files in the log dir
    root = tmp_path / "csv" / "version_0" / "metaif"
    assert sorted(p.name for p in root.glob("scores_round_*.csv")) == [
        f"scores_round_{k:04d}.csv" for k in range(3)
    ]
    with open(root / "decisions.csv") as f:
        decisions = list(csv.DictReader(f))
    assert any(d["action"] == "prune" for d in decisions)
    assert (root / "store" / "rank0").is_dir()


def test_wandb_dashboard_is_logged_and_readable(tmp_path):
    seed_all(0)
    dm, corruption = digits_setup()
    influence = MetaInfluence(
        "checkpoints",
        store=GradientStoreConfig(projection_dim=64),
        samples=SampleInfluence(top_k=2),
        ground_truth=corruption.task_ids,
        verbose=False,
    )
    dm.task_state = influence.task_state
    logger = WandbLogger(project="metaif-test", save_dir=str(tmp_path), mode="offline")
    trainer_module = [tiny_maml()]
    try:
        trainer(tmp_path, [influence], max_epochs=2, logger=logger).fit(trainer_module[0], datamodule=dm)
    finally:
        wandb.finish()
    run = read_run(tmp_path)
    table = run.table("influence/tasks")
    assert len(table["data"]) == 40  # one row per task
    assert {"id", "score", "rank", "weight", "pruned"} <= set(table["columns"])
    keys = run.keys()
    assert "influence/top_harmful_table" in keys and "influence/top_helpful_table" in keys
    assert "influence/score_hist_table" in keys
    assert "influence/auroc" in keys
    samples = run.table("influence/harmful_samples")
    assert samples["columns"] == ["task_id", "split", "index", "score", "label", "excess_loss", "image"]
    assert len(samples["data"]) > 0
    scores = [row[3] for row in samples["data"]]
    assert scores == sorted(scores)  # most harmful first
    rows = influence.result.sample_rows
    assert len(rows) == 2 * (5 * 1 + 5 * 15)  # every sample of the 2 most harmful tasks
    # query rows carry the excess loss: the adapted per-sample loss (MAML's own adaptation, at the round's
    # parameters) minus the mean over the task's other queries with the same label
    module = trainer_module[0]
    params = module.meta_parameters()
    for task_id in {r.task_id for r in rows}:
        task = dm.train_pool[dm.train_pool.task_ids.tolist().index(task_id)]
        theta = module.adapt(params, task)
        losses = module.sample_losses(
            {k[len("backbone.") :]: v for k, v in theta.items()}, task.query_x, task.query_y
        )
        for r in (r for r in rows if r.task_id == task_id and r.split == "query"):
            same = (task.query_y == task.query_y[r.index]) & (torch.arange(len(losses)) != r.index)
            assert r.excess_loss == pytest.approx(
                float(losses[r.index] - losses[same].mean()), rel=1e-4, abs=1e-6
            )
        assert all(r.excess_loss is None for r in rows if r.task_id == task_id and r.split == "support")
    logged = {(row[0], row[1], row[2]): row[5] for row in samples["data"]}
    for r in rows:
        if (r.task_id, r.split, r.index) in logged and r.split == "query":
            assert logged[(r.task_id, r.split, r.index)] == pytest.approx(r.excess_loss, rel=1e-6)


@pytest.mark.parametrize(
    "estimator",
    [
        Checkpoints(max_tasks=24),
        TaskIF(damping=1.0, l2=0.01, solver=CG(max_iterations=20), max_tasks=24),
        Ensemble(copies=1, max_tasks=24),
    ],
)
def test_periodic_estimators_score_the_pool(tmp_path, estimator):
    seed_all(0)
    influence = MetaInfluence(estimator, store=GradientStoreConfig(projection_dim=32), verbose=False)
    dm, _ = digits_setup(corrupt=0)
    trainer(tmp_path, [influence], max_epochs=2).fit(tiny_maml(), datamodule=dm)
    assert influence.rounds == 2
    if estimator.name == "task_if":  # solver diagnostics reach the loggers; one round's sample only
        assert {"influence/solver_iterations", "influence/solver_residual"} <= set(influence.history[-1])
        assert int(influence.result.scored.sum()) == 24
    else:  # sums / means over rounds: tasks scored in any round
        assert int(influence.result.scored.sum()) >= 24
    assert torch.isfinite(influence.result.scores[influence.result.scored]).all()
    assert torch.isnan(influence.result.scores[~influence.result.scored]).all()


def test_failed_solve_warns_and_prunes_nothing(tmp_path):
    seed_all(0)
    policy = PruningPolicy(fraction=0.2, warmup_rounds=0, only_harmful=False, margin=None)
    influence = MetaInfluence(
        TaskIF(damping=0.0, curvature="exact", solver=CG(max_iterations=30)), actions=[policy], verbose=False
    )
    dm, _ = digits_setup(corrupt=0, task_state=influence.task_state)
    with pytest.warns(UserWarning, match=r"raise `damping` or `l2` of TaskIF"):
        trainer(tmp_path, [influence], max_epochs=1).fit(tiny_maml(), datamodule=dm)
    assert torch.isnan(influence.result.scores).all()
    assert not influence.task_state.pruned
    assert influence.result.decisions[-1].action == "skip"


def test_resume_keeps_pruned_set_and_store(tmp_path):
    seed_all(0)
    policy = PruningPolicy(
        fraction=0.2,
        warmup_rounds=1,
        max_fraction_per_round=0.2,
        only_harmful=False,
        stable_rounds=1,
        margin=None,
    )
    config = GradientStoreConfig(projection_dim=32, trajectory=True)
    first = MetaInfluence("trajectory", store=config, actions=[policy], verbose=False)
    dm, _ = digits_setup(task_state=first.task_state)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, [first, checkpoint], max_epochs=2, enable_checkpointing=True).fit(
        tiny_maml(), datamodule=dm
    )
    assert len(first.task_state.pruned) == 8
    store = first._root / "store" / "rank0"
    segments_before = len(GradientStore.open(store).checkpoints())
    assert segments_before == 2  # one trajectory segment per round

    second = MetaInfluence("trajectory", store=config, actions=[policy], verbose=False)
    dm2, _ = digits_setup(task_state=second.task_state)
    recorder = RecordSampledIds()
    trainer(tmp_path, [second, recorder], max_epochs=3).fit(  # a new logger version, same callback folder
        tiny_maml(), datamodule=dm2, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert second._root == first._root
    assert first.task_state.pruned <= second.task_state.pruned
    assert not set(recorder.by_epoch[2]) & first.task_state.pruned  # the first resumed epoch skips them
    assert second.rounds == 3
    assert len(GradientStore.open(store).checkpoints()) == segments_before + 1
    assert len(list(first._root.glob("scores_round_*.csv"))) == 3


def test_detects_corrupted_tasks(tmp_path):
    seed_all(0)
    dm, corruption = digits_setup(num_train=60, batch_size=10)
    influence = MetaInfluence("trajectory", ground_truth=corruption.task_ids, verbose=False)
    dm.task_state = influence.task_state
    trainer(tmp_path, [influence], max_epochs=4).fit(tiny_maml(outer_lr=1e-2), datamodule=dm)
    auroc = influence.history[-1]["influence/auroc"]
    print(f"detection AUROC after 4 epochs: {auroc:.3f}")
    assert auroc >= 0.9


def test_ddp_spawn_two_ranks_agree(tmp_path):
    seed_all(0)
    policy = PruningPolicy(
        fraction=0.2,
        warmup_rounds=1,
        max_fraction_per_round=0.2,
        only_harmful=False,
        stable_rounds=1,
        margin=None,
    )
    influence = MetaInfluence(
        "checkpoints", store=GradientStoreConfig(projection_dim=32), actions=[policy], verbose=False
    )
    dm, _ = digits_setup(task_state=influence.task_state, batch_size=4)
    out = tmp_path / "ranks"
    out.mkdir()
    logger = CSVLogger(tmp_path, name="ddp")
    t = trainer(
        tmp_path,
        [influence, DumpRankState(str(out))],
        max_epochs=3,
        logger=logger,
        strategy="ddp_spawn",
        devices=2,
    )
    t.fit(tiny_maml(), datamodule=dm)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["world_size"] == 2
    assert ranks[0]["pruned"] == ranks[1]["pruned"] and len(ranks[0]["pruned"]) == 8
    assert ranks[0]["scores"] == ranks[1]["scores"]
    pruned = set(ranks[0]["pruned"])
    for r in ranks:
        assert not set(r["sampled"]["2"]) & pruned
    kept = set(dm.train_pool.task_ids.tolist()) - pruned
    assert set(ranks[0]["sampled"]["2"]) | set(ranks[1]["sampled"]["2"]) == kept  # ranks split the kept tasks
    root = tmp_path / "ddp" / "version_0" / "metaif"
    assert len(list(root.glob("scores_round_*.csv"))) == 3  # rank 0 only writes round files
    assert (root / "store" / "rank0").is_dir() and (root / "store" / "rank1").is_dir()


def test_runs_sharing_a_log_dir_do_not_mix_their_files(tmp_path):
    seed_all(0)
    for _ in range(2):
        influence = MetaInfluence("trajectory", verbose=False)
        dm, _ = digits_setup(corrupt=0, task_state=influence.task_state)
        trainer(tmp_path, [influence], max_epochs=1, logger=False).fit(tiny_maml(), datamodule=dm)
    assert sorted(p.name for p in tmp_path.glob("metaif*")) == ["metaif", "metaif_1"]
    assert len(list((tmp_path / "metaif_1").glob("scores_round_*.csv"))) == 1


def test_documented_wandb_keys_are_the_logged_ones(tmp_path):
    """Every `influence/...` key that docs/dashboard.md names is a history key of a real offline run (or the
    prefix of a family such as influence/recall@...), and tables are logged every n rounds as configured."""
    import re
    from pathlib import Path

    seed_all(0)
    dm, corruption = digits_setup()
    influence = MetaInfluence(
        "trajectory",
        actions=[
            PruningPolicy(
                fraction=0.2, warmup_rounds=1, max_fraction_per_round=0.2, only_harmful=False, margin=None
            )
        ],
        samples=SampleInfluence(top_k=1),
        ground_truth=corruption.task_ids,
        dashboard_every_n_rounds=2,
        verbose=False,
    )
    dm.task_state = influence.task_state
    logger = WandbLogger(project="metaif-test", save_dir=str(tmp_path), mode="offline")
    try:
        trainer(tmp_path, [influence], max_epochs=3, logger=logger).fit(tiny_maml(), datamodule=dm)
    finally:
        wandb.finish()
    run = read_run(tmp_path)
    logged = run.keys()
    text = (Path(__file__).parents[1] / "docs" / "dashboard.md").read_text()
    documented = set(re.findall(r"`(influence/[A-Za-z0-9_@%]+)`", text))
    assert len(documented) >= 12
    panels = {
        "influence/top_harmful",
        "influence/top_helpful",
        "influence/score_hist",
        "influence/score_stats",
        "influence/detection",
    }  # chart panels: their data are the documented *_table keys
    missing = {k for k in documented - panels if k not in logged and not any(x.startswith(k) for x in logged)}
    assert not missing, f"documented but never logged: {sorted(missing)}"
    # scalars every round (3 rounds), tables at rounds 1 and 3 (every 2nd round, and the last)
    assert len(run.values("influence/score_median")) == 3
    assert len(run.values("influence/tasks")) == 2
    labels = [row[0] for row in run.table("influence/top_harmful_table")["data"]]
    assert any("[corrupted]" in label for label in labels)
