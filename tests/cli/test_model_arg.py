"""`--model` takes a flash dir, an mlx_lm/HF dir or a .gguf file: sources are converted once into
the models dir and reused."""

from __future__ import annotations

import os

import mlx.core as mx
import pytest
from mlx_lm.convert import convert as mlx_lm_convert
from mlx_lm.utils import load_model

from mlx_flash import load
from mlx_flash.cli.common import converted_dir, resolve_model
from mlx_flash.format.manifest import PART_QUANT_VERSION, read_manifest
from tests.tiny import make_source


def test_flash_dir_is_used_as_is(tiny_dirs):
    _, flash = tiny_dirs("qwen2")
    assert resolve_model(str(flash)) == flash


def test_source_dir_is_converted_once_and_reused(tmp_path, capsys):
    src = make_source(tmp_path / "src", "qwen2")
    home = tmp_path / "models"
    first = resolve_model(str(src), str(home))
    assert first == converted_dir(home, src.resolve())
    assert (first / "manifest.json").is_file()
    assert "converting" in capsys.readouterr().err
    made = (first / "manifest.json").stat().st_mtime_ns
    assert resolve_model(str(src), str(home)) == first
    assert "converting" not in capsys.readouterr().err  # reused, not converted again
    assert (first / "manifest.json").stat().st_mtime_ns == made


def test_quantized_mlx_lm_dir_is_carried_once(tmp_path, capsys):
    """An mlx_lm 4-bit dir given to --model is converted once, exactly (format 3), and its
    flash model gives the checkpoint's greedy tokens."""
    src = make_source(tmp_path / "src", "qwen2", dtype="float16")
    quantized = tmp_path / "q4"
    mlx_lm_convert(hf_path=str(src), mlx_path=str(quantized), quantize=True, q_bits=4,
                   q_group_size=64)
    home = tmp_path / "models"
    flash = resolve_model(str(quantized), str(home))
    assert "converting" in capsys.readouterr().err
    assert read_manifest(flash).format_version == PART_QUANT_VERSION
    assert resolve_model(str(quantized), str(home)) == flash
    assert "converting" not in capsys.readouterr().err
    model, _ = load(flash, dtype="float16")
    try:
        ref = load_model(quantized)[0]
        tokens = mx.array([[5, 9, 17, 33]])
        assert (mx.argmax(model(tokens), -1) == mx.argmax(ref(tokens), -1)).all()
    finally:
        model.flash.close()


def test_changed_source_is_converted_again(tmp_path, capsys):
    src = make_source(tmp_path / "src", "qwen2")
    home = tmp_path / "models"
    first = resolve_model(str(src), str(home))
    later = (first / "manifest.json").stat().st_mtime + 10
    os.utime(src / "config.json", (later, later))
    capsys.readouterr()
    assert resolve_model(str(src), str(home)) == first
    assert "converting" in capsys.readouterr().err


def test_unknown_model_names_what_it_accepts(tmp_path):
    with pytest.raises(FileNotFoundError, match="--model nope.*hf:org/name"):
        resolve_model("nope", str(tmp_path))
