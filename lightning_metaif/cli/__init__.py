"""The ``lightning-metaif`` command: ``demo``, ``report RUN_DIR``, ``store verify DIR``, ``fit --config ...``.

* ``lightning-metaif demo``: meta-trains MAML on scikit-learn's bundled digits (5-way 1-shot tasks) with a
  share of the training tasks corrupted, scores every task with :class:`~lightning_metaif.MetaInfluence`
  and prunes the harmful ones; then trains the same run (same seed) without pruning and compares meta-test
  accuracy. Logs to W&B offline (CSV without wandb), writes a self-contained HTML report and ``summary.json``.
* ``lightning-metaif report RUN_DIR``: rebuilds the HTML report from the files of any run that used the
  callback (the ``metaif/`` folders under ``RUN_DIR``).
* ``lightning-metaif store verify DIR``: checks every byte of the gradient stores under ``DIR`` against their
  checksums and lists each damaged file, record and chunk (exit code 1 when something is damaged).
* ``lightning-metaif fit|validate|test ...``: Lightning's ``LightningCLI`` with
  :class:`~lightning_metaif.MAML` and a :class:`~lightning_metaif.MetaDataModule` subclass (e.g.
  :class:`DigitsDataModule`) built from a YAML config; ``MetaInfluence`` goes in ``trainer.callbacks``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
ESTIMATORS = ("trajectory", "checkpoints", "task_if", "ensemble")

# Heavy modules (torch, Lightning) are imported only by the command that needs them, so that
# `lightning-metaif --help` answers at once.
_EXPORTS: dict[str, str] = {
    "DemoConfig": "lightning_metaif.cli.demo",
    "run_demo": "lightning_metaif.cli.demo",
    "DigitsDataModule": "lightning_metaif.cli.components",
    "FlatMLP": "lightning_metaif.cli.components",
    "format_summary": "lightning_metaif.cli.summary",
    "lightning_cli": "lightning_metaif.cli.lightning_commands",
    "run_lightning_cli": "lightning_metaif.cli.lightning_commands",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_metaif.cli' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


# --------------------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-metaif",
        description="Task influence for meta-learning with PyTorch Lightning: demo, HTML report, LightningCLI.",
        epilog="`lightning-metaif fit --config config.yaml` runs Lightning's LightningCLI "
        "(see examples/config_digits.yaml); `lightning-metaif fit --help` lists its options.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="meta-train MAML on noisy digits tasks, find and prune the harmful ones, compare with no pruning",
        description="Meta-trains MAML on scikit-learn's digits (5-way 1-shot) with corrupted tasks, scores every "
        "task with MetaInfluence and prunes the harmful ones, then trains the same run without pruning and "
        "compares meta-test accuracy. Writes an HTML report and summary.json into the output directory.",
    )
    demo.add_argument("--num-tasks", type=int, default=100, help="training tasks (default 100)")
    demo.add_argument(
        "--noise", type=float, default=0.2, help="share of corrupted training tasks (default 0.2)"
    )
    demo.add_argument("--mode", choices=ESTIMATORS, default="trajectory", help="influence estimator")
    demo.add_argument("--epochs", type=int, default=40, help="training epochs (default 40; one round each)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--output-dir", type=Path, default=None, help="default ./runs/demo-<timestamp>")
    demo.add_argument(
        "--fast", action="store_true", help="tiny settings for CI: 40 tasks, 6 epochs, a small network"
    )
    demo.add_argument(
        "--logger",
        choices=("auto", "wandb", "csv"),
        default="auto",
        help="auto: W&B offline if wandb is installed, CSV otherwise",
    )
    demo.add_argument("--quiet", action="store_true", help="no progress output, only the summary")
    report = sub.add_parser("report", help="rebuild the HTML report of a run directory")
    report.add_argument(
        "run_dir", type=Path, help="a demo output dir or any folder holding metaif/ score files"
    )
    report.add_argument("--output", type=Path, default=None, help="default RUN_DIR/report.html")
    store = sub.add_parser("store", help="gradient store maintenance: `store verify DIR` checks every byte")
    store_sub = store.add_subparsers(dest="store_command", required=True)
    verify = store_sub.add_parser(
        "verify",
        help="check every file of the gradient stores under DIR against its checksums",
        description="Checks the manifest and every byte of every file (header, rows, task ids, steps, learning "
        "rates, checksum table) of the gradient store DIR, or of every store below DIR (e.g. a run directory). "
        "Exit code 0: intact; 1: damage found (each damaged file, record and chunk is listed); 2: no store.",
    )
    verify.add_argument("dir", type=Path, help="a gradient store directory or a folder holding stores")
    for name in LIGHTNING_COMMANDS:
        sub.add_parser(
            name, help=f"LightningCLI {name} (e.g. --config examples/config_digits.yaml)", add_help=False
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-metaif`` console script; returns the exit code.

    Example:
        >>> main(["report", "/nonexistent-folder"])
        Traceback (most recent call last):
        ...
        SystemExit: 2
    """
    from_console = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from lightning_metaif.cli.lightning_commands import run_lightning_cli

        return run_lightning_cli(None if from_console else argv)
    args = _parser().parse_args(argv)
    return _COMMANDS[args.command](args)


def _report_command(args: argparse.Namespace) -> int:
    from lightning_metaif.dashboards.report import build_report

    try:
        path = build_report(args.run_dir, output=args.output)
    except (FileNotFoundError, ValueError) as error:
        print(f"lightning-metaif report: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    print(f"Report: {path}")
    return 0


def _demo_command(args: argparse.Namespace) -> int:
    from lightning_metaif.cli.demo import DemoConfig, run_demo
    from lightning_metaif.cli.summary import format_summary

    cfg = DemoConfig(
        num_tasks=args.num_tasks,
        noise=args.noise,
        mode=args.mode,
        epochs=args.epochs,
        seed=args.seed,
        output_dir=args.output_dir,
        fast=args.fast,
        logger=args.logger,
        progress=not args.quiet,
    )
    try:
        summary = run_demo(cfg)
    except ValueError as error:
        print(f"lightning-metaif demo: {error}", file=sys.stderr)
        return 2
    print(format_summary(summary), flush=True)
    return 0


# One handler per subcommand of `_parser()` (a new subcommand adds its parser there and its handler here).
def _store_command(args: argparse.Namespace) -> int:
    from lightning_metaif.cli.store import store_command

    return store_command(args)


_COMMANDS: dict[str, Any] = {"demo": _demo_command, "report": _report_command, "store": _store_command}


__all__ = [
    "DemoConfig",
    "DigitsDataModule",
    "FlatMLP",
    "format_summary",
    "lightning_cli",
    "main",
    "run_demo",
    "run_lightning_cli",
]
