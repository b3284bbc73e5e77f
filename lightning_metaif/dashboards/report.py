"""A self-contained HTML report of a run that used :class:`~lightning_metaif.MetaInfluence`.

:func:`build_report` reads the score files the callback wrote (every ``metaif/`` folder under a run
directory, through :func:`~lightning_metaif.dashboards.files.load_run`) and, when present, the
``summary.json`` of ``lightning-metaif demo`` (accuracy with and without pruning). Plots are drawn with
matplotlib (Agg backend) and embedded as base64 PNG, so the single HTML file can be mailed or archived.

Plots per scored run: histogram of the final scores (split by corrupted / clean when ground truth is known),
the most harmful and most helpful tasks (bars), score trajectories over the scoring rounds, detection AUROC
per round, the most harmful samples with their images (when the callback scored samples); across runs: the
detection curve (recall of the corrupted tasks vs the fraction of tasks inspected, most harmful first) and
meta-test accuracy with and without pruning (demo only).

Rounds are numbered from 0, as in the file names (``scores_round_0000.csv``) and on the console. Scores are
printed as plain decimals (:func:`~lightning_metaif.dashboards.text.format_score`); classes by name when the
run's ``summary.json`` has ``class_names``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_metaif._io import atomic_write
from lightning_metaif.dashboards.files import RunFiles, load_run
from lightning_metaif.dashboards.text import format_classes, format_score
from lightning_metaif.records import SampleScore, ScoreRound

__all__ = ["build_report", "find_metaif_dirs", "render_report"]

HARMFUL_COLOR, HELPFUL_COLOR, CORRUPT_COLOR, CLEAN_COLOR = "#d62728", "#2ca02c", "#d62728", "#1f77b4"
NEUTRAL_COLOR = "#7f7f7f"


def find_metaif_dirs(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Folders under ``run_dir`` (itself included) that hold ``scores_round_*.csv`` files, sorted.

    Example:
        >>> import tempfile
        >>> find_metaif_dirs(tempfile.mkdtemp())
        []
    """
    root = Path(run_dir)
    if not root.exists():
        raise FileNotFoundError(f"run directory {root} does not exist")
    found = {p.parent for p in root.rglob("scores_round_*.csv")}
    return sorted(found)


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The HTML report needs matplotlib: pip install 'lightning-metaif[plot]'."
        ) from error
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _img(fig: Any, alt: str) -> str:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"/>'


def _finite(round_: ScoreRound) -> torch.Tensor:
    return torch.isfinite(round_.scores)


def _histogram(round_: ScoreRound, title: str) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    scores = round_.scores
    finite = _finite(round_)
    if round_.corrupted is not None:
        clean = scores[finite & ~round_.corrupted].numpy()
        bad = scores[finite & round_.corrupted].numpy()
        ax.hist(
            [clean, bad],
            bins=30,
            stacked=True,
            color=[CLEAN_COLOR, CORRUPT_COLOR],
            label=["clean", "corrupted"],
        )
        ax.legend()
    else:
        ax.hist(scores[finite].numpy(), bins=30, color=CLEAN_COLOR)
    ax.axvline(0.0, color="black", lw=0.8, ls="--")
    ax.set_xlabel("score (negative = harmful, positive = helpful)")
    ax.set_ylabel("tasks")
    ax.set_title(title)
    return _img(fig, f"score histogram: {title}")


def _top_bars(round_: ScoreRound, title: str, k: int = 10) -> str:
    plt = _pyplot()
    order = [p for p in round_.order().tolist() if bool(_finite(round_)[p])]
    harmful, helpful = order[:k], list(reversed(order))[:k]
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 0.3 * max(len(harmful), 3) + 1.4))
    for ax, positions, name in ((axes[0], harmful, "most harmful"), (axes[1], helpful, "most helpful")):
        labels, values, colors, hatches = [], [], [], []
        for p in positions:
            tid = int(round_.task_ids[p])
            corrupt = round_.corrupted is not None and bool(round_.corrupted[p])
            pruned = bool(round_.pruned[p])
            labels.append(f"task {tid}" + (" (pruned)" if pruned else ""))
            values.append(float(round_.scores[p]))
            colors.append(
                CORRUPT_COLOR if corrupt else (HELPFUL_COLOR if name == "most helpful" else NEUTRAL_COLOR)
            )
            hatches.append("//" if pruned else "")
        bars = ax.barh(range(len(values)), values, color=colors)
        for bar, hatch in zip(bars, hatches):
            bar.set_hatch(hatch)
        ax.set_yticks(range(len(values)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(0.0, color="black", lw=0.8)
        ax.set_title(name, fontsize=9)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 2))
        ax.set_xlabel("score")
    from matplotlib.patches import Patch

    legend = [
        Patch(
            facecolor=NEUTRAL_COLOR,
            label="harmful" + (", not corrupted" if round_.corrupted is not None else ""),
        ),
        Patch(
            facecolor=HELPFUL_COLOR,
            label="helpful" + (", not corrupted" if round_.corrupted is not None else ""),
        ),
    ]
    if round_.corrupted is not None:
        legend.append(Patch(facecolor=CORRUPT_COLOR, label="corrupted (ground truth)"))
    if bool(round_.pruned.any()):
        legend.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="pruned (hatched)"))
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return _img(fig, f"top tasks: {title}")


