"""Draw the pictures of the documentation's W&B dashboard page from a real offline W&B run.

    python docs/make_figures.py            # writes docs/img/dashboard_*.png (about a minute on 2 CPU cores)

It runs ``examples/wandb_dashboard.py --fast`` (every panel turned on: ground truth, pruning, sample influence)
with ``WANDB_MODE=offline`` in a temporary folder, reads the run's logged history, tables and images back from
its ``.wandb`` file and the run's table artifacts (with ``tests/wandb_reader.py``), and draws one PNG per panel
with matplotlib: the same data the W&B app shows, drawn the way its panels draw it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "img"
HARMFUL, HELPFUL, NEUTRAL = "#d62728", "#2ca02c", "#7f7f7f"


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _save(fig, name: str) -> Path:
    path = OUT / f"dashboard_{name}.png"
    fig.savefig(path, dpi=80, bbox_inches="tight")
    return path


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=None, help="where the run goes (default: a temp dir)")
    args = parser.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="metaif-figures-"))
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        os.environ[var] = str(work / var.lower())
    os.environ["WANDB_MODE"], os.environ["WANDB_SILENT"] = "offline", "true"
    sys.path.insert(0, str(ROOT / "tests"))
    import matplotlib
    from wandb_reader import read_run

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    run_dir = _load_example("wandb_dashboard").main(["--fast", "--output-dir", str(work / "run")])
    run = read_run(run_dir)
    OUT.mkdir(parents=True, exist_ok=True)
    written = []

    # scalars: one value per round under influence/
    keys = ["influence/score_median", "influence/fraction_harmful", "influence/num_pruned", "influence/auroc"]
    fig, axes = plt.subplots(1, len(keys), figsize=(12, 2.4))
    rows = [r for r in run.history if "influence/score_median" in r]
    steps = [r.get("trainer/global_step", i) for i, r in enumerate(rows)]
    for ax, key in zip(axes, keys):
        ax.plot(steps, [r.get(key) for r in rows], marker="o", ms=3)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("trainer/global_step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    written.append(_save(fig, "scalars"))

    # the task table (last round), sorted by score as you would sort it in the app
    table = run.table("influence/tasks")
    columns = table["columns"]
    data = sorted(table["data"], key=lambda r: r[columns.index("score")])
    shown = []
    for r in data[:10]:
        row = dict(zip(columns, r))
        shown.append(
            [
                row["id"],
                f"{row['score']:+.3f}",
                row["rank"],
                f"{row['weight']:.2f}",
                "yes" if row["pruned"] else "",
                " ".join(str(c) for c in row["classes"] or []),
                "yes" if row["corrupted"] else "no",
            ]
        )
    fig, ax = plt.subplots(figsize=(8.5, 3.0))
    ax.axis("off")
    cells = ax.table(
        cellText=shown,
        colLabels=["id", "score", "rank", "weight", "pruned", "classes", "corrupted"],
        colWidths=[0.07, 0.1, 0.07, 0.09, 0.09, 0.3, 0.11],
        loc="center",
        cellLoc="left",
    )
    cells.auto_set_font_size(False)
    cells.set_fontsize(8)
    cells.scale(1, 1.25)
    ax.set_title("influence/tasks (sorted by score, first 10 of 40 rows)", fontsize=10)
    written.append(_save(fig, "tasks"))

    # bar charts of the top-k harmful and helpful tasks
    for key, color, name in (("top_harmful", HARMFUL, "harmful"), ("top_helpful", HELPFUL, "helpful")):
        bars = run.table(f"influence/{key}_table")["data"]
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        ax.barh([b[0] for b in bars], [b[1] for b in bars], color=color)
        ax.invert_yaxis()
        ax.axvline(0, color="black", lw=0.6)
        ax.set_xlabel("score")
        ax.set_title(f"influence/{key}: the {len(bars)} most {name} tasks", fontsize=10)
        ax.tick_params(labelsize=8)
        written.append(_save(fig, key))

    # histogram of the scores
    scores = [r[0] for r in run.table("influence/score_hist_table")["data"]]
    fig, ax = plt.subplots(figsize=(5.5, 3.0))
    ax.hist(scores, bins=20, color="#1f77b4")
    ax.axvline(0, color="black", lw=0.8, ls="--")
    ax.set_xlabel("score (negative = harmful)")
    ax.set_ylabel("tasks")
    ax.set_title("influence/score_hist", fontsize=10)
    written.append(_save(fig, "score_hist"))

    # line series over the rounds
    for key, title in (("score_stats", "score quantiles per round"), ("detection", "detection per round")):
        series = defaultdict(list)
        for step, line, value in run.table(f"influence/{key}_table")["data"]:
            series[line].append((step, value))
        fig, ax = plt.subplots(figsize=(5.5, 3.0))
        for line, points in series.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, label=line)
        ax.set_xlabel("trainer/global_step")
        ax.set_title(f"influence/{key}: {title}", fontsize=10)
        ax.legend(fontsize=7, ncol=2)
        written.append(_save(fig, key))

    # the most harmful samples, with the images W&B stored for them
    typed, files = run.artifact_table("influence/harmful_samples")
    columns = typed["columns"]
    rows = [dict(zip(columns, r)) for r in typed["data"]][:16]
    fig, axes = plt.subplots(2, 8, figsize=(11.5, 4.0))
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows):
        image = row.get("image")
        if isinstance(image, dict) and image.get("path") in files:
            ax.imshow(Image.open(files[image["path"]]), cmap="gray", interpolation="nearest")
        ax.set_title(
            f"task {row['task_id']}\n{row['split']}[{row['index']}] y={row['label']}\n{row['score']:+.3f}",
            fontsize=7,
        )
    fig.suptitle("influence/harmful_samples (most harmful first)", fontsize=10)
    fig.tight_layout()
    written.append(_save(fig, "harmful_samples"))
    plt.close("all")
    for path in written:
        print(path.relative_to(ROOT))
    return written


if __name__ == "__main__":
    main()
