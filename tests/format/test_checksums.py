"""Block checksums: recorded by convert, checked by every reader; damage is caught when read."""

from __future__ import annotations

import base64
import json
import shutil
import sys
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import generate

import mlx_flash.format.checksums as checksums
from mlx_flash import load_dense
from mlx_flash.cli.main import main as cli_main
from mlx_flash.format.checksums import (
    BLOCK_SIZE,
    ChecksumError,
    bundle_block_size,
    check_file,
    file_checks,
)
from mlx_flash.format.manifest import (
    MANIFEST,
    PREDICTORS,
    add_block_checksums,
    file_entry,
    has_block_checksums,
    read_manifest,
)
from mlx_flash.format.storage import write_text_atomic
from mlx_flash.offline.placement import place
from mlx_flash.runtime.selectors.predictor import load_predictors
from mlx_flash.spec.drafter import Drafter, init_params, load_drafter, save_drafter

sys.path.insert(0, str(Path(__file__).parents[1] / "offline"))
from test_placement import fake_calibration  # noqa: E402

PROMPT = [5, 9, 17, 33, 65, 129, 7, 8]


@pytest.fixture
def own(tiny_dirs, tmp_path):
    """A private copy of the tiny qwen2 flash dir (tests damage it)."""
    return Path(shutil.copytree(tiny_dirs("qwen2")[1], tmp_path / "flash"))


def flip(path: Path, offset: int, n: int = 7) -> None:
    """Overwrite n bytes at offset with their complement: same size, different content."""
    data = bytearray(path.read_bytes())
    data[offset:offset + n] = bytes(b ^ 0xFF for b in data[offset:offset + n])
    path.write_bytes(bytes(data))


def strip_blocks(root: Path) -> None:
    """Make `root` look like a dir converted before block checksums."""
    data = json.loads((root / MANIFEST).read_text())
    data["resident"].pop("blocks")
    for layer in data["layers"]:
        layer.pop("blocks")
    write_text_atomic(root / MANIFEST, json.dumps(data))


def test_convert_records_blocks_beside_the_sha256(own):
    manifest = read_manifest(own)
    assert has_block_checksums(manifest)
    sizes = [BLOCK_SIZE] + [bundle_block_size(e.stride) for e in manifest.layers]
    for entry, size in zip([manifest.resident, *[vars(e) for e in manifest.layers]], sizes,
                           strict=True):
        sha256, blocks = file_checks(own / entry["file"], size)
        assert entry["sha256"] == sha256 and entry["blocks"] == blocks
        assert blocks["algo"] == "crc32" and blocks["block_size"] == size
        assert check_file(own / entry["file"], entry["size"], entry["blocks"])
    # a layer's blocks are whole bundles: the most that fit BLOCK_SIZE
    stride = manifest.layers[0].stride
    assert sizes[1] % stride == 0 and BLOCK_SIZE - stride < sizes[1] <= BLOCK_SIZE


def test_place_records_the_blocks_of_the_files_it_writes(own, tmp_path):
    calib, _ = fake_calibration(tmp_path / "calib", read_manifest(own))
    place(own, calib, "coact", keep=0.3)
    manifest = read_manifest(own)
    assert manifest.format_version == 2 and has_block_checksums(manifest)
    for entry in manifest.layers:
        assert (entry.sha256, entry.blocks) == file_checks(own / entry.file,
                                                           bundle_block_size(entry.stride))
    path = own / manifest.layers[0].file
    flip(path, 100)
    with pytest.raises(ChecksumError, match=str(path)):
        load_dense(own)


