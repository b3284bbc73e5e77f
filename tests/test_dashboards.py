"""Dashboards: ScoreRound validation, round metrics, CSV round files, and a real offline W&B run read back."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import wandb_reader
from lightning.pytorch.loggers import WandbLogger

from lightning_metaif.dashboards import (
    Decision,
    RoundFileWriter,
    SampleScore,
    ScoreRound,
    WandbDashboard,
    load_run,
    round_metrics,
)

# ----------------------------------------------------------------------------------------------------------------
# helpers


def make_round(m: int = 40, step: int = 10, epoch: int = 0, seed: int = 0, **overrides) -> ScoreRound:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(10 * m, generator=g)[:m]
    scores = torch.randn(m, generator=g, dtype=torch.float64)
    corrupted = torch.zeros(m, dtype=torch.bool)
    corrupted[torch.argsort(scores)[: max(1, m // 10)]] = True  # the lowest scores are the corrupted ones
    pruned = torch.zeros(m, dtype=torch.bool)
    pruned[torch.argsort(scores)[:2]] = True
    weights = torch.where(pruned, 0.0, 1.0).double()
    kwargs = dict(
        step=step,
        epoch=epoch,
        estimator="task_if",
        task_ids=ids,
        scores=scores,
        self_influence=scores.abs() + 0.5,
        weights=weights,
        pruned=pruned,
        decisions=[
            Decision(step, epoch, "prune", ids[pruned].tolist(), "score below q10"),
            Decision(step, epoch, "weight", ids[:3].tolist(), "harmful, weight 0.5"),
        ],
        classes=[[int(i) % 7, int(i) % 11] for i in ids],
        corrupted=corrupted,
        seconds=1.25,
    )
    kwargs.update(overrides)
    return ScoreRound(**kwargs)


@pytest.fixture
def wandb_logger(tmp_path, monkeypatch):
    """A real offline WandbLogger whose every file (artifact staging and cache included) lives in tmp_path."""
    import wandb

    for var, sub in (
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_CONFIG_DIR", "config"),
        ("WANDB_ARTIFACT_DIR", "artifacts"),
    ):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(project="metaif-test", save_dir=str(tmp_path / "runs"), mode="offline")
    _ = logger.experiment
    yield logger
    wandb.finish()


def finish_and_read(tmp_path: Path) -> wandb_reader.OfflineRun:
    import wandb

    wandb.finish()
    return wandb_reader.read_run(tmp_path / "runs")


# ----------------------------------------------------------------------------------------------------------------
# ScoreRound


def test_score_round_validates_shapes_and_types():
    ids = torch.arange(4)
    with pytest.raises(ValueError, match="scores has 3 entries but task_ids has 4"):
        ScoreRound(step=0, epoch=0, estimator="x", task_ids=ids, scores=torch.zeros(3))
    with pytest.raises(ValueError, match="duplicates"):
        ScoreRound(step=0, epoch=0, estimator="x", task_ids=torch.tensor([1, 1]), scores=torch.zeros(2))
    with pytest.raises(ValueError, match="must be 1-D"):
        ScoreRound(step=0, epoch=0, estimator="x", task_ids=ids, scores=torch.zeros(4, 1))
    with pytest.raises(ValueError, match="boolean mask"):
        ScoreRound(step=0, epoch=0, estimator="x", task_ids=ids, scores=torch.zeros(4), pruned=torch.rand(4))
    with pytest.raises(ValueError, match="classes has 2 entries"):
        ScoreRound(step=0, epoch=0, estimator="x", task_ids=ids, scores=torch.zeros(4), classes=[[1], [2]])
    with pytest.raises(ValueError, match="integers"):
        ScoreRound(step=0, epoch=0, estimator="x", task_ids=torch.zeros(4), scores=torch.zeros(4))
    with pytest.raises(ValueError, match="action must be one of"):
        Decision(0, 0, "delete", [1], "no")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="split must be one of"):
        SampleScore(1, "train", 0, 0.1)  # type: ignore[arg-type]


def test_to_rows_ranks_most_harmful_first_and_leaves_nonfinite_unranked():
    r = ScoreRound(
        step=1,
        epoch=0,
        estimator="tracin",
        task_ids=torch.tensor([10, 11, 12, 13, 14]),
        scores=torch.tensor([0.5, float("nan"), -2.0, float("-inf"), 0.1]),
        pruned=torch.tensor([0, 0, 1, 0, 0]),
    )
    rows = r.to_rows()
    assert [row["id"] for row in rows] == [10, 11, 12, 13, 14]
    assert [row["rank"] for row in rows] == [3, None, 1, None, 2]
    assert rows[2]["pruned"] is True and rows[0]["weight"] == 1.0
    assert set(rows[0]) == {
        "id",
        "score",
        "self_influence",
        "rank",
        "weight",
        "pruned",
        "classes",
        "corrupted",
        "scored",
    }


# ----------------------------------------------------------------------------------------------------------------
# metrics


def test_auroc_perfect_and_reversed():
    ids = torch.arange(8)
    corrupted = torch.tensor([1, 1, 0, 0, 0, 0, 0, 0], dtype=torch.bool)
    separating = torch.tensor([-3.0, -2.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # corrupted = lowest scores
    good = round_metrics(
        ScoreRound(step=0, epoch=0, estimator="x", task_ids=ids, scores=separating, corrupted=corrupted)
    )
    bad = round_metrics(
        ScoreRound(step=0, epoch=0, estimator="x", task_ids=ids, scores=-separating, corrupted=corrupted)
    )
    assert good["influence/auroc"] == 1.0
    assert bad["influence/auroc"] == 0.0
    # only one class present: AUROC undefined -> NaN, not torchmetrics' silent 0
    none = round_metrics(
        ScoreRound(
            step=0,
            epoch=0,
            estimator="x",
            task_ids=ids,
            scores=separating,
            corrupted=torch.zeros(8, dtype=torch.bool),
        )
    )
    assert math.isnan(none["influence/auroc"]) and math.isnan(none["influence/recall@20%"])


def test_recall_and_precision_at_k_by_hand():
    # 10 tasks, given in a shuffled order; by score ascending the positions are p0..p9.
    by_rank_scores = [-5.0, -4.0, -3.0, -2.0, -1.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    corrupted_ranks = {0, 2, 7}  # most harmful, third most harmful, and one helpful-looking task
    perm = [3, 9, 0, 6, 1, 8, 2, 5, 7, 4]
    scores = torch.tensor([by_rank_scores[p] for p in perm])
    corrupted = torch.tensor([p in corrupted_ranks for p in perm])
    r = ScoreRound(
        step=0, epoch=0, estimator="x", task_ids=torch.arange(10) + 100, scores=scores, corrupted=corrupted
    )
    m = round_metrics(r)
    # k=10% -> 1 task {rank0}: 1 of 3 corrupted found; k=20% -> {0,1}: 1/3; k=40% -> {0,1,2,3}: 2/3
    assert m["influence/recall@10%"] == pytest.approx(1 / 3)
    assert m["influence/recall@20%"] == pytest.approx(1 / 3)
    assert m["influence/recall@40%"] == pytest.approx(2 / 3)
    assert m["influence/precision@10%"] == pytest.approx(1.0)
    assert m["influence/precision@20%"] == pytest.approx(0.5)
    assert m["influence/precision@40%"] == pytest.approx(0.5)
    # AUROC by hand: pairs (corrupted, clean) ordered correctly: rank0 beats 7, rank2 beats 6, rank7 beats 2 -> 15/21
    assert m["influence/auroc"] == pytest.approx(15 / 21)


def test_nonfinite_scores_counted_and_excluded_from_quantiles():
    scores = torch.tensor([1.0, 2.0, float("nan"), 3.0, float("inf"), -1.0, float("-inf")])
    r = ScoreRound(step=3, epoch=1, estimator="x", task_ids=torch.arange(7), scores=scores, seconds=0.5)
    m = round_metrics(r)
    assert m["influence/num_nonfinite"] == 4 - 1  # nan, inf, -inf
    assert m["influence/score_min"] == -1.0 and m["influence/score_max"] == 3.0
    assert m["influence/score_median"] == 1.5  # median of [-1, 1, 2, 3]
    assert m["influence/fraction_harmful"] == 0.25
    assert m["influence/seconds"] == 0.5 and m["influence/step"] == 3 and m["influence/num_tasks"] == 7
    assert all(math.isfinite(v) for k, v in m.items() if k.startswith("influence/score_"))


def test_pruned_counts_and_weight_stats():
    r = make_round(m=20)
    m = round_metrics(r)
    assert m["influence/num_pruned"] == 2 and m["influence/num_pruned_new"] == 2
    assert m["influence/weight_min"] == 0.0 and m["influence/weight_max"] == 1.0
    assert m["influence/weight_mean"] == pytest.approx(18 / 20)
    # a task pruned in an earlier round (no prune decision now) counts in the total, not as new
    again = make_round(m=20, decisions=[])
    assert round_metrics(again)["influence/num_pruned_new"] == 0


# ----------------------------------------------------------------------------------------------------------------
# CSV files


def test_csv_files_round_trip_through_load_run(tmp_path):
    writer = RoundFileWriter(tmp_path / "influence")
    images = [torch.rand(8, 8) for _ in range(3)]
    samples = [SampleScore(7, "query", i, -0.1 * i, label=i % 2, image=images[i]) for i in range(3)]
    scores = torch.tensor([0.1, float("nan"), -0.3, 1e-17, float("inf")], dtype=torch.float64)
    first = ScoreRound(
        step=5,
        epoch=0,
        estimator="tracin",
        task_ids=torch.tensor([7, 3, 9, 1, 4]),
        scores=scores,
        decisions=[Decision(5, 0, "skip", [], "warm-up")],
        seconds=0.125,
        sample_rows=samples,
    )
    second = make_round(m=12, step=9, epoch=1)
    paths1 = writer.write(first)
    paths2 = writer.write(second)
    assert (
        paths1["scores"].name == "scores_round_0000.csv" and paths2["scores"].name == "scores_round_0001.csv"
    )
    assert "samples" in paths1 and "samples" not in paths2

    loaded = load_run(tmp_path / "influence")
    assert len(loaded.rounds) == 2
    for original, back in zip((first, second), loaded.rounds):
        assert (back.step, back.epoch, back.estimator, back.seconds) == (
            original.step,
            original.epoch,
            original.estimator,
            original.seconds,
        )
        assert torch.equal(back.task_ids, original.task_ids)
        assert torch.allclose(back.scores, original.scores, equal_nan=True, rtol=0, atol=0)
        assert torch.equal(back.weights, original.weights) and torch.equal(back.pruned, original.pruned)
        assert back.classes == original.classes and back.decisions == original.decisions
        assert back.to_rows()[0].keys() == original.to_rows()[0].keys()
        for a, b in zip(back.to_rows(), original.to_rows()):
            assert a["rank"] == b["rank"]
    assert loaded.rounds[0].self_influence is None and loaded.rounds[0].corrupted is None
    assert torch.equal(loaded.rounds[1].corrupted, second.corrupted)
    assert torch.equal(loaded.rounds[1].self_influence, second.self_influence)
    assert [(s.task_id, s.split, s.index, s.score, s.label) for s in loaded.rounds[0].sample_rows] == [
        (s.task_id, s.split, s.index, s.score, s.label) for s in samples
    ]
    # long-format history, decisions and metrics (columns grow: AUROC appears only in round 2)
    assert len(loaded.history) == 5 + 12 and loaded.history[0] == {
        "round": 0,
        "step": 5,
        "epoch": 0,
        "task_id": 7,
        "score": 0.1,
        "weight": 1.0,
        "pruned": False,
    }
    assert [d.action for d in loaded.decisions] == ["skip", "prune", "weight"]
    assert math.isnan(loaded.metrics[0]["influence/auroc"]) and loaded.metrics[1]["influence/auroc"] == 1.0
    assert loaded.metrics[1]["influence/score_median"] == round_metrics(second)["influence/score_median"]
    # plain stdlib csv readers work, and no temporary files are left behind
    with open(paths1["scores"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[1]["score"] == "nan" and rows[1]["rank"] == "" and rows[2]["rank"] == "1"
    assert not list((tmp_path / "influence").glob(".*tmp"))
    # a new writer on the same directory continues the numbering (resume)
    assert (
        RoundFileWriter(tmp_path / "influence")
        .write(make_round(m=3, step=11))["scores"]
        .name.endswith("0002.csv")
    )
    assert len(load_run(tmp_path / "influence").metrics) == 3


def test_load_run_on_empty_directory_says_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="no scores_round"):
        load_run(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# W&B (real offline runs)


def test_wandb_dashboard_logs_tables_and_charts(wandb_logger, tmp_path):
    dash = WandbDashboard(wandb_logger, top_k=5)
    rounds = [make_round(m=40, step=10, seed=0), make_round(m=40, step=20, epoch=1, seed=1)]
    for r in rounds:
        dash.log_round(r)
    run = finish_and_read(tmp_path)

    rows = [h for h in run.history if "influence/tasks" in h]
    assert [h["trainer/global_step"] for h in rows] == [10, 20]
    assert [h["_step"] for h in rows] == [0, 1]  # no step= passed: W&B's own counter
    table = run.table("influence/tasks")
    assert table["columns"] == [
        "id",
        "score",
        "self_influence",
        "rank",
        "weight",
        "pruned",
        "classes",
        "corrupted",
    ]
    assert len(table["data"]) == 40  # one row per task
    by_id = {row[0]: row for row in table["data"]}
    last = rounds[-1]
    most_harmful = int(last.task_ids[torch.argmin(last.scores)])
    assert by_id[most_harmful][3] == 1 and by_id[most_harmful][7] is True
    assert rows[-1]["influence/tasks_capped"] == 0 and rows[-1]["influence/tasks_total"] == 40

    harmful = run.table("influence/top_harmful_table")
    helpful = run.table("influence/top_helpful_table")
    assert harmful["columns"] == ["task", "score"] and len(harmful["data"]) == 5
    assert [s for _, s in harmful["data"]] == sorted(last.scores.tolist())[:5]
    assert [s for _, s in helpful["data"]] == sorted(last.scores.tolist(), reverse=True)[:5]
    assert len(run.table("influence/score_hist_table")["data"]) == 40
    stats = run.table("influence/score_stats_table")
    assert stats["columns"] == ["step", "lineKey", "lineVal"]
    assert len(stats["data"]) == 7 * 2  # 7 quantile lines x 2 rounds
    medians = [v for s, k, v in stats["data"] if k == "median"]
    assert medians == pytest.approx([round_metrics(r)["influence/score_median"] for r in rounds])
    detection = run.table("influence/detection_table")
    assert {k for _, k, _ in detection["data"]} >= {"auroc", "recall@10%", "recall@20%", "recall@40%"}
    assert rows[-1]["influence/auroc"] == 1.0
    assert rows[-1]["influence/score_distribution"]["_type"] == "histogram"

    charts = run.config["_wandb"]["visualize"]
    assert charts["influence/top_harmful"]["panel_config"]["panelDefId"] == "wandb/bar/v0"
    assert charts["influence/top_helpful"]["panel_config"]["panelDefId"] == "wandb/bar/v0"
    assert charts["influence/score_hist"]["panel_config"]["panelDefId"] == "wandb/histogram/v0"
    assert charts["influence/score_stats"]["panel_config"]["panelDefId"] == "wandb/lineseries/v0"
    assert run.table_files("influence/tasks")  # the media files W&B wrote (a "/" in a key is a folder)
    assert run.summary["influence/score_median"] == pytest.approx(
        round_metrics(last)["influence/score_median"]
    )


def test_wandb_table_over_cap_logs_summary_and_artifact(wandb_logger, tmp_path):
    m = 10_400
    scores = torch.linspace(-1, 1, m, dtype=torch.float64)[
        torch.randperm(m, generator=torch.Generator().manual_seed(0))
    ]
    scores[:7] = float("nan")
    r = ScoreRound(step=3, epoch=0, estimator="tracin", task_ids=torch.arange(m) + 1000, scores=scores)
    WandbDashboard(wandb_logger).log_round(r)
    run = finish_and_read(tmp_path)

    (row,) = [h for h in run.history if "influence/tasks" in h]
    assert row["influence/tasks_capped"] == 1
    assert row["influence/tasks_total"] == m and row["influence/tasks_logged"] == 10_000
    assert (
        "exceed the 10000-row table cap" in row["influence/tasks_note"]
        and "artifact" in row["influence/tasks_note"]
    )
    table = run.table("influence/tasks")
    assert table["columns"][-1] == "part" and len(table["data"]) == 10_000
    parts = [t[-1] for t in table["data"]]
    assert parts.count("most_harmful") == 5000 and parts.count("most_helpful") == 5000
    finite_sorted = sorted(s for s in scores.tolist() if math.isfinite(s))
    harmful_scores = sorted(t[1] for t in table["data"] if t[-1] == "most_harmful")
    helpful_scores = sorted(t[1] for t in table["data"] if t[-1] == "most_helpful")
    assert harmful_scores == finite_sorted[:5000] and helpful_scores == finite_sorted[-5000:]
    assert row["influence/score_hist_subsampled"] == 1
    assert len(run.table("influence/score_hist_table")["data"]) == 10_000

    artifact = run.artifact("influence-scores")
    assert artifact["metadata"]["num_tasks"] == m and artifact["metadata"]["step"] == 3
    ((name, local_path),) = artifact["files"].items()
    assert name == "scores_step_00000003.csv"
    with open(local_path, newline="") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert len(csv_rows) == m  # nothing cut: every task is in the artifact
    assert sum(r["score"] == "nan" for r in csv_rows) == 7
    assert Path(local_path).is_relative_to(tmp_path)  # staged under WANDB_DATA_DIR, not in the home folder


def test_wandb_over_cap_without_artifact_refuses_to_cut(wandb_logger):
    r = ScoreRound(step=1, epoch=0, estimator="x", task_ids=torch.arange(30), scores=torch.randn(30))
    dash = WandbDashboard(wandb_logger, max_table_rows=20, summary_rows=10, artifact="never")
    with pytest.raises(ValueError, match="would be cut"):
        dash.log_round(r)


def test_wandb_harmful_samples_with_images(wandb_logger, tmp_path):
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 8), (1, 28, 28), (3, 28, 28), (28, 28, 3)]
    samples = [
        SampleScore(
            task_id=i % 3,
            split="query" if i % 2 else "support",
            index=i,
            score=float(i) - 4.5,
            label=i % 5,
            image=torch.rand(*shapes[i % 4], generator=g),
        )
        for i in range(10)
    ]
    r = make_round(m=6, sample_rows=samples)
    WandbDashboard(wandb_logger, max_samples=6).log_round(r)
    run = finish_and_read(tmp_path)

    table = run.table("influence/harmful_samples")
    assert table["columns"] == ["task_id", "split", "index", "score", "label", "excess_loss", "image"]
    assert [row[3] for row in table["data"]] == [-4.5, -3.5, -2.5, -1.5, -0.5, 0.5]  # most harmful first
    # the media/table file only names the cell type; the images live in the table's run_table artifact
    assert [row[6] for row in table["data"]] == ["Image"] * 6
    typed, files = run.artifact_table("influence/harmful_samples")
    images = [row[6] for row in typed["data"]]
    assert all(img["_type"] == "image-file" for img in images)
    sizes = [(img["width"], img["height"]) for img in images]
    assert sizes[0] == (32, 32) and sizes[1] == (56, 56)  # 8x8 and 28x28 enlarged for display
    assert sizes[2:4] == [(56, 56), (56, 56)]  # 3x28x28 and 28x28x3
    for img in images:
        assert Path(files[img["path"]]).stat().st_size > 0


def test_wandb_dashboard_accepts_raw_run_and_history(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    raw = wandb.init(project="metaif-test", dir=str(tmp_path / "runs"), mode="offline")
    try:
        earlier = [round_metrics(make_round(m=10, step=s, seed=s)) for s in (1, 2)]
        WandbDashboard(raw).log_round(make_round(m=10, step=3, seed=3), earlier)
    finally:
        wandb.finish()
    run = wandb_reader.read_run(tmp_path / "runs")
    stats = run.table("influence/score_stats_table")
    assert sorted({s for s, _, _ in stats["data"]}) == [1, 2, 3]


def test_reader_handles_records_spanning_blocks(wandb_logger, tmp_path):
    big = "x" * 100_000  # > 3 blocks of 32 KiB: FIRST/MIDDLE/LAST chunks
    wandb_logger.experiment.config.update({"blob": big})
    wandb_logger.experiment.log({"influence/a": 1.0, "trainer/global_step": 1})
    run = finish_and_read(tmp_path)
    assert run.config["blob"] == big
    assert run.values("influence/a") == [1.0]


def test_missing_wandb_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(ImportError, match=r'pip install "lightning-metaif\[wandb\]"'):
        WandbDashboard(object())


def test_table_json_files_are_valid_json(wandb_logger, tmp_path):
    r = ScoreRound(
        step=1,
        epoch=0,
        estimator="x",
        task_ids=torch.arange(4),
        scores=torch.tensor([1.0, float("nan"), -1.0, 0.0]),
    )
    WandbDashboard(wandb_logger).log_round(r)
    run = finish_and_read(tmp_path)
    files = run.table_files()
    assert files

    def bare(constant: str) -> None:
        raise AssertionError(f"bare {constant} in a table file")

    for path in files:
        json.loads(path.read_text(), parse_constant=bare)


def test_report_flags_tasks_that_moved_into_the_most_harmful_after_pruning(tmp_path):
    from lightning_metaif.dashboards.files import RunFiles
    from lightning_metaif.dashboards.report import rank_changes_after_pruning
    from lightning_metaif.records import Decision, ScoreRound

    ids = torch.arange(6)
    pruned = torch.tensor([True, True, False, False, False, False])
    at_pruning = ScoreRound(
        step=10,
        epoch=0,
        estimator="trajectory",
        task_ids=ids,
        scores=torch.tensor([-3.0, -2.0, -1.0, 0.5, 1.0, 2.0]),
        pruned=pruned,
        decisions=[Decision(step=10, epoch=0, action="prune", task_ids=[0, 1], reason="lowest")],
    )
    final = ScoreRound(
        step=20,
        epoch=1,
        estimator="trajectory",
        task_ids=ids,
        scores=torch.tensor([-3.0, -2.0, 0.2, -0.5, 1.0, 2.0]),
        pruned=pruned,
    )
    run = RunFiles(directory=tmp_path, rounds=[at_pruning, final])
    # among the kept tasks {2, 3, 4, 5}: task 3 was 2nd most harmful when 0 and 1 were pruned, 1st now
    assert rank_changes_after_pruning(run, k=1) == {3: (2, 1)}
    assert rank_changes_after_pruning(run, k=2) == {}  # both of the 2 most harmful were already there
    assert rank_changes_after_pruning(RunFiles(directory=tmp_path, rounds=[final]), k=1) == {}  # no pruning
