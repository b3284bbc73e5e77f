"""Memory-mapped store of projected per-task gradients at training checkpoints (docs/maths.md §5, TracIn/TracInCP).

A :class:`GradientStore` is a directory::

    root/
      manifest.json                    committed files + store metadata (dim, dtype, projection); atomic
      ckpt-00000000-step100.mgs        one checkpoint: rows = tasks scored at that checkpoint
      traj-00000001-step101-164.mgs    one trajectory segment: rows recorded at many training steps
Each file is self-describing (see :mod:`lightning_metaif.influence.store.format` for the byte layout); a
file whose header is foreign, of another version, corrupt or truncated is refused with a
:class:`~lightning_metaif.influence.store.format.StoreFormatError`.


**Crash safety.** Every file (checkpoint, segment, manifest) is written to a ``.tmp-*`` file in the same
directory, flushed, ``fsync``-ed and ``os.replace``-d into place (then the directory is fsync-ed). A checkpoint
is *committed* once its manifest entry is written. A crash can leave:

* a ``.tmp-*`` file (crash during a write): ignored by readers and deleted when a writable store opens;
* a complete ``*.mgs`` file without a manifest entry (crash between the rename and the manifest update): it is
  **adopted** when the store opens, after validation (magic, version, header CRC, dtype, dim, exact size). This is
  safe because a file only gets its final name after every row was written and fsync-ed; adopting it loses no
  work. A final-named file that fails validation (only possible by outside tampering) is ignored with a warning,
  never deleted.
* a manifest entry whose file is gone: if a ``.tmp-removing-*`` tombstone shows a :meth:`GradientStore.remove`
  was interrupted, the removal is completed; otherwise opening raises ``ValueError`` (a silently missing
  checkpoint would bias TracIn scores).

One process writes a store at a time (e.g. rank 0): a writable store holds an exclusive ``flock`` on
``root/.lock`` (released by :meth:`GradientStore.close` or by the kernel when the process dies, so a killed
writer leaves no stale lock), and a writer in a second process gets ``StoreLockedError``. Other processes may
open it with ``readonly=True`` (no clean up, no writes, no lock) and call :meth:`GradientStore.refresh` to see
new commits. The class is not thread-safe.

**Trajectory segments.** TracIn along the trajectory records a few rows (the meta-batch) at every training step;
one file per step would be too many files. :meth:`GradientStore.append_step` buffers rows (already converted to
the store dtype) in memory and writes one *segment* file, with a per-row step and learning-rate column, whenever
the buffer would exceed ``segment_bytes`` (default 64 MiB), and on :meth:`~GradientStore.flush` /
:meth:`~GradientStore.close` / leaving a ``with store:`` block. The rows of one ``append_step`` call always land in
one segment. A crash loses at most the unflushed buffer (bounded by ``segment_bytes``); call ``flush()`` at
checkpoints if that matters.

**Scoring** never loads a file: :meth:`GradientStore.dot` and :meth:`GradientStore.tracin_scores` read blocks of
rows with ``readinto`` into reused buffers (so the process RSS stays at a few blocks, whereas touching every page of
a ``numpy.memmap`` would count the whole file as resident) and compute in float32 (or the ``compute_dtype``
asked for). :meth:`GradientStore.read` returns copy-on-write ``numpy.memmap``-backed tensors for random access.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import xxhash
from torch import Tensor

from lightning_metaif._io import atomic_write, fsync_dir
from lightning_metaif.influence.store import lock as _lock
from lightning_metaif.influence.store.format import (
    _DTYPES,
    FORMAT_VERSION,
    SECTIONS,
    FileHeader,
    StoreChecksumError,
    StoreFormatError,
    _dtype_name,
    _layout,
    _normalize_json,
    _pack_header,
    _read_exact,
    as_task_ids,
    digest,
    read_checksums,
    read_header,
    verify_file,
)
from lightning_metaif.influence.tracin import Reference, TracInResult

__all__ = [
    "CheckpointInfo",
    "CheckpointWriter",
    "GradientStore",
    "StoreReport",
    "TracInResult",
    "verify_store",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "lightning-metaif-gradient-store"
MANIFEST_VERSION = 2  # 2: files of format 2 (checksummed rows and ids)
FILE_SUFFIX = ".mgs"
TEMP_PREFIX = ".tmp-"
TOMBSTONE_PREFIX = ".tmp-removing-"
ROLLED_BACK_DIR = "rolled-back"
_NAME_RE = re.compile(r"^(?:ckpt|traj)-(\d{8})-")

DEFAULT_CHUNK_BYTES = 2**20
DEFAULT_SEGMENT_BYTES = 64 * 2**20
_WRITE_PIECE_BYTES = 2**20


Verify = bool | Literal["always"]


def _verify_mode(verify: Any) -> bool | str:
    if verify is True or verify is False or verify == "always":
        return verify
    raise ValueError(f"verify must be True, False or 'always', got {verify!r}.")


@dataclass
class _Check:
    """Checksums of one file for one read: the table, and which data chunks this store already verified."""

    table: np.ndarray
    verified: np.ndarray
    always: bool


@dataclass(frozen=True)
class CheckpointInfo:
    """Metadata of one committed file: a checkpoint, or a trajectory segment (``kind == "segment"``).

    For a segment, ``step``/``last_step`` are the smallest/largest recorded step and ``learning_rate`` is ``None``
    (each row has its own; see :meth:`GradientStore.read_steps`). ``index`` is the commit sequence number.
    """

    index: int
    kind: str
    step: int
    last_step: int
    learning_rate: float | None
    rows: int
    dim: int
    dtype: str
    path: Path
    nbytes: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-python manifest entry (file name relative to the store root)."""
        return {
            "file": self.path.name,
            "index": self.index,
            "kind": self.kind,
            "step": self.step,
            "last_step": self.last_step,
            "learning_rate": self.learning_rate,
            "rows": self.rows,
            "bytes": self.nbytes,
            "extra": self.extra,
        }


