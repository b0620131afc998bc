"""convert --bits 4/8 writes the resident part quantized (mlx_lm's packed affine tensors), load
uses it as stored, the DRAM plan counts it, and damaged or odd quantized files are refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from tiny import make_source

from mlx_flash.format.errors import FormatError
from mlx_flash.format.manifest import (
    MANIFEST,
    RESIDENT,
    read_manifest,
    resident_bits,
    resident_rows,
)
from mlx_flash.format.storage import tensor_sizes
from mlx_flash.offline.convert import convert, pack_bits, write_safetensors
from mlx_flash.offline.sources.base import TensorInfo
from mlx_flash.runtime.loader import load_dense

sys.path.insert(0, str(Path(__file__).parent))
import test_gguf  # noqa: E402  (its tiny GGUF writer)

TOKENS = mx.array([[5, 9, 17, 33, 65, 129]])
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(bits, group) -> (dir with a quantized resident part, the same FFN with a 16-bit one)."""
    root = tmp_path_factory.mktemp("resident")
    src = make_source(root / "src", "qwen2", dtype="float16")
    cache = {}

    def get(bits: int, group: int):
        if (bits, group) not in cache:
            packed, plain = root / f"q{bits}g{group}", root / f"q{bits}g{group}-r16"
            convert(src, packed, bits=bits, group_size=group)
            convert(src, plain, bits=bits, group_size=group, resident_bits=16)
            cache[bits, group] = packed, plain
        return cache[bits, group]

    return get


def logits(model) -> np.ndarray:
    return np.array(model(TOKENS).astype(mx.float32))


