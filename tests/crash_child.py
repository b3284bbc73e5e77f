"""One training run for the crash tests (`test_crash_resume.py`), killed with SIGKILL at a chosen phase.

    python tests/crash_child.py RUN_DIR [--phase PHASE --at K]
    python tests/crash_child.py RUN_DIR=CHECKPOINT [RUN_DIR=CHECKPOINT ...] [RUN_DIR]   # resumes, in one process

Trains the tiny MAML on digits tasks with the callback (`make_callback`: the one place that builds it), a
gradient store and pruning, saving a checkpoint every epoch under ``RUN_DIR/ckpt``. With ``--phase`` the process
kills itself (``SIGKILL``, nothing is flushed or cleaned) at the ``K``-th (0-based) occurrence of:

* ``record``: a store record write (rows written to the temporary file, not committed);
* ``after_round``: the end of a scoring round (round files written), before that epoch's checkpoint is saved;
* ``checkpoint``: a checkpoint save (half of the checkpoint bytes written to its final path);
* ``round_file``: the append of a round's rows to ``decisions.csv`` (a torn line left behind).

A run that finishes writes ``RUN_DIR/result.json``: pruned task ids, rounds, the last round's scores, decisions.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

EPOCHS = 2


def make_callback(run_dir: Path):
    """The callback under test (the only place the crash tests build it)."""
    from lightning_metaif import MetaInfluence, PruningPolicy
    from lightning_metaif.config import GradientStoreConfig

    policy = PruningPolicy(
        fraction=0.2, warmup_rounds=1, max_fraction_per_round=0.1, only_harmful=False, margin=None
    )
    store = GradientStoreConfig(projection_dim=32, dirpath=str(run_dir / "metaif"))
    return MetaInfluence("checkpoints", store=store, actions=[policy], verbose=False)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(phase: str, at: int) -> None:
    """Monkeypatch the code path of ``phase`` to SIGKILL this process at its ``at``-th occurrence."""
    import lightning.fabric.plugins.io.torch_io as torch_io

    import lightning_metaif.dashboards.files as files
    from lightning_metaif.influence.store.store import CheckpointWriter

    count = {"n": 0}

    def hit() -> bool:
        count["n"] += 1
        return count["n"] - 1 == at

    if phase == "record":
        original_write = CheckpointWriter.write

        def write(self, *args, **kwargs):
            original_write(self, *args, **kwargs)
            if hit():
                self._file.flush()
                _die()

        CheckpointWriter.write = write
    elif phase == "after_round":
        original_round = files.RoundFileWriter.write

        def write_round(self, *args, **kwargs):
            paths = original_round(self, *args, **kwargs)
            if hit():
                _die()
            return paths

        files.RoundFileWriter.write = write_round
    elif phase == "checkpoint":
        original_save = torch_io.TorchCheckpointIO.save_checkpoint

        def save_checkpoint(self, checkpoint, path, storage_options=None):
            if hit():
                import torch

                buffer = io.BytesIO()
                torch.save(checkpoint, buffer)
                data = buffer.getvalue()
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                with open(path, "wb") as fh:
                    fh.write(data[: len(data) // 2])
                    fh.flush()
                    os.fsync(fh.fileno())
                _die()
            return original_save(self, checkpoint, path, storage_options)

        torch_io.TorchCheckpointIO.save_checkpoint = save_checkpoint
    elif phase == "round_file":
        original_append = files._append

        def append(path, columns, rows):
            if Path(path).name == "decisions.csv" and hit():
                with open(path, "a", encoding="utf-8") as fh:
                    fh.write("9,99,9,pru")  # half a row
                    fh.flush()
                _die()
            return original_append(path, columns, rows)

        files._append = append
    elif phase != "none":
        raise SystemExit(f"unknown phase {phase!r}")


def run(run_dir: Path, resume: str | None) -> None:
    """One training run (resumed from ``resume`` when given); writes ``run_dir/result.json`` if it finishes."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from metaif_helpers import digits_setup, seed_all, tiny_maml, trainer

    seed_all(0)
    influence = make_callback(run_dir)
    dm, _ = digits_setup(num_train=40, batch_size=8, task_state=influence.task_state)
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "ckpt", filename="{epoch}", save_top_k=-1, every_n_epochs=1, save_last=False
    )
    pl.seed_everything(0, verbose=False)
    trainer(run_dir, [influence, checkpoint], max_epochs=EPOCHS, enable_checkpointing=True).fit(
        tiny_maml(), datamodule=dm, ckpt_path=resume
    )
    result = {
        "pruned": sorted(int(t) for t in influence.task_state.pruned),
        "rounds": influence.rounds,
        "decisions": [[d.step, d.action, sorted(int(t) for t in d.task_ids)] for d in influence.decisions],
        "history": [
            {k: v for k, v in h.items() if "seconds" not in k and "time" not in k} for h in influence.history
        ],
    }
    (run_dir / "result.json").write_text(json.dumps(result, sort_keys=True, default=str))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "jobs", nargs="+", help="RUN_DIR or RUN_DIR=CHECKPOINT (resume), run one after another"
    )
    parser.add_argument("--phase", default="none")
    parser.add_argument("--at", type=int, default=0)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    _arm(args.phase, args.at)
    for job in args.jobs:
        run_dir, _, resume = job.partition("=")
        run(Path(run_dir), resume or None)


if __name__ == "__main__":
    main()
