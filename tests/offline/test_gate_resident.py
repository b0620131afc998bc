"""Gate-resident dirs (format 4, issue 21): `convert --gate-resident` keeps each layer's gate
resident and only up/down in the bundles; the dense rebuild is the gated model, flash with every
neuron equals it (cached or streamed through 3-neuron caches, one token or several), the gate
selector keeps each token's top |act(gate x)| and finds a planted set, and what cannot hold a
resident gate is refused."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.convert import convert as mlx_lm_convert
from mlx_lm.utils import load_model
from safetensors.numpy import load_file, save_file
from tiny import make_source

import mlx_flash.accel.build as accel_build
from mlx_flash import load_dense
from mlx_flash.format.arch import np_activation
from mlx_flash.format.errors import FormatError
from mlx_flash.format.manifest import (
    GATE_RESIDENT_VERSION,
    MANIFEST,
    PART_QUANT_VERSION,
    Manifest,
    gate_names,
    read_manifest,
)
from mlx_flash.format.storage import tensor_sizes
from mlx_flash.offline.convert import convert
from mlx_flash.runtime.memory import gate_scratch

TOKENS = [5, 9, 17, 33, 65, 129, 7, 3]
REASON = accel_build.unavailable_reason()
FAST = [False, pytest.param(True, marks=pytest.mark.skipif(REASON is not None,
                                                           reason=f"CPU kernels: {REASON}"))]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(bits, gate_bits) -> (gate-resident dir, the same conversion with the gate in the
    bundles); bits "mlx-q4": an mlx_lm 4-bit g64 checkpoint, carried."""
    root = tmp_path_factory.mktemp("gate")
    src = make_source(root / "src", "qwen2", dtype="float16")
    cache = {}

    def get(bits, gate_bits=None):
        key = (bits, gate_bits)
        if key not in cache:
            source, options = src, {"bits": bits}
            if bits == "mlx-q4":
                source, options = root / "q4", {}
                if not source.exists():
                    mlx_lm_convert(hf_path=str(src), mlx_path=str(source), quantize=True,
                                   q_bits=4, q_group_size=64)
            name = f"{bits}-{gate_bits}"
            convert(source, root / f"gate-{name}", gate_resident=True, gate_bits=gate_bits,
                    **options)
            if not (root / f"plain-{bits}").exists():
                convert(source, root / f"plain-{bits}", **options)
            cache[key] = root / f"gate-{name}", root / f"plain-{bits}"
        return cache[key]

    return get


def logits(model, tokens=TOKENS) -> np.ndarray:
    return np.array(model(mx.array([tokens])).astype(mx.float32))


@pytest.mark.parametrize("bits", [16, 4, "mlx-q4"])
def test_the_dense_rebuild_is_the_gated_model(dirs, bits):
    gate_dir, plain_dir = dirs(bits)
    manifest, plain = read_manifest(gate_dir), read_manifest(plain_dir)
    assert manifest.format_version == GATE_RESIDENT_VERSION
    layout = manifest.ffn
    assert (layout.kind, layout.activation, layout.matrix_names) == ("plain", "identity",
                                                                       ["up", "down"])
    assert (layout.model_kind, layout.model_activation) == ("gated", "silu")
    assert layout.gate_resident.bits == (16 if bits == 16 else 4)
    assert layout.bundle_bytes < 0.7 * plain.ffn.bundle_bytes  # two parts of three
    names = tensor_sizes(gate_dir / "resident.safetensors")
    assert gate_names(0)[0] in names and (gate_names(0)[1] in names) == (bits != 16)
    want, _ = load_dense(plain_dir, dtype="float32")
    got, _ = load_dense(gate_dir, dtype="float32")
    np.testing.assert_array_equal(logits(got), logits(want))  # same gate values, same math
    if bits == "mlx-q4":  # and the mlx_lm checkpoint's own logits, in its own dtype
        source = json.loads((gate_dir / MANIFEST).read_text())["source"]["path"]
        model, _ = load_model(Path(source))
        np.testing.assert_array_equal(logits(load_dense(gate_dir, dtype="float16")[0]),
                                      logits(model))


