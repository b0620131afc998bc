"""The fast CPU path (accel/ + kernels/cpu_kernels.c) computes what the MLX reference computes."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm import generate
from mlx_lm.models.cache import make_prompt_cache

import mlx_flash.accel.build as accel_build
import mlx_flash.accel.build as cpu
import mlx_flash.accel.ffn as accel_ffn
import mlx_flash.accel.linear as accel_linear
from mlx_flash.compute.reference import ffn_over_rows
from mlx_flash.format.manifest import read_manifest
from mlx_flash.runtime.loader import load, load_dense
from mlx_flash.runtime.rows import split_bundles
from mlx_flash.runtime.store import NeuronStore

REASON = accel_build.unavailable_reason()
needs_kernels = pytest.mark.skipif(REASON is not None, reason=f"CPU kernels: {REASON}")
DTYPES = [("float16", mx.float16), ("bfloat16", mx.bfloat16)]


def rand(shape, seed, scale=1.0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale


def as16(a: np.ndarray, dtype: mx.Dtype) -> mx.array:
    return mx.array(a).astype(dtype)


@needs_kernels
@pytest.mark.parametrize("name,dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 3, 17, 70])
@pytest.mark.parametrize("bias", [False, True])
def test_linear16_equals_f32_matmul(name, dtype, tokens, bias):
    w = as16(rand((90, 101), 0), dtype)  # 101: a tail past the 8-wide vectors
    x = rand((tokens, 101), 1)
    b = rand(90, 2) if bias else None
    view, storage = accel_linear.storage_view(w)
    assert storage == name
    got = accel_build.kernels().linear16(view, storage, x, b)
    want = x @ np.asarray(w.astype(mx.float32)).T + (0 if b is None else b)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("name,dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_approx", "relu", "relu2"])
@pytest.mark.parametrize("parts", [3, 2])
def test_ffn16_equals_reference(name, dtype, activation, parts):
    tokens, capacity, n, d = 3, 50, 40, 72
    weights = as16(rand((parts, capacity, d), 3, 0.3), dtype)
    x = rand((tokens, d), 4)
    mask = (np.random.default_rng(5).random((tokens, n)) < 0.5).astype(np.float32)
    in_bias = rand((parts - 1, capacity), 6)
    base, storage = accel_linear.storage_view(weights)
    got = accel_build.kernels().ffn16(base, (capacity * d, d), parts, n, d, storage, x, activation,
                              mask, in_bias)
    want = ffn_over_rows(mx.array(x), weights.astype(mx.float32), n, activation,
                         mx.array(mask), mx.array(in_bias))
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-4)


@needs_kernels
def test_ffn16_over_no_neurons_is_zero():
    weights = as16(rand((3, 30, 16), 7, 0.3), mx.float16)
    x = rand((2, 16), 8)
    base, storage = accel_linear.storage_view(weights)
    empty = accel_build.kernels().ffn16(base, (30 * 16, 16), 3, 0, 16, storage, x, "silu")
    assert not empty.any()


@needs_kernels
def test_kernels_reject_bad_operands():
    k = accel_build.kernels()
    w = np.zeros((4, 8), np.uint16)
    with pytest.raises(ValueError, match="float32"):
        k.linear16(w, "float16", np.zeros((1, 8), np.float64))
    with pytest.raises(ValueError, match=r"\(T, 8\)"):
        k.linear16(w, "float16", np.zeros((1, 9), np.float32))
    with pytest.raises(ValueError, match="uint16"):
        k.linear16(w.astype(np.float32), "float16", np.zeros((1, 8), np.float32))


def test_build_without_a_compiler_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(accel_build.CpuKernelsUnavailable, match="does not run"):
        accel_build.build_library(out_dir=tmp_path)
    assert not list(tmp_path.glob("*.so"))  # nothing half-written left


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setattr(cpu, "_state", {})
    monkeypatch.setenv(accel_build.ENV_CPU_KERNELS, "0")
    assert accel_build.unavailable_reason() == f"{accel_build.ENV_CPU_KERNELS}=0"
    assert not accel_build.wanted(False)
    with pytest.raises(accel_build.CpuKernelsUnavailable, match="fast_cpu=True"):
        accel_build.wanted(True)


@needs_kernels
@pytest.mark.parametrize("arch", ["qwen2", "nemotron", "starcoder2"])
def test_bundle_ffn_equals_split_bundles(tiny_dirs, arch):
    """Gated, plain with biases (relu2 / gelu): the kernel over raw bundle bytes."""
    _, flash_dir = tiny_dirs(arch, "float16")
    manifest = read_manifest(flash_dir)
    with NeuronStore(flash_dir, manifest) as store:
        rows, _ = store.read(1, np.arange(manifest.layers[1].n_neurons))
    x = rand((2, manifest.ffn.d_model), 9)
    got = accel_ffn.BundleFFN(manifest.ffn).over_rows(rows, x, n=rows.shape[0] - 3)
    weights, bias = split_bundles(rows[:-3], manifest, mx.float32)
    want = ffn_over_rows(mx.array(x), weights, weights.shape[1], manifest.ffn.activation,
                         None, bias)
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-4)


@needs_kernels
def test_accelerate_fuses_siblings_and_matches(tiny_dirs):
    _, flash_dir = tiny_dirs("qwen2", "float16")
    ref, _ = load_dense(flash_dir, dtype="float32")
    fast, _ = load_dense(flash_dir, fast_cpu=True)
    attn = fast.model.layers[0].self_attn
    assert type(attn.q_proj) is accel_linear.FastLinear and attn.q_proj._fused is attn.v_proj._fused
    assert type(fast.model.layers[0].mlp.down_proj) is accel_linear.FastLinear
    assert type(fast.model.embed_tokens) is accel_linear.FastEmbedding
    ids = mx.array([[5, 9, 17, 33, 2]])
    want = ref(ids, cache=make_prompt_cache(ref))
    got = fast(ids, cache=make_prompt_cache(fast))
    assert got.dtype == mx.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-3, atol=2e-3)


@needs_kernels
@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma3_text", "nemotron", "starcoder2"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_flash_fast_path_generates_like_the_reference(tiny_dirs, arch, dtype):
    """Window path (decode), dense streaming (prompt > 16 tokens) and the fast linears."""
    _, flash_dir = tiny_dirs(arch, dtype)
    ref, tokenizer = load_dense(flash_dir, dtype="float32")
    model, _ = load(flash_dir, fast_cpu=True, selector="oracle", oracle_rule="all")
    assert model.flash.backend.ffn is not None and model.flash.stats.settings["fast_linears"] > 0
    for prompt in ([5, 9, 17, 33], list(range(3, 40))):
        assert generate(model, tokenizer, prompt, max_tokens=8) == \
            generate(ref, tokenizer, prompt, max_tokens=8)


@needs_kernels
def test_fast_path_window_matches_mlx_window(tiny_dirs):
    """Sparse selections through a small cache: the numpy window update and the kernel give the
    MLX path's tokens and the same cache contents."""
    _, flash_dir = tiny_dirs("qwen2", "float16")
    kwargs = dict(selector="oracle", oracle_rule="top", keep=0.4, window=2, min_capacity=1)
    model, tokenizer = load(flash_dir, fast_cpu=True, **kwargs)
    ref, _ = load(flash_dir, fast_cpu=False, dtype="float32", **kwargs)
    prompt = [5, 9, 17, 33]
    assert generate(model, tokenizer, prompt, max_tokens=10) == \
        generate(ref, tokenizer, prompt, max_tokens=10)
    fast_cache, ref_cache = model.layers[1].mlp.cache, ref.layers[1].mlp.cache
    np.testing.assert_array_equal(fast_cache.neuron_of, ref_cache.neuron_of)


