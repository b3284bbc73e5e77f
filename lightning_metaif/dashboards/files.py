"""Plain CSV files of every scoring round (readable with the stdlib ``csv`` module, no pandas needed).

Layout of ``directory`` after ``RoundFileWriter.write`` was called for rounds 0..K-1:

* ``scores_round_{k:04d}.csv``: every task of round k: ``task_id, score, self_influence, rank, weight, pruned,
  classes, corrupted`` (rank 1 = most harmful, empty for non-finite scores; classes space-separated; booleans 0/1;
  empty = unknown). Written atomically (temporary file + ``os.replace``).
* ``samples_round_{k:04d}.csv``: sample-level scores of round k, when the round has sample rows; their images
  (when inputs are images) in ``samples_round_{k:04d}_images.pt`` (``{"rows": [...], "images": [...]}``, loaded
  with ``weights_only=True``), which the HTML report shows.
* ``scores_history.csv``: long format, appended: ``round, step, epoch, task_id, score, weight, pruned``.
* ``decisions.csv``: appended: ``round, step, epoch, action, task_ids (space-separated), reason``.
* ``metrics.csv``: one row per round (``round, step, epoch, estimator, seconds`` + the ``round_metrics`` keys); rewritten
  atomically each round because the set of metric columns can grow (e.g. AUROC once ground truth appears).

Floats are written with ``repr`` so they round-trip exactly (``nan``, ``inf`` included).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightning_metaif._io import atomic_write
from lightning_metaif.dashboards.metrics import round_metrics
from lightning_metaif.records import Decision, SampleScore, ScoreRound

__all__ = ["RoundFileWriter", "RunFiles", "load_run", "scores_csv_text", "SCORE_COLUMNS"]

SCORE_COLUMNS = ["task_id", "score", "self_influence", "rank", "weight", "pruned", "classes", "corrupted"]
SAMPLE_COLUMNS = ["task_id", "split", "index", "score", "label", "excess_loss"]
HISTORY_COLUMNS = ["round", "step", "epoch", "task_id", "score", "weight", "pruned"]
DECISION_COLUMNS = ["round", "step", "epoch", "action", "task_ids", "reason"]
METRIC_HEAD = ["round", "step", "epoch", "estimator", "seconds"]


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return " ".join(str(int(v)) for v in value)
    return str(value)


def _float(text: str) -> float | None:
    return None if text == "" else float(text)


def _int(text: str) -> int | None:
    return None if text == "" else int(text)


def _bool(text: str) -> bool | None:
    return None if text == "" else text == "1"


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split()]


def _csv_text(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_fmt(v) for v in row])
    return buffer.getvalue()


def _append(path: Path, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        if new:
            writer.writerow(columns)
        for row in rows:
            writer.writerow([_fmt(v) for v in row])
        fh.flush()


def _read(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def scores_csv_text(round: ScoreRound) -> str:
    """The ``scores_round_*.csv`` content of a round (all tasks, ``task_ids`` order).

    Example:
        >>> r = ScoreRound(step=1, epoch=0, estimator="tracin", task_ids=torch.tensor([4, 2]),
        ...                scores=torch.tensor([0.5, -1.0]))
        >>> print(scores_csv_text(r), end="")
        task_id,score,self_influence,rank,weight,pruned,classes,corrupted
        4,0.5,,2,1.0,0,,
        2,-1.0,,1,1.0,0,,
    """
    return _csv_text(
        SCORE_COLUMNS,
        ([row[c if c != "task_id" else "id"] for c in SCORE_COLUMNS] for row in round.to_rows()),
    )


class RoundFileWriter:
    """Write every scoring round as CSV files under ``directory`` (see module docstring for the layout).

    The round counter continues after existing ``scores_round_*.csv`` files, so a resumed run appends.
    Only per-round files and ``metrics.csv`` are atomic; the appended files are flushed after each round.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> w = RoundFileWriter(d)
        >>> r = ScoreRound(step=3, epoch=0, estimator="tracin", task_ids=torch.tensor([0, 1]),
        ...                scores=torch.tensor([0.2, -0.1], dtype=torch.float64))
        >>> sorted(p.name for p in w.write(r).values())
        ['decisions.csv', 'metrics.csv', 'scores_history.csv', 'scores_round_0000.csv']
        >>> load_run(d).rounds[0].scores.tolist()
        [0.2, -0.1]
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.next_round = len(list(self.directory.glob("scores_round_*.csv")))
        self._metrics = _read(self.directory / "metrics.csv")

    def write(self, round: ScoreRound, metrics: Mapping[str, float] | None = None) -> dict[str, Path]:
        """Write round ``round`` (metrics computed with :func:`round_metrics` unless given); return the paths."""
        k = self.next_round
        d = self.directory
        paths = {
            "scores": d / f"scores_round_{k:04d}.csv",
            "history": d / "scores_history.csv",
            "decisions": d / "decisions.csv",
            "metrics": d / "metrics.csv",
        }
        atomic_write(paths["scores"], scores_csv_text(round))
        if round.sample_rows:
            paths["samples"] = d / f"samples_round_{k:04d}.csv"
            rows = ([s.task_id, s.split, s.index, s.score, s.label, s.excess_loss] for s in round.sample_rows)
            atomic_write(paths["samples"], _csv_text(SAMPLE_COLUMNS, rows))
            with_images = [(i, s.image) for i, s in enumerate(round.sample_rows) if s.image is not None]
            if with_images:
                paths["sample_images"] = d / f"samples_round_{k:04d}_images.pt"
                buffer = io.BytesIO()
                torch.save(
                    {
                        "rows": [i for i, _ in with_images],
                        "images": [img.detach().to("cpu").contiguous() for _, img in with_images],
                    },
                    buffer,
                )
                atomic_write(paths["sample_images"], buffer.getvalue())
        _append(
            paths["history"],
            HISTORY_COLUMNS,
            (
                [k, round.step, round.epoch, t, s, w, p]
                for t, s, w, p in zip(
                    round.task_ids.tolist(),
                    round.scores.tolist(),
                    round.weights.tolist(),
                    round.pruned.tolist(),
                )
            ),
        )
        _append(
            paths["decisions"],
            DECISION_COLUMNS,
            ([k, x.step, x.epoch, x.action, x.task_ids, x.reason] for x in round.decisions),
        )
        values = dict(round_metrics(round) if metrics is None else metrics)
        self._metrics.append(
            {
                "round": str(k),
                "step": str(round.step),
                "epoch": str(round.epoch),
                "estimator": round.estimator,
                "seconds": repr(round.seconds),
            }
            | {key: _fmt(float(v)) for key, v in values.items()}
        )
        columns = list(METRIC_HEAD)
        for row in self._metrics:
            columns += [c for c in row if c not in columns]
        atomic_write(
            paths["metrics"], _csv_text(columns, ([row.get(c) for c in columns] for row in self._metrics))
        )
        self.next_round = k + 1
        return paths

    def rollback(self, rounds: int) -> list[str]:
        """Keep rounds ``0 .. rounds-1`` only: drop the files and rows of later rounds; return what was dropped.

        For resuming from a training checkpoint taken after ``rounds`` rounds: the interrupted run may have
        written later rounds (or part of one: a torn last line in an appended file, a round file without its
        metrics row) before it died. Their ``scores_round``/``samples_round`` files are deleted and the rows of
        ``scores_history.csv``, ``decisions.csv`` and ``metrics.csv`` with ``round >= rounds`` (or torn) are
        removed (each file rewritten atomically), so the directory equals that of an uninterrupted run at the
        checkpoint, and the next round is numbered ``rounds``.

        Example:
            >>> import tempfile
            >>> w = RoundFileWriter(tempfile.mkdtemp())
            >>> for step in (1, 2, 3):
            ...     _ = w.write(ScoreRound(step=step, epoch=0, estimator="tracin", task_ids=torch.tensor([0]),
            ...                            scores=torch.tensor([0.5], dtype=torch.float64)))
            >>> w.rollback(1)
            ['scores_round_0001.csv', 'scores_round_0002.csv', 'scores_history.csv: 2 rows', 'metrics.csv: 2 rows']
            >>> [r.step for r in load_run(w.directory).rounds], w.next_round
            ([1], 1)
        """
        if int(rounds) < 0:
            raise ValueError(f"rounds must be >= 0, got {rounds}.")
        rounds = int(rounds)
        d = self.directory
        dropped = []
        for pattern in ("scores_round_*.csv", "samples_round_*.csv"):
            for path in sorted(d.glob(pattern)):
                suffix = path.stem.rsplit("_", 1)[1]
                if not suffix.isdigit() or int(suffix) >= rounds:
                    path.unlink()
                    dropped.append(path.name)
        for name, columns in (
            ("scores_history.csv", HISTORY_COLUMNS),
            ("decisions.csv", DECISION_COLUMNS),
            ("metrics.csv", None),
        ):
            path = d / name
            if not path.exists():
                continue
            with open(path, newline="", encoding="utf-8") as fh:
                text = fh.read()
            lines = list(csv.reader(io.StringIO(text)))
            if not lines:
                continue
            header, rows = lines[0], lines[1:]
            complete = text.endswith("\n")
            keep = [
                row
                for i, row in enumerate(rows)
                if len(row) == len(header)
                and (complete or i < len(rows) - 1)  # a last line without its newline is torn
                and row[0].isdigit()
                and int(row[0]) < rounds
            ]
            if len(keep) != len(rows) or not complete:
                buffer = io.StringIO()
                writer = csv.writer(buffer, lineterminator="\n")
                writer.writerow(header if columns is None else columns)
                writer.writerows(keep)
                atomic_write(path, buffer.getvalue())
                dropped.append(f"{name}: {len(rows) - len(keep)} rows")
        self.next_round = rounds
        self._metrics = _read(d / "metrics.csv")
        return dropped


