"""File format of the gradient store: the 64-byte header, its parsing and validation, the dtype table.

Version 1, little-endian. A fixed 64-byte header::

    offset  size  field
    0       8     magic b"MIFGRAD\\x00"                (stable in every version)
    8       2     format version (uint16) = 1           (stable in every version)
    10      1     dtype code: 1 float16, 2 float32, 3 bfloat16
    11      1     kind: 0 checkpoint, 1 trajectory segment
    12      4     CRC32 of the header (this field zeroed) followed by the extra JSON bytes
    16      8     rows (uint64)
    24      8     dim (uint64)
    32      8     step (int64; first step of a segment)
    40      8     learning rate (float64; NaN for a segment, whose rates are per row)
    48      8     length of the extra JSON (uint64)
    56      8     reserved (0)

then the extra JSON (UTF-8), then, each section starting at a multiple of 64 bytes: task ids ``int64[rows]``;
for segments only, steps ``int64[rows]`` and learning rates ``float64[rows]``; then the row-major gradient matrix
``dtype[rows, dim]`` (bfloat16 is stored as its raw 16 bits, read through ``numpy.int16`` and reinterpreted with
``Tensor.view(torch.bfloat16)``, since numpy has no bfloat16). The file size must equal the size the header
describes, so a truncated file is detected. :func:`read_header` refuses a foreign file, another format version,
a corrupt header or a truncated file with a :class:`StoreFormatError` (a ``ValueError``) that names the file,
what was expected and what was found.
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
from torch import Tensor

__all__ = [
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "MAGIC",
    "FileHeader",
    "StoreFormatError",
    "read_header",
]

MAGIC = b"MIFGRAD\x00"
FORMAT_VERSION = 1
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sHBBIQQqdQQ")
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

    @property
    def itemsize(self) -> int:
        return _DTYPES[self.dtype][2].itemsize

    @property
    def row_bytes(self) -> int:
        return self.dim * self.itemsize


def _layout(rows: int, dim: int, itemsize: int, extra_len: int, kind: str) -> tuple[int, int, int, int, int]:
    ids = _align(HEADER_SIZE + extra_len)
    end = ids + 8 * rows
    steps = lrs = -1
    if kind == "segment":
        steps = _align(end)
        lrs = _align(steps + 8 * rows)
        end = lrs + 8 * rows
    data = _align(end)
    return ids, steps, lrs, data, data + rows * dim * itemsize


def _pack_header(
    dtype: str, kind: str, rows: int, dim: int, step: int, learning_rate: float, extra_bytes: bytes
) -> bytes:
    fields = [MAGIC, FORMAT_VERSION, _DTYPES[dtype][0], _KIND_CODES[kind], 0, rows, dim, step]
    fields += [learning_rate, len(extra_bytes), 0]
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
        >>> (h.version, h.dtype, h.kind, h.rows, h.dim, h.step, h.learning_rate)
        (1, 'float32', 'checkpoint', 2, 4, 10, 0.1)
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
        _, _, code, kind_code, crc, rows, dim, step, lr, extra_len, _ = _HEADER.unpack(raw)
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
    dtype, kind = _CODE_TO_NAME[code], _KINDS[kind_code]
    try:
        extra = json.loads(extra_bytes.decode("utf-8")) if extra_len else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StoreFormatError(f"{path}: extra metadata is not valid UTF-8 JSON ({err}).") from err
    ids, steps, lrs, data, total = _layout(rows, dim, _DTYPES[dtype][2].itemsize, extra_len, kind)
    if size != total:
        raise StoreFormatError(
            f"{path}: file has {size} bytes but its header ({rows} rows x {dim} {dtype}) describes {total} bytes; "
            "the file is truncated or was partially written, delete it or re-record it."
        )
    return FileHeader(path, version, dtype, kind, rows, dim, step, lr, extra, ids, steps, lrs, data, total)


def _read_exact(f: Any, offset: int, buffer: np.ndarray) -> None:
    view = memoryview(buffer).cast("B")
    f.seek(offset)
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise StoreFormatError(
                f"{getattr(f, 'name', '?')}: unexpected end of file at byte {offset + got}."
            )
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
