"""`mlx-flash calibrate-disk`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from ..format.manifest import MANIFEST, read_manifest
from ..offline import calibrate_disk as offline_calibrate_disk
from ..runtime import disk as runtime_disk


def cmd_calibrate_disk(args) -> int:
    where = Path(args.dir).expanduser()
    files = None
    if (where / MANIFEST).exists():  # a flash model dir: read its own bundle files
        files = [where / e.file for e in read_manifest(where).layers]
    with tqdm(total=offline_calibrate_disk.points(), desc="calibrate-disk", unit="point", file=sys.stderr,
              disable=None) as bar:
        model = offline_calibrate_disk.calibrate(where, files, args.seconds, args.scratch_mib * 2**20,
                               progress=lambda what: (bar.set_postfix_str(what), bar.update()))
    dest = runtime_disk.save(model, runtime_disk.model_path(where))
    print(f"device {model.device}: {model.latency() * 1e6:.0f} us per 4 KiB read, "
          f"{model.bandwidth() / 1e9:.2f} GB/s for 1 MiB reads (8 threads, O_DIRECT); "
          f"page cache {'dropped' if model.extra['page_cache_dropped'] else 'NOT dropped (not root)'}"
          f"\nwrote {dest}")
    return 0


def add_arguments(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("calibrate-disk", help="measure the disk's read cost (once per device; "
                                              "the read planner and the benchmark use it)")
    p.add_argument("dir", nargs="?", default=str(Path.home()),
                   help="a directory on the disk to measure (a flash model dir: its bundle files "
                        "are read; else a temporary scratch file is written there)")
    p.add_argument("--seconds", type=float, default=0.5, help="seconds per measured point")
    p.add_argument("--scratch-mib", type=int, default=512, help="size of the scratch file")
    p.set_defaults(func=cmd_calibrate_disk)
    return p
