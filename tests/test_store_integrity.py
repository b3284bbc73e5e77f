"""Integrity of the gradient store: per-chunk checksums, seeded byte flips, old formats, `store verify`."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_metaif.cli import main
from lightning_metaif.influence.store import (
    MANIFEST_NAME,
    GradientStore,
    StoreChecksumError,
    StoreFormatError,
    StoreLockedError,
    read_header,
    verify_store,
)
from lightning_metaif.influence.store.format import _padding
from lightning_metaif.influence.tracin import store_tracin

DIM, CHUNK_ROWS = 8, 5
REPO = Path(__file__).resolve().parents[1]


def _small_store(root: Path) -> GradientStore:
    """A checkpoint (12 rows, 3 chunks, extra metadata) and a trajectory segment (12 rows, 3 chunks)."""
    store = GradientStore(root, dim=DIM, dtype=torch.float16, chunk_bytes=DIM * 2 * CHUNK_ROWS)
    gen = torch.Generator().manual_seed(0)
    store.write_checkpoint(3, 0.1, torch.arange(12) * 7, torch.randn(12, DIM, generator=gen), extra={"e": 1})
    for t in range(4):
        store.append_step(10 + t, 0.05 * (t + 1), [t, t + 20, t + 40], torch.randn(3, DIM, generator=gen))
    store.flush()
    return store


def _regions(path: Path) -> dict[str, list[tuple[int, int]]]:
    h = read_header(path)
    regions = {
        "header": [(0, 64)],
        "ids": [(h.ids_offset, h.ids_offset + 8 * h.rows)],
        "data": [(h.data_offset, h.data_offset + h.rows * h.row_bytes)],
        "table": [(h.table_offset, h.total_size)],
        "padding": _padding(h),
    }
    if h.extra_len:
        regions["extra"] = [(64, 64 + h.extra_len)]
    if h.kind == "segment":
        regions["steps"] = [(h.steps_offset, h.steps_offset + 8 * h.rows)]
        regions["lrs"] = [(h.lrs_offset, h.lrs_offset + 8 * h.rows)]
    return regions


def _read_everything(root: Path) -> None:
    """Every read a scoring pass does: open (headers), TracIn over all files (ids, steps, lrs, rows), dot."""
    store = GradientStore.open(root, readonly=True)
    store_tracin(store, torch.ones(DIM))
    for info in store.checkpoints():
        store.dot(info, torch.ones(DIM, 2))


def test_seeded_single_byte_flips_are_all_detected(tmp_path: Path) -> None:
    """120 seeded flips over both files, every region: `verify_store` reports each; reads refuse all but padding."""
    store = _small_store(tmp_path)
    files = [info.path for info in store.checkpoints()]
    rng = np.random.default_rng(1234)
    per_region = {
        "header": 16,
        "extra": 6,
        "ids": 20,
        "steps": 8,
        "lrs": 8,
        "data": 36,
        "table": 14,
        "padding": 12,
    }
    flips = []
    for region, count in per_region.items():
        for k in range(count):
            path = files[k % len(files)]
            spans = _regions(path).get(region) or _regions(files[(k + 1) % len(files)])[region]
            if region not in _regions(path):
                path = files[(k + 1) % len(files)]
            lo, hi = spans[int(rng.integers(len(spans)))]
            flips.append((region, path, int(rng.integers(lo, hi)), int(rng.integers(1, 256))))
    assert len(flips) >= 100
    detected_verify = detected_read = read_checked = 0
    for region, path, pos, mask in flips:
        good = path.read_bytes()
        bad = bytearray(good)
        bad[pos] ^= mask
        path.write_bytes(bytes(bad))
        try:
            report = verify_store(tmp_path)
            if not report.ok and path.name in " ".join(report.problems):
                detected_verify += 1
            if region != "padding":  # padding is never read; only `verify` checks it
                read_checked += 1
                try:
                    _read_everything(tmp_path)
                except StoreFormatError as err:
                    assert path.name in str(err)
                    detected_read += 1
        finally:
            path.write_bytes(good)
    assert verify_store(tmp_path).ok
    print(
        f"\nbyte flips detected: verify {detected_verify}/{len(flips)}, reads {detected_read}/{read_checked}"
    )
    assert detected_verify == len(flips)
    assert detected_read == read_checked


def test_mismatch_names_file_record_chunk_and_opt_out(tmp_path: Path) -> None:
    store = _small_store(tmp_path)
    ckpt, seg = store.checkpoints()
    h = read_header(ckpt.path)
    rows = store.read(ckpt)[1].clone()
    bad = bytearray(ckpt.path.read_bytes())
    bad[h.data_offset + 11 * h.row_bytes + 3] ^= 0x40  # row 11: chunk 2 (rows 10-11)
    ckpt.path.write_bytes(bytes(bad))
    fresh = GradientStore.open(tmp_path)
    pattern = (
        r"ckpt-00000000-step3\.mgs: record 0, chunk 2 \(rows 10-11\): checksum mismatch in the data section"
    )
    with pytest.raises(StoreChecksumError, match=pattern) as caught:
        fresh.dot(ckpt, torch.ones(DIM))
    assert (caught.value.chunk, caught.value.section, caught.value.record) == (2, "data", 0)
    with pytest.raises(StoreChecksumError, match=pattern):
        fresh.read(ckpt)
    with pytest.raises(StoreChecksumError, match=pattern):
        fresh.tracin_scores(torch.ones(DIM))
    # opting out reads the damaged bytes as they are (rows 0-10 unchanged, row 11 differs)
    got = fresh.read(ckpt, verify=False)[1]
    assert torch.equal(got[:11], rows[:11]) and not torch.equal(got[11], rows[11])
    unchecked = GradientStore.open(tmp_path, verify=False)
    torch.testing.assert_close(unchecked.dot(ckpt, torch.ones(DIM)), got.float().sum(1))
    # the other file is intact and still readable
    assert fresh.read_ids(seg).tolist() == [0, 20, 40, 1, 21, 41, 2, 22, 42, 3, 23, 43]
    # an id flip is named as such
    ids_bad = bytearray(seg.path.read_bytes())
    ids_bad[read_header(seg.path).ids_offset + 8 * 6] ^= 1  # row 6: chunk 1
    seg.path.write_bytes(bytes(ids_bad))
    with pytest.raises(StoreChecksumError, match=r"record 1, chunk 1 \(rows 5-9\).*ids section"):
        GradientStore.open(tmp_path).read_ids(seg)
    report = verify_store(tmp_path)
    assert len(report.problems) == 2 and "chunk 2" in report.problems[0] and "ids" in report.problems[1]


def test_old_format_files_and_manifests_are_refused(tmp_path: Path) -> None:
    store = GradientStore(tmp_path / "s", dim=3)
    info = store.write_checkpoint(1, 0.1, [0, 1], torch.ones(2, 3))
    raw = bytearray(info.path.read_bytes())
    raw[8:10] = struct.pack("<H", 1)
    raw[12:16] = b"\0\0\0\0"
    extra_len = struct.unpack_from("<Q", raw, 48)[0]
    raw[12:16] = struct.pack("<I", zlib.crc32(bytes(raw[: 64 + extra_len])))  # a valid header, version 1
    old = tmp_path / "old.mgs"
    old.write_bytes(bytes(raw))
    with pytest.raises(
        StoreFormatError, match=r"old\.mgs: gradient file format version 1.*before data checksums"
    ):
        read_header(old)
    manifest = json.loads((tmp_path / "s" / MANIFEST_NAME).read_text())
    manifest["version"] = 1
    (tmp_path / "s" / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(StoreFormatError, match="older lightning-metaif.*Re-record the gradients"):
        GradientStore.open(tmp_path / "s")


def test_store_verify_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    store = _small_store(run / "metaif" / "store" / "rank0")
    assert main(["store", "verify", str(run)]) == 0  # finds the store below a run directory
    out = capsys.readouterr().out
    assert "rank0: 2 files, 24 rows" in out and "intact" in out
    ckpt = store.checkpoints()[0]
    bad = bytearray(ckpt.path.read_bytes())
    bad[read_header(ckpt.path).data_offset] ^= 0xFF
    ckpt.path.write_bytes(bytes(bad))
    assert main(["store", "verify", str(store.root)]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "record 0, chunk 0 (rows 0-4)" in out and "1 of 1 store(s) damaged" in out
    assert main(["store", "verify", str(tmp_path / "run" / "metaif" / "store" / "rank0" / "x")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["store", "verify", str(tmp_path / "empty")]) == 2
    assert "no gradient store" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- one writer
HOLD_LOCK = r"""
import sys, time, torch
from lightning_metaif.influence.store import GradientStore
store = GradientStore(sys.argv[1], dim=4)
store.write_checkpoint(7, 0.1, [0], torch.ones(1, 4))
w = store.open_checkpoint(8, 0.1, 10)  # a write in flight when the process is killed
w.write([0, 1], torch.ones(2, 4))
print("ready", flush=True)
time.sleep(120)
"""


def test_one_writer_per_store_and_a_killed_writer_leaves_no_stale_lock(tmp_path: Path) -> None:
    root = tmp_path / "s"
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(root)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        with pytest.raises(
            StoreLockedError, match=rf"open for writing in another process \(pid {child.pid} on"
        ):
            GradientStore(root, dim=4)
        reader = GradientStore(root, dim=4, readonly=True)  # readers take no lock
        assert [c.step for c in reader.checkpoints()] == [7]
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert (root / ".lock").exists()  # the lock file stays; the kernel released the lock itself
    store = GradientStore(root, dim=4)  # recovered: cleans the killed write's temp file, keeps the commit
    assert [c.step for c in store.checkpoints()] == [7] and not list(root.glob(".tmp-*"))
    # in one process, writable objects of one directory share the lock; it is released when the last closes
    again = GradientStore(root, dim=4)
    again.write_checkpoint(9, 0.1, [1], torch.ones(1, 4))
    probe = [
        sys.executable,
        "-c",
        f"from lightning_metaif.influence.store import GradientStore as G; G({str(root)!r}, dim=4)",
    ]
    assert subprocess.run(probe, cwd=REPO, capture_output=True, timeout=120).returncode != 0
    store.close()
    again.close()
    with pytest.raises(ValueError, match="was closed"):
        again.write_checkpoint(10, 0.1, [1], torch.ones(1, 4))
    assert again.dot(again.checkpoints()[-1], torch.ones(4)).tolist() == [4.0]  # still readable
    done = subprocess.run(probe, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------------------------- rollback
def test_store_rollback_drops_later_records_and_reuses_their_names(tmp_path: Path) -> None:
    uninterrupted = GradientStore(tmp_path / "u", dim=4, dtype=torch.float32)
    store = GradientStore(tmp_path / "s", dim=4, dtype=torch.float32)
    rows = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    for s in (store, uninterrupted):
        s.write_checkpoint(1, 0.1, [0, 1], rows[:2])
        s.append_step(2, 0.1, [2], rows[2:3])
        s.flush()
    saved = store.state_dict()  # the training checkpoint
    late = store.write_checkpoint(3, 0.1, [3], rows[3:4])  # the run goes on, then dies
    store.append_step(4, 0.1, [4], rows[4:5])  # buffered, never flushed
    orphan = store.write_checkpoint(5, 0.1, [5], rows[5:6])
    manifest = json.loads((tmp_path / "s" / MANIFEST_NAME).read_text())
    manifest["checkpoints"] = manifest["checkpoints"][:-1]  # died between the rename and the manifest update
    (tmp_path / "s" / MANIFEST_NAME).write_text(json.dumps(manifest))
    del store  # dies: no close(), the buffered step-4 row is lost
    with pytest.warns(UserWarning, match="adopted"):
        resumed = GradientStore.open(tmp_path / "s")
    dropped = resumed.rollback(saved)
    assert [d.path.name for d in dropped] == [late.path.name, orphan.path.name]
    aside = list((tmp_path / "s" / "rolled-back").glob("*/*.mgs"))
    assert sorted(p.name for p in aside) == sorted([late.path.name, orphan.path.name])
    assert resumed.pending_rows == 0
    for s in (resumed, uninterrupted):  # both go on identically
        s.write_checkpoint(3, 0.1, [3], rows[3:4])
    names = [sorted(p.name for p in (tmp_path / x).glob("*.mgs")) for x in ("s", "u")]
    assert names[0] == names[1]
    for a, b in zip(resumed.checkpoints(), uninterrupted.checkpoints()):
        assert a.path.read_bytes() == b.path.read_bytes()
    assert GradientStore.open(tmp_path / "s").checkpoints() == resumed.checkpoints()
    with pytest.raises(ValueError, match="lacks files listed in the state dict"):
        GradientStore(tmp_path / "other", dim=4, dtype=torch.float32).rollback(saved)


def test_round_files_rollback_drops_later_rounds_and_torn_lines(tmp_path: Path) -> None:
    from lightning_metaif.dashboards.files import RoundFileWriter, load_run
    from lightning_metaif.records import Decision, ScoreRound

    def round_at(step: int) -> ScoreRound:
        r = ScoreRound(
            step=step,
            epoch=step // 2,
            estimator="tracin",
            task_ids=torch.tensor([0, 1, 2]),
            scores=torch.tensor([0.5, -1.0, float(step)], dtype=torch.float64),
        )
        r.decisions = [Decision(step, step // 2, "prune", [1], "lowest score")]
        return r

    full, crashed = RoundFileWriter(tmp_path / "u"), RoundFileWriter(tmp_path / "c")
    for step in (1, 2):
        full.write(round_at(step))
        crashed.write(round_at(step))
    crashed.write(round_at(3))  # after the checkpoint (rounds=2)
    with open(tmp_path / "c" / "decisions.csv", "a", encoding="utf-8") as fh:
        fh.write("3,4,2,pru")  # killed in the middle of the next append
    resumed = RoundFileWriter(tmp_path / "c")
    dropped = resumed.rollback(2)
    assert "scores_round_0002.csv" in dropped and "decisions.csv: 2 rows" in dropped
    for w in (resumed, full):
        w.write(round_at(5))
    for name in ("scores_history.csv", "decisions.csv", "metrics.csv", "scores_round_0002.csv"):
        a, b = (tmp_path / "c" / name).read_text(), (tmp_path / "u" / name).read_text()
        if name == "metrics.csv":  # the seconds column is wall-clock
            a, b = ([line.split(",")[:4] for line in x.splitlines()] for x in (a, b))
        assert a == b, name
    assert [r.step for r in load_run(tmp_path / "c").rounds] == [1, 2, 5]


def test_verified_chunks_are_cached_until_the_file_changes(tmp_path: Path) -> None:
    store = _small_store(tmp_path)
    ckpt = store.checkpoints()[0]
    before = store.dot(ckpt, torch.ones(DIM))  # verifies every chunk once
    h = read_header(ckpt.path)
    st = ckpt.path.stat()
    bad = bytearray(ckpt.path.read_bytes())
    bad[h.data_offset + 2] ^= 0x10
    time.sleep(0.05)  # past the file system's timestamp granularity
    ckpt.path.write_bytes(bytes(bad))  # in place, like a hex editor: same inode and size, new mtime
    with pytest.raises(StoreChecksumError, match="record 0, chunk 0"):
        store.dot(ckpt, torch.ones(DIM))
    os.utime(ckpt.path, ns=(st.st_atime_ns, st.st_mtime_ns))  # a change that hides from the file's identity
    cached = GradientStore.open(tmp_path, verify=True)
    cached.dot(ckpt, torch.ones(DIM), verify=False)
    ckpt.path.write_bytes(bytes(bad))  # (no sleep: the next read should not depend on mtime)
    os.utime(ckpt.path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(StoreChecksumError):  # never verified by this object: checked now
        cached.dot(ckpt, torch.ones(DIM))
    good = bytearray(bad)
    good[h.data_offset + 2] ^= 0x10
    ckpt.path.write_bytes(bytes(good))
    os.utime(ckpt.path, ns=(st.st_atime_ns, st.st_mtime_ns))
    warm = GradientStore.open(tmp_path)
    torch.testing.assert_close(warm.dot(ckpt, torch.ones(DIM)), before)  # verified and cached
    ckpt.path.write_bytes(bytes(bad))
    os.utime(ckpt.path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert not torch.equal(
        warm.dot(ckpt, torch.ones(DIM)), before
    )  # cached: the hidden change is not re-hashed
    with pytest.raises(StoreChecksumError):
        warm.dot(ckpt, torch.ones(DIM), verify="always")  # ... unless asked to hash on every read
    with pytest.raises(ValueError, match="verify must be True, False or 'always'"):
        warm.dot(ckpt, torch.ones(DIM), verify="sometimes")


def test_rollback_with_another_ranks_state(tmp_path: Path) -> None:
    """DDP: each rank writes its own store, the checkpoint holds rank 0's state; it rolls every rank back."""
    ranks = [GradientStore(tmp_path / f"rank{r}", dim=2) for r in (0, 1)]
    for step in (1, 2):
        for r, s in enumerate(ranks):
            s.write_checkpoint(step, 0.1, [r], torch.full((1, 2), float(r + step)))
    saved = ranks[0].state_dict()
    for r, s in enumerate(ranks):
        s.write_checkpoint(3, 0.1, [r, r + 2], torch.ones(2, 2))
    dropped = ranks[1].rollback(saved, move_aside=False)
    assert [(d.step, d.rows) for d in dropped] == [(3, 2)]
    assert [c.step for c in ranks[1].checkpoints()] == [1, 2]
    with pytest.raises(ValueError, match="lacks files listed in the state dict: \\['record 1'\\]"):
        GradientStore(tmp_path / "short", dim=2).rollback({**saved, "checkpoints": saved["checkpoints"][1:]})
