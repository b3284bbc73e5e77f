"""Measure how long the demo, each example and `lightning-metaif --help` take; write the table the docs quote.

    python scripts/measure_times.py                  # everything (the full runs take a while)
    python scripts/measure_times.py --only demo help # a subset (names: see --list)
    python scripts/measure_times.py --list

Each command runs in a fresh subprocess, exactly as a user would start it (its default settings, W&B offline,
output in a temporary folder), and is timed wall-clock from start to exit. The machine is recorded with the
numbers: its CPU count and the load averages before and after each command (the numbers below were measured on
a shared machine, so load matters). `--help` is timed as the median of 5 runs.

Writes ``benchmarks/results/times.json`` (every number, command, load, date), ``benchmarks/results/times.md``
(the table that ``docs/times.md`` includes and the README quotes) and each command's console output in
``benchmarks/results/times_output/<name>.txt`` (the README's demo output is copied from there, so the output
and the time quoted beside it come from the same run). A command that fails or times out is
reported as such in the table, never dropped.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PY = sys.executable

# name -> (what it is, argv after the python executable; "{out}" is a fresh output folder)
COMMANDS: dict[str, tuple[str, list[str]]] = {
    "help": ("`lightning-metaif --help`", ["-m", "lightning_metaif.cli", "--help"]),
    "demo": (
        "`lightning-metaif demo` (2 runs of 40 epochs, 100 tasks)",
        ["-m", "lightning_metaif.cli", "demo", "--quiet", "--output-dir", "{out}"],
    ),
    "demo_fast": (
        "`lightning-metaif demo --fast`",
        ["-m", "lightning_metaif.cli", "demo", "--fast", "--quiet", "--output-dir", "{out}"],
    ),
    "sinusoid_quickstart": (
        "`examples/sinusoid_quickstart.py`",
        ["examples/sinusoid_quickstart.py", "--output-dir", "{out}"],
    ),
    "sinusoid_quickstart_fast": (
        "`examples/sinusoid_quickstart.py --fast`",
        ["examples/sinusoid_quickstart.py", "--fast", "--output-dir", "{out}"],
    ),
    "noisy_digits_pruning": (
        "`examples/noisy_digits_pruning.py`",
        ["examples/noisy_digits_pruning.py", "--output-dir", "{out}"],
    ),
    "noisy_digits_pruning_fast": (
        "`examples/noisy_digits_pruning.py --fast`",
        ["examples/noisy_digits_pruning.py", "--fast", "--output-dir", "{out}"],
    ),
    "higher_maml": ("`examples/higher_maml.py`", ["examples/higher_maml.py", "--output-dir", "{out}"]),
    "higher_maml_fast": (
        "`examples/higher_maml.py --fast`",
        ["examples/higher_maml.py", "--fast", "--output-dir", "{out}"],
    ),
    "wandb_dashboard": (
        "`examples/wandb_dashboard.py`",
        ["examples/wandb_dashboard.py", "--output-dir", "{out}"],
    ),
    "wandb_dashboard_fast": (
        "`examples/wandb_dashboard.py --fast`",
        ["examples/wandb_dashboard.py", "--fast", "--output-dir", "{out}"],
    ),
}
COMMANDS["fairness"] = ("`examples/fairness.py`", ["examples/fairness.py", "--output-dir", "{out}"])
COMMANDS["fairness_fast"] = (
    "`examples/fairness.py --fast`",
    ["examples/fairness.py", "--fast", "--output-dir", "{out}"],
)
NOT_MEASURED = {
    "omniglot_folder": "`examples/omniglot_folder.py` needs the Omniglot images in a local folder (nothing is "
    "downloaded); not measured here",
}


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def run_once(argv: list[str], timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="metaif-times-") as tmp:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env.update(WANDB_MODE="offline", WANDB_SILENT="true")
        for var in (
            "WANDB_DIR",
            "WANDB_CACHE_DIR",
            "WANDB_DATA_DIR",
            "WANDB_CONFIG_DIR",
            "WANDB_ARTIFACT_DIR",
        ):
            env[var] = str(Path(tmp) / var.lower())
        args = [a.replace("{out}", str(Path(tmp) / "out")) for a in argv]
        load_before = _load()
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                [PY, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
            )
            seconds, code = time.perf_counter() - start, proc.returncode
            output = proc.stdout + ("\n" + proc.stderr if proc.stderr.strip() else "")
        except subprocess.TimeoutExpired:
            seconds, code, output = time.perf_counter() - start, "timeout", ""
        return {
            "seconds": seconds,
            "exit": code,
            "load_before": load_before,
            "load_after": _load(),
            "tail": output[-800:],
            "output": output.replace(str(Path(tmp)), "<tmp>"),
        }


def fmt_seconds(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="+", choices=sorted(COMMANDS), help="measure only these")
    parser.add_argument("--list", action="store_true", help="list the commands and exit")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per command (default 1800)")
    args = parser.parse_args(argv)
    if args.list:
        for name, (what, _) in COMMANDS.items():
            print(f"{name:28s} {what}")
        return 0
    names = args.only or list(COMMANDS)
    path = RESULTS / "times.json"
    previous = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
    rows = dict(previous.get("rows", {}))
    for name in names:
        what, command = COMMANDS[name]
        repeats = 5 if name == "help" else 1
        runs = [run_once(command, args.timeout) for _ in range(repeats)]
        ok = all(r["exit"] == 0 for r in runs)
        seconds = statistics.median(r["seconds"] for r in runs)
        rows[name] = {
            "what": what,
            "command": "python " + " ".join(command).replace("{out}", "<tmp>"),
            "seconds": seconds,
            "runs": [r["seconds"] for r in runs],
            "ok": ok,
            "exit": [r["exit"] for r in runs],
            "load_before": runs[0]["load_before"],
            "load_after": runs[-1]["load_after"],
            "date": dt.datetime.now().isoformat(timespec="seconds"),
            "tail": None if ok else runs[-1]["tail"],
        }
        (RESULTS / "times_output").mkdir(parents=True, exist_ok=True)
        (RESULTS / "times_output" / f"{name}.txt").write_text(runs[-1]["output"])
        status = "ok" if ok else f"FAILED (exit {runs[-1]['exit']})"
        print(f"{name:28s} {fmt_seconds(seconds):>9s}  {status}  load {runs[0]['load_before']}", flush=True)
        _write(rows)
    return 0 if all(r["ok"] for r in rows.values()) else 1


def _write(rows: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"
    (RESULTS / "times.json").write_text(
        json.dumps({"script": "scripts/measure_times.py", "machine": machine, "rows": rows}, indent=2) + "\n"
    )
    lines = [
        "| command | wall time | load (1-min avg) before → after | measured |",
        "|---|---|---|---|",
    ]
    for name in COMMANDS:
        if name not in rows:
            continue
        r = rows[name]
        time_text = fmt_seconds(r["seconds"]) + (" (median of 5)" if len(r["runs"]) > 1 else "")
        if not r["ok"]:
            time_text = f"failed (exit {r['exit'][-1]}) after {fmt_seconds(r['seconds'])}"
        load = f"{(r['load_before'] or ['?'])[0]} → {(r['load_after'] or ['?'])[0]}"
        lines.append(f"| {r['what']} | {time_text} | {load} | {r['date'][:16].replace('T', ' ')} |")
    for what in NOT_MEASURED.values():
        lines.append(f"| {what} | – | – | – |")
    lines.append("")
    lines.append(
        f"Machine: {machine}; shared with other jobs, so the load column matters. "
        "Written by `python scripts/measure_times.py`."
    )
    (RESULTS / "times.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