class CheckpointWriter:
    """Streams the rows of one file to a temporary file; :meth:`commit` makes it visible atomically.

    Obtained from :meth:`GradientStore.open_checkpoint`. Use as a context manager: an exception inside the block
    aborts (the temporary file is removed, nothing is committed); leaving the block normally commits if
    :meth:`commit` was not called yet.
    """

    def __init__(
        self,
        store: GradientStore,
        kind: str,
        step: int,
        learning_rate: float,
        num_rows: int,
        extra: dict[str, Any] | None,
        last_step: int | None = None,
    ) -> None:
        if int(num_rows) < 0:
            raise ValueError(f"num_rows must be >= 0, got {num_rows}.")
        self.store = store
        self.kind = kind
        self.step = int(step)
        self.last_step = int(last_step) if last_step is not None else self.step
        self.learning_rate = float(learning_rate)
        self.num_rows = int(num_rows)
        self.extra = _normalize_json(dict(extra or {}), "extra")
        header_extra = {**self.extra, "last_step": self.last_step} if kind == "segment" else self.extra
        extra_bytes = json.dumps(header_extra, sort_keys=True).encode("utf-8") if header_extra else b""
        itemsize = _DTYPES[store.dtype_name][2].itemsize
        self._row_bytes = store.dim * itemsize
        self.chunk_rows = store.chunk_rows
        lay = _layout(self.num_rows, store.dim, itemsize, len(extra_bytes), kind, self.chunk_rows)
        self._ids, self._steps, self._lrs, self._data = lay.ids, lay.steps, lay.lrs, lay.data
        self._table, self._total = lay.table, lay.total
        self._digests: list[tuple[int, int, int, int]] = []  # one row of the checksum table per full chunk
        self._hashers = [xxhash.xxh3_64() for _ in SECTIONS]
        self.index = store._next_index()
        prefix = "ckpt" if kind == "checkpoint" else "traj"
        steps = f"step{self.step}" if kind == "checkpoint" else f"step{self.step}-{self.last_step}"
        self.final_path = store.root / f"{prefix}-{self.index:08d}-{steps}{FILE_SUFFIX}"
        self.temp_path = store.root / f"{TEMP_PREFIX}{self.final_path.name}.{uuid.uuid4().hex}"
        self.rows_written = 0
        self._cast: Tensor | None = None  # reused cast buffer: no per-chunk allocations in steady state
        self._state = "open"
        self._file = open(self.temp_path, "wb")  # noqa: SIM115 - lives until commit()/abort()
        try:
            header = _pack_header(
                store.dtype_name,
                kind,
                self.num_rows,
                store.dim,
                self.step,
                self.learning_rate,
                extra_bytes,
                self.chunk_rows,
            )
            self._file.write(header + extra_bytes)
            self._file.truncate(self._total)  # sparse until written; the size check catches missing rows
        except BaseException:
            self.abort()
            raise

    def write(self, task_ids: Any, rows: Tensor | np.ndarray, *, steps: Any = None, lrs: Any = None) -> None:
        """Append a chunk: ``task_ids`` ``[n]`` ints and ``rows`` ``[n, dim]`` (any float dtype, any device).

        ``steps``/``lrs`` (``[n]``) are the per-row columns of a trajectory segment (required there, refused for a
        checkpoint). Rows are cast to the store dtype and must stay finite (float16 overflows above 65504). The
        chunk is cast into a reused 1 MiB buffer and written piece by piece, so the store adds about 1.5 MiB to
        the caller's chunk, whatever its size.
        A failed write (bad shape, non-finite values, too many rows, I/O error) aborts the whole checkpoint.
        """
        if self._state != "open":
            raise ValueError(f"cannot write to a writer that is {self._state}; open a new checkpoint.")
        try:
            rows_t = self.store._as_rows(rows)
            n = int(rows_t.shape[0])
            ids = as_task_ids(task_ids, n)
            if self.rows_written + n > self.num_rows:
                raise ValueError(
                    f"writing {n} more rows would exceed num_rows={self.num_rows} ({self.rows_written} already "
                    "written); the checkpoint was aborted. Pass the right num_rows to open_checkpoint."
                )
            f, start = self._file, self.rows_written
            step_col = lr_col = None
            if self.kind == "segment":
                if steps is None or lrs is None:
                    raise ValueError("a trajectory segment needs per-row steps= and lrs= columns.")
                step_col = as_task_ids(steps, n)
                lr_col = np.ascontiguousarray(np.broadcast_to(np.asarray(lrs, dtype="<f8"), (n,)))
                if not np.isfinite(lr_col).all():
                    raise ValueError("learning rates must be finite.")
                f.seek(self._steps + 8 * start)
                f.write(step_col.tobytes())
                f.seek(self._lrs + 8 * start)
                f.write(lr_col.tobytes())
            elif steps is not None or lrs is not None:
                raise ValueError("steps=/lrs= columns only exist for trajectory segments (append_step).")
            f.seek(self._ids + 8 * start)
            f.write(ids.tobytes())
            if self._cast is None:
                piece_rows = max(1, min(self.num_rows, _WRITE_PIECE_BYTES // self._row_bytes))
                self._cast = torch.empty((piece_rows, self.store.dim), dtype=self.store.dtype)
            piece = self._cast.shape[0]
            h_data, h_ids, h_steps, h_lrs = self._hashers
            lo = 0
            while lo < n:  # pieces never cross a checksum chunk, so each chunk's digest streams
                row = start + lo
                chunk_end = (row // self.chunk_rows + 1) * self.chunk_rows
                hi = min(n, lo + piece, chunk_end - start)
                dst = self._cast[: hi - lo]
                data = self.store._encode_rows(rows_t[lo:hi], out=dst)
                f.seek(self._data + self._row_bytes * row)
                f.write(memoryview(data).cast("B"))
                h_data.update(data)
                h_ids.update(ids[lo:hi])
                if step_col is not None and lr_col is not None:
                    h_steps.update(step_col[lo:hi])
                    h_lrs.update(lr_col[lo:hi])
                if start + hi == chunk_end:
                    self._close_chunk()
                lo = hi
        except BaseException:
            self.abort()
            raise
        self.rows_written += n

    def _close_chunk(self) -> None:
        segment = self.kind == "segment"
        h_data, h_ids, h_steps, h_lrs = self._hashers
        self._digests.append(
            (
                h_data.intdigest(),
                h_ids.intdigest(),
                h_steps.intdigest() if segment else 0,
                h_lrs.intdigest() if segment else 0,
            )
        )
        for h in self._hashers:
            h.reset()

    def commit(self) -> CheckpointInfo:
        """Check the row count, write the checksum table, fsync, rename into place and record it in the manifest."""
        if self._state != "open":
            raise ValueError(f"cannot commit a writer that is {self._state}.")
        if self.rows_written != self.num_rows:
            written = self.rows_written
            self.abort()
            raise ValueError(
                f"checkpoint at step {self.step} got {written} rows but num_rows={self.num_rows}; it was aborted "
                "and nothing was committed. Write every row before commit()."
            )
        try:
            if self.num_rows % self.chunk_rows:
                self._close_chunk()  # the last, shorter chunk
            table = np.asarray(self._digests, dtype="<u8").reshape(-1, len(SECTIONS))
            self._file.seek(self._table)
            self._file.write(table.tobytes())
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.temp_path, self.final_path)
            fsync_dir(self.store.root)
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        info = CheckpointInfo(
            index=self.index,
            kind=self.kind,
            step=self.step,
            last_step=self.last_step,
            learning_rate=None if self.kind == "segment" else self.learning_rate,
            rows=self.num_rows,
            dim=self.store.dim,
            dtype=self.store.dtype_name,
            path=self.final_path,
            nbytes=self._total,
            extra=self.extra,
        )
        self.store._register(info)
        return info

    def abort(self) -> None:
        """Drop the temporary file; nothing is committed. Idempotent."""
        if self._state == "open":
            self._state = "aborted"
        try:
            self._file.close()
        finally:
            self.temp_path.unlink(missing_ok=True)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            if self._state == "open":
                self.abort()
        elif self._state == "open":
            self.commit()


class GradientStore:
    """Projected per-task gradients with the step and learning rate of each checkpoint, memory-mapped on disk.

    Args:
        root: directory (created if missing).
        dim: gradient (projection) dimension ``d``.
        dtype: ``torch.float16`` (default), ``torch.float32`` or ``torch.bfloat16``.
        projection: metadata of the projection that produced the rows (e.g. ``RandomProjection.state_dict()``),
            stored in the manifest; reopening with a different value raises.
        segment_bytes: bound of the in-memory buffer of :meth:`append_step` before it is written as a segment.
        readonly: open an existing store for reading only (no temp-file clean up, no writes, no lock). A writable
            store holds an exclusive OS lock on ``root/.lock`` until :meth:`close` (or until its process dies):
            a writer in another process gets :class:`~lightning_metaif.influence.store.lock.StoreLockedError`.
        verify: check what reads return against the checksums (default ``True``): task ids, steps and learning
            rates on every read, each chunk of rows the first time this object reads it (again if the file
            changes on disk); ``"always"`` hashes the rows on every read too; ``False`` checks nothing. Each read
            method also takes ``verify=``. A mismatch raises :class:`StoreChecksumError`.
        chunk_bytes: data bytes per checksum chunk of new files (rows per chunk = ``chunk_bytes // row bytes``);
            reads stream one chunk at a time, so the default 1 MiB keeps a chunk in the CPU cache.

    Opening an existing root with a different ``dim``/``dtype``/``projection`` raises ``ValueError``; use
    :meth:`open` to take them from the manifest.

    Example:
        >>> import tempfile, torch
        >>> store = GradientStore(tempfile.mkdtemp(), dim=3, dtype=torch.float32, projection={"seed": 0})
        >>> info = store.write_checkpoint(5, 0.5, [10, 11], torch.tensor([[1.0, 0, 0], [0, 2.0, 0]]))
        >>> store.dot(info, torch.tensor([1.0, 1.0, 1.0])).tolist()
        [1.0, 2.0]
        >>> r = store.tracin_scores(torch.tensor([1.0, 0.0, 0.0]))
        >>> r.task_ids.tolist(), r.scores.tolist()
        ([10, 11], [0.5, 0.0])
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        dim: int,
        dtype: torch.dtype | str = torch.float16,
        *,
        projection: dict[str, Any] | None = None,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        readonly: bool = False,
        verify: Verify = True,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        if int(dim) <= 0:
            raise ValueError(f"dim must be a positive integer, got {dim}.")
        if int(segment_bytes) <= 0:
            raise ValueError(f"segment_bytes must be positive, got {segment_bytes}.")
        if int(chunk_bytes) <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}.")
        self.root = Path(root).absolute()
        self.dim = int(dim)
        self.dtype_name = _dtype_name(dtype)
        self.dtype = _DTYPES[self.dtype_name][1]
        self.projection = _normalize_json(projection, "projection") if projection is not None else None
        self.segment_bytes = int(segment_bytes)
        self.readonly = bool(readonly)
        self.verify_reads = _verify_mode(verify)
        row_bytes = self.dim * _DTYPES[self.dtype_name][2].itemsize
        self.chunk_rows = max(1, min(int(chunk_bytes) // row_bytes, 2**32 - 1))
        self._tables: dict[str, tuple[tuple[int, int, int], np.ndarray, np.ndarray]] = {}
        self._closed = False
        self._entries: dict[str, CheckpointInfo] = {}
        self._headers: dict[str, FileHeader] = {}
        self._buffer: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._buffer_bytes = 0
        self._max_index = -1
        if self.readonly:
            if not (self.root / MANIFEST_NAME).is_file():
                raise ValueError(f"{self.root}: no {MANIFEST_NAME}; a read-only store must already exist.")
            self._lock_key = None
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock_key = _lock.acquire(self.root)  # before _load: it cleans up and rewrites the manifest
        try:
            self._load()
        except BaseException:
            self._release()
            raise

    # ------------------------------------------------------------------ opening / manifest
    @classmethod
    def open(cls, root: str | os.PathLike[str], *, readonly: bool = False, **kwargs: Any) -> GradientStore:
        """Open an existing store with the dim, dtype and projection recorded in its manifest."""
        manifest = cls._read_manifest(Path(root) / MANIFEST_NAME)
        if manifest is None:
            raise ValueError(
                f"{root}: no {MANIFEST_NAME}; create the store with GradientStore(root, dim, dtype)."
            )
        return cls(
            root,
            manifest["dim"],
            manifest["dtype"],
            projection=manifest.get("projection"),
            readonly=readonly,
            **kwargs,
        )

    @staticmethod
    def _read_manifest(path: Path) -> dict[str, Any] | None:
        if not path.is_file():
            return None
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(
                f"{path}: manifest is not valid JSON ({err}). It is written atomically, so it was modified from "
                "outside; delete it and reopen the store to rebuild it from the self-describing checkpoint files."
            ) from err
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
            raise ValueError(
                f"{path}: not a gradient store manifest (expected format {MANIFEST_FORMAT!r}, found {found!r})."
            )
        if manifest.get("version") == 1:
            raise StoreFormatError(
                f"{path}: this gradient store was written by an older lightning-metaif (manifest version 1, file "
                "format 1, without data checksums), which this version refuses to read. Re-record the gradients "
                "into a new directory (re-run the training with the store on), or read it with the version that "
                "wrote it."
            )
        if manifest.get("version") != MANIFEST_VERSION:
            raise ValueError(
                f"{path}: manifest version {manifest.get('version')!r} is not supported (expected "
                f"{MANIFEST_VERSION})."
            )
        return manifest

    def _load(self) -> None:
        manifest_path = self.root / MANIFEST_NAME
        manifest = self._read_manifest(manifest_path)
        if manifest is not None:
            mismatches = []
            if manifest["dim"] != self.dim:
                mismatches.append(f"dim {manifest['dim']} (asked {self.dim})")
            if manifest["dtype"] != self.dtype_name:
                mismatches.append(f"dtype {manifest['dtype']} (asked {self.dtype_name})")
            if manifest.get("projection") != self.projection:
                mismatches.append(f"projection {manifest.get('projection')} (asked {self.projection})")
            if mismatches:
                raise ValueError(
                    f"{self.root} holds gradients with {', '.join(mismatches)}. Open it with the same settings "
                    "(GradientStore.open(root) reads them from the manifest) or use a new directory."
                )
        if not self.readonly:
            for tmp in self.root.glob(f"{TEMP_PREFIX}*"):
                if not tmp.name.startswith(TOMBSTONE_PREFIX):
                    tmp.unlink(missing_ok=True)
        entries: dict[str, CheckpointInfo] = {}
        changed = manifest is None
        missing = []
        for raw in (manifest or {}).get("checkpoints", []):
            path = self.root / raw["file"]
            if not path.is_file():
                if (self.root / f"{TOMBSTONE_PREFIX}{raw['file']}").exists():
                    changed = True  # finish an interrupted remove()
                    continue
                missing.append(raw["file"])
                continue
            header = self._check_header(read_header(path))
            info = self._info_from(header, raw["index"])
            if info.rows != raw["rows"]:
                raise ValueError(
                    f"{path}: manifest says {raw['rows']} rows, the file header says {info.rows}; the file was "
                    "replaced from outside the store. Delete the manifest entry or restore the file."
                )
            entries[path.name] = info
            self._headers[path.name] = header  # manifest extra == header extra (the header is the truth)
        if missing:
            raise ValueError(
                f"{self.root}: the manifest lists committed files that are missing: {missing[:5]}. Restore them, "
                "or remove their entries from manifest.json to accept the loss."
            )
        for path in sorted(self.root.glob(f"*{FILE_SUFFIX}")):
            if path.name in entries or path.name.startswith(TEMP_PREFIX):
                continue
            try:
                header = self._check_header(read_header(path))
            except ValueError as err:
                warnings.warn(f"ignoring unregistered file that failed validation: {err}", stacklevel=3)
                continue
            match = _NAME_RE.match(path.name)
            index = int(match.group(1)) if match else self._max_index_of(entries) + 1
            if any(e.index == index for e in entries.values()):
                index = self._max_index_of(entries) + 1
            entries[path.name] = self._info_from(header, index)
            self._headers[path.name] = header
            changed = True
            if not self.readonly:
                warnings.warn(
                    f"adopted {path.name}: complete and valid but missing from the manifest (interrupted commit).",
                    stacklevel=3,
                )
        self._entries = dict(sorted(entries.items(), key=lambda kv: kv[1].index))
        self._max_index = max(self._max_index, self._max_index_of(self._entries))
        if not self.readonly:
            if changed:
                self._write_manifest()
            for tomb in self.root.glob(
                f"{TOMBSTONE_PREFIX}*"
            ):  # their entries are gone from the manifest now
                tomb.unlink(missing_ok=True)

    @staticmethod
    def _max_index_of(entries: Mapping[str, CheckpointInfo]) -> int:
        return max((e.index for e in entries.values()), default=-1)

    def _check_header(self, header: FileHeader) -> FileHeader:
        if header.dim != self.dim or header.dtype != self.dtype_name:
            raise StoreFormatError(
                f"{header.path}: holds {header.dtype} rows of dim {header.dim}, but this store is {self.dtype_name} "
                f"with dim {self.dim}."
            )
        return header

    def _info_from(self, header: FileHeader, index: int) -> CheckpointInfo:
        extra = dict(header.extra)
        last = int(extra.pop("last_step", header.step)) if header.kind == "segment" else header.step
        return CheckpointInfo(
            index=int(index),
            kind=header.kind,
            step=header.step,
            last_step=last,
            learning_rate=None if header.kind == "segment" else header.learning_rate,
            rows=header.rows,
            dim=header.dim,
            dtype=header.dtype,
            path=header.path.absolute(),
            nbytes=header.total_size,
            extra=extra,
        )

    def _manifest_dict(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "file_format_version": FORMAT_VERSION,
            "dim": self.dim,
            "dtype": self.dtype_name,
            "projection": self.projection,
            "checkpoints": [info.to_dict() for info in self._entries.values()],
        }

    def _write_manifest(self) -> None:
        data = json.dumps(self._manifest_dict(), indent=1, sort_keys=True).encode("utf-8")
        atomic_write(self.root / MANIFEST_NAME, data, temp_prefix=TEMP_PREFIX)

    def _require_writable(self) -> None:
        if self.readonly:
            raise ValueError(
                f"{self.root} was opened with readonly=True; open it writable to add or remove data."
            )
        if self._closed:
            raise ValueError(f"{self.root}: this GradientStore was closed; open it again to write.")

    def _next_index(self) -> int:
        self._max_index += 1
        return self._max_index

    def _register(self, info: CheckpointInfo) -> None:
        self._entries[info.path.name] = info
        self._headers.pop(info.path.name, None)
        self._tables.pop(info.path.name, None)
        self._write_manifest()

    def refresh(self) -> None:
        """Re-read the manifest (e.g. in a read-only process while another one writes)."""
        self._headers.clear()
        self._tables.clear()
        self._load()

    # ------------------------------------------------------------------ writing
    def _as_rows(self, rows: Tensor | np.ndarray) -> Tensor:
        """Validate shape and dtype of a chunk of rows (no copy)."""
        if isinstance(rows, np.ndarray):
            rows = torch.from_numpy(rows if rows.strides[-1] > 0 else np.ascontiguousarray(rows))
        if not isinstance(rows, Tensor):
            raise ValueError(f"rows must be a Tensor or numpy array, got {type(rows).__name__}.")
        if rows.dim() != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"rows must have shape [n, {self.dim}], got {tuple(rows.shape)}.")
        if not rows.is_floating_point():
            raise ValueError(f"rows must be floating point, got {rows.dtype}.")
        return rows

    def _encode_rows(self, rows: Tensor | np.ndarray, out: Tensor | None = None) -> np.ndarray:
        """Cast rows to the store dtype on the CPU (checked finite) as a numpy array of the storage dtype.

        With ``out`` (a CPU tensor of the store dtype and the same shape) the cast is written there.
        """
        rows = self._as_rows(rows).detach()
        cast = out.copy_(rows) if out is not None else rows.to(device="cpu", dtype=self.dtype).contiguous()
        if not bool(torch.isfinite(cast).all()):
            hint = (
                " (float16 overflows above 65504: scale the gradients or use float32)"
                if self.dtype_name == "float16"
                else ""
            )
            raise ValueError(f"rows contain non-finite values after casting to {self.dtype_name}{hint}.")
        if self.dtype_name == "bfloat16":
            cast = cast.view(torch.int16)
        return cast.numpy()

    def open_checkpoint(
        self, step: int, learning_rate: float, num_rows: int, extra: dict[str, Any] | None = None
    ) -> CheckpointWriter:
        """Start a streaming write of ``num_rows`` rows scored at training ``step`` with ``learning_rate``.

        Example:
            >>> import tempfile, torch
            >>> store = GradientStore(tempfile.mkdtemp(), dim=2)
            >>> with store.open_checkpoint(step=3, learning_rate=0.1, num_rows=4) as w:
            ...     w.write([0, 1], torch.ones(2, 2))
            ...     w.write([2, 3], torch.zeros(2, 2))
            >>> [(c.step, c.rows) for c in store.checkpoints()]
            [(3, 4)]
        """
        self._require_writable()
        lr = float(learning_rate)
        if not math.isfinite(lr):
            raise ValueError(f"learning_rate must be finite, got {learning_rate}.")
        return CheckpointWriter(self, "checkpoint", int(step), lr, int(num_rows), extra)

    def write_checkpoint(
        self,
        step: int,
        learning_rate: float,
        task_ids: Any,
        rows: Tensor | np.ndarray,
        extra: dict[str, Any] | None = None,
    ) -> CheckpointInfo:
        """Write and commit one checkpoint in one call (rows ``[M, dim]``, ``task_ids`` ``[M]``)."""
        with self.open_checkpoint(step, learning_rate, int(rows.shape[0]), extra) as writer:
            writer.write(task_ids, rows)
            return writer.commit()

    def append_step(self, step: int, learning_rate: float, task_ids: Any, rows: Tensor | np.ndarray) -> None:
        """Buffer the rows recorded at one training step (trajectory TracIn); written as segments.

        The rows are cast to the store dtype immediately (so GPU tensors are not kept alive). The buffer is written
        as one segment file before it would exceed ``segment_bytes``; :meth:`flush` writes it now.

        Example:
            >>> import tempfile, torch
            >>> store = GradientStore(tempfile.mkdtemp(), dim=2, dtype=torch.float32)
            >>> for t in range(3):
            ...     store.append_step(t, 0.1, [t, t + 10], torch.ones(2, 2))
            >>> info = store.flush()
            >>> (info.kind, info.step, info.last_step, info.rows)
            ('segment', 0, 2, 6)
            >>> store.read_steps(info)[0].tolist()
            [0, 0, 1, 1, 2, 2]
        """
        self._require_writable()
        lr = float(learning_rate)
        if not math.isfinite(lr):
            raise ValueError(f"learning_rate must be finite, got {learning_rate}.")
        data = self._encode_rows(rows)
        n = data.shape[0]
        ids = as_task_ids(task_ids, n)
        if n == 0:
            return
        if self._buffer and self._buffer_bytes + data.nbytes > self.segment_bytes:
            self.flush()
        self._buffer.append((ids, np.full(n, int(step), dtype="<i8"), np.full(n, lr, dtype="<f8"), data))
        self._buffer_bytes += data.nbytes
        if self._buffer_bytes >= self.segment_bytes:
            self.flush()

    @property
    def pending_rows(self) -> int:
        """Rows buffered by :meth:`append_step` and not yet written."""
        return sum(part[0].shape[0] for part in self._buffer)

    def flush(self) -> CheckpointInfo | None:
        """Write the :meth:`append_step` buffer as one committed segment (``None`` if the buffer is empty)."""
        if not self._buffer:
            return None
        self._require_writable()
        steps = np.concatenate([p[1] for p in self._buffer])
        first, last = int(steps.min()), int(steps.max())
        with CheckpointWriter(
            self, "segment", first, float("nan"), steps.shape[0], None, last_step=last
        ) as writer:
            for ids, step_col, lr_col, data in self._buffer:
                writer.write(ids, torch.from_numpy(data).view(self.dtype), steps=step_col, lrs=lr_col)
            info = writer.commit()
        self._buffer.clear()
        self._buffer_bytes = 0
        return info

    def close(self) -> None:
        """Flush the trajectory buffer and release the writer lock (read-only stores: nothing to do).

        A closed writable store can still be read; writing to it again raises. Idempotent.
        """
        if not self.readonly and self._lock_key is not None:
            try:
                self.flush()
            finally:
                self._release()
        self._closed = True

    def _release(self) -> None:
        key, self._lock_key = getattr(self, "_lock_key", None), None
        _lock.release(key)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self._release()

    def __enter__(self) -> GradientStore:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close()

    def remove(self, info: CheckpointInfo) -> None:
        """Delete one committed file (crash-safe: tombstone rename, manifest update, unlink)."""
        self._require_writable()
        name = info.path.name
        if name not in self._entries:
            raise ValueError(f"{name} is not a committed file of {self.root}.")
        tomb = self.root / f"{TOMBSTONE_PREFIX}{name}"
        os.replace(self.root / name, tomb)
        del self._entries[name]
        self._headers.pop(name, None)
        self._tables.pop(name, None)
        self._write_manifest()
        tomb.unlink(missing_ok=True)

    # ------------------------------------------------------------------ reading
    def checkpoints(self, kind: Literal["checkpoint", "segment"] | None = None) -> list[CheckpointInfo]:
        """Committed files in commit order (``kind`` filters checkpoints or trajectory segments)."""
        if kind not in (None, "checkpoint", "segment"):
            raise ValueError(f"kind must be None, 'checkpoint' or 'segment', got {kind!r}.")
        return [e for e in self._entries.values() if kind is None or e.kind == kind]

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return (
            f"GradientStore(root={str(self.root)!r}, dim={self.dim}, dtype={self.dtype_name}, "
            f"files={len(self._entries)}, rows={self.total_rows()})"
        )

    def total_rows(self) -> int:
        """Rows over all committed files."""
        return sum(e.rows for e in self._entries.values())

    def _header(self, info: CheckpointInfo | int) -> FileHeader:
        if isinstance(info, int):
            info = self.checkpoints()[info]
        name = info.path.name
        if name not in self._entries:
            raise ValueError(
                f"{name} is not a committed file of {self.root} (call refresh() if another process wrote it)."
            )
        if name not in self._headers:
            self._headers[name] = self._check_header(read_header(self.root / name))
        return self._headers[name]

    def _checksums(self, h: FileHeader, f: Any, verify: Verify | None) -> _Check | None:
        """What a read must check (``None``: nothing): the file's checksum table and its verified data chunks.

        The table is cached with the file's identity (inode, size, modification time); data chunks verified once
        by this object are not hashed again while that identity holds, unless ``verify="always"``. A file
        changed on disk since it was opened has its header re-validated and every chunk verified again.
        """
        mode = _verify_mode(self.verify_reads if verify is None else verify)
        if not mode:
            return None
        name = h.path.name
        st = os.fstat(f.fileno())
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._tables.get(name)
        if cached is None or cached[0] != key:
            if cached is not None and self._check_header(read_header(h.path)) != h:
                raise StoreFormatError(
                    f"{h.path}: the file was replaced after this store opened it (its header changed); "
                    "call refresh() or reopen the store."
                )
            table = read_checksums(f, h)
            if h.kind == "checkpoint" and table[:, 2:].any():  # no steps/lrs columns: their digests are 0
                raise self._damaged(h, int(np.flatnonzero(table[:, 2:].any(axis=1))[0]), "checksum table")
            cached = (key, table, np.zeros(h.chunks, dtype=bool))
            self._tables[name] = cached
        return _Check(cached[1], cached[2], mode == "always")

    def _damaged(self, h: FileHeader, chunk: int, section: str) -> StoreChecksumError:
        entry = self._entries.get(h.path.name)
        return StoreChecksumError(
            h.path, chunk, h.chunk_range(chunk), section, None if entry is None else entry.index
        )

    def _read_column(self, h: FileHeader, f: Any, check: _Check | None, section: str) -> np.ndarray:
        """A whole ``ids``/``steps``/``lrs`` column; with ``check``, every chunk of it is verified (cheap: 8 B/row)."""
        offset = {"ids": h.ids_offset, "steps": h.steps_offset, "lrs": h.lrs_offset}[section]
        col = np.empty(h.rows, dtype="<f8" if section == "lrs" else "<i8")
        _read_exact(f, offset, col)
        if check is not None:
            s = SECTIONS.index(section)
            for c in range(h.chunks):
                start, stop = h.chunk_range(c)
                if digest(col[start:stop]) != int(check.table[c, s]):
                    raise self._damaged(h, c, section)
        return col

    def _check_data(self, h: FileHeader, check: _Check | None, chunk: int, raw: np.ndarray) -> None:
        if check is None or not (check.always or not check.verified[chunk]):
            return
        if digest(raw) != int(check.table[chunk, 0]):
            raise self._damaged(h, chunk, "data")
        check.verified[chunk] = True

    def _verify_data(self, h: FileHeader, f: Any, check: _Check) -> None:
        buf = np.empty((min(h.chunk_rows, h.rows), h.dim), dtype=_DTYPES[h.dtype][2])
        for c in range(h.chunks):
            if check.always or not check.verified[c]:
                start, stop = h.chunk_range(c)
                part = buf[: stop - start]
                _read_exact(f, h.data_offset + start * h.row_bytes, part)
                self._check_data(h, check, c, part)

    def read(self, info: CheckpointInfo | int, *, verify: Verify | None = None) -> tuple[Tensor, Tensor]:
        """``(task_ids [rows] int64, rows [rows, dim] store dtype)`` backed by copy-on-write memmaps (not loaded).

        Writing to the returned tensors never changes the file. Pages are read on access. With verification on
        (the store's default), the ids and rows are first checked chunk by chunk (one streaming pass).
        """
        h = self._header(info)
        if h.rows == 0:
            return torch.empty(0, dtype=torch.int64), torch.empty(0, h.dim, dtype=self.dtype)
        with open(h.path, "rb", buffering=0) as f:
            check = self._checksums(h, f, verify)
            if check is not None:
                self._read_column(h, f, check, "ids")
                self._verify_data(h, f, check)
        ids = np.memmap(h.path, dtype="<i8", mode="c", offset=h.ids_offset, shape=(h.rows,))
        data = np.memmap(
            h.path, dtype=_DTYPES[h.dtype][2], mode="c", offset=h.data_offset, shape=(h.rows, h.dim)
        )
        rows = torch.from_numpy(data)
        if h.dtype == "bfloat16":
            rows = rows.view(torch.bfloat16)
        return torch.from_numpy(ids), rows

    def read_ids(self, info: CheckpointInfo | int, *, verify: Verify | None = None) -> Tensor:
        """Task ids ``[rows]`` of one file (loaded; verified by default)."""
        h = self._header(info)
        with open(h.path, "rb", buffering=0) as f:
            return torch.from_numpy(self._read_column(h, f, self._checksums(h, f, verify), "ids"))

    def read_steps(
        self, info: CheckpointInfo | int, *, verify: Verify | None = None
    ) -> tuple[Tensor, Tensor]:
        """Per-row ``(steps int64, learning_rates float64)`` (loaded, verified by default); constant for a checkpoint."""
        h = self._header(info)
        if h.kind == "checkpoint" or h.rows == 0:
            return torch.full((h.rows,), h.step, dtype=torch.int64), torch.full(
                (h.rows,), h.learning_rate, dtype=torch.float64
            )
        with open(h.path, "rb", buffering=0) as f:
            check = self._checksums(h, f, verify)
            steps = self._read_column(h, f, check, "steps")
            lrs = self._read_column(h, f, check, "lrs")
        return torch.from_numpy(steps), torch.from_numpy(lrs)

    def iter_blocks(
        self,
        info: CheckpointInfo | int,
        *,
        compute_dtype: torch.dtype = torch.float32,
        columns: bool = False,
        verify: Verify | None = None,
    ) -> Iterator[tuple[int, int, Tensor, np.ndarray | None, np.ndarray | None, np.ndarray | None]]:
        """Stream ``(start, stop, rows[start:stop] in compute_dtype, ids, steps, lrs)``, one checksum chunk a time.

        A block is one chunk of the file (about 1 MiB of stored rows, see ``chunk_bytes``): it is read into a
        reused buffer, checked against its checksum while it is in the CPU cache (unless ``verify=False``) and
        converted to ``compute_dtype`` in a second reused buffer (no conversion when the dtypes agree), so RAM
        stays at two chunks. The yielded tensors reuse these buffers: consume (or copy) each block before taking
        the next. ``ids``/``steps``/``lrs`` are ``None`` unless ``columns=True`` (``steps``/``lrs`` stay ``None``
        for a checkpoint); the columns are read and verified once, then sliced.
        """
        h = self._header(info)
        nrows = min(h.chunk_rows, max(h.rows, 1))
        raw = np.empty((nrows, h.dim), dtype=_DTYPES[h.dtype][2])
        raw_t = torch.from_numpy(raw)
        if h.dtype == "bfloat16":
            raw_t = raw_t.view(torch.bfloat16)
        conv = None if self.dtype == compute_dtype else torch.empty((nrows, h.dim), dtype=compute_dtype)
        with open(h.path, "rb", buffering=0) as f:
            check = self._checksums(h, f, verify)
            ids_col = steps_col = lrs_col = None
            if columns:
                ids_col = self._read_column(h, f, check, "ids")
                if h.kind == "segment":
                    steps_col = self._read_column(h, f, check, "steps")
                    lrs_col = self._read_column(h, f, check, "lrs")
            f.seek(h.data_offset)
            for c in range(h.chunks):
                start, stop = h.chunk_range(c)
                n = stop - start
                _read_exact(f, None, raw[:n])  # sequential: chunks are contiguous
                self._check_data(h, check, c, raw[:n])
                block = raw_t[:n]
                if conv is not None:
                    block = conv[:n].copy_(block)
                yield (
                    start,
                    stop,
                    block,
                    None if ids_col is None else ids_col[start:stop],
                    None if steps_col is None else steps_col[start:stop],
                    None if lrs_col is None else lrs_col[start:stop],
                )

    def dot(
        self,
        info: CheckpointInfo | int,
        vectors: Tensor,
        *,
        compute_dtype: torch.dtype = torch.float32,
        verify: Verify | None = None,
    ) -> Tensor:
        """``rows @ vectors`` for ``vectors`` ``[dim]`` or ``[dim, r]`` -> ``[rows]`` / ``[rows, r]``, streamed.

        Streams the file one cache-sized chunk at a time (:meth:`iter_blocks`) and multiplies in ``compute_dtype``
        on the CPU; a matrix of ``r`` reference vectors reads the file once. RAM: two chunks plus the output.

        Example:
            >>> import tempfile, torch
            >>> store = GradientStore(tempfile.mkdtemp(), dim=2)
            >>> info = store.write_checkpoint(0, 0.1, [0, 1], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
            >>> store.dot(info, torch.tensor([[1.0, 0.0], [0.0, 1.0]])).tolist()
            [[1.0, 2.0], [3.0, 4.0]]
        """
        h = self._header(info)
        vec = self.check_vectors(vectors, compute_dtype)
        blocks = self.iter_blocks(info, compute_dtype=compute_dtype, verify=verify)
        if vec.dim() == 1:
            out = torch.empty(h.rows, dtype=compute_dtype)
            for start, stop, block, *_ in blocks:
                torch.mv(block, vec, out=out[start:stop])
            return out
        # r queries: [r, d] @ block^T into a transposed output (faster on CPU than block @ [d, r] in our tests)
        vec_t = vec.t().contiguous()
        out_t = torch.empty((vec.shape[1], h.rows), dtype=compute_dtype)
        for start, stop, block, *_ in blocks:
            torch.mm(vec_t, block.t(), out=out_t[:, start:stop])
        return out_t.t().contiguous()

    def check_vectors(self, vectors: Tensor, compute_dtype: torch.dtype) -> Tensor:
        if not isinstance(vectors, Tensor):
            vectors = torch.as_tensor(np.asarray(vectors))
        if vectors.dim() not in (1, 2) or vectors.shape[0] != self.dim:
            raise ValueError(
                f"vectors must have shape [{self.dim}] or [{self.dim}, r], got {tuple(vectors.shape)}."
            )
        vec = vectors.detach().to(device="cpu", dtype=compute_dtype).contiguous()
        if not bool(torch.isfinite(vec).all()):
            raise ValueError("vectors contain non-finite values.")
        return vec

    def verify(self) -> StoreReport:
        """Check every byte of every file in the store directory; see :func:`verify_store`.

        Example:
            >>> import tempfile, torch
            >>> store = GradientStore(tempfile.mkdtemp(), dim=2)
            >>> _ = store.write_checkpoint(0, 0.1, [0], torch.ones(1, 2))
            >>> report = store.verify()
            >>> report.ok, report.files, report.rows
            (True, 1, 1)
        """
        return verify_store(self.root)

    # ------------------------------------------------------------------ TracIn
    def tracin_scores(self, reference: Reference, **kwargs: Any) -> TracInResult:
        """TracIn / TracInCP scores over the stored rows: :func:`lightning_metaif.influence.tracin.store_tracin`."""
        from lightning_metaif.influence.tracin import store_tracin

        return store_tracin(self, reference, **kwargs)

    # ------------------------------------------------------------------ bookkeeping
    def size_bytes(self) -> int:
        """Bytes on disk: every committed file plus the manifest."""
        manifest = self.root / MANIFEST_NAME
        return sum(e.nbytes for e in self._entries.values()) + (
            manifest.stat().st_size if manifest.exists() else 0
        )

    def state_dict(self) -> dict[str, Any]:
        """Plain-python description (root, dim, dtype name, projection, committed file metadata)."""
        return {
            "root": str(self.root),
            "dim": self.dim,
            "dtype": self.dtype_name,
            "projection": self.projection,
            "format_version": FORMAT_VERSION,
            "checkpoints": [info.to_dict() for info in self._entries.values()],
        }

    def _check_listed(self, state: Mapping[str, Any]) -> set[int]:
        """Commit indices a saved state lists; every one must still be here (and, same store, unchanged)."""
        listed = list(state.get("checkpoints", []))
        same_store = Path(state.get("root", "")).absolute() == self.root
        by_index = {info.index: info for info in self._entries.values()}
        if same_store:
            missing = sorted(c["file"] for c in listed if c["file"] not in self._entries)
        else:  # another rank's store: same records in the same order, other contents
            missing = sorted(f"record {c['index']}" for c in listed if c["index"] not in by_index)
        if missing:
            raise ValueError(
                f"{self.root} lacks files listed in the state dict: {missing[:5]}; the store was modified or "
                "the state belongs to another store."
            )
        for entry in listed:
            info = self._entries[entry["file"]] if same_store else by_index[entry["index"]]
            if info.kind != entry["kind"] or (
                same_store and (info.rows, info.step) != (entry["rows"], entry["step"])
            ):
                raise ValueError(
                    f"{info.path.name}: state dict says {entry['kind']} at step {entry['step']}, {entry['rows']} "
                    f"rows; the store has {info.kind} at step {info.step}, {info.rows} rows (the state belongs to "
                    "another store)."
                )
        return {int(c["index"]) for c in listed}

    def rollback(self, state: Mapping[str, Any], *, move_aside: bool = True) -> list[CheckpointInfo]:
        """Return the store to a saved :meth:`state_dict`: drop every record committed after it; report them.

        For resuming from a training checkpoint: records written by the interrupted run after the checkpoint
        (committed, adopted at open, or still buffered by :meth:`append_step`) are dropped, so the resumed run
        re-records them exactly as an uninterrupted run would (same file names, same commit indices). With
        ``move_aside=True`` (default) their files move to ``root/rolled-back/<time>-<id>/`` (ignored by the store),
        otherwise they are deleted. Every record the state lists must still be there unchanged (else
        ``ValueError``). Records are matched by commit index, so the state of another rank's store (which writes
        the same sequence of records, as the per-rank stores of a DDP run do) rolls this one back as well. Crash-safe: the manifest drops the records first, so an interrupted rollback leaves
        unlisted files that the next open adopts and the next rollback drops again.

        Example:
            >>> import tempfile, torch
            >>> store = GradientStore(tempfile.mkdtemp(), dim=2)
            >>> _ = store.write_checkpoint(1, 0.1, [0], torch.ones(1, 2))
            >>> saved = store.state_dict()
            >>> late = store.write_checkpoint(2, 0.1, [0], torch.ones(1, 2))
            >>> [info.step for info in store.rollback(saved)], [c.step for c in store.checkpoints()]
            ([2], [1])
            >>> store.write_checkpoint(2, 0.1, [0], torch.ones(1, 2)).path.name == late.path.name
            True
        """
        self._require_writable()
        listed = self._check_listed(state)
        self._buffer.clear()
        self._buffer_bytes = 0
        later = [info for info in self._entries.values() if info.index not in listed]
        for info in later:
            del self._entries[info.path.name]
            self._headers.pop(info.path.name, None)
            self._tables.pop(info.path.name, None)
        self._max_index = self._max_index_of(self._entries)
        if later:
            self._write_manifest()
            aside = None
            if move_aside:
                aside = (
                    self.root / ROLLED_BACK_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
                )
                aside.mkdir(parents=True)
            for info in later:
                if aside is not None:
                    os.replace(info.path, aside / info.path.name)
                else:
                    info.path.unlink(missing_ok=True)
            fsync_dir(self.root)
        return later

    @classmethod
    def from_state_dict(
        cls,
        state: Mapping[str, Any],
        *,
        root: str | os.PathLike[str] | None = None,
        prune_unlisted: bool = False,
        readonly: bool = False,
    ) -> GradientStore:
        """Reopen the store described by :meth:`state_dict` and check that every listed file is still there.

        ``root`` overrides the recorded directory (moved store). ``prune_unlisted=True`` removes committed files
        that the state does not list (e.g. written after the training checkpoint that is being resumed).

        Example:
            >>> import tempfile, torch
            >>> store = GradientStore(tempfile.mkdtemp(), dim=2)
            >>> _ = store.write_checkpoint(1, 0.1, [0], torch.ones(1, 2))
            >>> again = GradientStore.from_state_dict(store.state_dict())
            >>> [c.step for c in again.checkpoints()]
            [1]
        """
        store = cls(
            root if root is not None else state["root"],
            state["dim"],
            state["dtype"],
            projection=state.get("projection"),
            readonly=readonly,
        )
        if prune_unlisted:
            store.rollback(state, move_aside=False)
        else:
            store._check_listed(state)
        return store


@dataclass
class StoreReport:
    """What :func:`verify_store` found: ``problems`` (one line each; empty = intact) and what was checked."""

    root: Path
    files: int = 0
    rows: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        head = f"{self.root}: {self.files} files, {self.rows} rows, {self.bytes / 2**20:.1f} MiB checked: "
        lines = [head + ("intact" if self.ok else f"{len(self.problems)} problem(s)")]
        lines += [f"  DAMAGED {p}" for p in self.problems] + [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def verify_store(root: str | os.PathLike[str]) -> StoreReport:
    """Check a store directory without opening it for writing: manifest, and every byte of every ``*.mgs`` file.

    Reports (never raises for damage): files listed in the manifest but missing, files whose header, padding or
    any chunk of rows, task ids, steps or learning rates does not match its checksum (naming file, record and
    chunk), files of another format version. Unlisted valid files and leftover temporary files are notes (a
    writable open adopts or removes them). The command line ``lightning-metaif store verify DIR`` prints it.

    Example:
        >>> import tempfile, torch
        >>> root = tempfile.mkdtemp()
        >>> info = GradientStore(root, dim=2).write_checkpoint(0, 0.1, [0, 1], torch.ones(2, 2))
        >>> data = bytearray(info.path.read_bytes()); data[-20] ^= 0xFF  # a byte of the checksum table
        >>> _ = info.path.write_bytes(bytes(data))
        >>> report = verify_store(root)
        >>> report.ok, "chunk 0" in report.problems[0]
        (False, True)
    """
    root = Path(root).absolute()
    report = StoreReport(root)
    try:
        manifest = GradientStore._read_manifest(root / MANIFEST_NAME)
    except ValueError as err:
        report.problems.append(str(err))
        manifest = None
    if manifest is None and not report.problems:
        report.problems.append(
            f"{root}: no {MANIFEST_NAME}; not a gradient store (or its manifest was deleted)."
        )
    listed = {e["file"]: e for e in (manifest or {}).get("checkpoints", [])}
    for name in sorted(listed):
        if not (root / name).is_file():
            report.problems.append(
                f"{root / name}: listed in the manifest (record {listed[name]['index']}) but missing"
            )
    for path in sorted(root.glob(f"*{FILE_SUFFIX}")):
        entry = listed.get(path.name)
        problems = verify_file(path, record=None if entry is None else entry.get("index"))
        report.files += 1
        report.bytes += path.stat().st_size
        if problems:
            report.problems += problems
            continue
        h = read_header(path)
        report.rows += h.rows
        if manifest is not None and (h.dim != manifest["dim"] or h.dtype != manifest["dtype"]):
            report.problems.append(
                f"{path}: holds {h.dtype} rows of dim {h.dim}, the store is {manifest['dtype']} dim {manifest['dim']}"
            )
        elif entry is None:
            report.notes.append(f"{path.name}: valid but not in the manifest (a writable open adopts it)")
        elif entry.get("rows") != h.rows:
            report.problems.append(f"{path}: manifest says {entry.get('rows')} rows, the file {h.rows}")
    for tmp in sorted(root.glob(f"{TEMP_PREFIX}*")):
        report.notes.append(f"{tmp.name}: leftover of an interrupted write (a writable open removes it)")
    return report
