"""Benchmark of the memory-mapped gradient store: write and score M stored tasks of dimension d.

For each M in {1,000; 10,000; 100,000}, d in {256, 1024} and dtype in {float16, float32} it streams M random rows
into a fresh store (chunks of ``--chunk`` rows), then scores them with ``GradientStore.dot`` against one vector
(``[d]``) and eight vectors (``[d, 8]``), and with ``tracin_scores`` (dot + per-task accumulation). Scoring is timed
with the file in the page cache ("warm", best of ``--repeats``) and after dropping the file's pages with
``posix_fadvise(DONTNEED)`` ("cold", where the platform allows it). Peak memory is the growth of the resident set
during each phase, measured in a fresh interpreter per configuration (so no memory freed by an earlier
configuration is reused): the kernel's high-water mark is reset before the phase (``/proc/self/clear_refs``,
Linux) and ``VmHWM`` read after it; elsewhere ``ru_maxrss`` is used. The rows come from one pre-generated chunk
updated in place, so neither the write time nor the write memory includes data generation.

``--scoring`` instead measures, in one process on one warm 100,000 x 1,024 float16 store (``--rows``/``--dim``
change it), interleaved rounds of: reading every byte of the file sequentially into a reused 1 MiB buffer (the
floor of any scan: "touch every byte"); ``dot`` against one vector from a fresh store object (every chunk of
rows hashed) and without verification; ``dot`` on a warm object (default: chunks verified once are not hashed
again), with ``verify="always"`` and with ``verify=False``; ``dot`` against 8 vectors (``[d, 8]``); ``dot`` in
float16 (``compute_dtype=torch.float16``: no float32 conversion, float16 output); the previous version's
loop (16 MiB blocks converted to float32, for a before/after in one run); and ``tracin_scores``. It prints the medians and the ratios: scoring vs
touching every byte, the verification overhead, multi-query vs one query.

Usage::

    python benchmarks/bench_store.py            # full grid (writes up to ~400 MB at a time in a temp dir)
    python benchmarks/bench_store.py --quick    # M in {1,000; 10,000}, d in {256, 1024}
    python benchmarks/bench_store.py --scoring  # ratios on one 100,000 x 1,024 float16 store (~200 MB)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C
import torch

from lightning_metaif.influence.store import GradientStore

_SCALE = 1 if sys.platform.startswith("linux") else 1 / 1024  # ru_maxrss unit: KiB on Linux, bytes on macOS


def _status_mib(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Growth of the resident set (MiB) during a ``with`` block."""

    def __enter__(self) -> PeakMemory:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method, self.base = "VmHWM", _status_mib("VmRSS") or 0.0
        except OSError:
            self.method = "ru_maxrss"
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _SCALE / 1024
        return self

    def __exit__(self, *exc: object) -> None:
        peak = _status_mib("VmHWM") if self.method == "VmHWM" else None
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _SCALE / 1024
        self.growth = max(0.0, peak - self.base)


