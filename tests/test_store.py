"""Tests of the memory-mapped gradient store (lightning_metaif.influence.store).

Heavier test: ``test_large_streaming_write_and_dot_bounded_rss`` writes and scores 100,000 x 1,024 float16 rows
(~200 MB in tmp_path) in a fresh interpreter (~5-15 s). ``test_crash_mid_write_in_killed_process`` also starts a
fresh interpreter (~2-4 s).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_metaif.influence.store import (
    HEADER_SIZE,
    MAGIC,
    MANIFEST_NAME,
    GradientStore,
    StoreFormatError,
    read_header,
)

REPO = Path(__file__).resolve().parents[1]


def _mapped_from(tensor: torch.Tensor, path: Path) -> bool:
    """Whether ``tensor``'s memory lies in a mapping of ``path`` (Linux /proc/self/maps)."""
    ptr = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() == str(path):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                if lo <= ptr < hi:
                    return True
    return False


def _tmp_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".tmp-"))


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_roundtrip_header_and_memmap_read(tmp_path: Path, dtype: torch.dtype) -> None:
    store = GradientStore(tmp_path, dim=7, dtype=dtype, projection={"seed": 3, "kind": "gaussian"})
    rows = torch.randn(11, 7, dtype=torch.float64)
    ids = torch.arange(11) * 5 + 2
    info = store.write_checkpoint(40, 0.125, ids, rows, extra={"epoch": 2})
    assert (info.step, info.learning_rate, info.rows, info.kind, info.extra) == (
        40,
        0.125,
        11,
        "checkpoint",
        {"epoch": 2},
    )
    h = read_header(info.path)
    assert (h.dtype, h.rows, h.dim, h.step, h.learning_rate) == (str(dtype)[6:], 11, 7, 40, 0.125)
    assert h.data_offset % 64 == 0 and info.path.stat().st_size == h.total_size == info.nbytes
    got_ids, got_rows = store.read(info)
    assert got_rows.dtype == dtype and got_rows.shape == (11, 7)
    assert torch.equal(got_ids, ids)
    assert torch.equal(got_rows, rows.to(dtype))
    if sys.platform.startswith("linux"):
        assert _mapped_from(got_rows, info.path) and _mapped_from(got_ids, info.path)
    got_rows[0, 0] = 123.0  # copy-on-write: never reaches the file
    assert torch.equal(store.read(info)[1], rows.to(dtype))


def test_streaming_writer_equals_one_shot_and_checks_row_count(tmp_path: Path) -> None:
    store = GradientStore(tmp_path / "s", dim=5, dtype=torch.float32)
    rows, ids = torch.randn(10, 5), torch.arange(10)
    with store.open_checkpoint(step=1, learning_rate=0.5, num_rows=10) as w:
        for start in range(0, 10, 3):
            w.write(ids[start : start + 3], rows[start : start + 3])
    one = store.write_checkpoint(2, 0.5, ids, rows)
    a, b = store.checkpoints()
    assert torch.equal(store.read(a)[1], store.read(b)[1]) and one == b
    assert a.index < b.index
    # too few rows: commit aborts and commits nothing
    w = store.open_checkpoint(3, 0.1, 4)
    w.write([0, 1], torch.ones(2, 5))
    with pytest.raises(ValueError, match="got 2 rows but num_rows=4"):
        w.commit()
    # too many rows
    w = store.open_checkpoint(3, 0.1, 1)
    with pytest.raises(ValueError, match="exceed num_rows=1"):
        w.write([0, 1], torch.ones(2, 5))
    assert len(store.checkpoints()) == 2 and _tmp_files(store.root) == []
    with pytest.raises(ValueError, match="one id per row"):
        store.write_checkpoint(4, 0.1, [0], torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"shape \[n, 5\]"):
        store.write_checkpoint(4, 0.1, [0], torch.ones(1, 6))


