"""Log scoring rounds to Weights & Biases (tables, bar charts, histogram, line series, harmful-sample images).

Everything of one round goes into a single ``run.log({...})`` call that carries ``"trainer/global_step"`` (the
step metric ``WandbLogger`` defines); ``step=`` is never passed, so W&B's own monotonically increasing ``_step``
cannot drop rows logged out of order. ``wandb`` is imported lazily (``pip install "lightning-metaif[wandb]"``).

Keys written per round (``prefix="influence"``), as they appear in the run history:

* scalars from :func:`round_metrics` (``influence/score_median``, ``influence/auroc``, ...);
* ``influence/tasks``: table of every task (``id, score, self_influence, rank, weight, pruned, classes,
  corrupted``); when M > ``max_table_rows`` (W&B cuts tables at 10,000 rows *silently*) it holds the
  ``summary_rows`` most harmful and most helpful finite-score tasks with a ``part`` column, and
  ``influence/tasks_capped`` = 1, ``influence/tasks_total``, ``influence/tasks_logged`` say so; the full CSV is
  then logged as an artifact of type ``"influence-scores"``;
* ``influence/top_harmful_table``, ``influence/top_helpful_table``: the data tables of two ``wandb.plot.bar``
  charts (the chart specs land in the run config under ``_wandb.visualize.influence/top_harmful`` ...);
* ``influence/score_hist_table``: data of a ``wandb.plot.histogram`` (finite scores; above ``max_table_rows``
  an evenly spaced set of order statistics, flagged by ``influence/score_hist_subsampled`` = 1), plus
  ``influence/score_distribution``, a native ``wandb.Histogram`` over all finite scores;
* ``influence/score_stats_table``: data of a ``wandb.plot.line_series`` of the score quantiles over training
  (and ``influence/detection_table`` for AUROC / recall@k when ground truth is known);
* ``influence/harmful_samples``: table of the most harmful samples, with a ``wandb.Image`` column when inputs
  are images.
"""

from __future__ import annotations

import importlib
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_metaif.dashboards.files import scores_csv_text
from lightning_metaif.dashboards.metrics import QUANTILES, round_metrics
from lightning_metaif.records import ScoreRound

__all__ = ["WandbDashboard", "require_wandb", "image_to_array", "WANDB_EXTRA_HINT"]

WANDB_EXTRA_HINT = 'pip install "lightning-metaif[wandb]"'
TASK_COLUMNS = ["id", "score", "self_influence", "rank", "weight", "pruned", "classes", "corrupted"]


def require_wandb() -> Any:
    """Import and return ``wandb``, or raise an ImportError that names the extra to install."""
    try:
        return importlib.import_module("wandb")
    except ImportError as err:
        raise ImportError(
            f"WandbDashboard needs the `wandb` package, which is not installed: run `{WANDB_EXTRA_HINT}`"
        ) from err


def _bar_label(round: ScoreRound, position: int) -> str:
    """``"task 22"``, marked ``[pruned]`` and ``[corrupted]`` (when ground truth is known) so bar charts show them."""
    label = f"task {int(round.task_ids[position])}"
    if bool(round.pruned[position]):
        label += " [pruned]"
    if round.corrupted is not None and bool(round.corrupted[position]):
        label += " [corrupted]"
    return label


