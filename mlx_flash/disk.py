"""The disk's cost model: what a read of a given size costs, measured once per machine.

`measure_disk` times random O_DIRECT reads (page cache bypassed, and dropped first when root)
against read size and thread count, plus sequential 1 MiB reads: the paper's Figure 2b, and what
`scripts/benchmark.py` plots. `calibrate` turns that table into a `CostModel`, which is stored as
JSON under `$MLX_FLASH_HOME/disk/` (default `~/.cache/mlx_flash/disk/`), one file per block
device (`MAJOR-MINOR.json`, from `os.stat(path).st_dev`), and found again by `cost_model_for`.

The model: with `t` reads in flight, random reads of `s` bytes reach an aggregate `R_t(s)`
bytes/s, so each such read occupies the device for `s / R_t(s)` seconds. A set of reads issued
together on `t` threads costs the sum of those times. `read_seconds` interpolates that per-read
time in log(size) between the measured sizes and extends it past the largest by the bandwidth.
On this project's machine a 4 KiB read costs ~36 us and a 128 KiB read ~89 us: below ~64 KiB a
read costs about the same whatever its size (the device is bound by read count), which is what
the read planner (`planner.py`) exploits.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

MIB = 2**20
READ_SIZES_KIB = (4, 8, 16, 32, 64, 128, 256, 512, 1024)
READ_THREADS = (1, 4, 8, 16)
COST_MODEL_VERSION = 1
Progress = Callable[[str], None]  # called once per measured point, with its description


class CostModelError(ValueError):
    """A stored cost model that is missing fields, damaged or from another version."""


# ---------------------------------------------------------------- measuring


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


# ---------------------------------------------------------------- the model


@dataclass
class CostModel:
    """Per-read time of random direct reads by size and thread count, on one block device.

    random: {threads: {size_kib: bytes/s}} (string keys, as stored); device: "MAJOR:MINOR".
    """

    device: str
    random: dict[str, dict[str, float]]
    sequential_best: float = 0.0
    measured_on: str = ""  # the path whose files were read
    measured_at: str = ""
    version: int = COST_MODEL_VERSION
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.version != COST_MODEL_VERSION:
            raise CostModelError(f"cost model version {self.version!r} is not "
                                 f"{COST_MODEL_VERSION}")
        if not self.random or not all(self.random.values()):
            raise CostModelError("cost model has no random-read measurements")
        for t, by_size in self.random.items():
            for k, rate in by_size.items():
                if not (int(t) >= 1 and int(k) >= 1 and float(rate) > 0):
                    raise CostModelError(f"bad measurement {t} threads / {k} KiB: {rate!r}")

    def _table(self, threads: int) -> tuple[np.ndarray, np.ndarray]:
        """(sizes in bytes, seconds per read) at the measured thread count nearest `threads`."""
        t = min(self.random, key=lambda k: (abs(int(k) - threads), -int(k)))
        by_size = sorted((int(k) * 1024, float(v)) for k, v in self.random[t].items())
        sizes = np.array([s for s, _ in by_size], dtype=np.float64)
        # A larger read never costs less than a smaller one (noise can make it look so).
        return sizes, np.maximum.accumulate(sizes / np.array([r for _, r in by_size]))

    def read_seconds(self, nbytes: np.ndarray, threads: int = 8) -> np.ndarray:
        """Device time of each read of nbytes (array) when `threads` reads are in flight."""
        sizes, per_read = self._table(threads)
        nbytes = np.maximum(np.asarray(nbytes, dtype=np.float64), 1.0)
        inside = np.interp(np.log(nbytes), np.log(sizes), per_read)
        bandwidth = sizes[-1] / per_read[-1]
        return np.where(nbytes > sizes[-1], per_read[-1] + (nbytes - sizes[-1]) / bandwidth,
                        inside)

    def latency(self, threads: int = 8) -> float:
        """Seconds per read of the smallest measured size (the read-count bound)."""
        return float(self._table(threads)[1][0])

    def bandwidth(self, threads: int = 8) -> float:
        """Bytes/s of the largest measured random reads."""
        sizes, per_read = self._table(threads)
        return float(sizes[-1] / per_read[-1])

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, where: str) -> CostModel:
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
            return cls(**data)
        except (json.JSONDecodeError, TypeError, ValueError, AttributeError) as e:
            raise CostModelError(f"{where}: not a valid disk cost model ({e}); delete it and "
                                 "run `mlx-flash calibrate-disk` again") from e


# Measured on this project's development machine (DESIGN.md "Disk here"), 8 threads: the
# fallback when a device was never calibrated, so the planner still has a sensible shape.
FALLBACK = CostModel(device="unknown", measured_on="DESIGN.md (fallback)", random={"8": {
    "4": 115e6, "8": 250e6, "32": 790e6, "128": 1.47e9, "1024": 1.5e9}})


def as_report(model: CostModel) -> dict:
    """The `measure_disk`-shaped dict of a cost model (the benchmark's disk table and plot)."""
    seq = model.extra.get("sequential_1mib") or {"?": model.sequential_best}
    return {"sequential_1mib": seq, "sequential_best": model.sequential_best,
            "random": model.random, "device": model.device, "measured_on": model.measured_on,
            "measured_at": model.measured_at,
            "note": "O_DIRECT reads, Python thread pool of preadv, random 4 KiB-aligned offsets"}


# ---------------------------------------------------------------- storage


def home() -> Path:
    """$MLX_FLASH_HOME, else ~/.cache/mlx_flash."""
    env = os.environ.get("MLX_FLASH_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mlx_flash"


def device_of(path: str | Path) -> str:
    dev = os.stat(path).st_dev
    return f"{os.major(dev)}:{os.minor(dev)}"


def model_path(path: str | Path) -> Path:
    """Where the cost model of the device holding `path` is stored."""
    return home() / "disk" / (device_of(path).replace(":", "-") + ".json")


def save(model: CostModel, dest: Path) -> Path:
    """Write atomically (temp name, fsync, rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(model.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dest)
    return dest


def load(path: str | Path) -> CostModel:
    path = Path(path)
    return CostModel.from_json(path.read_text(), str(path))


def cost_model_for(path: str | Path) -> CostModel | None:
    """The stored cost model of the device holding `path`, or None if never calibrated.

    A damaged file raises CostModelError naming it (and the fix).
    """
    stored = model_path(path)
    return load(stored) if stored.exists() else None


# ---------------------------------------------------------------- calibration


def scratch_file(directory: Path, size: int) -> Path:
    """A file of `size` random-ish bytes in `directory`, written and fsynced (for reads)."""
    path = directory / f".mlx-flash-calibrate-{os.getpid()}.bin"
    block = np.random.default_rng(0).integers(0, 256, 8 * MIB, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        for _ in range(-(-size // len(block))):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
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