@needs_kernels
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("arch", ["qwen2", "starcoder2"])
def test_fast_path_on_quantized_bundles(tiny_dirs, tmp_path, monkeypatch, bits, arch):
    """ffnq over the cache (window path, small cache so some neurons stream) and over read
    chunks (prefill) against the MLX quantized path on the same bundles: the same tokens with
    exact f32 activations (int8 ones: tests/accel/test_quant_kernels.py)."""
    from mlx_flash.offline.convert import convert

    monkeypatch.setattr(accel_build.kernels(), "exact_quant", True)

    src, _ = tiny_dirs(arch, "float16")
    out = tmp_path / f"q{bits}"
    convert(src, out, bits=bits, group_size=32)
    kwargs = dict(selector="oracle", oracle_rule="top", keep=0.5, window=2)
    model, tokenizer = load(out, fast_cpu=True, **kwargs)
    assert type(model.flash.backend.ffn) is accel_ffn.QuantBundleFFN
    ref, _ = load(out, fast_cpu=False, dtype="float32", **kwargs)
    for prompt in ([5, 9, 17, 33], list(range(3, 40))):
        assert generate(model, tokenizer, prompt, max_tokens=8) == \
            generate(ref, tokenizer, prompt, max_tokens=8)


@needs_kernels
@pytest.mark.parametrize("bits", [8, 4])
def test_ffnq_equals_quantized_reference(bits):
    from mlx_flash.compute.reference import ffn_over_qrows
    from mlx_flash.format.manifest import FFNLayout

    d, n, tokens = 64, 20, 3
    layout = FFNLayout(kind="gated", activation="silu", d_model=d, dtype="float16",
                       has_bias=False, bits=bits, group_size=32)
    w = mx.array(rand((3, n, d), 16, 0.3))
    q, scales, biases = mx.quantize(w, group_size=32, bits=bits)
    scales, biases = scales.astype(mx.float16), biases.astype(mx.float16)
    x = rand((tokens, d), 17)
    mask = (np.random.default_rng(18).random((tokens, n)) < 0.6).astype(np.float32)
    got = accel_build.kernels().ffnq(np.asarray(q), accel_linear.storage_view(scales)[0],
                             accel_linear.storage_view(biases)[0], "float16", n, bits, 32, x, "silu",
                             mask, exact=True)  # int8 activations: test_quant_kernels.py
    want = ffn_over_qrows(mx.array(x), q, scales.astype(mx.float32),
                          biases.astype(mx.float32), n, layout, mx.array(mask))
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-4)