def image_to_array(image: Tensor, *, min_side: int = 32) -> Any:
    """Turn ``[H,W]``, ``[1,H,W]``, ``[3,H,W]`` or ``[H,W,3]`` into a uint8 numpy array for ``wandb.Image``.

    Values are min-max scaled per image (digits come in 0..16, normalised inputs around 0); small images (8x8)
    are enlarged by an integer nearest-neighbour factor so the smaller side reaches ``min_side``.

    Example:
        >>> image_to_array(torch.arange(64.0).reshape(8, 8)).shape
        (32, 32)
        >>> image_to_array(torch.rand(3, 28, 28)).shape
        (56, 56, 3)
    """
    x = image.detach().to("cpu", torch.float32)
    if x.dim() == 3 and x.shape[0] in (1, 3) and x.shape[-1] not in (1, 3):
        x = x.permute(1, 2, 0)
    elif x.dim() == 3 and x.shape[0] in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(1, 2, 0) if x.shape[0] <= x.shape[-1] else x  # tiny ambiguous case: channels first
    if x.dim() == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.dim() not in (2, 3) or (x.dim() == 3 and x.shape[-1] != 3):
        raise ValueError(
            f"cannot show an image of shape {tuple(image.shape)}: expected [H,W], [1,H,W], [3,H,W] or [H,W,3]"
        )
    lo, hi = float(x.min()), float(x.max())
    x = (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)
    factor = max(1, math.ceil(min_side / min(x.shape[0], x.shape[1])))
    if factor > 1:
        x = x.repeat_interleave(factor, 0).repeat_interleave(factor, 1)
    return (x * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def _is_image(t: Tensor | None) -> bool:
    if t is None:
        return False
    if t.dim() == 2:
        return True
    return t.dim() == 3 and (t.shape[0] in (1, 3) or t.shape[-1] in (1, 3))


def _json_number(v: Any) -> Any:
    # W&B writes NaN/inf as bare tokens into table JSON; keep them as strings so the file stays valid JSON
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class WandbDashboard:
    """Log :class:`ScoreRound` objects to a W&B run.

    Args:
        logger: a ``lightning.pytorch.loggers.WandbLogger`` (its ``.experiment`` is used) or a raw wandb run.
        prefix: namespace of every key.
        top_k: bars in each of the top-helpful / top-harmful bar charts.
        max_table_rows: largest task table logged as is (W&B's cap is 10,000 rows).
        summary_rows: rows from each end of the ranking in the capped summary table.
        artifact: ``"capped"`` (full CSV as an artifact only when the task table is capped), ``"always"``,
            ``"never"`` (not allowed together with capping: nothing is cut silently).
        max_samples: rows of the most-harmful-samples table.
        step_key: the step metric logged with every round.

    Example:
        >>> import wandb, tempfile
        >>> run = wandb.init(project="doc", dir=tempfile.mkdtemp(), mode="offline")  # doctest: +SKIP
        >>> dash = WandbDashboard(run)  # doctest: +SKIP
        >>> dash.log_round(ScoreRound(step=1, epoch=0, estimator="tracin", task_ids=torch.arange(3),
        ...                           scores=torch.tensor([0.1, -0.2, 0.3])))  # doctest: +SKIP
        >>> wandb.finish()  # doctest: +SKIP
    """

    def __init__(
        self,
        logger: Any,
        *,
        prefix: str = "influence",
        top_k: int = 10,
        max_table_rows: int = 10_000,
        summary_rows: int = 5_000,
        artifact: str = "capped",
        max_samples: int = 32,
        step_key: str = "trainer/global_step",
        every_n_rounds: int = 1,
    ) -> None:
        self.wandb = require_wandb()
        if not isinstance(every_n_rounds, int) or every_n_rounds < 1:
            raise ValueError(f"every_n_rounds must be a positive integer, got {every_n_rounds!r}")
        if artifact not in ("capped", "always", "never"):
            raise ValueError(f"artifact must be 'capped', 'always' or 'never', got {artifact!r}")
        if 2 * summary_rows > max_table_rows:
            raise ValueError(
                f"summary_rows={summary_rows} from each end makes {2 * summary_rows} rows, more than "
                f"max_table_rows={max_table_rows}: lower summary_rows to at most {max_table_rows // 2}"
            )
        if top_k < 1 or max_samples < 1:
            raise ValueError("top_k and max_samples must be at least 1")
        self.logger = logger
        self.prefix = prefix
        self.top_k = top_k
        self.max_table_rows = max_table_rows
        self.summary_rows = summary_rows
        self.artifact = artifact
        self.max_samples = max_samples
        self.step_key = step_key
        self.every_n_rounds = every_n_rounds
        self.rounds_seen = 0
        self.last_skipped = False
        self.history: list[dict[str, float]] = []
        self._defined = False

    @property
    def run(self) -> Any:
        """The wandb run (``logger.experiment`` for a Lightning logger)."""
        return self.logger.experiment if hasattr(self.logger, "experiment") else self.logger

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def log_round(
        self,
        round: ScoreRound,
        history: Sequence[Mapping[str, float]] | None = None,
        *,
        metrics: Mapping[str, float] | None = None,
        scalars: bool = True,
        final: bool = False,
    ) -> dict[str, Any]:
        """Log one round; return the dict passed to ``run.log`` (charts as W&B objects).

        ``scalars=False`` leaves the round's scalars out (the Lightning logger already logged them once).
        Tables and charts (each one a W&B artifact) are logged every ``every_n_rounds`` rounds, the first and
        ``final`` rounds always.

        ``history`` is the list of earlier rounds' :func:`round_metrics` dicts (they carry ``{prefix}/step``);
        when ``None`` the dashboard uses the rounds it logged itself. The current round is appended to it.
        """
        run = self.run
        if not self._defined and not hasattr(self.logger, "experiment") and hasattr(run, "define_metric"):
            run.define_metric(self.step_key)
            run.define_metric(f"{self.prefix}/*", step_metric=self.step_key)
        self._defined = True
        current = dict(round_metrics(round, prefix=self.prefix) if metrics is None else metrics)
        series = list(self.history if history is None else history)
        step_key = self._key("step")
        if not series or series[-1].get(step_key) != current.get(step_key):
            series.append(current)
        if history is None:
            self.history = series

        data: dict[str, Any] = {k: v for k, v in current.items()} if scalars else {}
        self.rounds_seen += 1
        self.last_skipped = not (final or (self.rounds_seen - 1) % self.every_n_rounds == 0)
        if not self.last_skipped:
            data.update(self._task_table(round))
            data.update(self._bars(round))
            data.update(self._histogram(round))
            data.update(self._lines(series))
            data.update(self._samples(round))
        if not data:
            return data
        data[self.step_key] = round.step
        run.log(data)
        return data

    # -- pieces ---------------------------------------------------------------------------------------------

    def _task_table(self, round: ScoreRound) -> dict[str, Any]:
        wandb = self.wandb
        rows = round.to_rows()
        m = len(rows)
        capped = m > self.max_table_rows
        out: dict[str, Any] = {self._key("tasks_total"): m, self._key("tasks_capped"): int(capped)}

        def cells(row: dict[str, Any]) -> list[Any]:
            return [
                _json_number(row[c]) if c in ("score", "self_influence") else row[c] for c in TASK_COLUMNS
            ]

        if not capped:
            table = wandb.Table(columns=TASK_COLUMNS, data=[cells(r) for r in rows], allow_mixed_types=True)
            out[self._key("tasks_logged")] = m
        else:
            order = [p for p in round.order().tolist() if rows[p]["rank"] is not None]
            n = min(self.summary_rows, len(order) // 2 + len(order) % 2)
            harmful = order[:n]
            helpful = [p for p in reversed(order[n:])][: self.summary_rows]
            data = [[*cells(rows[p]), "most_harmful"] for p in harmful]
            data += [[*cells(rows[p]), "most_helpful"] for p in helpful]
            table = wandb.Table(columns=[*TASK_COLUMNS, "part"], data=data, allow_mixed_types=True)
            out[self._key("tasks_logged")] = len(data)
            out[self._key("tasks_note")] = (
                f"{m} tasks exceed the {self.max_table_rows}-row table cap: table holds the {len(harmful)} most "
                f"harmful and {len(helpful)} most helpful finite-score tasks ({m - len(data)} left out, "
                f"{m - len(order)} non-finite); all {m} rows are in the 'influence-scores' artifact"
            )
        out[self._key("tasks")] = table
        if self.artifact == "always" or (capped and self.artifact == "capped"):
            out[self._key("tasks_artifact")] = self._log_artifact(round)
        elif capped:
            raise ValueError(
                f"{m} tasks exceed max_table_rows={self.max_table_rows} and artifact='never': the full scores "
                "would be cut; use artifact='capped' or raise max_table_rows"
            )
        return out

    def _log_artifact(self, round: ScoreRound) -> str:
        wandb = self.wandb
        name = f"{self.prefix}-scores".replace("/", "-")
        artifact = wandb.Artifact(
            name,
            type="influence-scores",
            description="Scores of every task of one scoring round (rank 1 = most harmful)",
            metadata={
                "step": round.step,
                "epoch": round.epoch,
                "estimator": round.estimator,
                "num_tasks": round.num_tasks,
            },
        )
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"scores_step_{round.step:08d}.csv")
            with open(path, "w", encoding="utf-8", newline="") as fh:
                fh.write(scores_csv_text(round))
            artifact.add_file(path, name=os.path.basename(path))  # copied to W&B staging before returning
            self.run.log_artifact(artifact, aliases=[f"step-{round.step}", "latest"])
        return f"{name}:step-{round.step}"

    def _bars(self, round: ScoreRound) -> dict[str, Any]:
        wandb = self.wandb
        order = [p for p in round.order().tolist() if math.isfinite(float(round.scores[p]))]
        scores = round.scores.tolist()
        k = min(self.top_k, len(order))
        harmful = order[:k]
        helpful = list(reversed(order))[:k]
        out = {}
        for name, picks, title in (
            ("top_harmful", harmful, f"{k} most harmful tasks (lowest score)"),
            ("top_helpful", helpful, f"{k} most helpful tasks (highest score)"),
        ):
            table = wandb.Table(
                columns=["task", "score"], data=[[_bar_label(round, p), scores[p]] for p in picks]
            )
            out[self._key(name)] = wandb.plot.bar(table, "task", "score", title=title)
        return out

    def _histogram(self, round: ScoreRound) -> dict[str, Any]:
        wandb = self.wandb
        finite = round.scores[torch.isfinite(round.scores)]
        values = torch.sort(finite).values
        subsampled = values.numel() > self.max_table_rows
        if subsampled:  # evenly spaced order statistics keep the shape of the distribution
            idx = torch.linspace(0, values.numel() - 1, self.max_table_rows).round().long()
            values = values[idx]
        table = wandb.Table(columns=["score"], data=[[v] for v in values.tolist()])
        out: dict[str, Any] = {
            self._key("score_hist"): wandb.plot.histogram(table, "score", title="Task influence scores"),
            self._key("score_hist_subsampled"): int(subsampled),
        }
        if finite.numel():
            out[self._key("score_distribution")] = wandb.Histogram(finite.numpy(), num_bins=64)
        return out

    def _lines(self, series: Sequence[Mapping[str, float]]) -> dict[str, Any]:
        wandb = self.wandb
        steps = [float(m.get(self._key("step"), i)) for i, m in enumerate(series)]
        out: dict[str, Any] = {}
        names = [n for n, _ in QUANTILES]
        ys = [[float(m.get(self._key(f"score_{n}"), math.nan)) for m in series] for n in names]
        out[self._key("score_stats")] = wandb.plot.line_series(
            xs=steps, ys=ys, keys=names, title="Score quantiles over training", xname="trainer/global_step"
        )
        det = [k for k in (series[-1] if series else {}) if k == self._key("auroc") or "/recall@" in k]
        if det:
            ys = [[float(m.get(k, math.nan)) for m in series] for k in det]
            out[self._key("detection")] = wandb.plot.line_series(
                xs=steps,
                ys=ys,
                keys=[k.split("/", 1)[-1] for k in det],
                title="Detection of corrupted tasks",
                xname="trainer/global_step",
            )
        return out

    def _samples(self, round: ScoreRound) -> dict[str, Any]:
        if not round.sample_rows:
            return {}
        wandb = self.wandb
        rows = [s for s in round.sample_rows if math.isfinite(s.score)]
        rows = sorted(rows, key=lambda s: s.score)[: self.max_samples]
        with_images = any(_is_image(s.image) for s in rows)
        columns = ["task_id", "split", "index", "score", "label", "excess_loss"] + (
            ["image"] if with_images else []
        )
        labels = [s.label for s in rows]
        if not all(lab is None or isinstance(lab, int) for lab in labels):  # one column type: int or float
            labels = [None if lab is None else float(lab) for lab in labels]
        data = []
        for s, label in zip(rows, labels):
            row: list[Any] = [s.task_id, s.split, s.index, s.score, label, s.excess_loss]
            if with_images:
                row.append(
                    wandb.Image(image_to_array(s.image), caption=f"task {s.task_id} {s.split}[{s.index}]")
                    if _is_image(s.image)
                    else None
                )
            data.append(row)
        # no allow_mixed_types here: with an untyped column W&B 0.31 serialises wandb.Image cells as the
        # string "Image" instead of writing the image files
        table = wandb.Table(columns=columns, data=data)
        return {self._key("harmful_samples"): table}
