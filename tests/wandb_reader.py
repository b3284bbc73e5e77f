"""Read an offline W&B run back in tests, without network and without the W&B app.

The ``run-<id>.wandb`` file of an offline run is a LevelDB-style log (checked with wandb 0.31):

* a 7-byte file header: ``b":W&B"``, the magic ``0xBEE1`` as little-endian uint16, version byte ``0``;
* then 32 KiB blocks (the first block counts the file header); each record chunk has a 7-byte header:
  CRC32 (little-endian uint32, over the type byte followed by the data), length (uint16), type (uint8:
  FULL=1, FIRST=2, MIDDLE=3, LAST=4); a block tail shorter than 7 bytes is zero padding;
* each reassembled record is a serialized ``wandb.proto.wandb_internal_pb2.Record``.

History rows come from ``record.history.item`` (``key`` or ``nested_key`` plus ``value_json``); logged tables
land as ``files/media/table/<key path>_<step>_<hash>.table.json`` (a ``/`` in the key becomes a folder).
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK_LEN = 32768
HEADER_LEN = 7
FILE_HEADER = b":W&B" + struct.pack("<H", 0xBEE1) + b"\x00"
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _chunks(data: bytes) -> Iterator[tuple[int, bytes]]:
    """Yield ``(type, payload)`` for every chunk of the log, checking CRCs."""
    if data[: len(FILE_HEADER)] != FILE_HEADER:
        raise ValueError(f"not a W&B run file: header {data[:7]!r}, expected {FILE_HEADER!r}")
    pos = len(FILE_HEADER)
    while pos + HEADER_LEN <= len(data):
        left_in_block = BLOCK_LEN - pos % BLOCK_LEN
        if left_in_block < HEADER_LEN:  # zero padding at the block end
            pos += left_in_block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER_LEN])
        if kind == 0 and length == 0 and checksum == 0:  # zero-filled tail (pre-allocated / padding)
            pos += left_in_block
            continue
        payload = data[pos + HEADER_LEN : pos + HEADER_LEN + length]
        if len(payload) != length:
            raise ValueError(f"truncated record at byte {pos}: wanted {length} bytes, got {len(payload)}")
        expected = zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF
        if expected != checksum:
            raise ValueError(f"CRC mismatch at byte {pos} (type {kind}, length {length})")
        yield kind, payload
        pos += HEADER_LEN + length


def iter_records(path: str | Path) -> Iterator[Any]:
    """Yield every ``wandb_internal_pb2.Record`` of a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    buffer: list[bytes] | None = None
    for kind, payload in _chunks(Path(path).read_bytes()):
        if kind == FULL:
            parts = [payload]
        elif kind == FIRST:
            buffer = [payload]
            continue
        elif kind == MIDDLE:
            if buffer is None:
                raise ValueError("MIDDLE chunk without a FIRST chunk")
            buffer.append(payload)
            continue
        elif kind == LAST:
            if buffer is None:
                raise ValueError("LAST chunk without a FIRST chunk")
            parts = [*buffer, payload]
            buffer = None
        else:
            raise ValueError(f"unknown chunk type {kind}")
        record = pb.Record()
        record.ParseFromString(b"".join(parts))
        yield record


def _item_keys(item: Any) -> list[str]:
    # ``key`` for plain values; ``nested_key`` (e.g. ["influence/tasks", "_type"]) for media references.
    return list(item.nested_key) if item.nested_key else [item.key]


