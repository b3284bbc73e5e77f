"""Fault injection: a training run killed with a real SIGKILL at each phase, resumed from its last complete
checkpoint, ends with the same pruned set, scores, decisions and on-disk records as an uninterrupted run.

The runs are subprocesses of `tests/crash_child.py` (tiny MAML on digits, 2 epochs of 5 steps, one scoring round
and one checkpoint per epoch, `Checkpoints` estimator with a gradient store, pruning from the second round). Each
killed run dies in its second epoch and resumes from the first epoch's checkpoint. The killed runs start in
parallel; the resumed runs and the uninterrupted one share one process (one import of torch and Lightning).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
CHILD = HERE / "crash_child.py"
# phase -> which occurrence to kill at (0-based): the last epoch's round / record / checkpoint
PHASES = {"record": 1, "after_round": 1, "checkpoint": 1, "round_file": 1}


def _start(*args: str | Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(CHILD), *map(str, args)],
        cwd=HERE.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def _latest_complete_checkpoint(run_dir: Path) -> Path:
    """What a user resumes from: the newest checkpoint file that loads (a torn one is skipped)."""
    for path in sorted(
        (run_dir / "ckpt").glob("epoch=*.ckpt"), key=lambda p: int(p.stem.split("=")[1]), reverse=True
    ):
        try:
            torch.load(path, map_location="cpu", weights_only=False)
        except Exception:  # noqa: BLE001 - a torn file fails in many ways
            continue
        return path
    raise AssertionError(f"no complete checkpoint under {run_dir / 'ckpt'}")


def _disk_state(run_dir: Path) -> dict[str, object]:
    """Everything the run left on disk that must match: store records (bytes) and round files (text)."""
    root = run_dir / "metaif"
    state: dict[str, object] = {}
    for path in sorted((root / "store").glob("rank*/*.mgs")):
        state[f"store/{path.parent.name}/{path.name}"] = path.read_bytes()
    for path in sorted(root.glob("*.csv")):
        text = path.read_text()
        if path.name == "metrics.csv":  # wall-clock columns differ between runs
            rows = [line.split(",") for line in text.splitlines()]
            drop = {i for i, c in enumerate(rows[0]) if "seconds" in c or "time" in c}
            text = "\n".join(",".join(c for i, c in enumerate(r) if i not in drop) for r in rows)
        state[path.name] = text
    return state


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("crash")
    killed = {phase: _start(base / phase, "--phase", phase, "--at", str(at)) for phase, at in PHASES.items()}
    for phase, proc in killed.items():
        code, err = _finish(proc)
        assert code == -9, f"{phase}: expected SIGKILL, got exit code {code}\n{err[-3000:]}"
    jobs = [f"{base / phase}={_latest_complete_checkpoint(base / phase)}" for phase in PHASES]
    code, err = _finish(_start(*jobs, str(base / "uninterrupted")))
    assert code == 0, f"resumed runs: exit code {code}\n{err[-3000:]}"
    return {"uninterrupted": base / "uninterrupted", **{p: base / p for p in PHASES}}


@pytest.mark.parametrize("phase", list(PHASES))
def test_resume_after_a_kill_equals_an_uninterrupted_run(runs: dict[str, Path], phase: str) -> None:
    expected = json.loads((runs["uninterrupted"] / "result.json").read_text())
    got = json.loads((runs[phase] / "result.json").read_text())
    assert got["pruned"] == expected["pruned"] and expected["pruned"]
    assert got["decisions"] == expected["decisions"]
    assert got["rounds"] == expected["rounds"] == 2
    assert got["history"] == expected["history"]  # every round's scalars, scores' summaries included
    want, have = _disk_state(runs["uninterrupted"]), _disk_state(runs[phase])
    assert sorted(have) == sorted(want)
    assert any(k.startswith("store/") for k in want) and "decisions.csv" in want
    for key in want:
        assert have[key] == want[key], f"{phase}: {key} differs from the uninterrupted run"
