"""One writer process per gradient store: an exclusive ``flock`` on ``root/.lock``.

The kernel releases a ``flock`` when its process dies (``kill -9`` included), so a lock left by a crashed
writer never blocks: the lock *file* stays, but nobody holds it. Inside one process several writable
:class:`~lightning_metaif.influence.store.GradientStore` objects of the same directory share one lock (a
reference count; e.g. a resumed Trainer in the same script); a second *process* gets :class:`StoreLockedError`.
Where ``fcntl`` is unavailable (Windows) no lock is taken.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"

# (st_dev, st_ino) of a lock file -> [fd, holders] for the locks this process holds
_HELD: dict[tuple[int, int], list[int]] = {}


class StoreLockedError(RuntimeError):
    """Another process has the gradient store open for writing."""


def acquire(root: Path) -> tuple[int, int] | None:
    """Take (or share, within this process) the writer lock of ``root``; returns a key for :func:`release`."""
    if fcntl is None:  # pragma: no cover
        return None
    path = root / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    if key in _HELD:
        os.close(fd)
        _HELD[key][1] += 1
        return key
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
        finally:
            os.close(fd)
        raise StoreLockedError(
            f"{root} is open for writing in another process ({holder}); one process writes a store at a time. "
            "Close that writer (GradientStore.close() or let it exit), open the store with readonly=True to "
            "read it meanwhile, or give this run its own directory."
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    _HELD[key] = [fd, 1]
    return key


def release(key: tuple[int, int] | None) -> None:
    """Drop one holder of a lock taken by :func:`acquire`; the last one unlocks (closing the descriptor)."""
    if key is None or key not in _HELD:
        return
    _HELD[key][1] -= 1
    if _HELD[key][1] <= 0:
        fd = _HELD.pop(key)[0]
        os.close(fd)  # closing the only descriptor releases the flock