def _set_nested(target: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = value


@dataclass
class OfflineRun:
    """What an offline run wrote: history rows, summary, config, artifacts and the run folder."""

    directory: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    artifacts: list[dict[str, Any]] = field(default_factory=list)

    def keys(self) -> set[str]:
        """Every history key logged at least once."""
        return {k for row in self.history for k in row}

    def values(self, key: str) -> list[Any]:
        """The values logged under ``key``, in history order."""
        return [row[key] for row in self.history if key in row]

    def table_files(self, key_prefix: str = "") -> list[Path]:
        """``*.table.json`` files under ``files/media/table`` whose key path starts with ``key_prefix``."""
        root = self.directory / "files" / "media" / "table"
        files = sorted(root.rglob("*.table.json"))
        return [p for p in files if p.relative_to(root).as_posix().startswith(key_prefix)]

    def table(self, key: str, index: int = -1) -> dict[str, Any]:
        """Load the table logged under history ``key`` (``index``-th logging) as ``{"columns", "data"}``."""
        refs = self.values(key)
        if not refs:
            raise KeyError(f"no history entry {key!r}; logged keys: {sorted(self.keys())}")
        ref = refs[index]
        if not isinstance(ref, dict) or ref.get("_type") != "table-file":
            raise ValueError(f"history entry {key!r} is not a table file reference: {ref!r}")
        return json.loads((self.directory / "files" / ref["path"]).read_text())

    def artifact_table(self, key: str, index: int = -1) -> tuple[dict[str, Any], dict[str, str]]:
        """The typed copy of a logged table from its ``run_table`` artifact: ``(table_json, files)``.

        W&B 0.31 logs every ``wandb.Table`` twice: ``files/media/table/...`` (first 10,000 rows, media cells
        written as the bare class name, e.g. ``"Image"``) and a ``run_table`` artifact (up to 200,000 rows,
        media cells as ``{"_type": "image-file", "path": "media/images/..."}``). ``files`` maps each artifact
        path to the staged local file (under ``WANDB_DATA_DIR``).
        """
        name = f"{key}.table.json"
        found = [a for a in self.artifacts if a["type"] == "run_table" and name in a["files"]]
        if not found:
            raise KeyError(f"no run_table artifact holds {name!r}")
        files = found[index]["files"]
        return json.loads(Path(files[name]).read_text()), files

    def artifact(self, type: str) -> dict[str, Any]:
        """The last artifact of ``type`` (name, type, metadata, files: {path: local_path})."""
        found = [a for a in self.artifacts if a["type"] == type]
        if not found:
            raise KeyError(f"no artifact of type {type!r}; found {[a['type'] for a in self.artifacts]}")
        return found[-1]


def find_run_dirs(save_dir: str | Path) -> list[Path]:
    """Offline run folders (``wandb/offline-run-*``) under ``save_dir``, oldest first."""
    return sorted(Path(save_dir).rglob("offline-run-*"))


def _complete_records(wandb_file: Path, timeout: float) -> list[Any]:
    # wandb.finish() can return before the W&B core process has flushed the offline file (seen with 0.31: the
    # file stood at exactly one 32 KiB block right after finish and grew a moment later), so wait for the
    # run's ``exit`` record before trusting the contents.
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = list(iter_records(wandb_file))
            if any(r.WhichOneof("record_type") == "exit" for r in records):
                return records
            problem = "no exit record yet"
        except ValueError as err:  # a chunk being written right now
            problem = str(err)
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{wandb_file} still incomplete after {timeout:.0f} s ({problem}): call wandb.finish() before reading"
            )
        time.sleep(0.05)


def read_run(run_dir: str | Path, *, timeout: float = 30.0) -> OfflineRun:
    """Parse the ``.wandb`` file of one offline run folder (or of the only run under a save dir).

    Waits up to ``timeout`` seconds for the run's ``exit`` record (the file is written by a separate process).
    """
    run_dir = Path(run_dir)
    if not list(run_dir.glob("run-*.wandb")):
        dirs = find_run_dirs(run_dir)
        if len(dirs) != 1:
            raise ValueError(f"expected exactly one offline run under {run_dir}, found {len(dirs)}")
        run_dir = dirs[0]
    (wandb_file,) = run_dir.glob("run-*.wandb")
    run = OfflineRun(directory=run_dir)
    for record in _complete_records(wandb_file, timeout):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set_nested(row, _item_keys(item), json.loads(item.value_json))
            run.history.append(row)
        elif kind == "summary":
            for item in record.summary.update:
                _set_nested(run.summary, _item_keys(item), json.loads(item.value_json))
        elif kind == "config":
            for item in record.config.update:
                _set_nested(run.config, _item_keys(item), json.loads(item.value_json))
        elif kind == "artifact":
            art = record.artifact
            run.artifacts.append(
                {
                    "name": art.name,
                    "type": art.type,
                    "metadata": json.loads(art.metadata) if art.metadata else {},
                    "files": {e.path: e.local_path for e in art.manifest.contents},
                }
            )
    return run
