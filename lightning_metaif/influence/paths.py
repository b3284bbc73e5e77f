"""Choosing between the ``vmap`` and the ``loop`` path by measurement.

Both paths compute the same numbers; which is faster depends on the model and the device (on a CPU, a
``vmap``-ed convolution becomes a grouped convolution that is slower than a loop of plain ones; on a GPU
``vmap`` wins). With ``vectorize="auto"`` the engine runs both on the first chunk of tasks, keeps the
faster, and remembers the choice for that problem, computation and chunk shape, so later calls (every
training step, every Hessian product) take the chosen path directly. The choice is logged once, with both
times, on the ``lightning_metaif`` logger.

A path that raises (e.g. a problem that ``torch.func`` cannot transform) loses to one that works; when
both raise, the loop's error is re-raised (it names the task).
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch

logger = logging.getLogger("lightning_metaif")

T = TypeVar("T")

_CHOICES: weakref.WeakKeyDictionary[Any, dict[Hashable, str]] = weakref.WeakKeyDictionary()


def _remembered(problem: Any) -> dict[Hashable, str] | None:
    try:
        return _CHOICES.setdefault(problem, {})
    except TypeError:  # not weak-referenceable: remember nothing (each call measures again)
        return None


def remembered_choice(problem: Any, key: Hashable) -> str | None:
    """The path chosen earlier for ``problem`` and ``key`` (``None`` when none was measured)."""
    table = _remembered(problem)
    return None if table is None else table.get(key)


def forget_choices(problem: Any | None = None) -> None:
    """Drop remembered choices (of one problem, or all): the next call measures again."""
    if problem is None:
        _CHOICES.clear()
    else:
        table = _remembered(problem)
        if table is not None:
            table.clear()


def _synchronize(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def choose_path(
    problem: Any,
    key: Hashable,
    candidates: dict[str, Callable[[], T]],
    *,
    what: str,
    device: torch.device | None = None,
) -> tuple[str, T]:
    """Run every candidate once, return ``(name of the fastest, its result)`` and remember the choice.

    ``key`` identifies the computation and the shapes it ran on (e.g. ``("gradients", shapes)``). With a
    remembered choice only that candidate runs. Candidates must compute the same numbers.

    Example:
        >>> class Problem:
        ...     pass
        >>> problem = Problem()
        >>> choose_path(problem, "demo", {"vmap": lambda: 1, "loop": lambda: 1}, what="a demo")[1]
        1
        >>> remembered_choice(problem, "demo") in ("vmap", "loop")
        True
    """
    table = _remembered(problem)
    known = None if table is None else table.get(key)
    if known is not None and known in candidates:
        return known, candidates[known]()
    if len(candidates) == 1:
        name, run = next(iter(candidates.items()))
        return name, run()
    times: dict[str, float] = {}
    results: dict[str, Any] = {}
    errors: dict[str, BaseException] = {}
    for name, run in candidates.items():
        _synchronize(device)
        start = time.perf_counter()
        try:
            results[name] = run()
        except Exception as error:  # noqa: BLE001 - a path that cannot run loses; re-raised if none can
            errors[name] = error
            continue
        _synchronize(device)
        times[name] = time.perf_counter() - start
    if not times:
        raise errors.get("loop") or next(iter(errors.values()))
    best = min(times, key=times.__getitem__)
    if table is not None:
        table[key] = best
    measured = ", ".join(f"{name} {seconds * 1e3:.1f} ms" for name, seconds in times.items())
    failed = "".join(f"; {name} failed ({type(err).__name__}: {err})" for name, err in errors.items())
    logger.info("%s: chose the %s path (%s%s).", what, best, measured, failed)
    return best, results[best]


__all__ = ["choose_path", "forget_choices", "remembered_choice"]