def _drop_cache(path: Path) -> bool:
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run_one(root: Path, m: int, d: int, dtype: torch.dtype, chunk: int, repeats: int) -> dict[str, float]:
    store = GradientStore(root, dim=d, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    pool = torch.randn(chunk, d, generator=gen)  # generated before the measurement; chunk c writes pool + c
    write_s = 0.0
    with PeakMemory() as mem_write:
        t0 = time.perf_counter()
        writer = store.open_checkpoint(step=0, learning_rate=0.01, num_rows=m)
        write_s += time.perf_counter() - t0
        for start in range(0, m, chunk):
            n = min(chunk, m - start)
            rows = pool[:n].add_(1.0 / (1 + start // chunk))  # in place: distinct rows, no allocation
            t0 = time.perf_counter()
            writer.write(torch.arange(start, start + n), rows)
            write_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        info = writer.commit()
        write_s += time.perf_counter() - t0
    vec, mat = torch.randn(d, generator=gen), torch.randn(d, 8, generator=gen)
    cold = _drop_cache(info.path)
    t0 = time.perf_counter()
    store.dot(info, vec)
    cold_s = time.perf_counter() - t0 if cold else float("nan")
    with PeakMemory() as mem_score:
        dot_s = _best(lambda: store.dot(info, vec), repeats)
        dot8_s = _best(lambda: store.dot(info, mat), repeats)
        tracin_s = _best(lambda: store.tracin_scores(vec), repeats)
    return {
        "file_mib": info.nbytes / 2**20,
        "write_s": write_s,
        "write_mibs": info.nbytes / 2**20 / write_s,
        "cold_ms": cold_s * 1e3,
        "dot_ms": dot_s * 1e3,
        "dot_mrows": m / dot_s / 1e6,
        "dot8_ms": dot8_s * 1e3,
        "tracin_ms": tracin_s * 1e3,
        "mem_write": mem_write.growth,
        "mem_score": mem_score.growth,
        "method": mem_score.method,
    }


def _touch_every_byte(path: Path, buffer: memoryview) -> int:
    """Read the whole file sequentially into ``buffer`` (reused): what any scan of the store must at least do."""
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            total += n
    return total


def _dot_before(path: Path, vec: torch.Tensor) -> torch.Tensor:
    """The scoring loop of the previous store version (for a before/after in one run): 16 MiB float32 blocks.

    Rows were read 4,096 at a time (16 MiB as float32) into a float16 buffer, the whole block converted to a
    float32 buffer, then multiplied; no checksums.
    """
    from lightning_metaif.influence.store import read_header

    h = read_header(path)
    nrows = min(65536, 16 * 2**20 // (h.dim * 4))
    raw = torch.empty((nrows, h.dim), dtype=torch.float16)
    conv = torch.empty((nrows, h.dim), dtype=torch.float32)
    out = torch.empty(h.rows)
    view = memoryview(raw.numpy()).cast("B")
    with open(path, "rb", buffering=0) as f:
        for start in range(0, h.rows, nrows):
            n = min(nrows, h.rows - start)
            f.seek(h.data_offset + start * h.row_bytes)
            f.readinto(view[: n * h.row_bytes])
            conv[:n].copy_(raw[:n])
            torch.matmul(conv[:n], vec, out=out[start : start + n])
    return out


def scoring_ratios(root: Path, m: int, d: int, rounds: int) -> dict[str, float]:
    """Interleaved timings (medians over ``rounds``) of the scoring paths against touching every byte."""
    store = GradientStore(root, dim=d, dtype=torch.float16)
    gen = torch.Generator().manual_seed(0)
    chunk = 4096
    with store.open_checkpoint(step=0, learning_rate=0.01, num_rows=m) as writer:
        for start in range(0, m, chunk):
            n = min(chunk, m - start)
            writer.write(torch.arange(start, start + n), torch.randn(n, d, generator=gen))
    info = store.checkpoints()[0]
    vec, mat = torch.randn(d, generator=gen), torch.randn(d, 8, generator=gen)
    buffer = memoryview(bytearray(2**20))
    ops = {
        "touch": lambda: _touch_every_byte(info.path, buffer),
        # a fresh store object: every chunk of rows is hashed (first read), or nothing is (verify=False)
        "dot_first": lambda: GradientStore.open(root, readonly=True).dot(info, vec),
        "dot_first_noverify": lambda: GradientStore.open(root, readonly=True, verify=False).dot(info, vec),
        # the same object again (warm, default): chunks verified once are not hashed again
        "dot": lambda: store.dot(info, vec),
        "dot_always": lambda: store.dot(info, vec, verify="always"),
        "dot_noverify": lambda: store.dot(info, vec, verify=False),
        "dot8": lambda: store.dot(info, mat),
        "dot_fp16": lambda: store.dot(info, vec, compute_dtype=torch.float16),
        "dot_before": lambda: _dot_before(info.path, vec),
        "tracin": lambda: store.tracin_scores(vec),
    }
    for fn in ops.values():  # warm: page cache, buffers, kernels
        fn()
    times: dict[str, list[float]] = {k: [] for k in ops}
    order, rng = list(ops), random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)  # a new order each round: no operation always follows the same one
        for name in order:
            fn = ops[name]
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
    assert torch.allclose(store.dot(info, vec), store.read(info)[1].float() @ vec, rtol=1e-4, atol=1e-3)
    return {
        **{f"{k}_ms": v for k, v in med.items()},
        "file_mib": info.nbytes / 2**20,
        "dot_vs_touch": med["dot"] / med["touch"],
        "dot_before_vs_touch": med["dot_before"] / med["touch"],
        "dot_noverify_vs_touch": med["dot_noverify"] / med["touch"],
        "verify_overhead_first_read": med["dot_first"] / med["dot_first_noverify"] - 1,
        "verify_overhead_always": med["dot_always"] / med["dot_noverify"] - 1,
        "verify_overhead_warm": med["dot"] / med["dot_noverify"] - 1,
        "dot8_vs_dot": med["dot8"] / med["dot"],
        "dot_fp16_vs_touch": med["dot_fp16"] / med["touch"],
        "tracin_vs_touch": med["tracin"] / med["touch"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="M in {1,000; 10,000} only")
    parser.add_argument(
        "--root", type=Path, default=None, help="directory for the stores (default: a temp dir)"
    )
    parser.add_argument("--chunk", type=int, default=4096, help="rows per writer.write call")
    parser.add_argument("--repeats", type=int, default=3, help="warm scoring repeats (best is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--scoring", action="store_true", help="scoring ratios on one warm store (see above)")
    parser.add_argument("--rows", type=int, default=100_000, help="--scoring: stored rows")
    parser.add_argument("--dim", type=int, default=1024, help="--scoring: row dimension")
    parser.add_argument("--rounds", type=int, default=21, help="--scoring: interleaved rounds (median)")
    parser.add_argument("--one", nargs=4, metavar=("ROOT", "M", "D", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:  # child mode: one configuration in a fresh interpreter, JSON on stdout
        torch.randn(64, 64) @ torch.randn(64)
        root, m, d, dtype = Path(args.one[0]), int(args.one[1]), int(args.one[2]), getattr(torch, args.one[3])
        print(json.dumps(run_one(root, m, d, dtype, args.chunk, args.repeats)))
        return
    if args.scoring:
        C.set_threads(args.threads)  # one thread unless asked: two made timings erratic on the shared machine
        env = C.environment()
        base = Path(tempfile.mkdtemp(prefix="bench_store_", dir=args.root))
        try:
            torch.randn(64, 64) @ torch.randn(64)
            r = scoring_ratios(base / "s", args.rows, args.dim, args.rounds)
        finally:
            shutil.rmtree(base, ignore_errors=True)
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.rows:,} x {args.dim:,} float16 "
            f"({r['file_mib']:.0f} MiB), warm page cache, medians of {args.rounds} rounds (operations shuffled in each)"
        )
        rows = [
            ("touch every byte (sequential read, 1 MiB buffer)", "touch"),
            ("dot, 1 vector, fresh store object (hashes every chunk)", "dot_first"),
            ("dot, 1 vector, fresh store object, verify=False", "dot_first_noverify"),
            ("dot, 1 vector, warm object (default: chunks verified once)", "dot"),
            ('dot, 1 vector, verify="always" (hash every read)', "dot_always"),
            ("dot, 1 vector, verify=False", "dot_noverify"),
            ("dot, 8 vectors [d, 8]", "dot8"),
            ("dot, 1 vector, compute_dtype=float16", "dot_fp16"),
            ("dot, 1 vector, previous version's loop (16 MiB float32 blocks)", "dot_before"),
            ("tracin_scores (dot + per-task accumulation)", "tracin"),
        ]
        for label, key in rows:
            print(f"  {label:<60} {r[key + '_ms']:8.1f} ms")
        print(
            f"  ratios: dot / touch = {r['dot_vs_touch']:.2f} (verify=False {r['dot_noverify_vs_touch']:.2f}; "
            f"previous version {r['dot_before_vs_touch']:.2f}; "
            f"float16 compute {r['dot_fp16_vs_touch']:.2f}); verification overhead: first read "
            f'{100 * r["verify_overhead_first_read"]:+.1f}%, every read ("always") '
            f"{100 * r['verify_overhead_always']:+.1f}%, warm default {100 * r['verify_overhead_warm']:+.1f}%; "
            f"8 vectors / 1 vector = {r['dot8_vs_dot']:.2f}; tracin / touch = {r['tracin_vs_touch']:.2f}"
        )
        path = C.save("bench_store_scoring", {"environment": env, "rows": args.rows, "dim": args.dim, **r})
        print(f"saved {path}")
        return
    sizes = [1_000, 10_000] if args.quick else [1_000, 10_000, 100_000]
    base = Path(tempfile.mkdtemp(prefix="bench_store_", dir=args.root))
    torch.randn(64, 64) @ torch.randn(64)  # warm up BLAS before the first measurement
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, stores under {base}, one fresh process per "
        "row; scoring streams one checksum chunk (~1 MiB) at a time, verified; times: write = writer.write+commit (fsync included), dot = rows @ v[d], dot8 = rows @ "
        "V[d,8], tracin = dot + per-task accumulation (warm page cache, best of repeats), cold = first dot after "
        "posix_fadvise(DONTNEED); memory = peak RSS growth during the phase."
    )
    header = (
        f"{'M':>7} {'d':>5} {'dtype':>7} {'file MiB':>9} {'write s':>8} {'MiB/s':>7} {'cold ms':>8} {'dot ms':>8} "
        f"{'Mrows/s':>8} {'dot8 ms':>8} {'tracin ms':>9} {'mem write':>9} {'mem score':>9}"
    )
    print(header)
    print("-" * len(header))
    try:
        for d in (256, 1024):
            for dtype in (torch.float16, torch.float32):
                for m in sizes:
                    root = base / f"m{m}_d{d}_{str(dtype)[6:]}"
                    cmd = [sys.executable, __file__, "--one", str(root), str(m), str(d), str(dtype)[6:]]
                    cmd += ["--chunk", str(args.chunk), "--repeats", str(args.repeats)]
                    cmd += ["--threads", str(args.threads)] if args.threads else []
                    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                    if proc.returncode != 0:
                        raise RuntimeError(f"benchmark child failed for M={m} d={d} {dtype}:\n{proc.stderr}")
                    r = json.loads(proc.stdout.strip().splitlines()[-1])
                    print(
                        f"{m:>7} {d:>5} {str(dtype)[6:]:>7} {r['file_mib']:>9.2f} {r['write_s']:>8.3f} "
                        f"{r['write_mibs']:>7.0f} {r['cold_ms']:>8.1f} {r['dot_ms']:>8.1f} {r['dot_mrows']:>8.2f} "
                        f"{r['dot8_ms']:>8.1f} {r['tracin_ms']:>9.1f} {r['mem_write']:>8.1f}M {r['mem_score']:>8.1f}M",
                        flush=True,
                    )
                    shutil.rmtree(root)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
