"""Quiet output for the demo and the examples: hide what a user cannot act on, keep every actionable warning.

Hidden by :func:`quiet_lightning`:

* Lightning's start-up info lines (``GPU available: False``, ``TPU available``, ``💡 Tip: ...``,
  ``LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES``, ``Seed set to 0``, the model summary table): a filter on
  Lightning's ``rank_zero`` loggers drops exactly these records, so every other line they carry (warnings, the
  callback's round lines) still shows.
* ``Starting from v1.9.0, `tensorboardX` has been removed``: a tip about Lightning's default logger.
* ``does not have many workers``: task batches are built in the main process on purpose (they are tiny and
  their content depends only on the task id); more loader workers would only add start-up time here.
* ``Checkpoint directory ... exists and is not empty``: the examples reuse their output folder.
* Lightning's internal ``LeafSpec`` deprecation (raised inside Lightning, fixed by upgrading Lightning, not by
  changing your code).

:func:`wandb_logger` builds Lightning's ``WandbLogger`` without the ``anonymous`` setting that Lightning always
passes and recent ``wandb`` versions warn about ("The anonymous setting has no effect").
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any

__all__ = ["quiet_lightning", "wandb_logger"]

_UNACTIONABLE = (
    ".*does not have many workers.*",
    ".*Checkpoint directory.*exists and is not empty.*",
    ".*LeafSpec.*",
    ".*`tensorboardX` has been removed as a dependency.*",
)


class _StartupInfo(logging.Filter):
    """Drops Lightning's start-up info records (hardware availability, tips, rank banners); keeps the rest."""

    PATTERNS = re.compile(r"^(GPU|TPU|HPU|IPU) available|💡 Tip|^LOCAL_RANK: \d+ - |^Seed set to ")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or not self.PATTERNS.search(record.getMessage())


def quiet_lightning() -> None:
    """Hide Lightning's start-up lines and the warnings listed in the module docstring (process-wide, idempotent).

    Example:
        >>> quiet_lightning()
        >>> record = logging.LogRecord("x", logging.INFO, "", 0, "GPU available: False, used: False", None, None)
        >>> _StartupInfo().filter(record), _StartupInfo().filter(logging.makeLogRecord({"msg": "[metaif] round 0", "levelno": 20}))
        (False, True)
    """
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _StartupInfo) for f in logger.filters):
            logger.addFilter(_StartupInfo())
    # loggers that only carry start-up information
    for name in (
        "lightning.pytorch.accelerators.cuda",
        "lightning.fabric.utilities.seed",
        "lightning.pytorch.callbacks.model_summary",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in _UNACTIONABLE:
        warnings.filterwarnings("ignore", pattern)


def wandb_logger(**kwargs: Any) -> Any:
    """``lightning.pytorch.loggers.WandbLogger(**kwargs)`` without the deprecated ``anonymous`` init setting."""
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(**kwargs)
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous") is None and "anonymous" not in kwargs:
        init.pop("anonymous", None)
    return logger
