"""quant_selector.py: a 4-bit copy of gate/up picks each token's top neurons."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import generate

import mlx_flash.accel.build as accel_build
from mlx_flash.format.arch import np_activation
from mlx_flash.format.manifest import read_manifest
from mlx_flash.offline.train_predictors import layer_weights
from mlx_flash.runtime.backend import CpuBackend, MlxBackend
from mlx_flash.runtime.loader import load_dense
from mlx_flash.runtime.selectors.base import top_ids
from mlx_flash.runtime.selectors.quant_copy import (
    BITS,
    GROUP_SIZE,
    QuantCopySelector,
    selector_bytes,
)
from mlx_flash.runtime.store import NeuronStore

REASON = accel_build.unavailable_reason()


def reference_scores(flash_dir, manifest, layer: int, x: np.ndarray) -> np.ndarray:
    """|act(g^ x) (u^ x)| with g^, u^ dequantized from MLX's own quantization."""
    weights, biases = layer_weights(flash_dir, manifest, layer)
    parts = 2 if manifest.ffn.kind == "gated" else 1
    pre = []
    for p in range(parts):
        q = mx.quantize(mx.array(weights[p].astype(np.float32)), group_size=GROUP_SIZE, bits=BITS)
        w = np.asarray(mx.dequantize(*q, group_size=GROUP_SIZE, bits=BITS))
        pre.append(x @ w.T + (0 if biases is None else biases[p]))
    h = np_activation(manifest.ffn.activation, pre[0])
    return np.abs(h * pre[1] if parts == 2 else h)


def test_top_ids_orders_best_first():
    score = np.array([0.1, 5.0, 3.0, 4.0, 0.2])
    assert top_ids(score, 0.6).tolist() == [1, 3, 2]
    assert top_ids(score, 1.0).tolist() == [1, 3, 2, 4, 0]
    assert top_ids(score, 0.01).tolist() == [1]  # at least one


@pytest.mark.parametrize("fast", [False, pytest.param(True, marks=pytest.mark.skipif(
    REASON is not None, reason=f"CPU kernels: {REASON}"))])
@pytest.mark.parametrize("arch", ["qwen2", "starcoder2"])  # gated; plain with biases
def test_scores_equal_the_dequantized_copy(tiny_dirs, arch, fast):
    _, flash_dir = tiny_dirs(arch, "float16")
    manifest = read_manifest(flash_dir)
    with NeuronStore(flash_dir, manifest) as store:
        backend = CpuBackend(manifest, mx.float16) if fast else MlxBackend(manifest, mx.float32)
        selector = QuantCopySelector(store, manifest, backend, keep=0.25, chunk=48)
    x = np.random.default_rng(0).standard_normal((3, manifest.ffn.d_model)).astype(np.float32)
    for layer in range(manifest.n_layers):
        want = reference_scores(flash_dir, manifest, layer, x)
        np.testing.assert_allclose(selector.scores(layer, x), want, rtol=1e-3, atol=1e-4)
        picked = selector.select(layer, mx.array(x)).ids
        k = int(np.ceil(0.25 * want.shape[1]))
        for row, ids in zip(want, picked, strict=True):
            assert ids.size == k and set(ids[:k // 2]) <= set(np.argsort(-row)[:k])


def test_keep_everything_generates_like_dense(flash_load, tiny_dirs):
    _, flash_dir = tiny_dirs("qwen2", "float16")
    ref, tokenizer = load_dense(flash_dir, dtype="float32")
    model, _ = flash_load(flash_dir, selector="quant", keep=1.0)
    prompt = [5, 9, 17, 33]
    assert generate(model, tokenizer, prompt, max_tokens=8) == \
        generate(ref, tokenizer, prompt, max_tokens=8)


def test_half_the_neurons_are_computed_and_the_plan_counts_the_copy(flash_load, tiny_dirs):
    _, flash_dir = tiny_dirs("qwen2", "float16")
    model, tokenizer = flash_load(flash_dir, selector="quant")  # default keep 0.5
    generate(model, tokenizer, [5, 9, 17, 33], max_tokens=6)
    n = read_manifest(flash_dir).layers[0].n_neurons
    last = model.flash.stats.steps[-1]
    assert last.neurons_active == model.flash.manifest.n_layers * n // 2
    assert model.flash.stats.memory["predictors"] == selector_bytes(read_manifest(flash_dir))


def test_selector_bytes_is_what_the_copy_holds(tiny_dirs):
    _, flash_dir = tiny_dirs("starcoder2", "float16")
    manifest = read_manifest(flash_dir)
    with NeuronStore(flash_dir, manifest) as store:
        selector = QuantCopySelector(store, manifest, CpuBackend(manifest, mx.float16))
    held = sum(a.nbytes for layer in selector.layers for a in layer.values() if a is not None)
    assert held == selector_bytes(manifest)
