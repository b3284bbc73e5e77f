"""The README's engine example runs as written (docs move with code)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_engine_example_runs_as_written(capsys):
    (block,) = [b for b in python_blocks() if "task_influence(model" in b]
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["res"].scores.shape == (32,)
    assert namespace["samples"].query_scores.shape == (32, 10)
    assert set(namespace["delta"]) == set(namespace["params"])


def test_quickstart_names_exist():
    (block,) = [b for b in python_blocks() if "MetaInfluence(" in b and "trainer.fit" in b]
    imports = re.search(r"from lightning_metaif import (.*)", block).group(1).split(", ")
    import lightning_metaif

    for name in imports:
        assert hasattr(lightning_metaif, name.strip()), name
