"""The ``lightning-metaif`` command: demo (--fast) end to end, report, LightningCLI fit with the example config."""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from wandb_reader import read_run

from lightning_metaif.actions import TaskSampler, TaskState
from lightning_metaif.cli import main
from lightning_metaif.dashboards.report import detection_curve

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "config_digits.yaml"
WANDB_VARS = ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR")


def _pngs(html_text: str) -> list[bytes]:
    return [
        base64.b64decode(b)
        for b in re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([^"]+)"', html_text)
    ]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One `lightning-metaif demo --fast` run with W&B offline (shared by the tests below; ~20-40 s)."""
    root = tmp_path_factory.mktemp("demo")
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        for name in WANDB_VARS:
            mp.setenv(name, str(root / name.lower()))
        mp.setenv("WANDB_MODE", "offline")
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["demo", "--fast", "--output-dir", str(root / "run"), "--logger", "wandb"])
    return code, root / "run", out.getvalue() + err.getvalue()


def test_demo_fast_exits_cleanly_and_prints_the_summary(demo_run):
    code, run_dir, printed = demo_run
    assert code == 0
    for needle in (
        "Most harmful tasks",
        "Most helpful tasks",
        "Detection of the 8 corrupted tasks: AUROC",
        "recall@10%",
        "Meta-test accuracy",
        "without pruning",
        "with pruning",
        "Time: data",
        "Report: ",
        "wandb sync",
        "Most harmful samples",
        "± one standard error over the test batches",
        "counted from 0",
    ):
        assert needle in printed, needle
    assert "anonymous" not in printed and "Tip:" not in printed and "GPU available" not in printed
    assert re.search(r"round  0 \(of 0-5\)", printed)  # rounds from 0, like scores_round_0000.csv
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["corrupted_task_ids"]) == 8  # 20% of 40
    assert 0.0 <= summary["accuracy"]["with_pruning"] <= 1.0
    assert 0.0 <= summary["accuracy"]["without_pruning"] <= 1.0
    assert 0.0 <= summary["detection"]["auroc"] <= 1.0
    assert len(summary["pruned_task_ids"]) <= 8
    assert summary["seconds"]["total"] > 0
    assert len(summary["most_harmful"]) == 5 and len(summary["most_helpful"]) == 5
    scores = [r["score"] for r in summary["most_harmful"]]
    assert scores == sorted(scores)
    # every path in summary.json is relative to its folder
    assert summary["report"] == "report.html"
    for run in summary["runs"].values():
        assert (run_dir / run["metaif"]).is_dir() and (run_dir / run["wandb"]).is_dir()
    # rounds from 0: a prune round is the index of a scores_round_XXXX.csv file with a prune decision
    with open(run_dir / "with_pruning" / "metaif" / "decisions.csv") as f:
        prune_rounds = sorted({int(r["round"]) for r in csv.DictReader(f) if r["action"] == "prune"})
    assert summary["prune_rounds"] == prune_rounds
    samples = summary["most_harmful_samples"]
    assert len(samples) == 5 and [s["score"] for s in samples] == sorted(s["score"] for s in samples)


def test_demo_report_has_embedded_plots(demo_run):
    _, run_dir, _ = demo_run
    text = (run_dir / "report.html").read_text()
    pngs = _pngs(text)
    # accuracy, detection curve, AUROC per round + (histogram, top-k bars, trajectories, harmful samples) for
    # each of the 2 runs
    assert len(pngs) == 11
    assert text.count("<h3>Most harmful samples") == 2 and "support[" not in text.split("<h3>Most harmful")[0]
    assert "e-0" not in text.split("<table>", 1)[1]  # scores as plain decimals, not -8.5809e-01
    assert "rot" in text  # class names ("7 rot270") from summary.json
    assert all(p.startswith(b"\x89PNG\r\n\x1a\n") and len(p) > 2000 for p in pngs)
    assert "meta-test accuracy" in text.lower() and "with_pruning" in text and "without_pruning" in text
    assert 'src="http' not in text  # self-contained


def test_demo_writes_wandb_offline_runs_with_the_dashboard(demo_run):
    _, run_dir, _ = demo_run
    for label in ("with_pruning", "without_pruning"):
        run = read_run(run_dir / label)
        table = run.table("influence/tasks")
        assert len(table["data"]) == 40
        keys = run.keys()
        assert {"influence/auroc", "influence/top_harmful_table", "influence/score_hist_table"} <= keys
        assert "test/accuracy" in keys
        assert 0.0 <= run.summary["demo/test_accuracy"] <= 1.0


def test_demo_writes_csv_score_files(demo_run):
    _, run_dir, _ = demo_run
    metaif = run_dir / "with_pruning" / "metaif"
    rounds = sorted(metaif.glob("scores_round_*.csv"))
    assert len(rounds) == 6  # --fast: 6 epochs, one round each
    with open(rounds[-1]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 40 and {r["corrupted"] for r in rows} == {"0", "1"}
    with open(metaif / "decisions.csv") as f:
        pruned = [r for r in csv.DictReader(f) if r["action"] == "prune"]
    assert pruned, "the fast demo should prune something"
    assert (metaif / "metrics.csv").is_file() and (metaif / "scores_history.csv").is_file()


def test_report_rebuilds_from_the_run_directory(demo_run, tmp_path, capsys):
    _, run_dir, _ = demo_run
    out = tmp_path / "again.html"
    assert main(["report", str(run_dir), "--output", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    # the harmful-sample images come back from the samples_round_*_images.pt files
    assert len(_pngs(out.read_text())) == 11
    # any folder with a run that used the callback (no summary.json: no accuracy plot)
    single = tmp_path / "single.html"
    assert main(["report", str(run_dir / "without_pruning"), "--output", str(single)]) == 0
    text = single.read_text()
    # detection curve, AUROC per round, histogram, top-k bars, trajectories, harmful samples
    assert len(_pngs(text)) == 6 and "Meta-test accuracy" not in text


def test_report_and_demo_reject_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(tmp_path / "missing")])
    assert exit_.value.code == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path / "empty")])
    assert "no MetaInfluence score files" in capsys.readouterr().err
    assert main(["demo", "--noise", "1.5", "--output-dir", str(tmp_path / "x")]) == 2
    assert "--noise must be in [0, 1)" in capsys.readouterr().err


def test_detection_curve_counts_corrupted_tasks_in_harm_order():
    xs, ys = detection_curve(torch.tensor([0.3, -2.0, float("nan"), -0.1]), torch.tensor([0, 1, 1, 0]).bool())
    assert xs == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert ys == [0.0, 0.5, 0.5, 0.5, 1.0]  # the NaN-scored corrupted task is inspected last


def test_sampler_never_repeats_a_task_inside_a_batch_after_pruning():
    # 40 tasks, 8 pruned, batches of 10: the 4th batch straddles two passes over the 32 kept tasks.
    state = TaskState()
    state.prune(range(8))
    pool = torch.utils.data.TensorDataset(torch.zeros(40))
    for epoch in range(5):
        sampler = TaskSampler(pool, state=state, seed=epoch)
        order = list(sampler)
        batches = [order[i : i + 10] for i in range(0, 40, 10)]
        assert all(len(set(b)) == len(b) for b in batches)
        assert not set(order) & set(range(8))


def test_fit_with_the_example_config_runs_and_prunes(tmp_path):
    from lightning_metaif.callback import MetaInfluence
    from lightning_metaif.cli import lightning_cli

    # the shipped config, unchanged, for a few steps
    args = [
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]
    assert main(["fit", "--config", str(CONFIG), *args]) == 0
    assert list((tmp_path / "csv").rglob("metaif/scores_round_0000.csv"))

    # the same config with an early pruning policy: the callback (built apart from the datamodule) must bind
    # its task state into the train loader's TaskSampler so pruned tasks are not drawn in the next epoch
    config = yaml.safe_load(CONFIG.read_text())
    callback = config["trainer"]["callbacks"][0]["init_args"]
    callback["actions"][0]["init_args"] = {
        "fraction": 0.2,
        "warmup_rounds": 0,
        "max_fraction_per_round": 0.2,
        "only_harmful": False,
        "stable_rounds": 1,
        "margin": None,
    }
    config["trainer"]["callbacks"].append({"class_path": "metaif_helpers.RecordSampledIds"})
    config["data"]["init_args"].update(num_tasks=40, num_test_tasks=10)
    path = tmp_path / "early.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = lightning_cli(
        [
            "fit",
            "--config",
            str(path),
            "--trainer.max_epochs=2",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path / 'early'}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'early'}",
        ]
    )
    influence = next(c for c in cli.trainer.callbacks if isinstance(c, MetaInfluence))
    recorder = next(c for c in cli.trainer.callbacks if type(c).__name__ == "RecordSampledIds")
    pruned = influence.task_state.pruned
    assert len(pruned) == 8
    assert set(recorder.by_epoch[0]) == set(range(40))
    assert not set(recorder.by_epoch[1]) & pruned
    # ground truth handed over from DigitsDataModule.corrupted_task_ids
    assert influence.ground_truth == set(cli.datamodule.corrupted_task_ids)
    assert "influence/auroc" in influence.history[-1]


def test_help_imports_neither_torch_nor_lightning():
    """`lightning-metaif --help` (and each light subcommand's help) must answer without the heavy imports."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from lightning_metaif.cli import main\n"
        "for argv in (['--help'], ['demo', '--help'], ['report', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('torch', 'lightning', 'numpy', 'wandb') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env=_env_with_root(),
    )
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-2000:]
    assert "usage: lightning-metaif" in out.stdout


def _env_with_root() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env
