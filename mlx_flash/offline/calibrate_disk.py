"""Measure the disk once: random and sequential read throughput by size and thread count."""

from __future__ import annotations

import mmap
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..runtime.disk import MIB, CostModel, Progress, device_of

READ_SIZES_KIB = (4, 8, 16, 32, 64, 128, 256, 512, 1024)


READ_THREADS = (1, 4, 8, 16)


def drop_page_cache() -> bool:
    """sync and drop the page cache (root only). Returns whether it was dropped."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
        return True
    except OSError:
        return False


def _direct_fds(files: list[Path]) -> list[int]:
    flags = os.O_RDONLY | getattr(os, "O_DIRECT", 0)
    return [os.open(f, flags) for f in files]


def _reader(fds: list[int], sizes: list[int], size: int, deadline: float, seed: int,
            min_reads: int = 8) -> int:
    """Random aligned reads of `size` bytes until the deadline; returns bytes read."""
    rng, buf = random.Random(seed), mmap.mmap(-1, size)  # page aligned for O_DIRECT
    done = reads = 0
    try:
        while reads < min_reads or time.perf_counter() < deadline:
            reads += 1
            i = rng.randrange(len(fds))
            offset = rng.randrange(max(1, (sizes[i] - size) // 4096)) * 4096
            done += os.preadv(fds[i], [buf], offset)
    finally:
        buf.close()
    return done


def random_read_throughput(files: list[Path], size: int, threads: int, seconds: float) -> float:
    """Bytes/s of random direct reads of `size` bytes on `threads` threads."""
    fds, sizes = _direct_fds(files), [f.stat().st_size for f in files]
    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            got = sum(pool.map(lambda s: _reader(fds, sizes, size, t0 + seconds, s),
                               range(threads)))
        return got / (time.perf_counter() - t0)
    finally:
        for fd in fds:
            os.close(fd)


def sequential_read_throughput(files: list[Path], threads: int, limit: int,
                               chunk: int = MIB) -> float:
    """Bytes/s reading the files in order with `chunk` direct reads, `threads` in flight."""
    jobs = [(f, off) for f in files for off in range(0, f.stat().st_size, chunk)]
    jobs = jobs[: max(1, limit // chunk)]
    fds = {f: fd for f, fd in zip(files, _direct_fds(files), strict=True)}
    local = threading.local()

    def read(job) -> int:
        if not hasattr(local, "buf"):
            local.buf = mmap.mmap(-1, chunk)
        return os.preadv(fds[job[0]], [local.buf], job[1])

    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            got = sum(pool.map(read, jobs))
        return got / (time.perf_counter() - t0)
    finally:
        for fd in fds.values():
            os.close(fd)


def measure_disk(files: list[Path], seconds: float, seq_limit: int = 512 * MIB,
                 sizes_kib=READ_SIZES_KIB, threads=READ_THREADS,
                 progress: Progress | None = None) -> dict:
    """Sequential and random direct-read throughput (bytes/s) on `files`.

    Returns {"sequential_1mib": {threads: B/s}, "sequential_best", "random": {threads: {size_kib:
    B/s}}, "seconds_per_point", "files", "page_cache_dropped", "note"}; keys are strings (JSON).
    """
    report = progress or (lambda what: None)
    dropped = drop_page_cache()
    seq = {}
    for t in (1, 4):
        seq[str(t)] = sequential_read_throughput(files, t, seq_limit)
        report(f"sequential, {t} thread(s)")
    rand: dict[str, dict[str, float]] = {}
    for t in threads:
        for k in sizes_kib:
            rand.setdefault(str(t), {})[str(k)] = random_read_throughput(files, k * 1024, t,
                                                                         seconds)
            report(f"random {k} KiB, {t} thread(s)")
    return {"sequential_1mib": seq, "sequential_best": max(seq.values()), "random": rand,
            "seconds_per_point": seconds, "files": len(files), "page_cache_dropped": dropped,
            "note": "O_DIRECT reads, Python thread pool of preadv, random 4 KiB-aligned offsets"}


def points(sizes_kib=READ_SIZES_KIB, threads=READ_THREADS) -> int:
    """How many progress calls `measure_disk` makes (for a progress bar's total)."""
    return 2 + len(sizes_kib) * len(threads)


def scratch_file(directory: Path, size: int) -> Path:
    """A file of `size` random-ish bytes in `directory`, written and fsynced (for reads)."""
    path = directory / f".mlx-flash-calibrate-{os.getpid()}.bin"
    block = np.random.default_rng(0).integers(0, 256, 8 * MIB, dtype=np.uint8).tobytes()
    try:
        with open(path, "wb") as f:
            for _ in range(-(-size // len(block))):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a full disk or ^C: no half-written scratch file left behind
        path.unlink(missing_ok=True)
        raise
    return path


def calibrate(directory: str | Path, files: list[Path] | None = None, seconds: float = 0.5,
              scratch_bytes: int = 512 * MIB, progress: Progress | None = None) -> CostModel:
    """Measure the device holding `directory` and return its cost model (not saved).

    files: what to read (e.g. a model's bundle files); None writes a temporary scratch file of
    `scratch_bytes` in `directory` and removes it after.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory; pass a directory on the disk "
                                "to calibrate (e.g. where your flash models live)")
    if not hasattr(os, "O_DIRECT"):
        raise ValueError("calibrate-disk needs O_DIRECT reads (Linux); this OS has none")
    scratch = None if files else scratch_file(directory, scratch_bytes)
    try:
        disk = measure_disk(files or [scratch], seconds, progress=progress)
    finally:
        if scratch is not None:
            scratch.unlink(missing_ok=True)
    return CostModel(device=device_of(directory), random=disk["random"],
                     sequential_best=disk["sequential_best"], measured_on=str(directory),
                     measured_at=time.strftime("%Y-%m-%d %H:%M:%S"),
                     extra={"sequential_1mib": disk["sequential_1mib"],
                            "seconds_per_point": seconds,
                            "page_cache_dropped": disk["page_cache_dropped"]})
