"""Quiet output for the demo and the examples: hide what a user cannot act on, keep every actionable warning.

Hidden by :func:`quiet_lightning`:

* Lightning's start-up info lines (``GPU available: False``, ``💡 Tip: ...``, ``Seed set to 0``, the model
  summary table): INFO records of its loggers; warnings from the same loggers still show.
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
import warnings
from typing import Any

__all__ = ["quiet_lightning", "wandb_logger"]

_UNACTIONABLE = (
    ".*does not have many workers.*",
    ".*Checkpoint directory.*exists and is not empty.*",
    ".*LeafSpec.*",
    ".*`tensorboardX` has been removed as a dependency.*",
)


def quiet_lightning() -> None:
    """Hide Lightning's info lines and the warnings listed in the module docstring (process-wide).

    Example:
        >>> quiet_lightning()
        >>> logging.getLogger("lightning.pytorch.utilities.rank_zero").level == logging.WARNING
        True
    """
    for name in (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.fabric.utilities.rank_zero",
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
