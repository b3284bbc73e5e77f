"""The documentation stays consistent with the repository (the site itself is built by .ci/run)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DESIGN_NOTE = "MATH" + ".md"  # the team's design note, not in the repository


def test_project_files_cite_the_maths_page_not_the_design_note():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(
        ["git", "ls-files", "lightning_metaif", "tests", "examples", "benchmarks", "scripts", "docs", "*.md"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    citing = [
        p for p in tracked if p != "CHANGELOG.md" and DESIGN_NOTE in (ROOT / p).read_text(errors="ignore")
    ]
    assert not citing, f"cite docs/maths.md (§N) instead of {DESIGN_NOTE} in: {citing}"


def test_maths_citations_point_at_sections_that_exist():
    sections = set(re.findall(r"^## (\d+)\. ", (ROOT / "docs" / "maths.md").read_text(), flags=re.M))
    cited = set()
    for path in [*ROOT.joinpath("lightning_metaif").rglob("*.py"), *ROOT.joinpath("tests").glob("*.py")]:
        for match in re.finditer(r"docs/maths\.md §(\d+)(?:\s*[-,]\s*§?(\d+))?", path.read_text()):
            cited.update(n for n in match.groups() if n)
    assert cited, "no docstring cites docs/maths.md"
    assert cited <= sections, f"cited sections {sorted(cited - sections)} are not in docs/maths.md"


def test_every_page_in_the_nav_exists():
    nav = re.findall(r":\s*([\w/.-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), flags=re.M)
    assert len(nav) >= 10
    missing = [p for p in nav if not (ROOT / "docs" / p).is_file()]
    assert not missing, missing
