"""Quantized bundles: pack/unpack round trip, and flash == the dense model on the same
quantized weights."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import generate
from tiny import make_source

import mlx_flash.offline.convert as offline_convert
from mlx_flash.compute.reference import dequantize
from mlx_flash.format.bundles import pack_bundles, unpack_bundles
from mlx_flash.format.errors import FormatError
from mlx_flash.format.manifest import FFNLayout, read_manifest
from mlx_flash.runtime.loader import load, load_dense

PROMPT = [5, 9, 17, 33, 65, 129, 7, 8]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("has_bias", [False, True])
def test_pack_unpack_round_trip(bits, has_bias):
    d, n = 64, 10
    layout = FFNLayout("gated", "silu", d, "float16", has_bias, bits=bits, group_size=32)
    rng = np.random.default_rng(0)
    parts = {"gate": rng.normal(size=(n, d)), "up": rng.normal(size=(n, d)),
             "down": rng.normal(size=(d, n))}
    if has_bias:
        parts.update(gate_bias=rng.normal(size=n), up_bias=rng.normal(size=n))
    parts = {k: v.astype(np.float32) for k, v in parts.items()}
    rows = pack_bundles(parts, layout, 2, 7, layout.bundle_bytes)
    got = unpack_bundles(rows, layout)
    deq = dequantize(mx.array(got["q"]), mx.array(got["scales"]), mx.array(got["biases"]),
                     layout)
    for i, name in enumerate(["gate", "up", "down"]):
        want = parts[name][:, 2:7].T if name == "down" else parts[name][2:7]
        q, s, b = mx.quantize(mx.array(want), group_size=32, bits=bits)
        ref = mx.dequantize(q, s.astype(mx.float16).astype(mx.float32),
                            b.astype(mx.float16).astype(mx.float32), group_size=32, bits=bits)
        assert mx.allclose(deq[i], ref, atol=1e-6)
        assert float(mx.abs(deq[i] - mx.array(want)).max()) < (0.05 if bits == 8 else 0.8)
    if has_bias:
        np.testing.assert_allclose(got["bias"][0].astype(np.float32), parts["gate_bias"][2:7],
                                   atol=1e-2)


@pytest.fixture(scope="module")
def quant_dirs(tmp_path_factory):
    out = {}
    for arch in ("llama", "starcoder2"):
        root = tmp_path_factory.mktemp(f"q-{arch}")
        src = make_source(root / "src", arch)
        for bits in (8, 4):
            offline_convert.convert(src, root / f"flash{bits}", bits=bits, group_size=32)
            out[arch, bits] = root / f"flash{bits}"
    return out


@pytest.mark.parametrize("arch", ["llama", "starcoder2"])
@pytest.mark.parametrize("bits", [8, 4])
def test_flash_equals_dense_on_quantized_weights(quant_dirs, arch, bits):
    flash_dir = quant_dirs[arch, bits]
    manifest = read_manifest(flash_dir)
    assert manifest.ffn.bits == bits and manifest.ffn.group_size == 32
    dense, tokenizer = load_dense(flash_dir)
    model, _ = load(flash_dir, window=3)
    x = mx.array([PROMPT])
    np.testing.assert_allclose(np.array(model(x)), np.array(dense(x)), atol=1e-4)
    assert generate(model, tokenizer, PROMPT, max_tokens=8) == \
        generate(dense, tokenizer, PROMPT, max_tokens=8)
    assert "q" in model.model.layers[0].mlp.cache.buffers  # the cache keeps rows quantized


def test_quantized_bundles_are_smaller(quant_dirs, tiny_dirs):
    sizes = {bits: read_manifest(quant_dirs["llama", bits]).ffn_bytes for bits in (8, 4)}
    full = read_manifest(tiny_dirs("llama")[1]).ffn_bytes  # f32 source kept in f32
    assert sizes[4] < sizes[8] <= full / 3  # f32 rows of 64: 8-bit is 240 B, stride 256


def test_bad_quantization_settings(quant_dirs, tmp_path):
    copy = shutil.copytree(quant_dirs["llama", 4], tmp_path / "copy")
    data = json.loads((copy / "manifest.json").read_text())
    data["ffn"]["bits"] = 3
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(FormatError, match="bits must be 16, 8 or 4"):
        read_manifest(copy)
    data["ffn"]["bits"] = 8  # 8-bit bundles are bigger than the 4-bit stride on disk
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(FormatError, match="stride .* is smaller than the bundle"):
        read_manifest(copy)
    with pytest.raises(FormatError, match="group_size 48"):
        FFNLayout("gated", "silu", 64, "float16", False, bits=4, group_size=48)


@pytest.mark.parametrize("bits", [8, 4])
def test_resident_quantized_at_load(tiny_dirs, bits):
    _, flash_dir = tiny_dirs("qwen2")
    dense, _ = load_dense(flash_dir)
    model, _ = load(flash_dir, resident_bits=bits, resident_group_size=32)
    assert type(model.lm_head).__name__ == "QuantizedLinear"
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"
    x = mx.array([PROMPT])
    ref, got = np.array(dense(x)), np.array(model(x))
    rel = np.abs(got - ref).mean() / np.abs(ref).mean()
    assert rel < (0.02 if bits == 8 else 0.5), rel  # random weights: 4-bit measured 0.31
    unquantized, _ = load(flash_dir, dram_budget=10**10)
    assert model.flash.stats.memory["resident"] < unquantized.flash.stats.memory["resident"] / 2
