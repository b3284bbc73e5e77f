"""The demo's closing text, from its ``summary.json`` dictionary (plain Python: no torch import)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lightning_metaif.dashboards.text import format_classes, format_score


def format_summary(summary: dict[str, Any]) -> str:
    """The demo's closing text (readable in ten seconds)."""
    cfg, det, acc, sec = summary["config"], summary["detection"], summary["accuracy"], summary["seconds"]
    corrupted = summary["corrupted_task_ids"]
    lines = [
        "",
        "=" * 100,
        f"lightning-metaif demo  |  MAML, digits 5-way 1-shot  |  {cfg['num_tasks']} training tasks, "
        f"{len(corrupted)} corrupted (random labels)  |  estimator '{cfg['mode']}'  |  seed {cfg['seed']}",
        "=" * 100,
    ]

    names = {int(c): n for c, n in (summary.get("class_names") or {}).items()}
    out_dir = Path(cfg["output_dir"])

    def table(title: str, rows: list[dict[str, Any]]) -> list[str]:
        out = [title, f"  {'task':>6} {'score':>8}  {'corrupted':<9} {'pruned':<6} classes"]
        for r in rows:
            out.append(
                f"  {r['id']:>6} {format_score(r['score']):>8}  {'YES' if r.get('corrupted') else 'no':<9} "
                f"{'yes' if r.get('pruned_in_pruning_run') else '-':<6} {format_classes(r.get('classes'), names)}"
            )
        return out

    lines += table(
        "Most harmful tasks (lowest scores; run without pruning, all tasks trained to the end):",
        summary["most_harmful"],
    )
    lines += table("Most helpful tasks:", summary["most_helpful"])
    samples = summary.get("most_harmful_samples") or []
    if samples:
        lines.append(
            "Most harmful samples (instance influence of the most harmful tasks; images in the report and W&B):"
        )
        lines += [
            f"  task {r['task_id']:>3} {r['split']:<7}[{r['index']:>2}] score {format_score(r['score']):>8}  "
            f"label {r['label']}"
            + (f" ({format_classes([r['label_class']], names)})" if r.get("label_class") is not None else "")
            for r in samples
        ]
    if corrupted:
        m = len(corrupted)
        lines.append(
            f"Detection of the {m} corrupted tasks: AUROC {det['auroc']:.3f}  |  recall@10% {det['recall@10%']:.2f}"
            f"  @20% {det['recall@20%']:.2f}  @40% {det['recall@40%']:.2f}  "
            f"(random ranking: AUROC 0.5, recall@k = k)"
        )
    nonfinite = summary.get("num_nonfinite_scores", 0)
    if nonfinite:
        lines.append(
            f"WARNING: {nonfinite} tasks have no finite score (the estimator failed in some rounds; see the "
            "warnings above): they rank as least harmful and are never pruned."
        )
    n_pruned = len(summary["pruned_task_ids"])
    if n_pruned:
        rounds = summary["prune_rounds"]
        when = f"round{'s' if len(rounds) > 1 else ''} {', '.join(str(r) for r in rounds)}, counted from 0"
        line = f"Pruning: {n_pruned} tasks pruned ({when})"
        if corrupted:
            line += f", {summary['pruned_corrupted']} of them corrupted ({summary['pruned_corrupted'] / n_pruned:.0%})"
        if det.get("auroc_at_pruning") is not None:
            line += f"; AUROC when the last ones were pruned {det['auroc_at_pruning']:.3f}"
        lines.append(line)
    else:
        lines.append("Pruning: nothing was pruned (no task scored as harmful after the warm-up rounds)")
    verdict = (
        "helped"
        if acc["difference"] > 2 * acc["difference_se"]
        else ("hurt" if acc["difference"] < -2 * acc["difference_se"] else "made no clear difference")
    )
    lines.append(
        f"Meta-test accuracy ({acc['num_test_tasks']} unseen-class tasks; ± one standard error over the test "
        f"batches): without pruning {acc['without_pruning']:.1%} ± {acc['without_pruning_se']:.1%}  |  with "
        f"pruning {acc['with_pruning']:.1%} ± {acc['with_pruning_se']:.1%}  |  difference "
        f"{100 * acc['difference']:+.1f} points (paired s.e. {100 * acc['difference_se']:.1f}): pruning {verdict}"
    )
    lines.append(
        f"Time: data {sec['data']:.1f}s | training with pruning {sec['train_with_pruning']:.1f}s (tracing "
        f"{sec['trace_with_pruning']:.1f}s, scoring {sec['scoring_with_pruning']:.1f}s) | without pruning "
        f"{sec['train_without_pruning']:.1f}s | meta-test {sec['meta_test']:.1f}s | report "
        f"{sec.get('report', math.nan):.1f}s | total {sec.get('total', math.nan):.0f}s"
    )
    lines.append(f"Report: {out_dir / summary['report'] if summary.get('report') else None}")
    wandb_dirs = [out_dir / r["wandb"] for r in summary["runs"].values() if r.get("wandb")]
    if wandb_dirs:
        lines.append("W&B offline runs (upload with `wandb sync <dir>`):")
        lines += [f"  {d}" for d in wandb_dirs]
    else:
        lines.append(f"CSV logs and score files: {out_dir}/*/metaif/")
    lines.append("=" * 100)
    return "\n".join(lines)


__all__ = ["format_summary"]