def _trajectories(run: RunFiles, title: str, k: int = 5) -> str | None:
    if len(run.rounds) < 2 or not run.history:
        return None
    plt = _pyplot()
    final = run.rounds[-1]
    order = [p for p in final.order().tolist() if bool(_finite(final)[p])]
    chosen = {int(final.task_ids[p]): "harmful" for p in order[:k]}
    chosen.update({int(final.task_ids[p]): "helpful" for p in list(reversed(order))[:k]})
    corrupted = set()
    if final.corrupted is not None:
        corrupted = set(final.task_ids[final.corrupted].tolist())
    by_task: dict[int, list[tuple[int, float]]] = {}
    by_round: dict[int, list[float]] = {}
    for row in run.history:
        if math.isfinite(row["score"]):
            by_round.setdefault(row["round"], []).append(row["score"])
        if row["task_id"] in chosen:
            by_task.setdefault(row["task_id"], []).append((row["round"], row["score"]))
    fig, ax = plt.subplots(figsize=(7.2, 3.8))
    rounds = sorted(by_round)
    qs = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    bands = [torch.quantile(torch.tensor(by_round[r], dtype=torch.float64), qs).tolist() for r in rounds]
    xs = list(rounds)
    ax.fill_between(
        xs,
        [b[0] for b in bands],
        [b[2] for b in bands],
        color="#cccccc",
        alpha=0.6,
        label="all tasks, 10-90%",
    )
    ax.plot(xs, [b[1] for b in bands], color="#555555", lw=1.0, label="median")
    for tid, points in sorted(by_task.items()):
        points.sort()
        color = HARMFUL_COLOR if chosen[tid] == "harmful" else HELPFUL_COLOR
        style = "-" if tid not in corrupted else "--"
        ax.plot([r for r, _ in points], [s for _, s in points], style, color=color, lw=1.2, alpha=0.9)
    ax.plot([], [], "-", color=HARMFUL_COLOR, label=f"{k} most harmful (final)")
    ax.plot([], [], "-", color=HELPFUL_COLOR, label=f"{k} most helpful (final)")
    if corrupted:
        ax.plot([], [], "--", color="black", label="dashed = corrupted")
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set_xlabel("scoring round (from 0)")
    ax.set_ylabel("cumulative score")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="best")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    return _img(fig, f"score trajectories: {title}")