@dataclass
class RunFiles:
    """What :func:`load_run` read: rounds (as :class:`ScoreRound`), metrics rows, history rows, decisions."""

    directory: Path
    rounds: list[ScoreRound] = field(default_factory=list)
    metrics: list[dict[str, float | str]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)


def load_run(directory: str | os.PathLike[str]) -> RunFiles:
    """Read back everything :class:`RoundFileWriter` wrote under ``directory``.

    ``rounds[k]`` is a :class:`ScoreRound` rebuilt from ``scores_round_k``, ``metrics.csv`` (step, epoch,
    estimator, seconds), ``decisions.csv`` and ``samples_round_k`` (with the sample images when they were
    written).
    """
    d = Path(directory)
    score_files = sorted(d.glob("scores_round_*.csv"))
    if not score_files:
        raise ValueError(f"no scores_round_*.csv under {d}: is this a RoundFileWriter directory?")
    metric_rows = _read(d / "metrics.csv")
    metrics: list[dict[str, float | str]] = [
        {
            key: (value if key == "estimator" else float(value) if value != "" else math.nan)
            for key, value in row.items()
        }
        for row in metric_rows
    ]
    by_round_meta = {int(row["round"]): row for row in metric_rows}
    decisions_by_round: dict[int, list[Decision]] = {}
    all_decisions = []
    for row in _read(d / "decisions.csv"):
        dec = Decision(
            int(row["step"]), int(row["epoch"]), row["action"], _ints(row["task_ids"]), row["reason"]
        )  # type: ignore[arg-type]
        decisions_by_round.setdefault(int(row["round"]), []).append(dec)
        all_decisions.append(dec)
    history = [
        {
            "round": int(r["round"]),
            "step": int(r["step"]),
            "epoch": int(r["epoch"]),
            "task_id": int(r["task_id"]),
            "score": float(r["score"]),
            "weight": float(r["weight"]),
            "pruned": r["pruned"] == "1",
        }
        for r in _read(d / "scores_history.csv")
    ]
    rounds = []
    for path in score_files:
        k = int(path.stem.rsplit("_", 1)[1])
        rows = _read(path)
        meta = by_round_meta.get(k)
        if meta is None:
            raise ValueError(
                f"{path.name} has no row in metrics.csv (round {k}): the directory is incomplete"
            )
        si = [_float(r["self_influence"]) for r in rows]
        cor = [_bool(r["corrupted"]) for r in rows]
        samples_path = d / f"samples_round_{k:04d}.csv"
        samples = None
        if samples_path.exists():
            samples = [
                SampleScore(
                    int(r["task_id"]),
                    r["split"],  # type: ignore[arg-type]
                    int(r["index"]),
                    float(r["score"]),
                    None
                    if r["label"] == ""
                    else (int(r["label"]) if r["label"].lstrip("-").isdigit() else float(r["label"])),
                    excess_loss=None if r.get("excess_loss", "") in ("", None) else float(r["excess_loss"]),
                )
                for r in _read(samples_path)
            ]
            images_path = d / f"samples_round_{k:04d}_images.pt"
            if images_path.exists():
                stored = torch.load(images_path, weights_only=True)
                for i, image in zip(stored["rows"], stored["images"]):
                    if 0 <= int(i) < len(samples):
                        samples[int(i)].image = image
        rounds.append(
            ScoreRound(
                step=int(meta["step"]),
                epoch=int(meta["epoch"]),
                estimator=meta["estimator"],
                task_ids=torch.tensor([int(r["task_id"]) for r in rows], dtype=torch.long),
                scores=torch.tensor([float(r["score"]) for r in rows], dtype=torch.float64),
                self_influence=None if any(v is None for v in si) else torch.tensor(si, dtype=torch.float64),
                weights=torch.tensor([float(r["weight"]) for r in rows], dtype=torch.float64),
                pruned=torch.tensor([r["pruned"] == "1" for r in rows], dtype=torch.bool),
                decisions=decisions_by_round.get(k, []),
                classes=None
                if all(r["classes"] == "" for r in rows)
                else [_ints(r["classes"]) for r in rows],
                corrupted=None if any(v is None for v in cor) else torch.tensor(cor, dtype=torch.bool),
                seconds=float(meta["seconds"]),
                sample_rows=samples,
            )
        )
    return RunFiles(directory=d, rounds=rounds, metrics=metrics, history=history, decisions=all_decisions)
