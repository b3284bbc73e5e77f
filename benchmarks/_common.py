"""Shared helpers of the benchmark scripts: timing, environment record, tables, JSON + PNG output.

Not part of the library. Every script writes ``benchmarks/results/<name>.json`` (numbers, command, machine,
load, date) and ``benchmarks/results/<name>.png``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def load() -> list[float]:
    """1/5/15-minute load averages (the machine is shared: record them with every measurement)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def environment() -> dict[str, Any]:
    return {
        "command": "python "
        + " ".join([os.path.relpath(sys.argv[0], Path(__file__).resolve().parents[1])] + sys.argv[1:]),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared with other agents, noisy)",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_avg_start": load(),
    }


def timeit(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    cpu_times: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Time each function ``repeats`` times, interleaving them (A B C A B C ...) so load drifts hit all alike.

    Returns wall-clock seconds; with ``cpu_times`` (a dict to fill) also the process's CPU seconds of each call
    (``time.process_time``, all threads): on a shared, overloaded machine the process gets a varying share of a
    core, which moves wall-clock times by 2x and more, while its CPU time stays close to the work done.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            cpu = time.process_time()
            times[name].append(timeit(fn))
            if cpu_times is not None:
                cpu_times.setdefault(name, []).append(time.process_time() - cpu)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def table(rows: list[dict[str, Any]], columns: Sequence[str] | None = None, floatfmt: str = ".4g") -> str:
    """A Markdown table (also readable in a terminal)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return format(v, floatfmt)
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    out = [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in cells]
    return "\n".join(out)


def save(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = dict(payload)
    payload.setdefault("environment", {})["load_avg_end"] = load()
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def figure(name: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt: Any, name: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    plt.tight_layout()
    plt.savefig(path, dpi=80)
    plt.close("all")
    return path


def set_threads(threads: int | None) -> None:
    """Default 1 thread: on a shared 2-core machine two intra-op threads made timings erratic (up to 10x)."""
    torch.set_num_threads(threads or 1)


def fit_quietly(
    model: Any,
    datamodule: Any,
    *,
    max_epochs: int,
    callbacks: list | None = None,
    default_root_dir: str | None = None,
) -> tuple[Any, float]:
    """Fit on the CPU with no logger, progress bar, checkpoint or validation; return (trainer, seconds)."""
    import warnings

    import lightning.pytorch as pl

    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=default_root_dir,
        callbacks=callbacks or [],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        trainer.fit(model, datamodule=datamodule)
        return trainer, time.perf_counter() - start


def meta_test(maml: Any, tasks: Any, params: dict[str, torch.Tensor] | None = None) -> tuple[float, float]:
    """Meta-test accuracy and query cross-entropy of a MAML-style module after its own adaptation (means over
    ``tasks``), at ``params`` (default: the module's meta-parameters)."""
    from lightning_metaif.influence.tasks import Task

    params = {k: v.detach() for k, v in (params if params is not None else maml.meta_parameters()).items()}
    accuracy, loss = [], []
    for i in range(len(tasks)):
        t = tasks[i]
        with torch.enable_grad():
            logits = maml.query_outputs(params, Task(t.support_x, t.support_y, t.query_x, t.query_y)).detach()
        accuracy.append(float((logits.argmax(-1) == t.query_y).double().mean()))
        loss.append(float(torch.nn.functional.cross_entropy(logits, t.query_y)))
    return sum(accuracy) / len(accuracy), sum(loss) / len(loss)
