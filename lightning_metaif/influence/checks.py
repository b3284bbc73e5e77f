"""Checks of numeric settings shared by the engine: a finite number in range, named in the error."""

from __future__ import annotations

import math
import numbers
from typing import Any


def check_number(value: Any, name: str, *, minimum: float | None = None, positive: bool = False) -> float:
    """``value`` as a float if it is a finite real number (``>= minimum``, or ``> 0`` with ``positive``).

    NaN and infinities are refused, naming the argument, as are booleans and non-numbers.

    Example:
        >>> check_number(1e-3, "damping", minimum=0.0)
        0.001
        >>> check_number(float("nan"), "damping", minimum=0.0)
        Traceback (most recent call last):
        ...
        ValueError: damping must be a finite number >= 0.0, got nan.
    """
    bound = " > 0" if positive else (f" >= {minimum}" if minimum is not None else "")
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok and positive:
        ok = float(value) > 0
    if ok and minimum is not None:
        ok = float(value) >= minimum
    if not ok:
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}.")
    return float(value)


def check_options(options: dict[str, Any], what: str) -> None:
    """Refuse a non-finite float among keyword settings (e.g. a solver's ``tol=nan``), naming it."""
    for key, value in options.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{what} setting {key}={value!r} must be a finite number.")


__all__ = ["check_number", "check_options"]
