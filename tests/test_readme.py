"""Every Python block of the README runs as written, for 10 seeds (docs move with code).

A block runs in a fresh namespace, in a temporary working directory, after ``lightning.seed_everything(seed)``
for each of :data:`SEEDS` (the other tests all run under ``tests/conftest.py``'s fixed seed 0). Blocks that train
run in a small configuration: :data:`SMALL` lists the textual substitutions (same API, fewer tasks and
epochs), and a substitution that no longer matches the README fails the test, so the README cannot drift away
from what is tested.

A block the test cannot run is preceded in the README by ``<!-- readme-test: skip (why) -->``; there are none
today.
"""

from __future__ import annotations

import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
SEEDS = range(10)
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((.+?)\)\s*-->\s*$")

# block marker -> substitutions giving the same code a small configuration (each must match exactly once)
SMALL: dict[str, dict[str, str]] = {
    "trainer.fit(": {
        "num_train_tasks=500)": "num_train_tasks=40, num_val_tasks=8, num_test_tasks=8)",
        "max_epochs=10": "max_epochs=2, enable_progress_bar=False, enable_model_summary=False",
    },
}


def python_blocks() -> list[tuple[str, str, str | None]]:
    """``(name, code, skip_reason)`` of every fenced ``python`` block, named after its section heading."""
    blocks, heading, previous = [], "top", ""
    lines = README.read_text().splitlines(keepends=True)
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.strip("# \n")
        if line.startswith("```python"):
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            skip = SKIP.search(previous)
            blocks.append(
                (f"{heading} (line {i + 1})", "".join(lines[i + 1 : j]), skip.group(1) if skip else None)
            )
            i = j
        if line.strip():
            previous = line
        i += 1
    return blocks


def small(code: str) -> str:
    for marker, substitutions in SMALL.items():
        if marker in code:
            for old, new in substitutions.items():
                assert code.count(old) == 1, (
                    f"README block with {marker!r} no longer contains {old!r}: update SMALL"
                )
                code = code.replace(old, new)
    return code


BLOCKS = python_blocks()


def test_the_readme_has_the_blocks_this_file_expects():
    codes = [code for _, code, _ in BLOCKS]
    assert any("task_influence(model" in c for c in codes), "the engine example"
    assert any("MetaInfluence(" in c and "trainer.fit(" in c for c in codes), "the quickstart"
    assert all(any(marker in c for c in codes) for marker in SMALL)


@pytest.mark.slow
@pytest.mark.parametrize("name, code, skip", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_readme_block_runs_for_10_seeds(name, code, skip, tmp_path, monkeypatch, capsys):
    if skip:
        pytest.skip(skip)
    monkeypatch.chdir(tmp_path)
    source = small(code)
    failures: dict[int, str] = {}
    for seed in SEEDS:
        pl.seed_everything(seed, verbose=False)
        namespace: dict = {}
        try:
            exec(compile(source, f"{README}:{name}", "exec"), namespace)  # noqa: S102 - our own README
        except Exception as error:  # report every failing seed, not only the first
            failures[seed] = f"{type(error).__name__}: {error}"[:300]
            continue
        _check(namespace)
    capsys.readouterr()
    assert not failures, f"{name} failed for seeds {sorted(failures)} of {list(SEEDS)}: {failures}"


def _check(ns: dict) -> None:
    """What the blocks promise, beyond running: shapes and finite numbers where the block produces them."""
    if "res" in ns and "samples" in ns:  # the engine example
        assert ns["res"].scores.shape == (16,) and torch.isfinite(ns["res"].scores).all()
        assert ns["samples"].query_scores.shape == (16, 10)
        assert set(ns["delta"]) == set(ns["params"])
    if "influence" in ns and "trainer" in ns:  # the quickstart
        result = ns["influence"].result
        assert result is not None and len(result.task_ids) == 40
        scored = getattr(result, "scored", torch.ones(40, dtype=torch.bool))  # tasks not yet visited: NaN
        assert scored.any() and torch.isfinite(result.scores[scored]).all()


def test_quickstart_names_exist():
    (code,) = [c for _, c, _ in BLOCKS if "MetaInfluence(" in c and "trainer.fit" in c]
    imports = re.search(r"from lightning_metaif import (.*)", code).group(1).split(", ")
    import lightning_metaif

    for name in imports:
        assert hasattr(lightning_metaif, name.strip()), name