def _metric_series(run: RunFiles, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in run.metrics:
        value = row.get(key)
        if isinstance(value, float) and math.isfinite(value):
            xs.append(float(row["round"]))
            ys.append(value)
    return xs, ys


def _auroc_per_round(runs: Mapping[str, RunFiles]) -> str | None:
    series = {name: _metric_series(run, "influence/auroc") for name, run in runs.items()}
    series = {k: v for k, v in series.items() if v[0]}
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", ms=3, label=name)
    ax.axhline(0.5, color="black", lw=0.6, ls="--", label="random")
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("scoring round (from 0)")
    ax.set_ylabel("detection AUROC")
    ax.set_title("Detection AUROC of the corrupted tasks, per round")
    ax.legend(fontsize=8)
    return _img(fig, "detection AUROC per round")


def detection_curve(scores: torch.Tensor, corrupted: torch.Tensor) -> tuple[list[float], list[float]]:
    """Recall of the corrupted tasks after inspecting the ``i`` most harmful tasks, for ``i = 0..M``.

    Returns ``(fraction_inspected, recall)``; non-finite scores are inspected last.

    Example:
        >>> detection_curve(torch.tensor([-1.0, 2.0, -3.0, 0.5]), torch.tensor([True, False, False, False]))
        ([0.0, 0.25, 0.5, 0.75, 1.0], [0.0, 0.0, 1.0, 1.0, 1.0])
    """
    from lightning_metaif.records import harmful_order

    order = harmful_order(scores)
    hits = corrupted.to(torch.float64)[order]
    total = float(hits.sum())
    m = len(order)
    recall = [0.0] + (torch.cumsum(hits, 0) / max(total, 1.0)).tolist()
    return [i / m for i in range(m + 1)], recall


def _detection_plot(runs: Mapping[str, RunFiles]) -> str | None:
    finals = {n: r.rounds[-1] for n, r in runs.items() if r.rounds and r.rounds[-1].corrupted is not None}
    finals = {n: f for n, f in finals.items() if bool(f.corrupted.any())}
    if not finals:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    share = None
    for name, final in finals.items():
        xs, ys = detection_curve(final.scores, final.corrupted)
        share = float(final.corrupted.double().mean())
        ax.plot(xs, ys, lw=1.6, label=f"{name} (last round)")
    ax.plot([0, 1], [0, 1], color="gray", ls="--", lw=0.8, label="random order")
    if share:
        ax.plot([0, share, 1], [0, 1, 1], color="black", ls=":", lw=0.8, label="perfect")
    for k in (0.1, 0.2, 0.4):
        ax.axvline(k, color="#dddddd", lw=0.6)
    ax.set_xlabel("fraction of tasks inspected (most harmful first)")
    ax.set_ylabel("recall of corrupted tasks")
    ax.set_title("Detection curve")
    ax.legend(fontsize=8, loc="lower right")
    return _img(fig, "detection curve")


def _accuracy_plot(accuracy: Mapping[str, Any]) -> str:
    plt = _pyplot()
    names = ["without pruning", "with pruning"]
    values = [accuracy["without_pruning"], accuracy["with_pruning"]]
    errors = [accuracy.get("without_pruning_se") or 0.0, accuracy.get("with_pruning_se") or 0.0]
    errors = [0.0 if not math.isfinite(e) else 1.96 * e for e in errors]
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    bars = ax.bar(
        names,
        [100 * v for v in values],
        yerr=[100 * e for e in errors],
        capsize=6,
        color=["#7f7f7f", HELPFUL_COLOR],
    )
    for bar, value in zip(bars, values):
        ax.text(
            bar.get_x() + bar.get_width() / 2,
            bar.get_height() / 2,
            f"{value:.1%}",
            ha="center",
            color="white",
            fontweight="bold",
        )
    ax.set_ylabel("meta-test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(
        f"Meta-test accuracy ({accuracy.get('num_test_tasks', '?')} tasks; bars: 95% confidence interval)",
        fontsize=10,
    )
    return _img(fig, "meta-test accuracy with and without pruning")


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "–" if not math.isfinite(value) else format(value, spec)
    return html.escape(str(value))


def _prune_round(run: RunFiles) -> int | None:
    """Index of the last round with a prune decision (``None`` without pruning)."""
    rounds = [k for k, r in enumerate(run.rounds) if any(d.action == "prune" for d in r.decisions)]
    return rounds[-1] if rounds else None


def _kept_ranks(round_: ScoreRound, kept: set[int]) -> dict[int, int]:
    """Harmful-first rank (1 = most harmful) of each task of ``kept`` among the ``kept`` tasks of ``round_``."""
    ids = round_.task_ids.tolist()
    order = [p for p in round_.order().tolist() if ids[p] in kept and math.isfinite(float(round_.scores[p]))]
    return {ids[p]: i + 1 for i, p in enumerate(order)}


def rank_changes_after_pruning(run: RunFiles, k: int = 10) -> dict[int, tuple[int, int]]:
    """Tasks in the ``k`` most harmful of the last round that were not there when the last tasks were pruned.

    Ranks are counted among the tasks still kept at the end, in both rounds, so removing tasks does not by
    itself move anyone. Returns ``{task_id: (rank at the pruning round, rank now)}``; empty without pruning.
    After the harmful tasks are gone, scores are relative to a cleaner pool, and clean tasks drift into the
    "most harmful" list: this is what the report flags.
    """
    at = _prune_round(run)
    if at is None or at == len(run.rounds) - 1:
        return {}
    final = run.rounds[-1]
    kept = {int(t) for t, p in zip(final.task_ids.tolist(), final.pruned.tolist()) if not p}
    before, now = _kept_ranks(run.rounds[at], kept), _kept_ranks(final, kept)
    return {t: (before[t], r) for t, r in now.items() if r <= k and t in before and before[t] > k}


def _class_names(summary: Mapping[str, Any] | None) -> dict[int, str] | None:
    names = (summary or {}).get("class_names")
    return {int(c): str(n) for c, n in names.items()} if names else None


def _task_table(
    round_: ScoreRound,
    k: int = 10,
    *,
    class_names: Mapping[int, str] | None = None,
    moved: Mapping[int, tuple[int, int]] | None = None,
) -> str:
    rows = round_.to_rows()
    order = [p for p in round_.order().tolist() if math.isfinite(rows[p]["score"])]
    picks = [("harmful", p) for p in order[:k]] + [("helpful", p) for p in list(reversed(order))[:k]]
    moved = moved or {}
    body = []
    for kind, p in picks:
        r = rows[p]
        corrupt = r["corrupted"]
        cls = format_classes(r["classes"], class_names)
        flag = ""
        if kind == "harmful" and r["id"] in moved:
            before, now = moved[r["id"]]
            flag = f" <span class='flag' title='rank among the kept tasks: {before} then, {now} now'>⚑ new since pruning</span>"
        body.append(
            f"<tr class='{kind}'><td>{kind}</td><td>{r['id']}{flag}</td><td>{format_score(r['score'])}</td>"
            f"<td>{r['rank']}</td>"
            f"<td>{'–' if corrupt is None else ('<b>yes</b>' if corrupt else 'no')}</td>"
            f"<td>{'yes' if r['pruned'] else ''}</td><td>{r['weight']:.2f}</td><td>{html.escape(cls)}</td></tr>"
        )
    note = ""
    if moved:
        note = (
            "<p class='note'>⚑ new since pruning: the task was not among the most harmful (of the tasks kept) when "
            "the last tasks were pruned. Scores are relative to the pool: once the harmful tasks are gone, clean "
            "tasks move into this list without having become harmful.</p>"
        )
    return (
        "<table><tr><th></th><th>task</th><th>score</th><th>rank</th><th>corrupted</th><th>pruned</th>"
        "<th>weight</th><th>classes</th></tr>" + "".join(body) + "</table>" + note
    )


def _sample_section(
    run: RunFiles, *, class_names: Mapping[int, str] | None = None, k: int = 16
) -> str | None:
    """The most harmful samples of the latest round that scored samples: images (when stored) and a table."""
    with_samples = [r for r in run.rounds if r.sample_rows]
    if not with_samples:
        return None
    round_ = with_samples[-1]
    round_index = run.rounds.index(round_)
    rows: list[SampleScore] = sorted(
        (s for s in round_.sample_rows or [] if math.isfinite(s.score)), key=lambda s: s.score
    )[:k]
    if not rows:
        return None
    classes_of = {}
    if round_.classes is not None:
        classes_of = {int(t): c for t, c in zip(round_.task_ids.tolist(), round_.classes)}
    corrupted_of = {}
    if round_.corrupted is not None:
        corrupted_of = {int(t): bool(c) for t, c in zip(round_.task_ids.tolist(), round_.corrupted.tolist())}

    def label_text(s: SampleScore) -> str:
        if s.label is None:
            return "–"
        classes = classes_of.get(s.task_id)
        if isinstance(s.label, int) and classes and 0 <= s.label < len(classes):
            return f"{s.label} ({format_classes([classes[s.label]], class_names)})"
        return str(s.label)

    parts = [
        f"<h3>Most harmful samples (round {round_index}, instance influence of the most harmful tasks)</h3>",
        "<p class='note'>Score of one support or query sample: the predicted increase of the reference loss if "
        "that sample were removed (same sign convention as tasks). Label: the label the task gives the sample "
        "(class in brackets).</p>",
    ]
    images = [s for s in rows if s.image is not None]
    if images:
        from lightning_metaif.dashboards.wandb_dashboard import image_to_array

        plt = _pyplot()
        cols = min(8, len(images))
        nrows = math.ceil(len(images) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(1.45 * cols, 2.1 * nrows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, s in zip(axes.flat, images):
            array = image_to_array(s.image, min_side=8)
            ax.imshow(array, cmap="gray" if array.ndim == 2 else None, interpolation="nearest")
            bad = " *" if corrupted_of.get(s.task_id) else ""
            ax.set_title(
                f"task {s.task_id}{bad}\n{s.split}[{s.index}] y={s.label}\n{format_score(s.score)}",
                fontsize=7,
            )
        fig.tight_layout()
        parts.append("<div class='plots'>" + _img(fig, "most harmful samples") + "</div>")
        if corrupted_of:
            parts.append("<p class='note'>* the sample's task is corrupted (ground truth).</p>")
    body = "".join(
        f"<tr><td>{s.task_id}</td><td>{'<b>yes</b>' if corrupted_of.get(s.task_id) else ('no' if corrupted_of else '–')}</td>"
        f"<td>{s.split}</td><td>{s.index}</td><td>{html.escape(label_text(s))}</td><td>{format_score(s.score)}</td></tr>"
        for s in rows
    )
    parts.append(
        "<table><tr><th>task</th><th>task corrupted</th><th>split</th><th>index</th><th>label</th><th>score</th></tr>"
        + body
        + "</table>"
    )
    return "\n".join(parts)


def _decision_table(run: RunFiles) -> str:
    rows = [(k, d) for k, r in enumerate(run.rounds) for d in r.decisions if d.action != "skip"]
    if not rows:
        return "<p>No pruning or re-weighting decisions.</p>"
    body = "".join(
        f"<tr><td>{k}</td><td>{d.step}</td><td>{d.epoch}</td><td>{html.escape(d.action)}</td>"
        f"<td>{html.escape(' '.join(str(t) for t in d.task_ids[:40]))}{' …' if len(d.task_ids) > 40 else ''}</td>"
        f"<td>{html.escape(d.reason)}</td></tr>"
        for k, d in rows
    )
    return (
        "<table><tr><th>round</th><th>step</th><th>epoch</th><th>action</th><th>task ids</th><th>reason</th></tr>"
        + body
        + "</table>"
    )


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:1.5em} h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px} h3{margin-bottom:4px}
table{border-collapse:collapse;font-size:.85em;margin:8px 0} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
tr.harmful td:first-child{color:#d62728} tr.helpful td:first-child{color:#2ca02c}
.kv td:first-child{font-weight:600} .plots img{max-width:100%;margin:6px 12px 6px 0;vertical-align:top}
.note{color:#666;font-size:.85em} .flag{color:#b8860b;font-size:.85em;white-space:nowrap}
"""


def render_report(
    runs: Mapping[str, RunFiles],
    summary: Mapping[str, Any] | None = None,
    *,
    title: str = "lightning-metaif report",
) -> str:
    """The HTML text of the report for ``runs`` (name → :class:`RunFiles`) and an optional demo ``summary``."""
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
        f"<p class='note'>Generated {time.strftime('%Y-%m-%d %H:%M:%S')} by lightning-metaif. Score = first-order "
        "predicted increase of the reference (validation) loss if the task were removed: negative = harmful, "
        "positive = helpful.</p>",
    ]
    class_names = _class_names(summary)
    if summary:
        parts.append(_summary_section(summary))
    cross = [p for p in (_detection_plot(runs), _auroc_per_round(runs)) if p]
    if cross:
        parts.append("<h2>Detection of corrupted tasks</h2><div class='plots'>" + "".join(cross) + "</div>")
    for name, run in runs.items():
        if not run.rounds:
            continue
        final = run.rounds[-1]
        parts.append(f"<h2>Run: {html.escape(name)}</h2>")
        parts.append(
            f"<p class='note'>{html.escape(str(run.directory))} · estimator <b>{html.escape(final.estimator)}</b> · "
            f"{len(run.rounds)} scoring rounds · {final.num_tasks} tasks · last round at step {final.step} · "
            f"{int(final.pruned.sum())} pruned</p>"
        )
        plots = [
            _histogram(final, f"{name}: final scores"),
            _top_bars(final, f"{name}: most harmful / most helpful tasks (last round)"),
        ]
        trajectory = _trajectories(run, f"{name}: scores over training")
        if trajectory:
            plots.append(trajectory)
        parts.append("<div class='plots'>" + "".join(plots) + "</div>")
        parts.append(
            "<h3>Most harmful and most helpful tasks (last round)</h3>"
            + _task_table(final, class_names=class_names, moved=rank_changes_after_pruning(run))
        )
        samples = _sample_section(run, class_names=class_names)
        if samples:
            parts.append(samples)
        parts.append("<h3>Decisions</h3>" + _decision_table(run))
    parts.append("</body></html>")
    return "\n".join(parts)


def _summary_section(summary: Mapping[str, Any]) -> str:
    out = ["<h2>Summary</h2>"]
    cfg = summary.get("config", {})
    rows = []
    if cfg:
        rows.append(
            (
                "set-up",
                f"MAML on digits, 5-way 1-shot, {cfg.get('num_tasks')} training tasks, "
                f"{len(summary.get('corrupted_task_ids', []))} corrupted (random labels), estimator "
                f"'{cfg.get('mode')}', {cfg.get('epochs')} epochs, seed {cfg.get('seed')}",
            )
        )
    det = summary.get("detection") or {}
    if det and det.get("auroc") is not None:
        rows.append(
            (
                "detection (run without pruning)",
                f"AUROC {_fmt(det.get('auroc'))} · recall@10% {_fmt(det.get('recall@10%'), '.2f')} · "
                f"@20% {_fmt(det.get('recall@20%'), '.2f')} · @40% {_fmt(det.get('recall@40%'), '.2f')}",
            )
        )
    pruned = summary.get("pruned_task_ids")
    if pruned is not None:
        rows.append(
            ("pruned", f"{len(pruned)} tasks, {summary.get('pruned_corrupted', 0)} of them corrupted")
        )
    acc = summary.get("accuracy")
    if acc:
        rows.append(
            (
                "meta-test accuracy",
                f"without pruning {_fmt(acc['without_pruning'], '.1%')} (s.e. "
                f"{_fmt(100 * acc.get('without_pruning_se', math.nan), '.1f')} points) · with pruning "
                f"{_fmt(acc['with_pruning'], '.1%')} (s.e. {_fmt(100 * acc.get('with_pruning_se', math.nan), '.1f')}"
                f" points) · difference {100 * acc['difference']:+.1f} points "
                f"(paired s.e. {100 * acc['difference_se']:.1f}; standard errors over the test batches)",
            )
        )
    seconds = summary.get("seconds") or {}
    if seconds:
        rows.append(("time (s)", " · ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in seconds.items())))
    out.append(
        "<table class='kv'>"
        + "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in rows)
        + "</table>"
    )
    if acc:
        out.append("<div class='plots'>" + _accuracy_plot(acc) + "</div>")
    return "\n".join(out)


def build_report(
    run_dir: str | os.PathLike[str],
    *,
    output: str | os.PathLike[str] | None = None,
    title: str | None = None,
) -> Path:
    """Write ``report.html`` for ``run_dir`` (default ``<run_dir>/report.html``) and return its path.

    ``run_dir`` is a demo output directory or any folder that holds (somewhere below it) the ``metaif/``
    score files of a run; every such folder becomes one section. ``summary.json`` (written by the demo) adds
    the accuracy comparison.

    Example:
        >>> import tempfile
        >>> build_report(tempfile.mkdtemp())
        Traceback (most recent call last):
        ...
        FileNotFoundError: no MetaInfluence score files (scores_round_*.csv) under ...
    """
    root = Path(run_dir)
    dirs = find_metaif_dirs(root)
    if not dirs:
        raise FileNotFoundError(
            f"no MetaInfluence score files (scores_round_*.csv) under {root}: pass the folder of a run that used "
            "the callback (they live in <trainer.log_dir>/metaif/)."
        )
    summary: dict[str, Any] | None = None
    summary_path = root / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
    runs: dict[str, RunFiles] = {}
    for d in dirs:
        rel = d.relative_to(root)
        name = str(rel.parent) if rel.name == "metaif" and str(rel.parent) != "." else str(rel)
        runs[name if name != "." else root.name] = load_run(d)
    if summary and summary.get("primary") in runs:
        primary = summary["primary"]
        runs = {primary: runs[primary], **{k: v for k, v in runs.items() if k != primary}}
    path = Path(output) if output is not None else root / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = render_report(runs, summary, title=title or f"lightning-metaif report: {root.resolve().name}")
    atomic_write(path, text)
    return path