def test_resident_file_holds_packed_tensors(dirs):
    packed, plain = dirs(4, 32)
    tensors, manifest = tensor_sizes(packed / RESIDENT), read_manifest(packed)
    q = tensors["model.layers.0.self_attn.q_proj.weight"]
    assert q.dtype == "uint32" and q.shape == (64, 64 * 4 // 32)
    assert tensors["model.layers.0.self_attn.q_proj.scales"].shape == (64, 2)
    assert tensors["model.layers.0.self_attn.q_proj.biases"].dtype == "float16"
    assert tensors["model.embed_tokens.weight"].dtype == "uint32"
    assert tensors["lm_head.weight"].dtype == "uint32"
    assert tensors["model.norm.weight"].dtype == "float16"  # norms and biases stay 16-bit
    assert tensors["model.layers.0.self_attn.q_proj.bias"].dtype == "float16"
    assert resident_bits(manifest) == (4, 32)
    assert manifest.resident["quantization"]["modules"]["lm_head"] == {"bits": 4,
                                                                       "group_size": 32}
    assert (packed / RESIDENT).stat().st_size < 0.4 * (plain / RESIDENT).stat().st_size
    assert "quantization" not in read_manifest(plain).resident  # --resident-bits 16
    assert tensor_sizes(plain / RESIDENT)["lm_head.weight"].dtype == "float16"


@pytest.mark.parametrize("bits,group", [(4, 32), (8, 64)])
@pytest.mark.parametrize("fast_cpu", [False, True])
def test_load_matches_quantizing_at_load(dirs, flash_load, bits, group, fast_cpu):
    packed, plain = dirs(bits, group)
    dtype = None if fast_cpu else "float16"  # convert quantizes in the 16-bit storage dtype
    ref, _ = flash_load(plain, fast_cpu=fast_cpu, resident_bits=bits, resident_group_size=group,
                        dtype=dtype)
    got, _ = flash_load(packed, fast_cpu=fast_cpu, dtype=dtype)
    assert got.flash.stats.settings["resident_bits"] == bits
    np.testing.assert_allclose(logits(got), logits(ref), atol=1e-4)
    assert isinstance(got.model.embed_tokens, nn.QuantizedEmbedding)
    dense, _ = load_dense(packed)
    assert isinstance(dense.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    f32, _ = flash_load(packed, fast_cpu=False, dtype="float32")
    np.testing.assert_allclose(np.array(dense(TOKENS)), logits(f32), atol=1e-4)


def test_matches_mlx_lm_with_the_same_quantized_weights(dirs):
    import mlx_lm

    packed, _ = dirs(4, 64)
    stored = mx.load(str(packed / RESIDENT))
    config = read_manifest(packed).config
    ref = mlx_lm.utils._get_classes(config)
    ref = ref[0](ref[1].from_dict(config))
    nn.quantize(ref, group_size=64, bits=4, class_predicate=lambda p, m: f"{p}.scales" in stored)
    dense, _ = load_dense(packed, dtype="float16")
    ffn = {k: v for k, v in tree_flatten(dense.parameters()) if ".mlp." in k}
    ref.load_weights(list(stored.items()) + list(ffn.items()), strict=True)
    np.testing.assert_allclose(logits(dense), logits(ref), atol=1e-3)


def test_plan_counts_what_is_loaded(dirs, flash_load):
    packed, _ = dirs(4, 32)
    model, _ = flash_load(packed, fast_cpu=False, dtype="float32")
    memory = model.flash.stats.memory
    loaded = sum(v.nbytes for k, v in tree_flatten(model.parameters()) if ".mlp." not in k)
    assert memory["resident"] + memory["embedding"] == loaded
    embed = model.model.embed_tokens
    assert memory["embedding"] == embed.weight.nbytes + embed.scales.nbytes + embed.biases.nbytes


def test_quantized_dir_refuses_other_resident_bits(dirs, flash_load):
    packed, _ = dirs(4, 32)
    with pytest.raises(ValueError, match="converted to 4 bits.*--resident-bits 16"):
        flash_load(packed, resident_bits=16)


@pytest.mark.parametrize("fast_cpu", [False, None])
def test_packed_embedding_on_flash_matches_resident(dirs, flash_load, fast_cpu):
    """A quantized table left on flash: each token's packed row, scales and biases are read
    and dequantized, the same embeddings as the resident QuantizedEmbedding (and, on MLX's
    path, the same logits; the fast path's int8 activations amplify the f16 rounding)."""
    packed, _ = dirs(4, 32)
    resident, _ = flash_load(packed, embed_on_flash=False, fast_cpu=fast_cpu)
    on_flash, _ = flash_load(packed, embed_on_flash=True, fast_cpu=fast_cpu)
    assert type(on_flash.model.embed_tokens).__name__ == "FlashEmbedding"
    assert on_flash.flash.stats.memory["embedding"] == 0
    ids = mx.array([[3, 17, 200, 5]])
    np.testing.assert_allclose(np.array(on_flash.model.embed_tokens(ids).astype(mx.float32)),
                               np.array(resident.model.embed_tokens(ids).astype(mx.float32)),
                               atol=1e-3)  # the resident table dequantizes in float16
    if fast_cpu is False:
        np.testing.assert_allclose(logits(on_flash), logits(resident), atol=2e-2)


def test_old_dir_loads_and_quantizes_at_load(tiny_dirs, flash_load):
    _, flash = tiny_dirs("qwen2")
    manifest = json.loads((flash / MANIFEST).read_text())
    assert "quantization" not in manifest["resident"]  # the format every older dir has
    assert resident_bits(read_manifest(flash)) == (16, 0)
    model, _ = flash_load(flash, resident_bits=8, resident_group_size=32)
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear) or \
        model.flash.stats.settings["fast_linears"]
    assert model.flash.stats.settings["resident_bits"] == 8


def rewrite_resident(root: Path, change) -> None:
    """Rewrite resident.safetensors with `change(infos, arrays)` applied, and fix the
    manifest's size and checksums so only the tensors themselves are wrong."""
    arrays = mx.load(str(root / RESIDENT))
    infos, values = [], []
    for name, a in arrays.items():
        dtype = "uint32" if a.dtype == mx.uint32 else "float16"
        infos.append(TensorInfo(name, tuple(a.shape), dtype))
        values.append(np.array(a))
    change(infos, values)
    write_safetensors(root / RESIDENT, infos, values)
    data = json.loads((root / MANIFEST).read_text())
    data["resident"]["size"] = (root / RESIDENT).stat().st_size
    data["resident"].pop("blocks", None)
    (root / MANIFEST).write_text(json.dumps(data))


def test_odd_quantized_tensor_is_refused(dirs, tmp_path):
    import shutil

    packed, _ = dirs(4, 32)

    def cut_scales(infos, values):  # scales for half the groups: a packed row is misread
        i = next(i for i, t in enumerate(infos) if t.name.endswith("q_proj.scales"))
        values[i] = values[i][:, :1].copy()
        infos[i] = TensorInfo(infos[i].name, values[i].shape, "float16")

    bad = tmp_path / "bad"
    shutil.copytree(packed, bad)
    rewrite_resident(bad, cut_scales)
    with pytest.raises(FormatError, match=r"q_proj \(weight .*not 4-bit MLX affine in groups "
                                          "of 32.*re-convert"):
        read_manifest(bad)

    stray = tmp_path / "stray"
    shutil.copytree(packed, stray)
    data = json.loads((stray / MANIFEST).read_text())
    del data["resident"]["quantization"]["modules"]["lm_head"]
    (stray / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(FormatError, match="lm_head.weight is packed uint32 but the manifest"):
        read_manifest(stray)

    data["resident"]["quantization"]["bits"] = 7
    (stray / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(FormatError, match="resident quantization must be"):
        read_manifest(stray)


def test_truncated_resident_is_refused(dirs, tmp_path):
    import shutil

    packed, _ = dirs(4, 32)
    bad = tmp_path / "cut"
    shutil.copytree(packed, bad)
    with open(bad / RESIDENT, "r+b") as f:
        f.truncate((bad / RESIDENT).stat().st_size - 100)
    with pytest.raises(FormatError, match="truncated"):
        read_manifest(bad)


def test_pack_bits_is_mlx_packing():
    rng = np.random.default_rng(1)
    for bits in (4, 5, 8):
        q = rng.integers(0, 2**bits, (3, 64))
        scales, biases = mx.ones((3, 2)), mx.zeros((3, 2))
        got = mx.dequantize(mx.array(pack_bits(q, bits)), scales, biases, group_size=32,
                            bits=bits)
        assert np.array_equal(np.array(got), q.astype(np.float32))


@pytest.mark.parametrize("qtype", [Q.Q5_0, Q.Q8_0, Q.Q4_0])
def test_gguf_blocks_are_carried_exactly(tmp_path, monkeypatch, qtype):
    names = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
             "lm_head.weight", "model.embed_tokens.weight")
    for name in names:
        monkeypatch.setitem(test_gguf.STORED, name, qtype)
    tok = test_gguf.gpt2_vocab()
    weights = test_gguf.hf_weights("qwen2", len(tok["tokenizer.ggml.tokens"]), tie=False)
    src = test_gguf.write_gguf(tmp_path / "m.gguf", "qwen2", weights, tok)
    flat, out = tmp_path / "f16", tmp_path / "q4"
    convert(src, flat)
    convert(src, out, bits=4, group_size=64)
    modules = read_manifest(out).resident["quantization"]["modules"]
    bits = {Q.Q5_0: 8, Q.Q8_0: 8, Q.Q4_0: 4}[qtype]  # linears: a fast-path width
    stored, plain = mx.load(str(out / RESIDENT)), mx.load(str(flat / RESIDENT))
    for name in names:
        base = name[: -len(".weight")]
        if base == "model.embed_tokens":  # untied, only looked up: its own bits
            bits = {Q.Q5_0: 5, Q.Q8_0: 8, Q.Q4_0: 4}[qtype]
        assert modules[base] == {"bits": bits, "group_size": 32}
        w = mx.dequantize(stored[name], stored[f"{base}.scales"], stored[f"{base}.biases"],
                          group_size=32, bits=bits)
        # the 16-bit dir holds the GGUF's values rounded to f16: the carried blocks are them
        assert np.array_equal(np.array(w.astype(mx.float16)), np.array(plain[name]))
    f32 = read_manifest(out).resident["quantization"]["modules"]["model.layers.0.self_attn.v_proj"]
    assert f32 == {"bits": 4, "group_size": 64}  # an F32 tensor: the asked bits
    convert(src, tmp_path / "g32", bits=4)  # a GGUF's default group: its blocks' 32
    assert read_manifest(tmp_path / "g32").ffn.group_size == 32
    convert(src, tmp_path / "req", bits=4, group_size=64, carry=False)
    modules = read_manifest(tmp_path / "req").resident["quantization"]["modules"]
    assert all(p == {"bits": 4, "group_size": 64} for p in modules.values())


def test_resident_rows_dequantize_as_mlx(dirs, tiny_dirs):
    packed, _ = dirs(4, 32)
    stored, ids = mx.load(str(packed / RESIDENT)), np.array([3, 0, 200])
    want = mx.dequantize(stored["lm_head.weight"], stored["lm_head.scales"].astype(mx.float32),
                         stored["lm_head.biases"].astype(mx.float32), group_size=32, bits=4)
    got = resident_rows(packed, read_manifest(packed), "lm_head.weight", ids)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, np.array(want.astype(mx.float32))[ids], atol=1e-6)
    _, flat = tiny_dirs("qwen2")  # a 16-bit file: its rows widened
    raw = mx.load(str(flat / RESIDENT))["lm_head.weight"]
    got = resident_rows(flat, read_manifest(flat), "lm_head.weight", ids)
    assert np.array_equal(got, np.array(raw.astype(mx.float32))[ids])


def test_mmap_baseline_maps_a_packed_table(tmp_path, flash_load):
    from mlx_flash.bench.baselines import load_mmap

    packed = tmp_path / "r4"  # 16-bit bundles (what the mmap baseline reads), 4-bit resident
    convert(make_source(tmp_path / "src", "qwen2", dtype="float16"), packed, resident_bits=4,
            resident_group_size=32)
    assert resident_bits(read_manifest(packed)) == (4, 32)
    mapped, _ = load_mmap(packed, dtype="float16")
    assert type(mapped.model.embed_tokens).__name__ == "FlashEmbedding"  # rows read
    ref, _ = flash_load(packed, fast_cpu=False, dtype="float16")  # f16 compute: a loose match
    np.testing.assert_allclose(logits(mapped), logits(ref), atol=5e-2)
