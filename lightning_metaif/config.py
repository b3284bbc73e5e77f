"""Settings objects of the callback that belong to no single estimator."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

__all__ = ["GradientStoreConfig", "plain_settings"]


def plain_settings(value: Any) -> Any:
    """Settings as plain values for a logger's hyperparameters (dataclasses, solver settings, paths, ...).

    Example:
        >>> from lightning_metaif.influence.solvers import CG
        >>> plain_settings({"solver": CG(max_iterations=5), "store": GradientStoreConfig(dirpath=None)})["solver"]
        {'name': 'cg', 'max_iterations': 5, 'tolerance': 1e-05, 'strict': False}
    """
    if callable(getattr(value, "options", None)) and isinstance(getattr(value, "name", None), str):
        return {"name": value.name} | plain_settings(value.options())  # solver settings
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        named = {"name": value.name} if isinstance(getattr(value, "name", None), str) else {}
        return named | {f.name: plain_settings(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain_settings(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_settings(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


@dataclass(frozen=True)
class GradientStoreConfig:
    """Where and how the callback writes per-task gradients to disk (a
    :class:`~lightning_metaif.influence.store.GradientStore` per process).

    Args:
        projection_dim: dimension of the seeded random projection of stored gradients; ``None`` (or a value not
            below the number of meta-parameters) stores them unprojected.
        projection: the projection's kind: ``"sjlt"`` (default: a sparse seeded Johnson–Lindenstrauss transform,
            4 entries per parameter, applied by scatter-adds: 50-70x faster than ``"rademacher"`` at the same
            inner-product accuracy, ``benchmarks/bench_projection.py``), ``"rademacher"``, ``"gaussian"``.
        dtype: storage dtype of the rows (``"float16"``, ``"float32"``, ``"bfloat16"``; checked by the store).
        dirpath: the run's folder for the store and the round files; default ``<trainer.log_dir>/metaif``.
        trajectory: with the :class:`~lightning_metaif.estimators.Trajectory` estimator, also write every
            step's projected per-task gradients (to re-score the path later against another reference).
            :class:`~lightning_metaif.estimators.Checkpoints` always writes its rounds when a store is set.

    Example:
        >>> GradientStoreConfig(projection_dim=256).projection_dim
        256
        >>> GradientStoreConfig(projection_dim=0)
        Traceback (most recent call last):
        ...
        ValueError: GradientStoreConfig(projection_dim=0) must be a positive integer or None.
    """

    projection_dim: int | None = 1024
    projection: str = "sjlt"
    dtype: str = "float16"
    dirpath: str | os.PathLike[str] | None = None
    trajectory: bool = False

    def __post_init__(self) -> None:
        if self.projection_dim is not None and (
            not isinstance(self.projection_dim, int)
            or isinstance(self.projection_dim, bool)
            or self.projection_dim < 1
        ):
            raise ValueError(
                f"GradientStoreConfig(projection_dim={self.projection_dim!r}) must be a positive integer or None."
            )
        if not isinstance(self.projection, str):
            raise ValueError(
                f"GradientStoreConfig(projection={self.projection!r}) must be a name, e.g. 'rademacher'."
            )
        if not isinstance(self.dtype, str):
            raise ValueError(f"GradientStoreConfig(dtype={self.dtype!r}) must be a name, e.g. 'float16'.")
