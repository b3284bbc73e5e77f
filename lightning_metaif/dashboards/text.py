"""Readable text for scores and classes (console summaries, the HTML report)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

__all__ = ["format_classes", "format_score"]


def format_score(value: float, digits: int = 3) -> str:
    """A score as a signed decimal with ``digits`` significant digits; scientific only below 1e-3 or from 1e5.

    Example:
        >>> format_score(-0.85809), format_score(0.0012345), format_score(42.0), format_score(-3.2e-6)
        ('-0.858', '+0.00123', '+42.0', '-3.20e-06')
        >>> format_score(0.0), format_score(float("nan"))
        ('0', 'nan')
    """
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if value == 0.0:
        return "0"
    magnitude = abs(value)
    if 1e-3 <= magnitude < 1e5:
        decimals = max(0, digits - 1 - math.floor(math.log10(magnitude)))
        return f"{value:+.{decimals}f}"
    return f"{value:+.{digits - 1}e}"


def format_classes(classes: Iterable[int] | None, names: Mapping[int, str] | None = None) -> str:
    """Classes of a task, by name where known (``digit 7 rot270`` is shortened to ``7 rot270``).

    Example:
        >>> format_classes([3, 37], {3: "digit 3 rot0", 37: "digit 7 rot270"})
        '3 rot0, 7 rot270'
        >>> format_classes([3, 37])
        '3 37'
    """
    if not classes:
        return ""
    if not names:
        return " ".join(str(int(c)) for c in classes)
    out = []
    for c in classes:
        name = names.get(int(c), names.get(str(int(c)), str(int(c))))  # type: ignore[call-overload]
        out.append(str(name).removeprefix("digit "))
    return ", ".join(out)
