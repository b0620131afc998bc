"""Sources that lie: a config that disagrees with its tensors, shards that repeat a tensor.

convert must refuse them before OUT exists (naming the key or tensor, both values and the
file), never write a dir that does not load.
"""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import pytest
from tiny import make_source

from mlx_flash.offline.convert import convert
from mlx_flash.offline.sources.safetensors import SafetensorsCheckpoint


def lying_source(tmp_path, arch: str = "qwen2", **config_changes):
    """A tiny source whose config.json is edited after the weights were written."""
    src = make_source(tmp_path / "src", arch)
    config = json.loads((src / "config.json").read_text())
    config.update(config_changes)
    (src / "config.json").write_text(json.dumps(config))
    return src


@pytest.mark.parametrize("key, value, tensor_value", [
    ("intermediate_size", 96, 128),
    ("num_hidden_layers", 1, 2),
    ("vocab_size", 300, 256),
])
def test_config_that_disagrees_with_the_tensors_is_refused(tmp_path, key, value, tensor_value):
    src = lying_source(tmp_path, **{key: value})
    out = tmp_path / "flash"
    with pytest.raises(ValueError, match=key) as info:
        convert(src, out)
    message = str(info.value)
    assert "config.json" in message and str(value) in message and str(tensor_value) in message
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_config_disagreeing_in_attention_heads_is_refused(tmp_path):
    src = lying_source(tmp_path, num_attention_heads=2)  # q_proj is 64 x 64 = 4 heads of 16
    with pytest.raises(ValueError, match="config.json.*self_attn"):
        convert(src, tmp_path / "flash")
    assert not (tmp_path / "flash").exists()


def test_failed_check_keeps_the_old_out(tmp_path):
    good = make_source(tmp_path / "good", "qwen2")
    out = tmp_path / "flash"
    convert(good, out)
    before = (out / "manifest.json").read_text()
    src = lying_source(tmp_path, intermediate_size=96)
    with pytest.raises(ValueError, match="intermediate_size"):
        convert(src, out, force=True)
    assert (out / "manifest.json").read_text() == before


def test_tensor_repeated_across_shards_is_refused(tmp_path):
    src = make_source(tmp_path / "src", "qwen2")
    name = "model.layers.0.mlp.up_proj.weight"
    weights = mx.load(str(src / "model.safetensors"))
    mx.save_safetensors(str(src / "model-2.safetensors"), {name: weights[name] * 2})
    with pytest.raises(ValueError, match=name) as info:
        SafetensorsCheckpoint(src)
    assert "model.safetensors" in str(info.value) and "model-2.safetensors" in str(info.value)
    shutil.rmtree(src)


def test_shard_whose_header_lies_is_refused_by_name(tmp_path):
    src = make_source(tmp_path / "src", "qwen2")
    path = src / "model.safetensors"
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name = "model.layers.0.mlp.down_proj.weight"
    begin = header[name]["data_offsets"][0]
    header[name]["data_offsets"] = [begin, begin + 10 * len(raw)]  # past the end of the file
    blob = json.dumps(header).encode()
    blob += b" " * (n - len(blob)) if len(blob) <= n else b""
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n:])
    with pytest.raises(ValueError, match=f"model.safetensors.*{name}"):
        SafetensorsCheckpoint(src)
