"""The disk's cost model: what a read of a given size costs, measured once per machine.

`offline/calibrate_disk.py` times random O_DIRECT reads (page cache bypassed, and dropped first
when root) against read size and thread count, plus sequential 1 MiB reads: the paper's Figure
2b, and what the benchmark plots. Its `calibrate` turns that table into a `CostModel`, stored as
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
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..format.home import home
from ..format.storage import write_text_atomic

MIB = 2**20


COST_MODEL_VERSION = 1


Progress = Callable[[str], None]  # called once per measured point, with its description


class CostModelError(ValueError):
    """A stored cost model that is missing fields, damaged or from another version."""


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


# Random O_DIRECT reads measured on this project's development machine, 8 threads: the
# fallback when a device was never calibrated, so the planner still has a sensible shape.
FALLBACK = CostModel(device="unknown", measured_on="development machine (fallback)", random={"8": {
    "4": 115e6, "8": 250e6, "32": 790e6, "128": 1.47e9, "1024": 1.5e9}})


def as_report(model: CostModel) -> dict:
    """The `measure_disk`-shaped dict of a cost model (the benchmark's disk table and plot)."""
    seq = model.extra.get("sequential_1mib") or {"?": model.sequential_best}
    return {"sequential_1mib": seq, "sequential_best": model.sequential_best,
            "random": model.random, "device": model.device, "measured_on": model.measured_on,
            "measured_at": model.measured_at,
            "note": "O_DIRECT reads, Python thread pool of preadv, random 4 KiB-aligned offsets"}


def device_of(path: str | Path) -> str:
    dev = os.stat(path).st_dev
    return f"{os.major(dev)}:{os.minor(dev)}"


def model_path(path: str | Path) -> Path:
    """Where the cost model of the device holding `path` is stored."""
    return home() / "disk" / (device_of(path).replace(":", "-") + ".json")


def save(model: CostModel, dest: Path) -> Path:
    """Write `model` to `dest` atomically; returns dest."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(dest, model.to_json())
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
