"""Crash-safe file writes shared by the store and the dashboards: one :func:`atomic_write`."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

__all__ = ["atomic_write", "fsync_dir"]


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """``fsync`` a directory so that a rename or a new file in it survives a power loss (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes | str, *, temp_prefix: str = ".tmp-") -> None:
    """Replace ``path`` with ``data`` atomically: readers see the old or the new content, never a mix.

    ``data`` (``str`` is written as UTF-8, newlines untranslated) goes to a temporary file in the same directory
    (named ``{temp_prefix}{name}.{random}``), which is flushed, ``fsync``-ed and ``os.replace``-d onto ``path``;
    then the directory is ``fsync``-ed. On any error the temporary file is removed and ``path`` is unchanged.

    Example:
        >>> import pathlib, tempfile
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> atomic_write(target, "one\\n"); atomic_write(target, b"two\\n")
        >>> target.read_text(), sorted(p.name for p in target.parent.iterdir())
        ('two\\n', ['a.txt'])
    """
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    tmp = path.parent / f"{temp_prefix}{path.name}.{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
