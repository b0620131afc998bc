"""Hostile and damaged manifests and headers: each one is a FormatError that names the file."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from mlx_flash import load_dense
from mlx_flash.format.errors import FormatError
from mlx_flash.format.manifest import read_manifest
from mlx_flash.format.storage import tensor_sizes


@pytest.fixture
def flash_copy(tiny_dirs, tmp_path):
    """A private copy of the tiny qwen2 flash dir (under tmp_path/model)."""
    _, flash = tiny_dirs("qwen2")
    return shutil.copytree(flash, tmp_path / "model")


def edit(root, change) -> None:
    path = root / "manifest.json"
    data = json.loads(path.read_text())
    result = change(data)
    data = result if isinstance(result, list) else data  # a change may replace the whole JSON
    path.write_text(json.dumps(data))


def secret(tmp_path, size: int) -> str:
    """A file outside the model dir that a hostile manifest might point at."""
    path = tmp_path / "secret.bin"
    path.write_bytes(b"s" * size)
    return str(path)


def test_layer_file_outside_the_dir_is_refused(flash_copy, tmp_path):
    size = json.loads((flash_copy / "manifest.json").read_text())["layers"][0]["size"]
    secret(tmp_path, size)
    edit(flash_copy, lambda d: d["layers"][0].update(file="../secret.bin"))
    with pytest.raises(FormatError, match=r"manifest.json.*'\.\./secret\.bin'.*outside"):
        read_manifest(flash_copy)


def test_absolute_layer_file_is_refused(flash_copy, tmp_path):
    size = json.loads((flash_copy / "manifest.json").read_text())["layers"][1]["size"]
    path = secret(tmp_path, size)
    edit(flash_copy, lambda d: d["layers"][1].update(file=path))
    with pytest.raises(FormatError, match="secret.bin.*outside"):
        read_manifest(flash_copy)


def test_resident_and_predictors_outside_the_dir_are_refused(flash_copy, tmp_path):
    shutil.copy(flash_copy / "resident.safetensors", tmp_path / "resident.safetensors")
    edit(flash_copy, lambda d: d["resident"].update(file="../resident.safetensors"))
    with pytest.raises(FormatError, match="resident.safetensors.*outside"):
        read_manifest(flash_copy)
    edit(flash_copy, lambda d: d["resident"].update(file="resident.safetensors"))
    path = secret(tmp_path, 10)
    edit(flash_copy, lambda d: d.update(predictors={"file": path, "size": 10, "sha256": "0"}))
    with pytest.raises(FormatError, match="secret.bin.*outside"):
        read_manifest(flash_copy)


def test_symlink_out_of_the_dir_is_refused(flash_copy, tmp_path):
    shutil.move(flash_copy / "resident.safetensors", tmp_path / "elsewhere.safetensors")
    (flash_copy / "resident.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(FormatError, match="resident.safetensors.*outside"):
        read_manifest(flash_copy)


@pytest.mark.parametrize("change, words", [
    (lambda d: [d], "not a JSON object"),
    (lambda d: d.update(layers=[]), "no FFN layers"),
    (lambda d: d["layers"][0].update(n_neurons=128.0), "n_neurons"),
    (lambda d: d["layers"][0].update(stride="64"), "stride"),
    (lambda d: d["config"].update(model_type="gpt9"), "gpt9"),
    (lambda d: d.update(layers={"0": 1}), "layers"),
    (lambda d: d.update(resident="resident.safetensors"), "resident"),
    (lambda d: d.update(align=0), "align"),
    (lambda d: d["ffn"].update(d_model="64"), "d_model"),
])
def test_malformed_manifest_names_the_file(flash_copy, change, words):
    edit(flash_copy, change)
    with pytest.raises(FormatError, match="manifest.json") as info:
        read_manifest(flash_copy)
    assert words in str(info.value)


def test_parts_that_lost_an_entry_are_refused(flash_copy):
    edit(flash_copy, lambda d: d["ffn"]["parts"].pop(1))
    with pytest.raises(FormatError, match=r"manifest.json.*parts.*\[gate, down\].*gate, up, down"):
        read_manifest(flash_copy)


def test_parts_with_moved_offsets_are_refused(flash_copy):
    edit(flash_copy, lambda d: d["ffn"]["parts"][1].update(offset=0))
    with pytest.raises(FormatError, match="manifest.json.*parts"):
        read_manifest(flash_copy)


def test_layout_disagreeing_with_the_architecture_is_refused(flash_copy):
    edit(flash_copy, lambda d: d["ffn"].update(activation="relu"))
    with pytest.raises(FormatError, match="manifest.json.*activation 'relu'.*qwen2.*silu"):
        read_manifest(flash_copy)


def write_header(path, blob: bytes, n: int | None = None, data: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", len(blob) if n is None else n) + blob + data)


def test_resident_header_of_absurd_length_is_named(flash_copy):
    path = flash_copy / "resident.safetensors"
    size = path.stat().st_size
    write_header(path, b"{}", n=size - 8)  # "fits" the file, but no header is that long
    with pytest.raises(FormatError, match="resident.safetensors"):
        tensor_sizes(path)
    with open(path, "r+b") as f:  # header length of 2^63: far past the end
        f.write(struct.pack("<Q", 1 << 63))
    with pytest.raises(FormatError, match="resident.safetensors"):
        read_manifest(flash_copy)


def test_resident_header_not_json_is_named_by_read_manifest(flash_copy):
    path = flash_copy / "resident.safetensors"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe not json")
    assert path.stat().st_size == size
    with pytest.raises(FormatError, match="resident.safetensors"):
        read_manifest(flash_copy)


@pytest.mark.parametrize("header", [
    [1, 2],
    {"w": 3},
    {"w": {"dtype": "F32", "shape": "12", "data_offsets": [0, 48]}},
    {"w": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 4800]}},
    {"w": {"dtype": "F32", "shape": [3, 4], "data_offsets": [8, 4]}},
    {"w": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 40]}},
    {"w": {"dtype": 7, "shape": [3, 4], "data_offsets": [0, 48]}},
    {"w": {"dtype": "F32", "shape": [-3, 4], "data_offsets": [0, 48]}},
    {"w": {"dtype": "F32", "shape": [3, 4], "data_offsets": ["0", 48]}},
    {"w": {"dtype": "F32", "shape": [3, 4]}},
])
def test_safetensors_header_that_lies_is_named(tmp_path, header):
    path = tmp_path / "lying.safetensors"
    write_header(path, json.dumps(header).encode(), data=b"\0" * 48)
    with pytest.raises(FormatError, match="lying.safetensors"):
        tensor_sizes(path)


def test_honest_safetensors_header_still_reads(tmp_path):
    path = tmp_path / "ok.safetensors"
    header = {"w": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]},
              "b": {"dtype": "I32", "shape": [], "data_offsets": [48, 52]},
              "__metadata__": {"format": "mlx"}}
    write_header(path, json.dumps(header).encode(), data=b"\0" * 52)
    entries = tensor_sizes(path)
    assert entries["w"].shape == (3, 4) and entries["w"].nbytes == 48
    assert entries["b"].dtype == "I32" and entries["b"].shape == ()


@pytest.mark.parametrize("change", [
    {"dtype": "float16"},  # the bundles are float32: half the bytes per neuron
    {"bits": 8},
    {"has_bias": True, "parts": []},  # parts recomputed with biases: 2 more elements
])
def test_layout_that_disagrees_with_the_stride_is_refused(flash_copy, change):
    edit(flash_copy, lambda d: d["ffn"].update(change))
    with pytest.raises(FormatError, match="manifest.json.*stride"):
        read_manifest(flash_copy)


def test_bundle_dtype_that_disagrees_with_the_resident_is_refused(tiny_dirs, tmp_path):
    _, flash = tiny_dirs("qwen2", "float16")
    copy = shutil.copytree(flash, tmp_path / "model")
    edit(copy, lambda d: d["ffn"].update(dtype="bfloat16"))  # same size: only the dtype tells
    with pytest.raises(FormatError, match="manifest.json.*bfloat16.*resident.safetensors.*float16"):
        read_manifest(copy)


def test_load_refuses_a_manifest_pointing_outside(flash_copy, tmp_path, flash_load):
    size = json.loads((flash_copy / "manifest.json").read_text())["layers"][0]["size"]
    secret(tmp_path, size)
    edit(flash_copy, lambda d: d["layers"][0].update(file="../secret.bin"))
    with pytest.raises(FormatError, match="secret.bin.*outside"):
        flash_load(flash_copy)


def test_a_config_that_does_not_describe_the_resident_weights_is_named(flash_copy, flash_load):
    edit(flash_copy, lambda d: d["config"].update(num_key_value_heads=1))  # k/v shapes change
    with pytest.raises(FormatError, match="manifest.json.*do not fit the model.*re-convert"):
        load_dense(flash_copy)
    with pytest.raises(FormatError, match="manifest.json.*do not fit the model.*re-convert"):
        flash_load(flash_copy)