def test_flipped_bundle_bytes_are_caught_by_load_dense(own):
    manifest = read_manifest(own)
    path = own / manifest.layers[1].file
    flip(path, path.stat().st_size // 2)
    with pytest.raises(ChecksumError, match=rf"{path}: checksum mismatch in block 0 \(bytes "
                                            rf"0-{path.stat().st_size}\).*re-convert"):
        load_dense(own)


def test_flipped_bundle_bytes_are_caught_by_the_first_flash_read(flash_load, own):
    model, tokenizer = flash_load(own, window=2)
    want = generate(model, tokenizer, PROMPT, max_tokens=6, verbose=False)
    path = own / read_manifest(own).layers[0].file
    good = path.read_bytes()
    flip(path, 1000)
    model, tokenizer = flash_load(own, window=2)
    for _ in range(2):  # refused each time, never answered from the damaged rows
        with pytest.raises(ChecksumError, match=rf"{path}: checksum mismatch in block 0"):
            generate(model, tokenizer, PROMPT, max_tokens=6, verbose=False)
    path.write_bytes(good)  # repaired: the block was never marked, so it is checked again
    assert generate(model, tokenizer, PROMPT, max_tokens=6, verbose=False) == want


def test_flipped_resident_bytes_are_caught_at_load(flash_load, own):
    path = own / "resident.safetensors"
    flip(path, path.stat().st_size - 100)
    with pytest.raises(ChecksumError, match=rf"{path}: checksum mismatch in block 0"):
        load_dense(own)
    with pytest.raises(ChecksumError, match=rf"{path}: checksum mismatch"):
        flash_load(own)


def test_flipped_predictors_bytes_are_caught_at_load(own):
    path = own / PREDICTORS
    mx.save_safetensors(str(path), {"x": mx.zeros((64, 64))},
                        metadata={"format": "mlx-flash-predictors", "version": "1"})
    manifest = read_manifest(own)
    manifest.predictors = file_entry(own, PREDICTORS)
    write_text_atomic(own / MANIFEST, manifest.to_json())
    flip(path, path.stat().st_size - 100)
    with pytest.raises(ChecksumError, match=rf"{path}: checksum mismatch.*train-predictors"):
        load_predictors(own)


def test_flipped_drafter_bytes_are_caught_at_load(own, tmp_path):
    model, _ = load_dense(own)
    drafter = Drafter(init_params(64, 1, seed=1), np.arange(256)).attach(model, own)
    path = save_drafter(drafter, own, tmp_path / "d.safetensors")
    flip(path, path.stat().st_size // 2)
    with pytest.raises(ChecksumError, match=rf"{path}: checksum mismatch.*train-drafter"):
        load_drafter(path, own)


def test_old_dir_loads_with_a_warning_and_write_checksums_makes_it_checked(own, capsys):
    strip_blocks(own)
    assert not has_block_checksums(read_manifest(own))
    with pytest.warns(UserWarning, match=r"no block checksums.*--verify --write-checksums"):
        reference, _ = load_dense(own)
    assert cli_main(["info", str(own), "--verify", "--write-checksums"]) == 0
    assert "block checksums recorded" in capsys.readouterr().out
    assert has_block_checksums(read_manifest(own))
    assert not list(own.glob(".manifest*"))  # written atomically, no temp left
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dense(own)
    path = own / read_manifest(own).layers[0].file
    flip(path, 10)
    with pytest.raises(ChecksumError, match=str(path)):
        load_dense(own)


def test_write_checksums_refuses_a_damaged_dir(own, capsys):
    strip_blocks(own)
    path = own / read_manifest(own).layers[0].file
    flip(path, 10)
    assert cli_main(["info", str(own), "--verify", "--write-checksums"]) != 0
    assert f"{path}: checksum mismatch" in capsys.readouterr().err
    assert not has_block_checksums(read_manifest(own))


def test_verify_checks_the_block_table_too(own, capsys):
    assert cli_main(["info", str(own), "--verify"]) == 0
    data = json.loads((own / MANIFEST).read_text())
    sums = bytearray(base64.b64decode(data["layers"][0]["blocks"]["sums"]))
    sums[0] ^= 1
    data["layers"][0]["blocks"]["sums"] = base64.b64encode(bytes(sums)).decode()
    write_text_atomic(own / MANIFEST, json.dumps(data))
    assert cli_main(["info", str(own), "--verify"]) != 0
    assert "sha256 matches but its block checksums" in capsys.readouterr().err


def test_block_hashes_are_counted_once(own, monkeypatch):
    add_block_checksums(own, read_manifest(own), block_size=4096)
    calls = []
    real = checksums.block_sum
    monkeypatch.setattr(checksums, "block_sum", lambda data: calls.append(1) or real(data))
    load_dense(own)
    manifest = read_manifest(own)
    blocks = sum(-(-e.size // 4096) for e in manifest.layers) + -(-manifest.resident["size"]
                                                                   // 4096)
    assert len(calls) == blocks
