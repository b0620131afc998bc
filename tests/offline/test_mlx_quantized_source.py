"""Quantized mlx_lm checkpoints as a source, carried exactly (format 3): a tiny model quantized
by mlx_lm's own convert (4-bit g64, 8-bit g32, 4-bit g128, the mixed_3_6 and mixed_2_6
recipes: 2, 3, 4, 6 and 8 bits, 16-bit parts beside packed ones), converted by mlx-flash,
gives mlx_lm's logits - bit for bit from the dense rebuild, within float16 rounding from the
flash model (every neuron, cached or streamed) - and what cannot be carried is refused."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.convert import convert as mlx_lm_convert
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model
from tiny import make_source

import mlx_flash.accel.build as accel_build
from mlx_flash import load_dense
from mlx_flash.format.errors import FormatError
from mlx_flash.format.manifest import (
    MANIFEST,
    PART_QUANT_VERSION,
    RESIDENT,
    down_table_names,
    read_manifest,
)
from mlx_flash.format.storage import tensor_sizes
from mlx_flash.offline.convert import convert
from mlx_flash.runtime.backend import choose_backend

TOKENS = [5, 9, 17, 33, 65, 129, 7, 3]
RECIPES = {  # name -> mlx_lm convert's quantization options
    "q4g64": {"q_bits": 4, "q_group_size": 64},
    "q8g32": {"q_bits": 8, "q_group_size": 32},
    "mixed_3_6": {"q_group_size": 64, "quant_predicate": "mixed_3_6"},
    "mixed_2_6": {"q_group_size": 32, "quant_predicate": "mixed_2_6"},
    # d_model 64 does not split into groups of 128: mlx_lm leaves gate/up 16-bit, packs down
    "q4g128": {"q_bits": 4, "q_group_size": 128},
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """recipe -> (mlx_lm quantized dir, mlx-flash dir converted from it)."""
    root = tmp_path_factory.mktemp("mlxq")
    src = make_source(root / "src", "qwen2", dtype="float16")
    cache = {}

    def get(recipe: str):
        if recipe not in cache:
            quantized, flash = root / recipe, root / f"{recipe}-flash"
            mlx_lm_convert(hf_path=str(src), mlx_path=str(quantized), quantize=True,
                           **RECIPES[recipe])
            convert(quantized, flash)
            cache[recipe] = quantized, flash
        return cache[recipe]

    return get


def logits(model, tokens=TOKENS) -> np.ndarray:
    return np.array(model(mx.array([tokens])).astype(mx.float32))


def close_to(got: np.ndarray, want: np.ndarray) -> bool:
    """Equal up to float16 rounding in a different summation order."""
    return float(np.abs(got - want).max()) <= 1e-2 * float(np.abs(want).max())


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_dense_rebuild_is_the_checkpoint(dirs, recipe):
    """load_dense rebuilds mlx_lm's own packed tensors from the bundles and the down tables:
    the same logits as mlx_lm.load of the source, exactly."""
    quantized, flash = dirs(recipe)
    want = logits(load_model(quantized)[0])
    model, _ = load_dense(flash, dtype="float16")
    np.testing.assert_array_equal(logits(model), want)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_flash_every_neuron_matches_mlx_lm(dirs, recipe, flash_load):
    """The flash model (all neurons, MLX path) gives mlx_lm's logits and greedy tokens, both
    for a prompt (streamed) and token by token (the window path)."""
    quantized, flash = dirs(recipe)
    ref = load_model(quantized)[0]
    model, _ = flash_load(flash, dtype="float16")
    assert close_to(logits(model), logits(ref))
    caches = make_prompt_cache(model), make_prompt_cache(ref)
    greedy = [[], []]
    token = [TOKENS[0], TOKENS[0]]
    for _ in range(12):
        for i, m in enumerate((model, ref)):
            out = m(mx.array([[token[i]]]), cache=caches[i])
            token[i] = int(mx.argmax(out[0, -1]))
            greedy[i].append(token[i])
    assert greedy[0] == greedy[1]


def test_small_caches_stream_the_rest_and_still_match(dirs, flash_load,
                                                      caches_of_three_neurons):
    """With 3 neurons cached per layer the others are streamed from flash every token (their
    down columns dequantized with the layer's table): still mlx_lm's logits."""
    quantized, flash = dirs("mixed_3_6")
    model, _ = flash_load(flash, "1GB", dtype="float16", min_capacity=3)
    assert model.layers[0].mlp.cache.capacity == 3
    ref = load_model(quantized)[0]
    c_flash, c_ref = make_prompt_cache(model), make_prompt_cache(ref)
    for token in TOKENS:
        got = np.array(model(mx.array([[token]]), cache=c_flash).astype(mx.float32))
        want = np.array(ref(mx.array([[token]]), cache=c_ref).astype(mx.float32))
        assert close_to(got, want)
    assert model.flash.stats.totals()["bytes_read_per_token"] > 0


def test_layout_is_the_checkpoints_own(dirs):
    """Format 3: gate/up at the checkpoint's bits along d_model, down along the neurons with
    its table resident; mixed_3_6's finer down_proj layers are per-layer overrides, and the
    FFN on flash is the checkpoint's size (no re-quantized or 16-bit copy)."""
    quantized, flash = dirs("mixed_3_6")
    manifest = read_manifest(flash)
    assert manifest.format_version == PART_QUANT_VERSION
    config = json.loads((quantized / "config.json").read_text())["quantization"]
    for layer, entry in enumerate(manifest.layers):
        layout = manifest.layer_layout(layer)
        for part, module in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            want = config[f"model.layers.{layer}.mlp.{module}"]
            got = layout.part_quant(part)
            assert (got.bits, got.group_size) == (want["bits"], want["group_size"])
            assert got.axis == ("neurons" if part == "down" else "d_model")
        assert entry.stride == -(-layout.bundle_bytes // manifest.align) * manifest.align
    assert {manifest.layer_layout(i).part_quant("down").bits for i in range(2)} == {3, 6}
    resident = tensor_sizes(flash / RESIDENT)
    n, d = manifest.layers[0].n_neurons, manifest.ffn.d_model
    for layer in range(manifest.n_layers):
        for name in down_table_names(layer):
            assert resident[name].shape == (n // 64, d)
    source = tensor_sizes(quantized / "model.safetensors")
    packed = sum(e.nbytes for k, e in source.items() if ".mlp." in k)
    bundles = sum(e.n_neurons * manifest.layer_layout(i).bundle_bytes
                  for i, e in enumerate(manifest.layers))
    tables = sum(resident[name].nbytes for i in range(manifest.n_layers)
                 for name in down_table_names(i))
    assert bundles + tables == packed  # the checkpoint's bytes, moved (strides pad them)


def test_unquantized_parts_stay_16_bit(dirs):
    """Where mlx_lm left a linear unquantized (its input does not split into groups of 128)
    the part is stored 16-bit beside the packed down part."""
    _, flash = dirs("q4g128")
    layout = read_manifest(flash).ffn
    assert [layout.part_quant(p).bits for p in ("gate", "up", "down")] == [16, 16, 4]


def test_quantized_resident_part_is_carried(dirs):
    """Attention, embedding and lm_head stay packed as mlx_lm stored them (mixed bits)."""
    quantized, flash = dirs("mixed_3_6")
    modules = read_manifest(flash).resident["quantization"]["modules"]
    config = json.loads((quantized / "config.json").read_text())["quantization"]
    assert modules["lm_head"] == {"bits": 6, "group_size": 64}
    assert modules["model.embed_tokens"]["bits"] == config["model.embed_tokens"]["bits"]
    src, got = tensor_sizes(quantized / "model.safetensors"), tensor_sizes(flash / RESIDENT)
    for name in ("lm_head.weight", "model.layers.1.self_attn.v_proj.weight"):
        assert got[name].shape == src[name].shape and got[name].dtype == "uint32"


@pytest.mark.skipif(accel_build.unavailable_reason() is not None,
                    reason=f"CPU kernels: {accel_build.unavailable_reason()}")
@pytest.mark.parametrize("recipe", ["q4g64", "q8g32"])
def test_fast_cpu_path_matches_mlx_lm(dirs, recipe, flash_load, monkeypatch):
    """4/8-bit layers run on the fast CPU path's ffnp (chosen by default on the CPU): with f32
    activations within float rounding of mlx_lm (in f32), prompt and token by token."""
    quantized, flash = dirs(recipe)
    assert choose_backend(None, read_manifest(flash), None).name == "cpu"
    monkeypatch.setattr(accel_build.kernels(), "exact_quant", True)
    ref = load_model(quantized)[0]
    ref.set_dtype(mx.float32)
    model, _ = flash_load(flash)
    assert model.flash.backend.name == "cpu"
    assert close_to(logits(model), logits(ref))
    c_flash, c_ref = make_prompt_cache(model), make_prompt_cache(ref)
    for token in TOKENS:
        got = np.array(model(mx.array([[token]]), cache=c_flash))
        want = np.array(ref(mx.array([[token]]), cache=c_ref))
        assert close_to(got, want)


def test_fast_cpu_refuses_other_widths_and_default_takes_mlx_path(dirs):
    """mixed_3_6 has 3- and 6-bit parts, which ffnp does not decode: the MLX path computes
    them, and asking for the fast path says why."""
    _, flash = dirs("mixed_3_6")
    manifest = read_manifest(flash)
    assert choose_backend(None, manifest, None).name == "mlx"
    with pytest.raises(ValueError, match="3- or 6-bit"):
        choose_backend(True, manifest, None)


def test_precision_options_are_refused(dirs, tmp_path):
    quantized, _ = dirs("q4g64")
    with pytest.raises(ValueError, match="carried exactly as stored.*--bits"):
        convert(quantized, tmp_path / "out", bits=8)
    with pytest.raises(ValueError, match="--resident-bits"):
        convert(quantized, tmp_path / "out", resident_bits=16)
    assert not (tmp_path / "out").exists()


def test_non_affine_mode_is_refused_naming_the_tensor(dirs, tmp_path):
    quantized, _ = dirs("q4g64")
    odd = tmp_path / "odd"
    shutil.copytree(quantized, odd)
    config = json.loads((odd / "config.json").read_text())
    config["quantization"]["mode"] = "mxfp4"
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tensor \S+\.weight is quantized .*mxfp4"):
        convert(odd, tmp_path / "out")


def test_packed_tensor_without_quantization_entry_is_refused(dirs, tmp_path):
    quantized, _ = dirs("q4g64")
    odd = tmp_path / "odd"
    shutil.copytree(quantized, odd)
    config = json.loads((odd / "config.json").read_text())
    config["quantization"]["model.layers.0.mlp.up_proj"] = False
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="up_proj.weight is packed uint32 but"):
        convert(odd, tmp_path / "out")


def test_format_3_needs_its_version(dirs, tmp_path):
    """A manifest claiming an older version for per-part bundles is refused (an older reader
    would misread them): the version is what keeps old readers out."""
    _, flash = dirs("q4g64")
    edited = tmp_path / "edited"
    shutil.copytree(flash, edited)
    data = json.loads((edited / MANIFEST).read_text())
    data["format_version"] = 1
    (edited / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(FormatError, match="format_version 3"):
        read_manifest(edited)
