"""The robustness grid: the callback at its defaults, on runs it was not tuned for.

For every cell (task family x corrupted fraction x outer optimiser and learning rate x run length x seed), two
Lightning runs of the same MAML model from the same seed (paired), the two *parts* of the grid:

* ``score``: one run with several non-acting ``MetaInfluence`` callbacks at their defaults on the same Trainer
  (``"trajectory"``, the default estimator; ``"checkpoints"``; ``"task_if"``, Gauss-Newton with automatic
  damping; ``TraceTaskIF()``), told the corrupted task ids: the end-of-run detection AUROC of the corrupted
  tasks *per estimator* (lowest scores flagged; scikit-learn, from each callback's final round), the task-IF
  rounds that failed (solver error or non-finite scores) or did not converge, and the meta-test accuracy and
  query loss *without pruning*. Callbacks are told apart by their ``state_key`` (estimator name + seed).
  Non-acting callbacks do not change the training path (checked: a clean pool's pruning run that prunes
  nothing reproduces the score run's accuracy exactly).
* ``prune``: ``MetaInfluence(actions=[PruningPolicy()], ground_truth=...)``: pruning count and precision (share
  of the pruned tasks that are corrupted), restored tasks, and the meta-test accuracy and loss *with pruning*.

Families: digits (5-way 1-shot, MLP 64-32-5) and Gaussian mixtures (``gaussian_mixture_splits``, MLP 16-32-5);
corruption ``shuffle_query``; meta-test on 50 tasks of held-out classes (one inner step, as trained). A run is
"over-long" (``rising``) when its reference loss (the trajectory callback's, once per epoch) ends more than 2%
above its best.

Every finished cell part is appended as one JSON line to ``benchmarks/results/<name>.jsonl`` (with the load
averages and the code's commit); ``--resume`` skips the parts already there, so a run that dies loses only the
cells in flight. The summary, table and plot are computed from the JSONL (``--summary-only`` redoes just that).

Targets (issue: robust scores): AUROC >= 0.9 in every corrupted cell; pruning precision >= 0.85 on average and
>= 0.7 in the worst cell; accuracy with pruning >= without in >= 90% of corrupted cells and within 0.5 point on
clean cells; zero failed task-IF rounds.

Usage::

    python benchmarks/bench_robustness.py --quick      # 1 seed, 0/20%, 2 recipes, 10/40 epochs (< 15 min, 2 cores)
    python benchmarks/bench_robustness.py --full --workers 2 --resume --part score   # the scoring half
    python benchmarks/bench_robustness.py --full --workers 2 --resume --part prune   # the pruning half
    python benchmarks/bench_robustness.py --full --summary-only                      # table + plot from the JSONL
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import math
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import _common as C
import torch

RECIPES = {
    "sgd 0.5": ("sgd", 0.5),
    "sgd 0.2": ("sgd", 0.2),
    "adam 3e-3": ("adam", 3e-3),
    "adam 1e-3": ("adam", 1e-3),
}
FAMILIES = ("digits", "gaussian")
ESTIMATORS = ("trajectory", "checkpoints", "task_if", "task_if_trace")
TASK_IF = ("task_if", "task_if_trace")
KEY = ("family", "corrupt", "recipe", "epochs", "seed")


def family(name: str, seed: int, num_tasks: int):
    from lightning_metaif.meta.datasets import digits_splits, gaussian_mixture_splits

    if name == "digits":
        splits = digits_splits(num_train_tasks=num_tasks, num_val_tasks=20, num_test_tasks=50, seed=seed)
        return splits, lambda: torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5)
        )
    splits = gaussian_mixture_splits(
        num_train_tasks=num_tasks, num_val_tasks=20, num_test_tasks=50, seed=seed
    )
    return splits, lambda: torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5)
    )


def _auroc(influence, corruption, truth) -> float:
    from sklearn.metrics import roc_auc_score

    result = influence.result
    if not truth or result is None:
        return math.nan
    scored = (
        result.scored
        if getattr(result, "scored", None) is not None
        else torch.ones(len(result.task_ids), dtype=torch.bool)
    )
    ids, scores = result.task_ids[scored], result.scores[scored].double()
    positives = corruption.mask(ids)
    if not 0 < int(positives.sum()) < len(ids) or not torch.isfinite(scores).all():
        return math.nan
    return float(roc_auc_score(positives.numpy(), (-scores).numpy()))


def _estimator(name: str):
    from lightning_metaif.estimators import TraceTaskIF

    return TraceTaskIF() if name == "task_if_trace" else name


def run_part(job: dict) -> dict:
    """One part (``score`` or ``prune``) of one cell; runs in a worker process (1 torch thread)."""
    import lightning.pytorch as pl

    from lightning_metaif import MAML, MetaInfluence, PruningPolicy
    from lightning_metaif.meta.datamodule import MetaDataModule
    from lightning_metaif.meta.noise import corrupt_tasks

    torch.set_num_threads(1)
    started = time.perf_counter()
    load_start = C.load()
    splits, backbone = family(job["family"], job["seed"], job["tasks"])
    pool, corruption = corrupt_tasks(splits.train, job["corrupt"], mode="shuffle_query", seed=job["seed"])
    truth = corruption.task_ids.tolist()
    optimizer, lr = RECIPES[job["recipe"]]
    seed = job["seed"]
    pl.seed_everything(seed, verbose=False)
    if job["part"] == "score":
        callbacks = {
            name: MetaInfluence(
                _estimator(name),
                ground_truth=truth or None,
                verbose=False,
                seed=seed,
                every_n_epochs=job["every"].get(name),
            )
            for name in job["estimators"]
        }
        keys = {cb.state_key for cb in callbacks.values()}
        if len(keys) != len(callbacks):
            raise RuntimeError(f"callbacks share a state_key: {sorted(keys)}")
    else:
        callbacks = {
            "trajectory": MetaInfluence(
                actions=[PruningPolicy()], ground_truth=truth or None, verbose=False, seed=seed
            )
        }
    first = next(iter(callbacks.values()))
    dm = MetaDataModule(pool, splits.val, batch_size=10, seed=seed, task_state=first.task_state)
    maml = MAML(backbone(), inner_lr=0.5, outer_lr=lr, optimizer=optimizer, num_ways=5)
    _, seconds = C.fit_quietly(
        maml,
        dm,
        max_epochs=job["epochs"],
        callbacks=list(callbacks.values()),
        default_root_dir=tempfile.mkdtemp(),
    )
    acc, loss = C.meta_test(maml, splits.test.batch())
    out = {k: job[k] for k in KEY} | {"part": job["part"], "tasks": job["tasks"]}
    reference = [h.get("influence/reference_loss", math.nan) for h in callbacks["trajectory"].history]
    finite = [x for x in reference if math.isfinite(x)]
    out["rising"] = bool(finite) and finite[-1] > 1.02 * min(finite)
    out["reference_loss"] = [round(x, 5) for x in reference]
    out["held_at_end"] = bool(callbacks["trajectory"].history[-1].get("influence/scores_held", 0.0) > 0)
    if job["part"] == "score":
        out["state_keys"] = {name: cb.state_key for name, cb in callbacks.items()}
        out["acc_no_prune"], out["loss_no_prune"] = acc, loss
        for name, cb in callbacks.items():
            out[f"auroc_{name}"] = _auroc(cb, corruption, truth)
            out[f"rounds_{name}"] = len(cb.history)
            out[f"round_seconds_{name}"] = cb.timings["round_seconds"]
            out[f"trace_seconds_{name}"] = cb.timings["trace_seconds"]
            if name in TASK_IF:
                out[f"failed_{name}"] = sum(
                    1
                    for h in cb.history
                    if h.get("influence/solver_failed", 0.0) > 0
                    or not math.isfinite(h.get("influence/score_median", math.nan))
                )
                out[f"unconverged_{name}"] = sum(
                    1 for h in cb.history if h.get("influence/solver_converged", 1.0) == 0.0
                )
                residuals = [h.get("influence/solver_residual", math.nan) for h in cb.history]
                out[f"max_residual_{name}"] = max(
                    (r for r in residuals if math.isfinite(r)), default=math.nan
                )
        out["auroc"] = out.get("auroc_trajectory", math.nan)
    else:
        influence = callbacks["trajectory"]
        pruned = torch.tensor(sorted(influence.task_state.pruned), dtype=torch.long)
        out["acc_prune"], out["loss_prune"] = acc, loss
        out["pruned"] = len(pruned)
        out["precision"] = (
            float(corruption.mask(pruned).double().mean()) if len(pruned) and truth else math.nan
        )
        out["restored"] = sum(1 for d in influence.decisions if d.action == "restore")
        out["prune_epochs"] = sorted({int(d.epoch) for d in influence.decisions if d.action == "prune"})
    out["fit_seconds"] = seconds
    out["seconds"] = time.perf_counter() - started
    out["load_avg_start"], out["load_avg_end"] = load_start, C.load()
    out["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    out["pid"] = os.getpid()
    return out


def _safe_run_part(job: dict) -> dict:
    try:
        return run_part(job)
    except Exception:  # noqa: BLE001 - recorded as an error line; --resume retries it
        return {k: job[k] for k in KEY} | {"part": job["part"], "error": traceback.format_exc()}


def _init_worker() -> None:
    import warnings

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import logging

    import lightning.pytorch  # noqa: F401 - configures its loggers on import; quiet them after

    for name in (
        "lightning",
        "lightning.pytorch",
        "lightning.fabric",
        "lightning.pytorch.utilities.rank_zero",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("lightning_metaif").setLevel(logging.ERROR)


def _key(row: dict) -> tuple:
    return tuple(row[k] for k in KEY)


def read_jsonl(path: Path) -> tuple[list[dict], list[dict]]:
    """(run headers, cell-part lines without errors); a last line cut by a crash is ignored."""
    runs, parts = [], []
    if not path.exists():
        return runs, parts
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("type") == "run":
            runs.append(row)
        elif "error" not in row:
            parts.append(row)
    return runs, parts


def append_jsonl(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row, default=C._jsonable) + "\n")
        f.flush()
        os.fsync(f.fileno())


def merge(parts: list[dict]) -> list[dict]:
    """One row per cell: the latest score part and the latest prune part, paired (old rows' keys kept)."""
    by_key: dict[tuple, dict] = {}
    for p in parts:
        entry = by_key.setdefault(_key(p), {k: p[k] for k in KEY})
        entry[p["part"]] = p
    rows = []
    for entry in by_key.values():
        score, prune = entry.get("score"), entry.get("prune")
        row = {k: entry[k] for k in KEY}
        if score is not None:
            row.update({k: v for k, v in score.items() if k not in KEY and k != "part"})
        if prune is not None:
            for k in ("acc_prune", "loss_prune", "pruned", "precision", "restored", "prune_epochs"):
                row[k] = prune[k]
            if score is None:
                row["rising"] = prune["rising"]
        if score is not None and prune is not None:
            row["delta_acc"] = prune["acc_prune"] - score["acc_no_prune"]
            row["delta_loss"] = prune["loss_prune"] - score["loss_no_prune"]
            row["seconds"] = score["seconds"] + prune["seconds"]
        rows.append(row)
    order = {name: i for i, name in enumerate(RECIPES)}
    rows.sort(key=lambda r: (r["family"], r["corrupt"], order.get(r["recipe"], 9), r["epochs"], r["seed"]))
    return rows


def finite(values) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def mean(values) -> float:
    values = finite(values)
    return sum(values) / len(values) if values else math.nan


def worst(values) -> float:
    return min(finite(values), default=math.nan)


def summarise(rows: list[dict], estimators=ESTIMATORS) -> tuple[list[dict], list[dict]]:
    order = {name: i for i, name in enumerate(RECIPES)}
    keys = sorted(
        {(r["family"], r["corrupt"], r["recipe"], r["epochs"]) for r in rows},
        key=lambda k: (k[0], k[1], order.get(k[2], 9), k[3]),
    )
    cells = []
    for fam, corrupt, recipe, epochs in keys:
        sub = [
            r
            for r in rows
            if (r["family"], r["corrupt"], r["recipe"], r["epochs"]) == (fam, corrupt, recipe, epochs)
        ]
        entry = {
            "family": fam,
            "corrupt": f"{corrupt:.0%}",
            "recipe": recipe,
            "epochs": epochs,
            "seeds": len(sub),
            "rising": sum(bool(r.get("rising")) for r in sub),
            "auroc": mean(r.get("auroc", math.nan) for r in sub),
            "auroc_min": worst(r.get("auroc", math.nan) for r in sub),
        }
        for name in estimators:
            if any(f"auroc_{name}" in r for r in sub):
                entry[f"auroc_{name}"] = mean(r.get(f"auroc_{name}", math.nan) for r in sub)
                entry[f"auroc_{name}_min"] = worst(r.get(f"auroc_{name}", math.nan) for r in sub)
        # accuracy and loss with / without pruning over the same (paired) seeds, when there are any
        both = [r for r in sub if "delta_acc" in r] or sub
        entry.update(
            pruned=mean(r.get("pruned", math.nan) for r in sub),
            precision=mean(r.get("precision", math.nan) for r in sub),
            precision_min=worst(r.get("precision", math.nan) for r in sub),
            restored=mean(r.get("restored", math.nan) for r in sub),
            acc_no_prune=mean(r.get("acc_no_prune", math.nan) for r in both),
            acc_prune=mean(r.get("acc_prune", math.nan) for r in both),
            delta_acc=mean(r.get("delta_acc", math.nan) for r in sub),
            loss_no_prune=mean(r.get("loss_no_prune", math.nan) for r in both),
            loss_prune=mean(r.get("loss_prune", math.nan) for r in both),
            paired=sum("delta_acc" in r for r in sub),
        )
        for name in TASK_IF:
            if any(f"failed_{name}" in r for r in sub):
                entry[f"failed_{name}"] = sum(r.get(f"failed_{name}", 0) for r in sub)
                entry[f"unconverged_{name}"] = sum(r.get(f"unconverged_{name}", 0) for r in sub)
                entry[f"rounds_{name}"] = sum(r.get(f"rounds_{name}", 0) for r in sub)
        cells.append(entry)
    return cells, targets(rows, cells, estimators)


def targets(rows: list[dict], cells: list[dict], estimators=ESTIMATORS) -> list[dict]:
    corrupted = [r for r in rows if r["corrupt"] > 0]
    clean = [r for r in rows if r["corrupt"] == 0]
    corrupted_cells = [c for c in cells if c["corrupt"] != "0%"]
    clean_cells = [c for c in cells if c["corrupt"] == "0%"]
    out = []
    for name in estimators:
        values = finite(r.get(f"auroc_{name}", math.nan) for r in corrupted)
        if not values and name != "trajectory":
            continue
        if not values:  # rows of the old format
            values = finite(r.get("auroc", math.nan) for r in corrupted)
        cell_means = finite(
            c.get(f"auroc_{name}", c["auroc"] if name == "trajectory" else math.nan) for c in corrupted_cells
        )
        out.append(
            {
                "target": f"end-of-run AUROC >= 0.9 in every corrupted cell ({name}"
                + (", the default)" if name == "trajectory" else ")"),
                "result": f"cells (mean over seeds) >= 0.9: {sum(v >= 0.9 for v in cell_means)}/{len(cell_means)}; "
                f"runs >= 0.9: {sum(v >= 0.9 for v in values)}/{len(values)}; mean {mean(values):.3f}, worst run "
                f"{worst(values):.3f}",
            }
        )
    precisions = finite(r.get("precision", math.nan) for r in corrupted)
    cell_precisions = finite(c["precision"] for c in corrupted_cells)
    out.append(
        {
            "target": "pruning precision >= 0.85 on average, >= 0.7 in the worst cell",
            "result": f"mean {mean(precisions):.3f} over {len(precisions)} corrupted runs that pruned (of "
            f"{sum('pruned' in r for r in corrupted)}); worst cell {worst(cell_precisions):.3f}, worst run "
            f"{worst(precisions):.3f}",
        }
    )
    paired = [r for r in corrupted if "delta_acc" in r]
    paired_cells = [c for c in corrupted_cells if math.isfinite(c["delta_acc"])]
    out.append(
        {
            "target": "accuracy with pruning >= without in >= 90% of corrupted cells",
            "result": f"cells (mean over seeds): {sum(c['delta_acc'] >= 0 for c in paired_cells)}/{len(paired_cells)}; "
            f"runs: {sum(r['delta_acc'] >= 0 for r in paired)}/{len(paired)}; mean change "
            f"{100 * mean(r['delta_acc'] for r in paired):+.2f} points",
        }
    )
    paired = [r for r in clean if "delta_acc" in r]
    paired_cells = [c for c in clean_cells if math.isfinite(c["delta_acc"])]
    out.append(
        {
            "target": "within 0.5 point on clean cells",
            "result": f"cells: {sum(abs(c['delta_acc']) <= 0.005 for c in paired_cells)}/{len(paired_cells)}; runs: "
            f"{sum(abs(r['delta_acc']) <= 0.005 for r in paired)}/{len(paired)}, mean change "
            f"{100 * mean(r['delta_acc'] for r in paired):+.2f} points, "
            f"{sum(r.get('pruned', 0) > 0 for r in paired)} runs pruned something",
        }
    )
    for name in TASK_IF:
        if any(f"failed_{name}" in r for r in rows):
            out.append(
                {
                    "target": f"zero failed task-IF rounds ({name})",
                    "result": f"{sum(r.get(f'failed_{name}', 0) for r in rows)} failed of "
                    f"{sum(r.get(f'rounds_{name}', 0) for r in rows)} rounds in {sum(f'failed_{name}' in r for r in rows)} "
                    f"runs; {sum(r.get(f'unconverged_{name}', 0) for r in rows)} rounds did not converge",
                }
            )
    if rows and "task_if_failed" in rows[0]:  # rows of the old format
        out.append(
            {
                "target": "zero failed task-IF rounds",
                "result": f"{sum(r['task_if_failed'] for r in rows)} of {sum(r['task_if_rounds'] for r in rows)}",
            }
        )
    return out


def markdown(cells: list[dict], estimators=ESTIMATORS) -> str:
    """The per-cell table as BENCHMARKS.md prints it (AUROC: mean over seeds, worst seed in brackets)."""

    def num(value: float, fmt: str = ".3f") -> str:
        return "–" if not math.isfinite(value) else format(value, fmt)

    def auroc(cell: dict, est: str) -> str:
        mean_, worst_ = cell.get(f"auroc_{est}", math.nan), cell.get(f"auroc_{est}_min", math.nan)
        if not math.isfinite(mean_):
            return "–"
        return f"{mean_:.3f}" if cell["seeds"] == 1 or est in TASK_IF else f"{mean_:.3f} ({worst_:.3f})"

    shown = [e for e in estimators if any(f"auroc_{e}" in c for c in cells)]
    header = ["family", "corrupted", "outer", "epochs", "seeds", "rising"]
    header += [f"AUROC {e}" for e in shown]
    header += ["pruned", "precision (worst)", "restored", "acc. without", "acc. with", "change (points)"]
    header += ["loss without", "loss with", "task-IF failed / not converged"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c in cells:
        change = 100 * c["delta_acc"]
        change_text = "–" if not math.isfinite(change) else f"{change:+.1f}".replace("-", "−")
        if math.isfinite(change) and change < 0 and c["corrupt"] != "0%":
            change_text = f"**{change_text}**"
        if math.isfinite(change) and abs(change) > 0.5 and c["corrupt"] == "0%":
            change_text = f"**{change_text}**"
        failed = [
            f"{c[f'failed_{n}']}/{c[f'unconverged_{n}']} of {c[f'rounds_{n}']}"
            for n in TASK_IF
            if f"failed_{n}" in c
        ]
        precision = "–"
        if math.isfinite(c["precision"]):
            precision = f"{c['precision']:.3f} ({c['precision_min']:.3f})"
        row = [
            c["family"],
            c["corrupt"],
            c["recipe"],
            str(c["epochs"]),
            str(c["seeds"]),
            f"{c['rising']}/{c['seeds']}",
            *[auroc(c, e) for e in shown],
            num(c["pruned"], ".1f"),
            precision,
            num(c["restored"], ".1f"),
            num(c["acc_no_prune"]),
            num(c["acc_prune"]),
            change_text,
            num(c["loss_no_prune"]),
            num(c["loss_prune"]),
            ", ".join(failed) or "–",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(cells: list[dict], name: str, estimators=ESTIMATORS) -> None:
    plt = C.figure(name)
    corrupted = [c for c in cells if c["corrupt"] != "0%"]
    fig, axes = plt.subplots(1, 2, figsize=(12, max(4.0, 0.16 * len(cells) + 1)))
    labels = [f"{c['family'][:3]} {c['corrupt']} {c['recipe']} {c['epochs']}ep" for c in corrupted]
    shown = [n for n in estimators if any(f"auroc_{n}" in c for c in corrupted)] or ["trajectory"]
    height = 0.8 / len(shown)
    for i, est in enumerate(shown):
        values = [c.get(f"auroc_{est}", c["auroc"] if est == "trajectory" else math.nan) for c in corrupted]
        axes[0].barh([j + i * height for j in range(len(corrupted))], values, height=height, label=est)
    axes[0].set_yticks([j + 0.4 - height / 2 for j in range(len(corrupted))], labels)
    axes[0].axvline(0.9, color="red", ls="--", lw=1)
    axes[0].set_xlim(0, 1)
    axes[0].set_xlabel("end-of-run AUROC (corrupted tasks, mean over seeds)")
    axes[0].tick_params(axis="y", labelsize=6)
    axes[0].legend(fontsize=6, loc="lower left")
    labels = [f"{c['family'][:3]} {c['corrupt']} {c['recipe']} {c['epochs']}ep" for c in cells]
    axes[1].barh(labels, [100 * c["delta_acc"] for c in cells])
    axes[1].axvline(0, color="black", lw=1)
    axes[1].set_xlabel("meta-test accuracy with - without pruning (points, mean over seeds)")
    axes[1].tick_params(axis="y", labelsize=6)
    C.save_figure(plt, name)


def _commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "log", "-1", "--format=%h %s"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return head + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick", action="store_true", help="1 seed, 0/20%%, 2 recipes, 10/40 epochs (default)"
    )
    mode.add_argument("--full", action="store_true", help="3 seeds, 0/20/40%%, 4 recipes, 10/60 epochs")
    parser.add_argument("--part", choices=("score", "prune", "all"), default="all", help="which half to run")
    parser.add_argument(
        "--workers", type=int, default=2, help="worker processes (spawn, 1 torch thread each)"
    )
    parser.add_argument("--resume", action="store_true", help="skip the cell parts already in the JSONL")
    parser.add_argument("--summary-only", action="store_true", help="only the summary, table and plot")
    parser.add_argument("--estimators", nargs="+", choices=ESTIMATORS, default=None)
    parser.add_argument(
        "--task-if-every",
        type=int,
        default=None,
        help="every_n_epochs of the task-IF callbacks (0: one round at the end)",
    )
    parser.add_argument(
        "--task-if-seeds",
        nargs="+",
        type=int,
        default=[0],
        help="seeds whose score runs include the task-IF callbacks (their rounds cost 10-30 training epochs)",
    )
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--corrupt", nargs="+", type=float, default=None)
    parser.add_argument("--recipes", nargs="+", choices=tuple(RECIPES), default=None)
    parser.add_argument("--lengths", nargs="+", type=int, default=None)
    parser.add_argument(
        "--limit", type=int, default=None, help="run at most this many cell parts (smoke tests)"
    )
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--name", default=None, help="output name (default bench_robustness[_quick])")
    parser.add_argument("--jsonl", default=None, help="the cells' JSONL (default results/<name>.jsonl)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    C.set_threads(args.threads)
    if args.full:
        grid = dict(corrupt=(0.0, 0.2, 0.4), recipes=tuple(RECIPES), lengths=(10, 60), seeds=(0, 1, 2))
        estimators = tuple(args.estimators or ESTIMATORS)
        every = args.task_if_every if args.task_if_every is not None else 0
    else:
        grid = dict(corrupt=(0.0, 0.2), recipes=("sgd 0.5", "adam 3e-3"), lengths=(10, 40), seeds=(0,))
        estimators = tuple(args.estimators or ESTIMATORS)
        every = args.task_if_every if args.task_if_every is not None else 0
    if args.corrupt is not None:
        grid["corrupt"] = tuple(args.corrupt)
    if args.recipes is not None:
        grid["recipes"] = tuple(args.recipes)
    if args.lengths is not None:
        grid["lengths"] = tuple(args.lengths)
    if args.seeds is not None:
        grid["seeds"] = tuple(args.seeds)
    if "trajectory" not in estimators:
        estimators = ("trajectory", *estimators)
    grid["task_if_seeds"] = tuple(args.task_if_seeds)
    grid.update(
        families=tuple(args.families), estimators=estimators, task_if_every_n_epochs=every, tasks=args.tasks
    )
    name = args.name or ("bench_robustness" if args.full else "bench_robustness_quick")
    path = Path(args.jsonl) if args.jsonl else C.RESULTS / f"{name}.jsonl"
    parts = ("score", "prune") if args.part == "all" else (args.part,)

    if not args.summary_only:
        env = C.environment() | {"type": "run", "code": _commit(), "workers": args.workers, "grid": grid}
        if not args.resume and path.exists():
            path.rename(path.with_suffix(f".jsonl.{int(time.time())}.bak"))
        append_jsonl(path, env)
        _, done_parts = read_jsonl(path)
        done = {(_key(p), p["part"]) for p in done_parts}
        jobs = []
        # seed-major (a grid cut short still covers every cell once), long runs first within a seed
        for seed, fam, corrupt, recipe, epochs in itertools.product(
            grid["seeds"],
            grid["families"],
            grid["corrupt"],
            grid["recipes"],
            sorted(grid["lengths"], reverse=True),
        ):
            for part in parts:
                job = dict(
                    family=fam,
                    corrupt=corrupt,
                    recipe=recipe,
                    epochs=epochs,
                    seed=seed,
                    part=part,
                    tasks=args.tasks,
                    estimators=tuple(
                        n for n in estimators if n not in TASK_IF or seed in grid["task_if_seeds"]
                    ),
                    # 0 = one task-IF round, at the end of the run (their scores are the latest round's)
                    every={n: (every or epochs) for n in TASK_IF if every != 1},
                )
                if (_key(job), part) not in done:
                    jobs.append(job)
        if args.limit is not None:
            jobs = jobs[: args.limit]
        print(
            f"{len(jobs)} cell parts to run ({len(done)} already in {path.name}), {args.workers} workers",
            flush=True,
        )
        start = time.perf_counter()
        if args.workers == 1:
            _init_worker()
            results = map(_safe_run_part, jobs)
            pool = None
        else:
            pool = multiprocessing.get_context("spawn").Pool(
                args.workers, initializer=_init_worker, maxtasksperchild=8
            )
            results = pool.imap_unordered(_safe_run_part, jobs)
        try:
            for i, row in enumerate(results, 1):
                append_jsonl(path, row)
                what = " ".join(str(row[k]) for k in (*KEY, "part"))
                if "error" in row:
                    print(f"[{i}/{len(jobs)}] {what}: ERROR\n{row['error']}", flush=True)
                else:
                    aurocs = " ".join(f"{k[6:]}={row[k]:.3f}" for k in row if k.startswith("auroc_"))
                    extra = (
                        aurocs
                        if row["part"] == "score"
                        else f"pruned={row['pruned']} precision={row['precision']:.3f}"
                    )
                    print(
                        f"[{i}/{len(jobs)}] {what}: {row['seconds']:.0f} s, load {row['load_avg_end']}, {extra} "
                        f"({time.perf_counter() - start:.0f} s so far)",
                        flush=True,
                    )
        finally:
            if pool is not None:
                pool.close()
                pool.join()

    runs, parts_done = read_jsonl(path)
    rows = merge(parts_done)
    if not rows:
        print(f"no finished cells in {path}")
        return
    cells, goals = summarise(rows, estimators)
    columns = ["family", "corrupt", "recipe", "epochs", "seeds", "rising"]
    columns += [k for k in cells[0] if k.startswith("auroc_") and not k.endswith("_min")]
    columns += [
        "pruned",
        "precision",
        "acc_no_prune",
        "acc_prune",
        "delta_acc",
        "loss_no_prune",
        "loss_prune",
    ]
    columns += [k for k in cells[0] if k.startswith("failed_")]
    print("\nPer cell (mean over seeds; rising = runs whose reference loss ended > 2% above its best)")
    print(C.table(cells, columns=[c for c in columns if c in cells[0]], floatfmt=".3f"))
    print("\nTargets")
    print(C.table(goals))
    environment = dict(runs[0]) if runs else C.environment()
    environment.pop("type", None)
    environment["runs"] = [
        {k: r.get(k) for k in ("command", "date", "code", "workers", "load_avg_start")} for r in runs
    ]
    loads = [p["load_avg_end"][0] for p in parts_done if p.get("load_avg_end")]
    environment["load_avg_1min_over_cells"] = [min(loads), mean(loads), max(loads)] if loads else []
    environment["jsonl"] = path.name
    C.save(name, {"environment": environment, "grid": grid, "rows": rows, "cells": cells, "targets": goals})
    table = markdown(cells, estimators)
    (C.RESULTS / f"{name}_table.md").write_text(table + "\n")
    plot(cells, name, estimators)


if __name__ == "__main__":
    sys.exit(main())