def test_non_finite_and_float16_overflow_are_refused(tmp_path: Path) -> None:
    store = GradientStore(tmp_path, dim=2)
    with pytest.raises(ValueError, match="65504"):
        store.write_checkpoint(0, 0.1, [0], torch.tensor([[1e6, 0.0]]))
    with pytest.raises(ValueError, match="learning_rate must be finite"):
        store.write_checkpoint(0, float("nan"), [0], torch.ones(1, 2))
    assert store.checkpoints() == [] and _tmp_files(tmp_path) == []


def test_unsupported_dtype_and_mismatched_reopen(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot hold dtype torch.float64"):
        GradientStore(tmp_path / "x", dim=4, dtype=torch.float64)
    with pytest.raises(ValueError, match="cannot hold dtype"):
        GradientStore(tmp_path / "x", dim=4, dtype="int8")
    GradientStore(tmp_path, dim=4, dtype="fp16", projection={"seed": 1, "dims": (10, 4)})
    with pytest.raises(ValueError, match=r"dim 4 \(asked 8\)"):
        GradientStore(tmp_path, dim=8, dtype=torch.float16, projection={"seed": 1, "dims": [10, 4]})
    with pytest.raises(ValueError, match=r"dtype float16 \(asked float32\)"):
        GradientStore(tmp_path, dim=4, dtype=torch.float32, projection={"seed": 1, "dims": [10, 4]})
    with pytest.raises(ValueError, match="projection"):
        GradientStore(tmp_path, dim=4, dtype=torch.float16, projection={"seed": 2, "dims": [10, 4]})
    with pytest.raises(ValueError, match="projection"):
        GradientStore(tmp_path, dim=4, dtype=torch.float16)
    same = GradientStore(tmp_path, dim=4, dtype=torch.float16, projection={"dims": [10, 4], "seed": 1})
    opened = GradientStore.open(tmp_path)
    assert (opened.dim, opened.dtype, opened.projection) == (4, torch.float16, same.projection)


# ---------------------------------------------------------------------------------------------- file format
def test_foreign_old_version_corrupt_and_truncated_files_are_refused(tmp_path: Path) -> None:
    store = GradientStore(tmp_path / "s", dim=3, dtype=torch.float32)
    info = store.write_checkpoint(1, 0.1, [0, 1], torch.ones(2, 3))
    good = info.path.read_bytes()

    foreign = tmp_path / "foreign.mgs"
    foreign.write_bytes(b"PK\x03\x04 this is a zip file, not gradients" * 3)
    with pytest.raises(
        StoreFormatError, match=r"foreign\.mgs.*expected magic bytes b'MIFGRAD\\x00', found b'PK"
    ):
        read_header(foreign)

    old = tmp_path / "old.mgs"
    old.write_bytes(good[:8] + struct.pack("<H", 0) + good[10:])
    with pytest.raises(StoreFormatError, match=r"old\.mgs.*version 0 is not supported.*reads version 2"):
        read_header(old)

    corrupt = tmp_path / "corrupt.mgs"
    corrupt.write_bytes(good[:16] + struct.pack("<Q", 3) + good[24:])  # rows field 2 -> 3
    with pytest.raises(StoreFormatError, match=r"corrupt\.mgs.*checksum mismatch"):
        read_header(corrupt)

    truncated = tmp_path / "truncated.mgs"
    truncated.write_bytes(good[:-4])
    with pytest.raises(
        StoreFormatError, match=rf"truncated\.mgs.*has {len(good) - 4} bytes.*describes {len(good)}"
    ):
        read_header(truncated)
    short = tmp_path / "short.mgs"
    short.write_bytes(good[:20])
    with pytest.raises(StoreFormatError, match="truncated header"):
        read_header(short)
    assert issubclass(StoreFormatError, ValueError) and len(MAGIC) == 8 and HEADER_SIZE == 64


# ---------------------------------------------------------------------------------------------- crash safety
def test_exception_inside_writer_aborts_cleanly(tmp_path: Path) -> None:
    store = GradientStore(tmp_path, dim=4)
    store.write_checkpoint(0, 0.1, [0], torch.ones(1, 4))
    with pytest.raises(RuntimeError, match="boom"), store.open_checkpoint(1, 0.1, 100) as w:
        w.write(torch.arange(50), torch.ones(50, 4))
        assert len(_tmp_files(tmp_path)) == 1
        raise RuntimeError("boom")
    assert _tmp_files(tmp_path) == [] and [c.step for c in store.checkpoints()] == [0]
    assert [c.step for c in GradientStore(tmp_path, dim=4).checkpoints()] == [0]


def test_crash_mid_write_in_killed_process(tmp_path: Path) -> None:
    """A real process dies (os._exit) half-way through a streaming write; reopening ignores and cleans the temp."""
    script = textwrap.dedent(
        f"""
        import os, torch
        from lightning_metaif.influence.store import GradientStore
        store = GradientStore({str(tmp_path)!r}, dim=16)
        store.write_checkpoint(10, 0.1, torch.arange(8), torch.ones(8, 16))
        w = store.open_checkpoint(20, 0.1, 1000)
        w.write(torch.arange(500), torch.ones(500, 16))
        w._file.flush()
        os._exit(3)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 3, proc.stderr
    assert len(_tmp_files(tmp_path)) == 1  # the half-written temp survived the crash
    reader = GradientStore(tmp_path, dim=16, readonly=True)  # readers ignore it and leave it alone
    assert [c.step for c in reader.checkpoints()] == [10] and len(_tmp_files(tmp_path)) == 1
    store = GradientStore(tmp_path, dim=16)  # a writable open cleans it
    assert [c.step for c in store.checkpoints()] == [10] and _tmp_files(tmp_path) == []
    assert store.write_checkpoint(20, 0.1, [1], torch.ones(1, 16)).step == 20


def test_crash_between_rename_and_manifest_adopts_valid_orphan(tmp_path: Path) -> None:
    store = GradientStore(tmp_path, dim=4, dtype=torch.float32)
    store.write_checkpoint(1, 0.1, [0, 1], torch.ones(2, 4))
    manifest_before = (tmp_path / MANIFEST_NAME).read_bytes()
    rows = torch.randn(3, 4)
    lost = store.write_checkpoint(2, 0.2, [5, 6, 7], rows, extra={"note": "x"})
    (tmp_path / MANIFEST_NAME).write_bytes(
        manifest_before
    )  # as if the process died before the manifest update
    assert [c["step"] for c in json.loads(manifest_before)["checkpoints"]] == [1]
    with pytest.warns(UserWarning, match=f"adopted {lost.path.name}"):
        again = GradientStore(tmp_path, dim=4, dtype=torch.float32)
    assert [(c.step, c.learning_rate, c.extra) for c in again.checkpoints()] == [
        (1, 0.1, {}),
        (2, 0.2, {"note": "x"}),
    ]
    assert torch.equal(again.read(again.checkpoints()[1])[1], rows)
    listed = json.loads((tmp_path / MANIFEST_NAME).read_text())["checkpoints"]
    assert [c["file"] for c in listed][-1] == lost.path.name  # adoption was persisted
    assert again.write_checkpoint(3, 0.3, [0], torch.ones(1, 4)).index > lost.index


def test_invalid_orphan_is_ignored_not_deleted(tmp_path: Path) -> None:
    store = GradientStore(tmp_path, dim=4)
    info = store.write_checkpoint(1, 0.1, [0, 1], torch.ones(2, 4))
    bad = tmp_path / "ckpt-00000099-step5.mgs"
    bad.write_bytes(info.path.read_bytes()[:-8])  # truncated file under a final name
    other_dim = GradientStore(tmp_path / "other", dim=5)
    moved = other_dim.write_checkpoint(2, 0.1, [0], torch.ones(1, 5)).path
    os.replace(moved, tmp_path / "ckpt-00000100-step2.mgs")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = GradientStore(tmp_path, dim=4)
    messages = " ".join(str(w.message) for w in caught)
    assert "ckpt-00000099-step5.mgs" in messages and "truncated" in messages and "dim 5" in messages
    assert [c.step for c in again.checkpoints()] == [1] and bad.exists()


def test_missing_file_corrupt_manifest_and_rebuild(tmp_path: Path) -> None:
    store = GradientStore(tmp_path, dim=4)
    a = store.write_checkpoint(1, 0.1, [0], torch.ones(1, 4))
    b = store.write_checkpoint(2, 0.2, [0], torch.ones(1, 4))
    os.replace(b.path, tmp_path / "elsewhere")
    with pytest.raises(ValueError, match=f"missing: \\['{b.path.name}'\\]"):
        GradientStore(tmp_path, dim=4)
    os.replace(tmp_path / "elsewhere", b.path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="manifest is not valid JSON.*delete it"):
        GradientStore(tmp_path, dim=4)
    (tmp_path / MANIFEST_NAME).unlink()
    with pytest.warns(UserWarning, match="adopted"):
        rebuilt = GradientStore(tmp_path, dim=4)
    assert [(c.index, c.step, c.learning_rate) for c in rebuilt.checkpoints()] == [
        (a.index, 1, 0.1),
        (b.index, 2, 0.2),
    ]


def test_remove_and_interrupted_remove(tmp_path: Path) -> None:
    store = GradientStore(tmp_path, dim=2)
    a = store.write_checkpoint(1, 0.1, [0], torch.ones(1, 2))
    b = store.write_checkpoint(2, 0.1, [0], torch.ones(1, 2))
    store.remove(a)
    assert not a.path.exists() and [c.step for c in store.checkpoints()] == [2]
    # interrupted remove: tombstone renamed, manifest not yet updated
    os.replace(b.path, tmp_path / f".tmp-removing-{b.path.name}")
    again = GradientStore(tmp_path, dim=2)
    assert again.checkpoints() == [] and _tmp_files(tmp_path) == []


# ---------------------------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_dot_matches_dense_product_across_blocks(tmp_path: Path, dtype: torch.dtype) -> None:
    rows = torch.randn(1000, 33)
    exact = rows.to(dtype).double()
    vec, mat = torch.randn(33), torch.randn(33, 4)
    for chunk_rows in (7, 1000, 65536):  # chunks (= read blocks) of 7 rows, one chunk, one short chunk
        store = GradientStore(
            tmp_path / str(chunk_rows), dim=33, dtype=dtype, chunk_bytes=chunk_rows * 33 * 2
        )
        info = store.write_checkpoint(0, 1.0, torch.arange(1000), rows)
        assert read_header(info.path).chunk_rows == chunk_rows // (2 if dtype == torch.float32 else 1)
        got = store.dot(info, vec)
        assert got.shape == (1000,) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), exact @ vec.double(), rtol=1e-5, atol=1e-4)
        got = store.dot(info, mat)
        torch.testing.assert_close(got.double(), exact @ mat.double(), rtol=1e-5, atol=1e-4)
    got64 = store.dot(info, mat, compute_dtype=torch.float64)
    torch.testing.assert_close(got64, exact @ mat.double(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"shape \[33\] or \[33, r\]"):
        store.dot(info, torch.randn(32))


def test_tracin_checkpoints_with_mapping_callable_and_alignment(tmp_path: Path) -> None:
    store = GradientStore(tmp_path, dim=6, dtype=torch.float32)
    g = {10: torch.randn(5, 6), 20: torch.randn(4, 6), 30: torch.randn(5, 6)}
    ids = {10: [0, 1, 2, 3, 4], 20: [1, 3, 5, 7], 30: [0, 1, 2, 3, 4]}
    lrs = {10: 0.1, 20: 0.05, 30: 0.01}
    for step in (10, 20, 30):
        store.write_checkpoint(step, lrs[step], ids[step], g[step])
    refs = {10: torch.randn(6), 20: torch.randn(6), 30: torch.randn(6)}

    def brute(ref_of: dict[int, torch.Tensor]) -> dict[int, float]:
        out: dict[int, float] = {}
        for step in (10, 20, 30):
            for k, row in zip(ids[step], g[step]):
                out[k] = out.get(k, 0.0) + lrs[step] * float(row.double() @ ref_of[step].double())
        return out

    res = store.tracin_scores(refs)
    expect = brute(refs)
    assert res.task_ids.tolist() == sorted(expect)
    torch.testing.assert_close(
        res.scores, torch.tensor([expect[k] for k in sorted(expect)], dtype=torch.float64)
    )
    assert res.counts.tolist() == [2, 3, 2, 3, 2, 1, 1]
    # callable, same numbers; previous-match with sparse references
    torch.testing.assert_close(store.tracin_scores(lambda s: refs[s]).scores, res.scores)
    prev = store.tracin_scores({10: refs[10], 25: refs[30]}, match="previous")
    torch.testing.assert_close(
        prev.scores, store.tracin_scores({10: refs[10], 20: refs[10], 30: refs[30]}).scores
    )
    with pytest.raises(ValueError, match="no reference gradient for step 20"):
        store.tracin_scores({10: refs[10], 30: refs[30]})
    # skipping a step; aligning to requested ids (9 never stored)
    skip = store.tracin_scores(lambda s: None if s == 20 else refs[s], task_ids=[9, 5, 0])
    assert skip.task_ids.tolist() == [9, 5, 0] and skip.counts.tolist() == [0, 0, 2]
    assert skip.scores[:2].tolist() == [0.0, 0.0] and skip.diagnostics["skipped_steps"] == [20]
    torch.testing.assert_close(skip.scores[2].item(), expect[0], rtol=1e-6, atol=1e-7)


def test_trajectory_segments_buffering_and_tracin_completeness(tmp_path: Path) -> None:
    """TracIn along an SGD trajectory on least squares: Σ_k score_k ≈ f(λ_0) − f(λ_T) (docs/maths.md §5)."""
    torch.manual_seed(1)
    p, num_tasks, batch, steps, lr = 8, 12, 4, 61, 0.02
    truth = torch.randn(p, dtype=torch.float64)
    a, va = torch.randn(num_tasks, 5, p, dtype=torch.float64), torch.randn(20, p, dtype=torch.float64)
    b = a @ truth + 0.3 * torch.randn(num_tasks, 5, dtype=torch.float64)
    vb = va @ truth + 0.3 * torch.randn(20, dtype=torch.float64)

    def task_grads(lam: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
        r = torch.einsum("kip,p->ki", a[ks], lam) - b[ks]
        return torch.einsum("kip,ki->kp", a[ks], r) / 5

    def f(lam: torch.Tensor) -> float:
        return float(0.5 * ((va @ lam - vb) ** 2).mean())

    def grad_f(lam: torch.Tensor) -> torch.Tensor:
        return va.T @ (va @ lam - vb) / 20

    lam = torch.zeros(p, dtype=torch.float64)
    f0, refs = f(lam), {}
    # ~3 steps of 4 rows per segment (rows of one step never split)
    store = GradientStore(tmp_path, dim=p, dtype=torch.float32, segment_bytes=4 * p * 4 * 3)
    with store:
        for t in range(steps):
            ks = torch.randperm(num_tasks)[:batch]
            gk = task_grads(lam, ks)
            refs[t] = grad_f(lam)
            store.append_step(t, lr, ks, gk)
            lam = lam - lr * gk.mean(0)
        assert store.pending_rows == 4  # step 60 waits in the buffer until the with-block closes
    assert store.pending_rows == 0
    segs = store.checkpoints("segment")
    assert len(segs) == 21 and [s.rows for s in segs] == [12] * 20 + [4]
    assert (segs[0].step, segs[0].last_step, segs[0].learning_rate) == (0, 2, None)
    st, lrs_col = store.read_steps(segs[1])
    assert st.tolist() == [3] * 4 + [4] * 4 + [5] * 4 and torch.all(lrs_col == lr)
    res = store.tracin_scores(refs, per_step_mean=True)
    drop = f0 - f(lam)
    assert drop > 0.05
    assert abs(res.scores.sum().item() - drop) < 0.03 * drop
    assert int(res.counts.sum()) == steps * batch
    # without the 1/B the sum is B times larger
    assert res.scores.sum().item() * batch == pytest.approx(
        store.tracin_scores(refs).scores.sum().item(), rel=1e-9
    )
    # reopened segments keep their columns
    again = GradientStore.open(tmp_path)
    assert [s.last_step for s in again.checkpoints()] == [s.last_step for s in segs]
    torch.testing.assert_close(again.tracin_scores(refs, per_step_mean=True).scores, res.scores)


def test_state_dict_size_and_readonly(tmp_path: Path) -> None:
    store = GradientStore(tmp_path, dim=4, projection={"seed": 0})
    a = store.write_checkpoint(1, 0.1, [0, 1], torch.ones(2, 4))
    state = store.state_dict()
    assert json.loads(json.dumps(state)) == state  # plain python
    assert (state["dim"], state["dtype"], state["projection"]) == (4, "float16", {"seed": 0})
    reader = GradientStore.from_state_dict(state, readonly=True)
    with pytest.raises(ValueError, match="readonly=True"):
        reader.write_checkpoint(2, 0.1, [0], torch.ones(1, 4))
    b = store.write_checkpoint(2, 0.1, [0], torch.ones(1, 4))
    assert len(reader.checkpoints()) == 1
    reader.refresh()
    assert len(reader.checkpoints()) == 2
    files = [p for p in tmp_path.iterdir() if p.suffix == ".mgs"] + [tmp_path / MANIFEST_NAME]
    assert store.size_bytes() == sum(p.stat().st_size for p in files)
    resumed = GradientStore.from_state_dict(state, prune_unlisted=True)  # resume: drop what came after
    assert [c.path.name for c in resumed.checkpoints()] == [a.path.name] and not b.path.exists()
    resumed.remove(a)  # (one writable instance per root at a time: `store` is stale now)
    with pytest.raises(ValueError, match="lacks files listed in the state dict"):
        GradientStore.from_state_dict(state)


# ---------------------------------------------------------------------------------------------- scale
LARGE_CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
from lightning_metaif.influence.store import GradientStore

root, out = sys.argv[1], sys.argv[2]
M, D, CHUNK = 100_000, 1024, 2048
scale = 1 if sys.platform.startswith("linux") else 1 / 1024  # ru_maxrss: KiB on Linux, bytes on macOS


def status_kib(key):
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
    except (OSError, StopIteration):
        return None


def start_phase():
    # reset the kernel's RSS high-water mark (Linux >= 4.0); return the baseline in MiB
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status_kib("VmRSS") / 1024, "VmHWM"
    except (OSError, TypeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1024, "ru_maxrss"


def phase_growth(base):
    hwm = status_kib("VmHWM") if base[1] == "VmHWM" else None
    peak = hwm / 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1024
    return peak - base[0]


torch.set_num_threads(1)
# one-time initialisation (torch kernels, numpy generator) and the test's own data buffer come before the baseline
warm = GradientStore(root + "_warm", dim=D, dtype=torch.float16)
warm.dot(warm.write_checkpoint(0, 0.1, torch.arange(16), torch.randn(16, D)), torch.randn(D))
buf = np.empty((CHUNK, D), dtype=np.float32)  # rows are generated in place in this buffer
np.random.default_rng(0).standard_normal(out=buf, dtype=np.float32)
store = GradientStore(root, dim=D, dtype=torch.float16, projection={"seed": 0})
base = start_phase()
t0 = time.perf_counter()
with store.open_checkpoint(step=100, learning_rate=0.01, num_rows=M) as w:
    for c, start in enumerate(range(0, M, CHUNK)):
        n = min(CHUNK, M - start)
        np.random.default_rng(1000 + c).standard_normal(out=buf[:n], dtype=np.float32)
        w.write(torch.arange(start, start + n) * 3 + 7, buf[:n])
t_write = time.perf_counter() - t0
growth_write = phase_growth(base)
base = start_phase()
info = store.checkpoints()[0]
vec = torch.randn(D, generator=torch.Generator().manual_seed(5))
t0 = time.perf_counter()
scores = store.dot(info, vec)
t_dot = time.perf_counter() - t0
tr = store.tracin_scores(vec)
growth_score = phase_growth(base)
np.save(out + "/dot.npy", scores.numpy())
np.save(out + "/tracin_ids.npy", tr.task_ids.numpy())
np.save(out + "/tracin.npy", tr.scores.numpy())
print(json.dumps({"growth_write": growth_write, "growth_score": growth_score, "method": base[1],
                  "write_s": t_write, "dot_s": t_dot, "bytes": info.nbytes}))
"""


def test_large_streaming_write_and_dot_bounded_rss(tmp_path: Path) -> None:
    """100,000 x 1,024 float16 (~200 MB) written in chunks and scored with bounded RAM.

    RSS check: the work runs in a fresh interpreter (independent of earlier tests). Each phase (write, score)
    resets the kernel's resident-set high-water mark (``/proc/self/clear_refs`` = 5, Linux) and reads ``VmHWM``
    afterwards; elsewhere it falls back to ``ru_maxrss`` (a high-water mark over the process life, still fine in a
    fresh process). Both count every resident page, file-backed mmap pages included, which tracemalloc does not
    see. One-time initialisation and the test's data buffer (rows are generated in place) come before the baseline,
    so the growth is the store's own: about 1.5 MiB of cast buffer when writing, one ~1 MiB float16 chunk plus its
    float32 copy when scoring (and the columns of ids for TracIn). Limits: a tenth (write) and a fifth (score) of the file size.
    """
    root, out = tmp_path / "store", tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", LARGE_CHILD, str(root), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    file_mib = stats["bytes"] / 2**20
    assert file_mib > 195
    print(f"\nlarge store ({file_mib:.1f} MiB file): {stats}")
    assert stats["growth_write"] < file_mib / 10, stats
    assert stats["growth_score"] < file_mib / 5, stats

    # correctness on sampled rows against an independent regeneration in float64 numpy
    store = GradientStore.open(root, readonly=True)
    info = store.checkpoints()[0]
    assert (info.rows, info.dim, info.step, info.learning_rate) == (100_000, 1024, 100, 0.01)
    scores = np.load(out / "dot.npy")
    vec = torch.randn(1024, generator=torch.Generator().manual_seed(5)).double().numpy()
    ids, rows = store.read(info)
    rng = np.random.default_rng(0)
    chunks = sorted(set(rng.integers(0, 48, size=4).tolist()) | {48})  # chunk 48 is the short last one
    for c in chunks:
        start = c * 2048
        n = min(2048, 100_000 - start)
        ref = torch.from_numpy(
            np.random.default_rng(1000 + c).standard_normal((n, 1024), dtype=np.float32)
        ).half()
        pick = rng.choice(n, size=min(n, 64), replace=False)
        expect = ref.double().numpy()[pick] @ vec
        np.testing.assert_allclose(scores[start + pick], expect, rtol=1e-4, atol=1e-3)
        assert torch.equal(rows[start + pick], ref[pick])  # memmap read-back, bit exact
        assert torch.equal(ids[start + pick], torch.from_numpy(start + pick) * 3 + 7)
    tr_ids, tr = np.load(out / "tracin_ids.npy"), np.load(out / "tracin.npy")
    np.testing.assert_array_equal(tr_ids, np.arange(100_000) * 3 + 7)
    np.testing.assert_allclose(tr, 0.01 * scores.astype(np.float64), rtol=1e-6)
