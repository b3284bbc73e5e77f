"""Argument checks shared by the task- and instance-influence entry points, and their defaults."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_metaif.influence.checks import check_number
from lightning_metaif.influence.solvers import SOLVERS

ESTIMATORS = ("task_if", "direct_if", "tracin", "ensemble", "self")
ENGINE_SOLVERS = (*SOLVERS, "ekfac")
"""The iterative / direct solvers of :mod:`~lightning_metaif.influence.solvers`, plus ``"ekfac"`` (a fitted
approximate inverse of the Gauss–Newton curvature, :mod:`~lightning_metaif.influence.ekfac`)."""

DEFAULT_DAMPING = 1e-3
"""A small fixed ``δ`` in ``(H + δI)`` (the estimators' default is ``damping="auto"``, relative to the
curvature's mean eigenvalue): small against the curvature of a mean task loss (O(0.1-10) per direction for
well-scaled models), so it barely biases PD problems, yet it keeps CG away from near-zero directions."""


def check_common(estimator: str, solver: str, damping: float | str) -> None:
    """Reject an unknown estimator or solver, or a damping that is not ``"auto"`` nor a finite number >= 0.

    Example:
        >>> check_common("task_if", "cg", 1e-3)
        >>> check_common("task_if", "newton", 1e-3)
        Traceback (most recent call last):
        ...
        ValueError: Unknown solver 'newton'; choose one of ('identity', 'dense', 'cg', 'lissa', 'arnoldi', 'ekfac').
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"Unknown estimator {estimator!r}; choose one of {ESTIMATORS}.")
    if solver not in ENGINE_SOLVERS:
        raise ValueError(f"Unknown solver {solver!r}; choose one of {ENGINE_SOLVERS}.")
    if isinstance(damping, str):
        if damping != "auto":
            raise ValueError(f"damping must be 'auto' or a finite number >= 0, got {damping!r}.")
        return
    check_number(damping, "damping", minimum=0.0)


def check_reference(reference_tasks: Any, utility: Any, needed: bool, estimator: str) -> None:
    """Exactly one reference objective (tasks or utility) when ``needed``; none otherwise."""
    if needed and (reference_tasks is None) == (utility is None):
        raise ValueError(
            f"estimator={estimator!r} needs exactly one reference objective: `reference_tasks` (held-out tasks "
            "whose mean query loss is f) or `utility` (a differentiable function params -> scalar)."
        )
    if not needed and (reference_tasks is not None or utility is not None):
        raise ValueError(
            "estimator='self' uses no reference objective: drop `reference_tasks` / `utility` (or choose "
            "another estimator and set with_self_influence=True)."
        )


def task_weight_vector(task_weights: Any, num_tasks: int, like: Tensor) -> Tensor:
    """``w_k`` as a vector of ``num_tasks`` entries with ``like``'s dtype and device (default: ones).

    Example:
        >>> task_weight_vector(None, 2, torch.zeros(1)).tolist()
        [1.0, 1.0]
    """
    if task_weights is None:
        return torch.ones(num_tasks, dtype=like.dtype, device=like.device)
    weights = torch.as_tensor(task_weights, dtype=like.dtype, device=like.device).reshape(-1)
    if weights.numel() != num_tasks:
        raise ValueError(
            f"task_weights has {weights.numel()} entries for {num_tasks} tasks; give one per task."
        )
    return weights


__all__ = [
    "DEFAULT_DAMPING",
    "ENGINE_SOLVERS",
    "ESTIMATORS",
    "check_common",
    "check_reference",
    "task_weight_vector",
]
