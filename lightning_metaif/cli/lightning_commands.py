"""``lightning-metaif fit|validate|test|predict``: Lightning's ``LightningCLI`` with MAML and a MetaDataModule."""

# (Not named lightning_cli.py: importing a submodule binds its name in the package, which would shadow the
# ``lightning_metaif.cli.lightning_cli`` function.)

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from lightning_metaif.meta.datamodule import MetaDataModule


def lightning_cli(args: Sequence[str] | None = None, *, run: bool = True) -> Any:
    """Build (and by default run) ``LightningCLI`` with MAML and a MetaDataModule subclass on ``args``.

    ``args`` are LightningCLI arguments such as ``["fit", "--config", "examples/config_digits.yaml"]`` (``None``:
    ``sys.argv[1:]``). The model
    and datamodule are given by ``class_path`` in the config (``lightning_metaif.MAML`` or a subclass;
    ``lightning_metaif.cli.DigitsDataModule`` or any ``MetaDataModule`` subclass); ``MetaInfluence`` goes in
    ``trainer.callbacks``. Corrupted-task ground truth of the datamodule (``corrupted_task_ids``) is handed to
    ``MetaInfluence`` callbacks that have none. Returns the ``LightningCLI`` object (``.trainer``,
    ``.model``, ``.datamodule``).
    """
    try:
        import jsonargparse  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "`lightning-metaif fit` uses Lightning's LightningCLI, which needs jsonargparse: "
            "pip install 'lightning-metaif[cli]' (or 'jsonargparse[signatures]>=4.27')"
        ) from error
    from lightning.pytorch.cli import LightningCLI

    from lightning_metaif.meta.maml import MAML

    class MetaInfluenceCLI(LightningCLI):
        def before_fit(self) -> None:
            _hand_over_ground_truth(self.trainer, self.datamodule)

    return MetaInfluenceCLI(
        MAML,
        MetaDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=None if args is None else list(args),
        run=run,
        save_config_kwargs={"overwrite": True},
    )


def run_lightning_cli(args: Sequence[str] | None = None) -> int:
    """:func:`lightning_cli` for the console script: returns an exit code instead of raising."""
    try:
        lightning_cli(args)
    except ImportError as error:
        print(f"lightning-metaif: {error}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # argument errors, --help, --print_config
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    return 0


def _hand_over_ground_truth(trainer: Any, datamodule: Any) -> None:
    from lightning_metaif.callback import MetaInfluence

    truth = getattr(datamodule, "corrupted_task_ids", None)
    if truth is None:
        return
    for callback in trainer.callbacks:
        if isinstance(callback, MetaInfluence) and callback.ground_truth is None:
            callback.ground_truth = {int(t) for t in truth}


__all__ = ["lightning_cli", "run_lightning_cli"]
