"""Typed solver settings: each solver's options as a frozen dataclass, validated where it is built.

``solve(operator, rhs, method=..., **options)`` stays the engine's entry point; these objects are what a user
passes instead of a name and a free-form options dict (``TaskIF(solver=CG(max_iterations=200))``), so a typo
fails when the object is built, not deep inside a training run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

__all__ = [
    "CG",
    "EKFAC",
    "SOLVER_SETTINGS",
    "Arnoldi",
    "Dense",
    "Identity",
    "LiSSA",
    "SolverSettings",
    "as_solver",
]


def _positive_int(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}({name}=...) must be a positive integer, got {value!r}.")


def _positive_float(owner: str, name: str, value: Any) -> None:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{owner}({name}=...) must be a finite number > 0, got {value!r}.")


@dataclass(frozen=True)
class SolverSettings:
    """Base class: ``name`` is the engine's method name, :meth:`options` the keyword arguments it takes."""

    name: ClassVar[str] = ""

    def options(self) -> dict[str, Any]:
        """The settings as keyword arguments of the engine's solver (``None`` values left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class Identity(SolverSettings):
    """No curvature: ``(H + δI)^{-1} ≈ I`` (inner-product influence)."""

    name: ClassVar[str] = "identity"


@dataclass(frozen=True)
class Dense(SolverSettings):
    """Build the Hessian as a matrix and factorise it (small models only: ``p²`` memory)."""

    name: ClassVar[str] = "dense"


@dataclass(frozen=True)
class CG(SolverSettings):
    """Conjugate gradient on ``(H + δI) s = ∇f``; stops at relative residual ``tolerance``.

    Example:
        >>> CG(max_iterations=50).options()
        {'max_iterations': 50, 'tolerance': 1e-05, 'strict': False}
        >>> CG(tolerance=0)
        Traceback (most recent call last):
        ...
        ValueError: CG(tolerance=...) must be a finite number > 0, got 0.
    """

    name: ClassVar[str] = "cg"
    max_iterations: int = 100
    tolerance: float = 1e-5
    strict: bool = False

    def __post_init__(self) -> None:
        _positive_int("CG", "max_iterations", self.max_iterations)
        _positive_float("CG", "tolerance", self.tolerance)


@dataclass(frozen=True)
class LiSSA(SolverSettings):
    """Stochastic Neumann series (Agarwal et al.); ``scale`` defaults to an estimate from the spectral radius.

    Stops when the relative residual reaches ``tolerance`` (the defaults of
    :func:`~lightning_metaif.influence.solvers.lissa.lissa_solve`).
    """

    name: ClassVar[str] = "lissa"
    iterations: int = 1000
    tolerance: float = 1e-3
    scale: float | None = None
    batch_size: int | None = None
    repeats: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        _positive_int("LiSSA", "iterations", self.iterations)
        _positive_int("LiSSA", "repeats", self.repeats)
        _positive_float("LiSSA", "tolerance", self.tolerance)
        if self.scale is not None:
            _positive_float("LiSSA", "scale", self.scale)
        if self.batch_size is not None:
            _positive_int("LiSSA", "batch_size", self.batch_size)


@dataclass(frozen=True)
class Arnoldi(SolverSettings):
    """Low-rank inverse from ``rank`` Lanczos eigenpairs (Schioppa et al.), reusable across right-hand sides."""

    name: ClassVar[str] = "arnoldi"
    rank: int = 20
    iterations: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _positive_int("Arnoldi", "rank", self.rank)
        if self.iterations is not None:
            _positive_int("Arnoldi", "iterations", self.iterations)


@dataclass(frozen=True)
class EKFAC(SolverSettings):
    """EK-FAC of the Gauss–Newton total curvature, fitted once on ``fit_tasks`` tasks (default ``min(M, 256)``).

    ``draws``: random output-space cotangents per fitted task (default: about 128 samples in all); tasks with
    few query outputs use the exact expectation instead. Only through ``task_influence`` / ``TaskIF`` (it
    needs the problem's layers, not just Hessian-vector products); see :mod:`lightning_metaif.influence.ekfac`.

    Example:
        >>> EKFAC(fit_tasks=64).options()
        {'fit_tasks': 64}
    """

    name: ClassVar[str] = "ekfac"
    fit_tasks: int | None = None
    draws: int | None = None

    def __post_init__(self) -> None:
        for name in ("fit_tasks", "draws"):
            if getattr(self, name) is not None:
                _positive_int("EKFAC", name, getattr(self, name))


SOLVER_SETTINGS: dict[str, type[SolverSettings]] = {
    cls.name: cls for cls in (Identity, Dense, CG, LiSSA, Arnoldi, EKFAC)
}


def as_solver(value: str | SolverSettings, *, argument: str = "solver") -> SolverSettings:
    """A solver name (with its default settings) or a settings object, checked.

    Example:
        >>> as_solver("cg")
        CG(max_iterations=100, tolerance=1e-05, strict=False)
        >>> as_solver("newton")
        Traceback (most recent call last):
        ...
        ValueError: solver='newton' is not a solver; choose one of ('identity', 'dense', 'cg', 'lissa', 'arnoldi', 'ekfac') or pass CG(...), LiSSA(...), ... from lightning_metaif.influence.solvers.
    """
    if isinstance(value, SolverSettings):
        return value
    if isinstance(value, str) and value in SOLVER_SETTINGS:
        return SOLVER_SETTINGS[value]()
    raise ValueError(
        f"{argument}={value!r} is not a solver; choose one of {tuple(SOLVER_SETTINGS)} or pass CG(...), "
        "LiSSA(...), ... from lightning_metaif.influence.solvers."
    )