@pytest.mark.parametrize("fast", FAST)
@pytest.mark.parametrize("bits", [16, 4])
def test_flash_with_every_neuron_equals_dense(dirs, flash_load, bits, fast, monkeypatch):
    """The MLX path exactly (f32); the fast CPU path (f32 activations) within the rounding of
    its 16-bit storage."""
    gate_dir, _ = dirs(bits)
    want = logits(load_dense(gate_dir, dtype="float32")[0])
    if fast:
        monkeypatch.setattr(accel_build.kernels(), "exact_quant", True)
    for selector in ("oracle", "gate"):
        model, _ = flash_load(gate_dir, selector=selector, keep=1.0, fast_cpu=fast)
        assert model.flash.backend.name == ("cpu" if fast else "mlx")
        tol = 1e-2 * float(np.abs(want).max()) if fast else 1e-5
        np.testing.assert_allclose(logits(model), want, atol=tol)
        long = TOKENS * 3  # 24 tokens: more than max_sparse_tokens, streamed chunk by chunk
        np.testing.assert_allclose(logits(model, long), logits(load_dense(
            gate_dir, dtype="float32")[0], long), atol=tol)
        for t in range(1, 4):  # decode-sized calls go through the cache and the mask
            np.testing.assert_allclose(logits(model, TOKENS[:t]), want[:, :t], atol=tol)


def test_the_plan_counts_the_gates_scratch(dirs):
    gate_dir, plain_dir = dirs(4)
    gate, plain = read_manifest(gate_dir), read_manifest(plain_dir)
    n, d = gate.layers[0].n_neurons, gate.ffn.d_model
    assert gate_scratch(plain, 512, 1024) == 0
    assert gate_scratch(gate, 512, 1024) == 3 * 4 * 512 * n + 2 * n * d  # n < 1024 here


def test_small_caches_stream_the_rest_with_the_gate(dirs, flash_load, caches_of_three_neurons):
    gate_dir, _ = dirs(4)
    dense, _ = load_dense(gate_dir, dtype="float32")
    model, _ = flash_load(gate_dir, "1GB", selector="gate", keep=1.0, min_capacity=3,
                          fast_cpu=False)
    assert model.layers[0].mlp.cache.capacity == 3
    for t in (1, 3):
        np.testing.assert_allclose(logits(model, TOKENS[:t]), logits(dense, TOKENS[:t]),
                                   atol=1e-5)
    assert model.flash.stats.steps[-1].bytes_read > 0  # the overflow was streamed


def gate_scores(gate_dir, layer: int, x: np.ndarray) -> np.ndarray:
    """|act(gate x)| from the dense rebuild's gate_proj (numpy)."""
    dense, _ = load_dense(gate_dir, dtype="float32")
    gate = dense.model.layers[layer].mlp.gate_proj
    w = mx.dequantize(gate.weight, gate.scales, gate.biases, group_size=gate.group_size,
                      bits=gate.bits) if hasattr(gate, "scales") else gate.weight
    return np.abs(np_activation("silu", x @ np.array(w.astype(mx.float32)).T))


def test_the_gate_selector_keeps_each_tokens_top_gate_activations(dirs, flash_load):
    gate_dir, _ = dirs(4)
    model, _ = flash_load(gate_dir, selector="gate", keep=0.25)
    x = np.random.default_rng(1).standard_normal((2, read_manifest(gate_dir).ffn.d_model))
    x = x.astype(np.float32)
    want = gate_scores(gate_dir, 1, x)
    picked = model.flash.selector.select(1, mx.array(x)).ids
    k = int(np.ceil(0.25 * want.shape[1]))
    for row, ids in zip(want, picked, strict=True):
        assert ids.size == k
        np.testing.assert_allclose(np.sort(row[ids]), np.sort(row)[-k:], rtol=1e-4)


