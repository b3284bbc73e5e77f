"""The examples run in their --fast mode (in-process: each example has a ``main(argv)``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _offline_wandb(tmp_path, monkeypatch):
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")


def test_every_example_has_a_fast_mode():
    for path in EXAMPLES.glob("*.py"):
        text = path.read_text()
        assert "--fast" in text and "METAIF_EXAMPLES_FAST" in text, path.name
        assert "def main(argv=None)" in text, path.name


def test_sinusoid_quickstart(tmp_path, capsys):
    influence = load("sinusoid_quickstart").main(["--fast", "--output-dir", str(tmp_path)])
    assert influence.rounds == 2 and len(influence.result.task_ids) == 40
    assert torch.isfinite(influence.result.scores).all()
    assert "most harmful tasks:" in capsys.readouterr().out
    assert list(tmp_path.rglob("metaif/scores_round_0001.csv"))


def test_higher_maml_example_scores_and_prunes_through_the_loop_path(tmp_path):
    pytest.importorskip("higher")
    influence = load("higher_maml").main(["--fast", "--output-dir", str(tmp_path)])
    assert influence.rounds == 2 and torch.isfinite(influence.result.scores).all()
    assert len(influence.task_state.pruned) >= 1  # warm-up of 1 round, then pruning


def test_omniglot_example_fails_clearly_without_the_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        load("omniglot_folder").main(["--root", str(tmp_path / "missing"), "--fast"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Omniglot not found" in err and "Nothing is downloaded" in err


def test_omniglot_example_runs_on_a_small_folder(tmp_path):
    image = pytest.importorskip("PIL.Image")
    root = tmp_path / "omniglot"
    generator = torch.Generator().manual_seed(0)
    for alphabet in range(2):
        for character in range(10):
            folder = root / "images_background" / f"Alphabet{alphabet}" / f"character{character + 1:02d}"
            folder.mkdir(parents=True)
            for k in range(6):  # shots + queries = 1 + 5
                pixels = (torch.rand(28, 28, generator=generator) > 0.5).to(torch.uint8) * 255
                image.fromarray(pixels.numpy(), mode="L").save(folder / f"{k}.png")
    influence = load("omniglot_folder").main(
        [
            "--root",
            str(root),
            "--fast",
            "--train-characters",
            "0.5",
            "--val-characters",
            "0.25",
            "--output-dir",
            str(tmp_path / "out"),
        ]
    )
    assert influence.rounds == 1 and len(influence.result.task_ids) == 20


def test_noisy_digits_pruning_example(tmp_path, capsys):
    acc_baseline, acc_pruned = load("noisy_digits_pruning").main(["--fast", "--output-dir", str(tmp_path)])
    assert 0.0 <= acc_baseline <= 1.0 and 0.0 <= acc_pruned <= 1.0
    out = capsys.readouterr().out
    assert "detection AUROC" in out and "pruned 8 tasks" in out


def test_wandb_dashboard_example_writes_an_offline_run(tmp_path):
    from wandb_reader import read_run

    from lightning_metaif.cli import main

    run_dir = load("wandb_dashboard").main(["--fast", "--output-dir", str(tmp_path)])
    run = read_run(run_dir)
    assert len(run.table("influence/tasks")["data"]) == 40
    assert main(["report", str(tmp_path)]) == 0  # the walkthrough's last step
    assert (tmp_path / "report.html").is_file()


def test_fairness_example_scores_the_pool_against_the_gap_and_plots(tmp_path):
    result, gaps = load("fairness").main(["--fast", "--output-dir", str(tmp_path)])
    assert len(result) == 24 and torch.isfinite(result.scores).all()
    assert result.diagnostics["curvature"] == "gauss_newton" and len(gaps) == 3
    assert (tmp_path / "fairness.png").stat().st_size > 0
