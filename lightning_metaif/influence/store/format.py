"""File format of the gradient store (version 2): header, sections, per-chunk data checksums, dtype table.

Little-endian. A fixed 64-byte header::

    offset  size  field
    0       8     magic b"MIFGRAD\\x00"                (stable in every version)
    8       2     format version (uint16) = 2           (stable in every version)
    10      1     dtype code: 1 float16, 2 float32, 3 bfloat16
    11      1     kind: 0 checkpoint, 1 trajectory segment
    12      4     CRC32 of the header (this field zeroed) followed by the extra JSON bytes
    16      8     rows (uint64)
    24      8     dim (uint64)
    32      8     step (int64; first step of a segment)
    40      8     learning rate (float64; NaN for a segment, whose rates are per row)
    48      8     length of the extra JSON (uint64)
    56      4     chunk rows (uint32 >= 1): rows per checksum chunk
    60      1     checksum algorithm: 1 = XXH3-64
    61      3     reserved (0)

then the extra JSON (UTF-8), then, each section starting at a multiple of 64 bytes: task ids ``int64[rows]``;
for segments only, steps ``int64[rows]`` and learning rates ``float64[rows]``; then the row-major gradient matrix
``dtype[rows, dim]`` (bfloat16 is stored as its raw 16 bits, read through ``numpy.int16`` and reinterpreted with
``Tensor.view(torch.bfloat16)``, since numpy has no bfloat16); then the checksum table ``uint64[chunks, 4]``.
Every byte between sections is zero.

**Checksums.** Rows are grouped in chunks of ``chunk rows`` rows (about 1 MiB of data; the last chunk may be
shorter). For chunk ``c`` the table holds the XXH3-64 digests of that chunk's bytes in the data, ids, steps and
lrs sections (steps and lrs are 0 in a checkpoint). So a reader verifies what it reads one chunk at a time,
while the chunk is in the cache, and a mismatch names the file, the chunk and its rows
(:class:`StoreChecksumError`). Together with the header CRC, the exact-size check and the zero padding
(checked by :func:`verify_file`), every byte of a file is covered.

:func:`read_header` refuses a foreign file, another format version (version 1 files, which had no data
checksums, included), a corrupt header or a truncated file with a :class:`StoreFormatError` (a ``ValueError``)
that names the file, what was expected and what was found.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash
from torch import Tensor

__all__ = [
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "MAGIC",
    "FileHeader",
    "StoreChecksumError",
    "StoreFormatError",
    "read_header",
    "verify_file",
]

MAGIC = b"MIFGRAD\x00"
FORMAT_VERSION = 2
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sHBBIQQqdQIB3x")
CHECKSUM_XXH3_64 = 1
SECTIONS = ("data", "ids", "steps", "lrs")  # columns of the checksum table
assert _HEADER.size == HEADER_SIZE
_ALIGN = 64
_KINDS = {0: "checkpoint", 1: "segment"}
_KIND_CODES = {v: k for k, v in _KINDS.items()}

# name -> (code, torch dtype, numpy storage dtype)
_DTYPES: dict[str, tuple[int, torch.dtype, np.dtype]] = {
    "float16": (1, torch.float16, np.dtype("<f2")),
    "float32": (2, torch.float32, np.dtype("<f4")),
    "bfloat16": (3, torch.bfloat16, np.dtype("<i2")),  # raw bits; numpy has no bfloat16
}
_CODE_TO_NAME = {code: name for name, (code, _, _) in _DTYPES.items()}
_ALIASES = {
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


class StoreFormatError(ValueError):
    """A file in a gradient store is foreign, of another format version, corrupt or truncated."""


def _dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    elif isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
    else:
        raise ValueError(f"dtype must be a torch.dtype or a string, got {type(dtype).__name__}.")
    if name not in _ALIASES:
        raise ValueError(
            f"GradientStore cannot hold dtype {dtype!r}: supported are torch.float16, torch.float32 and "
            "torch.bfloat16 (stored as raw 16-bit words, since numpy.memmap has no bfloat16). Project/cast the "
            "gradients to one of them."
        )
    return _ALIASES[name]


def _align(offset: int) -> int:
    return (offset + _ALIGN - 1) // _ALIGN * _ALIGN


def _normalize_json(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{what} must be JSON-serialisable (dicts, lists, str, finite numbers, bool, None): {err}"
        ) from err


class StoreChecksumError(StoreFormatError):
    """A chunk of a store file does not match its checksum: the file was damaged after it was written.

    ``path``, ``record`` (the file's commit index, or ``None``), ``chunk``, ``rows`` (``(start, stop)``) and
    ``section`` (``"data"``, ``"ids"``, ``"steps"`` or ``"lrs"``) say where.
    """

    def __init__(
        self, path: Path, chunk: int, rows: tuple[int, int], section: str, record: int | None = None
    ) -> None:
        self.path, self.chunk, self.rows, self.section, self.record = path, chunk, rows, section, record
        where = f"record {record}, " if record is not None else ""
        super().__init__(
            f"{path}: {where}chunk {chunk} (rows {rows[0]}-{rows[1] - 1}): checksum mismatch in the {section} "
            "section; the file was damaged after it was written. Run `lightning-metaif store verify "
            f"{path.parent}` to list every damaged chunk, then remove or re-record the file (pass verify=False to "
            "read it anyway)."
        )


def digest(data: Any) -> int:
    """XXH3-64 digest of a bytes-like object (a contiguous numpy array or memoryview): the chunk checksum."""
    return xxhash.xxh3_64_intdigest(data)


@dataclass(frozen=True)
class FileHeader:
    """Parsed header and section offsets of one store file (see the module docstring for the layout)."""

    path: Path
    version: int
    dtype: str
    kind: str
    rows: int
    dim: int
    step: int
    learning_rate: float
    extra: dict[str, Any]
    ids_offset: int
    steps_offset: int
    lrs_offset: int
    data_offset: int
    total_size: int
    chunk_rows: int = 1
    table_offset: int = 0
    extra_len: int = 0

    @property
    def itemsize(self) -> int:
        return _DTYPES[self.dtype][2].itemsize

    @property
    def row_bytes(self) -> int:
        return self.dim * self.itemsize

    @property
    def chunks(self) -> int:
        """Number of checksum chunks."""
        return -(-self.rows // self.chunk_rows)

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        """``(start, stop)`` rows of one chunk."""
        start = chunk * self.chunk_rows
        return start, min(start + self.chunk_rows, self.rows)


@dataclass(frozen=True)
class Layout:
    """Byte offsets of the sections of a file (``-1``: absent)."""

    ids: int
    steps: int
    lrs: int
    data: int
    table: int
    total: int


def _layout(rows: int, dim: int, itemsize: int, extra_len: int, kind: str, chunk_rows: int) -> Layout:
    ids = _align(HEADER_SIZE + extra_len)
    end = ids + 8 * rows
    steps = lrs = -1
    if kind == "segment":
        steps = _align(end)
        lrs = _align(steps + 8 * rows)
        end = lrs + 8 * rows
    data = _align(end)
    table = _align(data + rows * dim * itemsize)
    chunks = -(-rows // chunk_rows)
    return Layout(ids, steps, lrs, data, table, table + 8 * len(SECTIONS) * chunks)


def _pack_header(
    dtype: str,
    kind: str,
    rows: int,
    dim: int,
    step: int,
    learning_rate: float,
    extra_bytes: bytes,
    chunk_rows: int,
) -> bytes:
    fields = [MAGIC, FORMAT_VERSION, _DTYPES[dtype][0], _KIND_CODES[kind], 0, rows, dim, step]
    fields += [learning_rate, len(extra_bytes), chunk_rows, CHECKSUM_XXH3_64]
    crc = zlib.crc32(_HEADER.pack(*fields) + extra_bytes)
    fields[4] = crc
    return _HEADER.pack(*fields)


def read_header(path: str | os.PathLike[str]) -> FileHeader:
    """Parse and validate the header of one store file; refuse foreign, other-version, corrupt or truncated files.

    Example:
        >>> import tempfile, torch
        >>> from lightning_metaif.influence.store import GradientStore
        >>> root = tempfile.mkdtemp()
        >>> store = GradientStore(root, dim=4, dtype=torch.float32)
        >>> info = store.write_checkpoint(10, 0.1, [7, 8], torch.ones(2, 4))
        >>> h = read_header(info.path)
        >>> (h.version, h.dtype, h.kind, h.rows, h.dim, h.step, h.learning_rate, h.chunks)
        (2, 'float32', 'checkpoint', 2, 4, 10, 0.1, 1)
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(HEADER_SIZE)
        if len(raw) < 10 or raw[:8] != MAGIC:
            raise StoreFormatError(
                f"{path}: not a lightning-metaif gradient file (expected magic bytes {MAGIC!r}, found "
                f"{raw[:8]!r}); remove it from the store directory."
            )
        version = struct.unpack_from("<H", raw, 8)[0]
        if version == 1:
            raise StoreFormatError(
                f"{path}: gradient file format version 1 (written by lightning-metaif 0.x before data checksums) "
                f"is not supported: this lightning-metaif reads version {FORMAT_VERSION}, whose rows and task ids "
                "are checksummed. Re-record the gradients (re-run the training with the store on), or read the "
                "file with the version that wrote it."
            )
        if version != FORMAT_VERSION:
            raise StoreFormatError(
                f"{path}: gradient file format version {version} is not supported (this lightning-metaif reads "
                f"version {FORMAT_VERSION}); re-record the gradients with this version or read the file with the "
                "version that wrote it."
            )
        if len(raw) < HEADER_SIZE:
            raise StoreFormatError(
                f"{path}: truncated header ({len(raw)} bytes, expected {HEADER_SIZE}); the file is incomplete."
            )
        _, _, code, kind_code, crc, rows, dim, step, lr, extra_len, chunk_rows, algo = _HEADER.unpack(raw)
        size = os.fstat(f.fileno()).st_size
        if HEADER_SIZE + extra_len > size:
            raise StoreFormatError(
                f"{path}: header announces {extra_len} bytes of extra JSON but the file has {size} bytes "
                "(truncated or corrupt)."
            )
        extra_bytes = f.read(extra_len)
    zeroed = raw[:12] + b"\x00\x00\x00\x00" + raw[16:]
    found_crc = zlib.crc32(zeroed + extra_bytes)
    if found_crc != crc:
        raise StoreFormatError(
            f"{path}: header checksum mismatch (expected CRC32 {crc:#010x}, found {found_crc:#010x}); the header "
            "is corrupt, delete the file."
        )
    if code not in _CODE_TO_NAME:
        raise StoreFormatError(
            f"{path}: unknown dtype code {code} (expected one of {sorted(_CODE_TO_NAME)} = "
            f"{list(_CODE_TO_NAME.values())})."
        )
    if kind_code not in _KINDS:
        raise StoreFormatError(
            f"{path}: unknown record kind {kind_code} (expected 0 checkpoint or 1 segment)."
        )
    if algo != CHECKSUM_XXH3_64 or chunk_rows < 1:
        raise StoreFormatError(
            f"{path}: unknown checksum algorithm {algo} or chunk size {chunk_rows} (expected algorithm "
            f"{CHECKSUM_XXH3_64} = XXH3-64 and chunk rows >= 1)."
        )
    dtype, kind = _CODE_TO_NAME[code], _KINDS[kind_code]
    try:
        extra = json.loads(extra_bytes.decode("utf-8")) if extra_len else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StoreFormatError(f"{path}: extra metadata is not valid UTF-8 JSON ({err}).") from err
    lay = _layout(rows, dim, _DTYPES[dtype][2].itemsize, extra_len, kind, chunk_rows)
    if size != lay.total:
        raise StoreFormatError(
            f"{path}: file has {size} bytes but its header ({rows} rows x {dim} {dtype}) describes {lay.total} "
            "bytes; the file is truncated or was partially written, delete it or re-record it."
        )
    return FileHeader(
        path,
        version,
        dtype,
        kind,
        rows,
        dim,
        step,
        lr,
        extra,
        lay.ids,
        lay.steps,
        lay.lrs,
        lay.data,
        lay.total,
        chunk_rows,
        lay.table,
        extra_len,
    )


def read_checksums(f: Any, header: FileHeader) -> np.ndarray:
    """The checksum table ``uint64[chunks, 4]`` (columns :data:`SECTIONS`) of an open file."""
    table = np.empty((header.chunks, len(SECTIONS)), dtype="<u8")
    if header.chunks:
        _read_exact(f, header.table_offset, table)
    return table


def _padding(header: FileHeader) -> list[tuple[int, int]]:
    """Byte ranges ``[start, stop)`` between sections, which must be zero."""
    sections = [
        (0, HEADER_SIZE + header.extra_len),
        (header.ids_offset, header.ids_offset + 8 * header.rows),
    ]
    if header.kind == "segment":
        sections += [(header.steps_offset, header.steps_offset + 8 * header.rows)]
        sections += [(header.lrs_offset, header.lrs_offset + 8 * header.rows)]
    sections += [(header.data_offset, header.data_offset + header.rows * header.row_bytes)]
    sections += [(header.table_offset, header.total_size)]
    gaps, end = [], 0
    for start, stop in sections:
        if start > end:
            gaps.append((end, start))
        end = max(end, stop)
    return gaps


def verify_file(path: str | os.PathLike[str], *, record: int | None = None) -> list[str]:
    """Check every byte of one file: header (CRC, size), zero padding and every chunk of every section.

    Returns one line per problem found (empty: the file is intact); never raises for a damaged file.

    Example:
        >>> import tempfile, torch
        >>> from lightning_metaif.influence.store import GradientStore
        >>> store = GradientStore(tempfile.mkdtemp(), dim=4)
        >>> info = store.write_checkpoint(1, 0.1, [0, 1], torch.ones(2, 4))
        >>> verify_file(info.path)
        []
        >>> data = bytearray(info.path.read_bytes()); data[read_header(info.path).data_offset] ^= 1
        >>> _ = info.path.write_bytes(bytes(data))
        >>> verify_file(info.path)[0].endswith("checksum mismatch in the data section")
        True
    """
    path = Path(path)
    try:
        h = read_header(path)
    except (StoreFormatError, OSError) as err:
        return [str(err)]
    problems: list[str] = []
    where = f"record {record}, " if record is not None else ""
    with open(path, "rb", buffering=0) as f:
        for start, stop in _padding(h):
            pad = np.empty(stop - start, dtype=np.uint8)
            _read_exact(f, start, pad)
            if pad.any():
                problems.append(f"{path}: {where}non-zero padding in bytes {start}-{stop - 1}")
        table = read_checksums(f, h)
        offsets = {"data": (h.data_offset, h.row_bytes), "ids": (h.ids_offset, 8)}
        if h.kind == "segment":
            offsets.update(steps=(h.steps_offset, 8), lrs=(h.lrs_offset, 8))
        buf = np.empty(h.chunk_rows * max(h.row_bytes, 8), dtype=np.uint8)
        for c in range(h.chunks):
            start, stop = h.chunk_range(c)
            for s, section in enumerate(SECTIONS):
                if section not in offsets:
                    if table[c, s] != 0:
                        problems.append(
                            f"{path}: {where}chunk {c}: non-zero {section} checksum in a checkpoint"
                        )
                    continue
                offset, width = offsets[section]
                part = buf[: (stop - start) * width]
                _read_exact(f, offset + start * width, part)
                if digest(part) != int(table[c, s]):
                    problems.append(
                        f"{path}: {where}chunk {c} (rows {start}-{stop - 1}): checksum mismatch in the {section} "
                        "section"
                    )
    return problems


def _read_exact(f: Any, offset: int | None, buffer: np.ndarray) -> None:
    """Fill ``buffer`` from ``f`` at ``offset`` (``None``: the current position) or raise on a short file."""
    view = memoryview(buffer).cast("B")
    if offset is not None:
        f.seek(offset)
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise StoreFormatError(f"{getattr(f, 'name', '?')}: unexpected end of file at byte {f.tell()}.")
        got += n


def as_task_ids(task_ids: Any, n: int | None = None) -> np.ndarray:
    """Task ids (tensor, array or sequence of ints) as a contiguous little-endian ``int64`` array (``n`` checks the length)."""
    if isinstance(task_ids, Tensor):
        if task_ids.is_floating_point() or task_ids.is_complex():
            raise ValueError(f"task_ids must be integers, got a {task_ids.dtype} tensor.")
        arr = task_ids.detach().cpu().to(torch.int64).numpy()
    else:
        arr = np.asarray(task_ids)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"task_ids must be integers, got dtype {arr.dtype}.")
        arr = arr.astype("<i8", copy=False)
    if arr.ndim != 1:
        raise ValueError(f"task_ids must be 1-D, got shape {tuple(arr.shape)}.")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"got {arr.shape[0]} task ids for {n} gradient rows; pass one id per row.")
    return np.ascontiguousarray(arr, dtype="<i8")