def test_a_planted_set_is_found_and_only_its_rows_are_read(tmp_path, flash_load):
    """Layer 0's gate: 8 neurons' rows along one direction v, 100x the others: for inputs along
    v, keep = 8/n picks exactly those 8; a decode step reads at most 8 new bundles a layer."""
    src = make_source(tmp_path / "src", "qwen2", dtype="float16")
    path = src / "model.safetensors"
    tensors = load_file(path)
    name = "model.layers.0.mlp.gate_proj.weight"
    gate = tensors[name].astype(np.float32)
    (n, d), rng = gate.shape, np.random.default_rng(2)
    planted = rng.choice(n, 8, replace=False)
    v = rng.standard_normal(d).astype(np.float32)
    v /= np.linalg.norm(v)
    gate *= 0.01
    gate[planted] = v * rng.uniform(1.0, 2.0, (8, 1))
    tensors[name] = gate.astype(np.float16)
    save_file(tensors, path, metadata={"format": "pt"})
    convert(src, tmp_path / "flash", gate_resident=True)
    model, _ = flash_load(tmp_path / "flash", selector="gate", keep=8 / n)
    for _ in range(4):
        x = 3.0 * v + 0.1 * rng.standard_normal(d).astype(np.float32)
        assert sorted(model.flash.selector.select(0, mx.array(x[None])).ids[0]) == \
            sorted(planted)
    logits(model, TOKENS[:5])  # prefill
    logits(model, TOKENS[:1])
    step = model.flash.stats.steps[-1]
    stride = read_manifest(tmp_path / "flash").layers[0].stride
    assert step.neurons_active == 8 * len(model.layers)
    assert step.bytes_read <= 8 * stride * len(model.layers)


def test_selectors_that_need_the_gate_in_the_bundles_are_refused(dirs, flash_load):
    gate_dir, plain_dir = dirs(4)
    for options in ({"selector": "quant"}, {"selector": "oracle", "oracle_rule": "top"},
                    {"selector": "sequence"}):
        with pytest.raises(ValueError, match="keeps the gate resident"):
            flash_load(gate_dir, **options)
    with pytest.raises(ValueError, match="needs a gate-resident dir"):
        flash_load(plain_dir, selector="gate")


def test_eval_refuses_a_selector_the_dir_cannot_serve_before_running_any(dirs, monkeypatch,
                                                                          tmp_path):
    """Every --selector entry is checked up front: the 1.5B's eval lost 74 minutes of dense and
    gate runs to a 'sequence' entry refused only when its turn came."""
    import mlx_flash.offline.evaluate as evaluate

    gate_dir, _ = dirs(4)
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 20)
    monkeypatch.setattr(evaluate, "_dense_part", lambda *a: pytest.fail("the dense run started"))
    with pytest.raises(ValueError, match="selector 'sequence'.*cannot score"):
        evaluate.evaluate_selectors(gate_dir, text, evaluate.EvalConfig(ppl_tokens=8, prompts=0),
                                    [("oracle", None), ("gate", 0.5), ("sequence", 0.8)])


def test_convert_refuses_what_cannot_keep_a_resident_gate(tmp_path):
    src = make_source(tmp_path / "src", "starcoder2")  # plain FFN with biases
    with pytest.raises(ValueError, match="needs a gated FFN"):
        convert(src, tmp_path / "out", gate_resident=True)
    src = make_source(tmp_path / "qwen", "qwen2")
    with pytest.raises(ValueError, match="gate_bits"):
        convert(src, tmp_path / "out", gate_bits=4)
    assert not (tmp_path / "out").exists()


def test_the_version_must_say_whether_the_gate_is_resident(dirs):
    gate_dir, plain_dir = dirs(4)
    for root, version in ((gate_dir, PART_QUANT_VERSION), (plain_dir, GATE_RESIDENT_VERSION)):
        data = json.loads((root / MANIFEST).read_text())
        data["format_version"] = version
        with pytest.raises(FormatError, match="resident gate"):
            Manifest.from_dict(data)
    data = json.loads((gate_dir / MANIFEST).read_text())
    data["ffn"]["activation"] = "silu"  # bundles computed with an activation: wrong
    with pytest.raises(FormatError, match="not a gate-resident layout"):
        Manifest.from_dict(data)