class Holder(nn.Module):
    def __init__(self, **children):
        super().__init__()
        for name, child in children.items():
            setattr(self, name, child)


def test_mlx_linear_kept_for_f32_weights():
    half = nn.Linear(8, 8)
    half.set_dtype(mx.float16)
    model = Holder(kept=nn.Linear(8, 8), swapped=half)
    assert accel_linear.accelerate(model) == 1
    assert type(model.kept) is nn.Linear


@needs_kernels
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("tokens", [1, 11])
def test_quantized_linear_equals_mlx(monkeypatch, bits, group_size, tokens):
    monkeypatch.setattr(accel_build.kernels(), "exact_quant", True)  # int8: test_quant_kernels
    linear = nn.QuantizedLinear(128, 40, bias=True, group_size=group_size, bits=bits)
    linear.update({"weight": linear.weight, "bias": mx.array(rand(40, 10))})
    x = mx.array(rand((tokens, 128), 11))
    want = linear(x)
    model = Holder(proj=linear)
    assert accel_linear.accelerate(model) == 1
    got = model.proj(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


@needs_kernels
def test_flash_fast_path_with_quantized_resident(tiny_dirs, monkeypatch):
    monkeypatch.setattr(accel_build.kernels(), "exact_quant", True)  # token-exact: f32 x
    _, flash_dir = tiny_dirs("qwen2", "float16")
    model, tokenizer = load(flash_dir, fast_cpu=True, resident_bits=8, resident_group_size=32)
    ref, _ = load(flash_dir, fast_cpu=False, dtype="float32", resident_bits=8,
                  resident_group_size=32)
    assert type(model.layers[0].self_attn.q_proj) is accel_linear.FastLinear
    prompt = [5, 9, 17, 33]
    assert generate(model, tokenizer, prompt, max_tokens=8) == \
        generate(ref, tokenizer, prompt, max_tokens=8)


@needs_kernels
@pytest.mark.parametrize("kind", ["ffn", "linear"])
def test_fast_predictor_scores(kind):
    from mlx_flash.runtime.selectors.predictor import FastLayerPredictor, LayerPredictor

    a, b, x = rand((64, 12), 12, 0.3), rand((12, 300), 13, 0.3), rand((3, 64), 14)
    if kind == "ffn":
        layer = LayerPredictor(A=np.stack([a, a * 0.5]), B=np.stack([b, -b]),
                               bias=rand((2, 300), 15), kind="ffn", tau=0.1)
    else:
        layer = LayerPredictor(A=a, B=b, bias=rand(300, 15), kind="linear", tau=0.1)
    want = layer.scores(x)
    got = FastLayerPredictor(layer).scores(x)  # f16 weights: within their rounding
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)
    assert np.mean((got > 0.1) == (want > 0.1)) > 0.97


@needs_kernels
def test_portable_scalar_build_matches_the_vector_one(builds):
    """The path any non-x86 CPU gets: built without -march=native (no AVX2/F16C), no OpenMP."""
    scalar, vector = builds["scalar"], builds["native"]
    assert not scalar.vector and scalar.threads == 1
    w = as16(rand((40, 72), 20, 0.3), mx.bfloat16)
    view, storage = accel_linear.storage_view(w)
    x = rand((3, 72), 21)
    np.testing.assert_allclose(scalar.linear16(view, storage, x), vector.linear16(view, storage, x),
                               rtol=1e-5, atol=1e-5)
    weights = as16(rand((3, 30, 72), 22, 0.3), mx.float16)
    base, storage = accel_linear.storage_view(weights)
    args = (base, (30 * 72, 72), 3, 25, 72, storage, x, "gelu_approx")
    np.testing.assert_allclose(scalar.ffn16(*args), vector.ffn16(*args), rtol=1e-4, atol=1e-4)
    q, s, b = mx.quantize(mx.array(rand((3, 30, 64), 23, 0.3)), group_size=32, bits=4)
    s16, b16 = (accel_linear.storage_view(a.astype(mx.float16))[0] for a in (s, b))
    xq = rand((2, 64), 24)
    qargs = (np.asarray(q), s16, b16, "float16", 30, 4, 32, xq, "silu")
    # int8 activations: the vector build's 4-bit down rows also take int8 coefficients
    # (tests/accel/test_quant_kernels.py checks each build against its own reference)
    np.testing.assert_allclose(scalar.ffnq(*qargs, exact=True), vector.ffnq(*qargs, exact=True),
                               rtol=1e-4, atol=1e-4)
