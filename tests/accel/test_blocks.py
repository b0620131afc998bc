"""accel/blocks.py: the numpy transformer block computes what mlx_lm's block computes."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm import generate
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import KVCache, make_prompt_cache
from mlx_lm.models.rope_utils import initialize_rope

import mlx_flash.accel.blocks as accel_blocks
import mlx_flash.accel.build as accel_build
import mlx_flash.process as process
from mlx_flash.runtime.loader import load, load_dense
from mlx_flash.spec.drafter import Drafter, init_params
from mlx_flash.spec.speculative import SpecSettings, SpecStats, make_cache, speculative_tokens

REASON = accel_build.unavailable_reason()
needs_kernels = pytest.mark.skipif(REASON is not None, reason=f"CPU kernels: {REASON}")
FAMILY = ["llama", "qwen2", "mistral", "qwen3"]


def rand(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


@pytest.mark.parametrize("traditional,dims,scaling", [
    (False, 16, None), (True, 16, None),
    (False, 8, None), (True, 8, None),  # partial rotary: the rest of the head passes through
    (False, 16, LLAMA3),  # a scaled rope module with its own frequencies
])
def test_rope_table_equals_the_module(traditional, dims, scaling):
    rope = (initialize_rope(16, 10000.0, traditional, scaling, 2048) if scaling
            else nn.RoPE(dims, traditional=traditional, base=10000.0))
    table = accel_blocks.RopeTable(rope, 16)
    x = rand((1, 3, 5, 16), 0)  # (B, heads, L, D): mlx's layout
    for offset in (0, 7, 1500):  # 1500: past the first table, which then grows
        want = np.asarray(rope(mx.array(x), offset=offset))
        got = table(x.transpose(0, 2, 1, 3), offset + np.arange(5)).transpose(0, 2, 1, 3)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length,span", [(1, 9), (4, 4), (3, 10)])
@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool", "additive"])
def test_attend_equals_mlx_sdpa(length, span, mask_kind):
    q, k, v = rand((1, 4, length, 16), 1), rand((1, 2, span, 16), 2), rand((1, 2, span, 16), 3)
    mask = None if mask_kind == "none" else "causal"
    if mask_kind in ("bool", "additive"):
        keep = np.random.default_rng(4).random((length, span)) < 0.7
        keep[:, 0] = True  # every query sees something
        mask = keep if mask_kind == "bool" else np.where(keep, 0.0, -1e9).astype(np.float32)
    if mask_kind == "causal" and length == 1:
        mask = None  # mlx_lm passes no mask for one token
    want = mx.fast.scaled_dot_product_attention(
        mx.array(q), mx.array(k), mx.array(v), scale=0.25,
        mask=mask if mask is None or isinstance(mask, str) else mx.array(mask))
    got = accel_blocks.attend(q, k, v, 0.25, mask)
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length,span,limit", [(7, 7, 12), (5, 13, 20), (6, 9, 1)])
def test_causal_attention_in_query_blocks_equals_all_at_once(length, span, limit, monkeypatch):
    """Past SCORES_PER_HEAD scores a head, a causal prompt goes a block of queries at a time."""
    q, k, v = rand((1, 4, length, 16), 1), rand((1, 2, span, 16), 2), rand((1, 2, span, 16), 3)
    want = accel_blocks.attend(q, k, v, 0.25, "causal")
    calls = []
    original = accel_blocks._attend
    monkeypatch.setattr(accel_blocks, "_attend",
                        lambda q, k, *a: calls.append(q.shape[2] * k.shape[2]) or original(q, k, *a))
    monkeypatch.setattr(accel_blocks, "SCORES_PER_HEAD", limit)
    got = accel_blocks.attend(q, k, v, 0.25, "causal")
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert len(calls) > 1 and max(calls) <= max(limit, span)  # one query row at the least


@needs_kernels
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_a_long_cached_call_goes_a_piece_at_a_time(tiny_dirs, arch, monkeypatch):
    """mlx_lm's prefill hands the model up to 2048 positions at once: a swapped block computes
    PIECE of them at a time, with the same result and caches."""
    _, flash_dir = tiny_dirs(arch, "float16")
    model, _ = load_dense(flash_dir, fast_cpu=True)
    ids = mx.array([list(range(3, 30))])  # 27 positions
    whole_cache = make_prompt_cache(model)
    want = np.asarray(model(ids, cache=whole_cache))
    seen = []
    forward = accel_blocks.FastBlockState.forward
    monkeypatch.setattr(accel_blocks.FastBlockState, "forward",
                        lambda self, x, *a: seen.append(x.shape[1]) or forward(self, x, *a))
    monkeypatch.setattr(accel_blocks, "PIECE", 8)
    cache = make_prompt_cache(model)
    got = np.asarray(model(ids, cache=cache))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert set(seen) == {8, 3} and len(seen) == 4 * len(model.layers)
    for a, b in zip(cache, whole_cache, strict=True):
        assert a.offset == b.offset == 27
        np.testing.assert_allclose(a.keys[..., :27, :], b.keys[..., :27, :], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(1, 64), (3, 40), (2, 7)])
def test_rms_norm_kernel_equals_numpy(builds, shape):
    x, w = rand(shape, 0) * 3, rand(shape[1:], 1)
    want = accel_blocks.rms_norm(x, w, 1e-6)
    for name, k in builds.items():
        np.testing.assert_allclose(k.rms_norm(x, w, 1e-6), want, rtol=1e-5, atol=1e-6,
                                   err_msg=name)


@pytest.mark.parametrize("traditional,rot", [(False, 16), (True, 16), (False, 8), (True, 6)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (3, 3), (6, 1)])
@pytest.mark.parametrize("offset", [0, 7, 20])
def test_decode_attention_equals_the_numpy_steps(builds, traditional, rot, heads,
                                                 kv_heads, offset):
    """One position through kernels.decode_attention against what the numpy block does:
    RoPE on q and k, the cache append, attend; with grouped heads, partial rotary and a
    cache that has to grow (step 8) for the new position."""
    dim, scale = 16, 0.25
    table = accel_blocks.RopeTable(nn.RoPE(rot, traditional=traditional, base=10000.0), dim)
    qkv = rand((1, (heads + 2 * kv_heads) * dim), 5)
    history = (rand((1, kv_heads, offset, dim), 6), rand((1, kv_heads, offset, dim), 7))
    ref = accel_blocks.NumpyKVCache()
    ref.step = 8
    if offset:
        ref.append_f32(*history)
    q, k, v = (qkv[:, a:b].reshape(1, 1, -1, dim) for a, b in (
        (0, heads * dim), (heads * dim, (heads + kv_heads) * dim),
        ((heads + kv_heads) * dim, None)))
    q, k = (table(a, np.array([offset])).transpose(0, 2, 1, 3) for a in (q, k))
    keys, values = ref.append_f32(k, v.transpose(0, 2, 1, 3))
    want = accel_blocks.attend(q, keys, values, scale, None).reshape(1, -1)
    for name, kern in builds.items():
        cache = accel_blocks.NumpyKVCache()
        cache.step = 8
        if offset:
            cache.append_f32(*history)
        kc, vc = cache.reserve((1, kv_heads, 1, dim), 1)
        got = kern.decode_attention(qkv.copy(), heads, kv_heads, table.at(offset), kc, vc,
                                    offset, scale)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(kc[..., :offset + 1, :], keys, rtol=1e-6, atol=1e-6,
                                   err_msg=name)
        np.testing.assert_array_equal(vc[..., :offset + 1, :], values, err_msg=name)


def test_decode_attention_refuses_a_full_cache(builds):
    kc = np.zeros((1, 2, 4, 16), dtype=np.float32)
    table = accel_blocks.RopeTable(nn.RoPE(16, base=10000.0), 16)
    with pytest.raises(ValueError, match="decode_attention"):
        builds["native"].decode_attention(rand((1, 8 * 16), 0), 4, 2, table.at(4),
                                                   kc, kc.copy(), 4, 0.25)


def test_attend_rejects_unknown_named_mask():
    q = rand((1, 2, 2, 8), 0)
    with pytest.raises(ValueError, match="causal"):
        accel_blocks.attend(q, q, q, 1.0, "sliding")


def test_numpy_kv_cache_grows_trims_and_serves_mlx_modules():
    cache = accel_blocks.NumpyKVCache()
    cache.step = 4  # grow every 4 positions
    a, b = rand((1, 2, 3, 8), 0), rand((1, 2, 3, 8), 1)
    k, v = cache.append_f32(a, a + 1)
    assert cache.offset == 3 and k.shape == (1, 2, 3, 8) and cache.keys.shape[2] == 4
    k, v = cache.append_f32(b, b + 1)  # crosses the step: the buffer grows, keeps the past
    assert cache.keys.shape[2] == 8
    np.testing.assert_array_equal(k, np.concatenate([a, b], axis=2))
    np.testing.assert_array_equal(v, np.concatenate([a, b], axis=2) + 1)
    assert cache.trim(2) == 2 and cache.offset == 4
    mk, mv = cache.update_and_fetch(mx.array(b[:, :, :1]), mx.array(b[:, :, :1]))  # MLX caller
    assert isinstance(mk, mx.array) and mk.shape == (1, 2, 5, 8) and cache.offset == 5
    np.testing.assert_array_equal(np.asarray(mk)[:, :, 4], b[:, :, 0])


@needs_kernels
@pytest.mark.parametrize("arch", FAMILY)
def test_blocks_are_swapped_and_match_mlx(tiny_dirs, arch, monkeypatch):
    _, flash_dir = tiny_dirs(arch, "float16")
    fast, _ = load_dense(flash_dir, fast_cpu=True)
    monkeypatch.setenv(accel_blocks.ENV_CPU_BLOCKS, "0")
    mlx_blocks, _ = load_dense(flash_dir, fast_cpu=True)
    assert all(accel_blocks.is_fast(b) for b in fast.layers)
    assert not any(accel_blocks.is_fast(b) for b in mlx_blocks.layers)
    caches = make_prompt_cache(fast), make_prompt_cache(mlx_blocks)
    assert isinstance(caches[0][0], accel_blocks.NumpyKVCache)
    assert type(caches[1][0]) is KVCache
    for ids in ([[5, 9, 17, 33, 2]], [[7]], [[8]]):  # a prompt, then two decode steps
        got = fast(mx.array(ids), cache=caches[0])
        want = mlx_blocks(mx.array(ids), cache=caches[1])
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-3, atol=1e-3)
    assert caches[0][0].offset == caches[1][0].offset == 7


@needs_kernels
def test_other_caches_run_the_mlx_block(tiny_dirs):
    """A cache the numpy block does not keep (here a plain MLX KVCache) gets MLX's code."""
    _, flash_dir = tiny_dirs("qwen2", "float16")
    model, _ = load_dense(flash_dir, fast_cpu=True)
    ids = mx.array([[5, 9, 17]])
    got = model(ids, cache=[KVCache() for _ in model.layers])
    want = model(ids, cache=make_prompt_cache(model))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-3, atol=1e-3)


@needs_kernels
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_flash_generation_with_numpy_blocks_equals_reference(tiny_dirs, arch):
    _, flash_dir = tiny_dirs(arch, "float16")
    ref, tokenizer = load_dense(flash_dir, dtype="float32")
    model, _ = load(flash_dir, fast_cpu=True, selector="oracle", oracle_rule="all")
    assert all(accel_blocks.is_fast(b) for b in model.layers)
    for prompt in ([5, 9, 17, 33], list(range(3, 40))):  # window path, then prefill stream
        assert generate(model, tokenizer, prompt, max_tokens=8) == \
            generate(ref, tokenizer, prompt, max_tokens=8)


class TruthDrafter:
    """Drafts holding the true continuation in the second beam, after a decoy sharing its
    first token: accepted paths are long and not contiguous in the packed tree."""

    def __init__(self, truth: list[int], emitted: list[int]):
        self.truth, self.emitted = truth, emitted

    def beam_search(self, h, token, width, length):
        true = list(self.truth[len(self.emitted):][:length])
        true += [3] * (length - len(true))
        return np.array([[true[0]] + [(t + 1) % 256 for t in true[1:]], true])


@needs_kernels
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_speculative_tree_on_numpy_blocks_is_greedy(tiny_dirs, arch):
    """Tree verification (depth positions, tree mask) and rollback on numpy caches."""
    _, flash_dir = tiny_dirs(arch, "float16")
    model, _ = load_dense(flash_dir, fast_cpu=True)
    assert isinstance(make_cache(model)[0], accel_blocks.NumpyKVCache)
    prompt = [5, 9, 17, 33, 65, 129, 7, 8]
    want = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=16)]
    drafters = [Drafter(init_params(64, 1, seed=1), np.arange(256)).attach(model, flash_dir),
                TruthDrafter(want, [])]
    for drafter in drafters:
        out, stats = [], SpecStats(draft_length=3)
        if isinstance(drafter, TruthDrafter):
            drafter.emitted = out
        for token in speculative_tokens(model, drafter, prompt, SpecSettings(2, 3), stats):
            out.append(token)
            if len(out) == len(want):
                break
        assert out == want
    assert stats.totals()["tokens_per_step"] > 2  # the truth drafter's paths were accepted


class ShiftedRoPE(nn.Module):
    """Not a rotation (adds the position): the numpy table cannot reproduce it."""

    def __call__(self, x, offset=0):
        return x + mx.arange(x.shape[-2])[:, None].astype(x.dtype) + offset


@needs_kernels
def test_a_variant_the_numpy_block_does_not_reproduce_keeps_mlx(tiny_dirs, monkeypatch):
    _, flash_dir = tiny_dirs("qwen2", "float16")
    monkeypatch.setenv(accel_blocks.ENV_CPU_BLOCKS, "0")
    model, _ = load_dense(flash_dir, fast_cpu=True)
    monkeypatch.delenv(accel_blocks.ENV_CPU_BLOCKS)
    for block in model.layers:
        block.self_attn.rope = ShiftedRoPE()
    with pytest.warns(UserWarning, match="keeping MLX's blocks"):
        assert accel_blocks.install(model) == 0
    assert not any(accel_blocks.is_fast(b) for b in model.layers)
    assert not hasattr(model, "make_cache") or type(model.make_cache()[0]) is KVCache


def test_numpy_blas_is_put_on_one_thread(monkeypatch):
    """numpy's OpenBLAS threads would fight the kernels' (see cpu.single_threaded_blas)."""
    import ctypes
    from pathlib import Path

    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    libs = sorted({ln.split()[-1] for ln in maps.splitlines() if "openblas" in ln.lower()
                   and ln.split()[-1].startswith("/")})
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    assert process.single_threaded_blas() is False  # the user's setting wins
    monkeypatch.delenv("OPENBLAS_NUM_THREADS")
    assert process.single_threaded_blas() is bool(libs)
    for path in libs:
        getter = getattr(ctypes.CDLL(path), "scipy_openblas_get_num_threads64_", None)
        if getter is not None:
            assert getter() == 1


class ScaledMLP(nn.Module):
    """An MLP the numpy block has no kernel entry for: it runs through MLX."""

    def __init__(self, d: int):
        super().__init__()
        self.proj = nn.Linear(d, d, bias=True)

    def __call__(self, x):
        return nn.gelu(self.proj(x)) * 0.5


@needs_kernels
def test_any_other_mlp_runs_through_mlx_inside_the_numpy_block(tiny_dirs, monkeypatch):
    _, flash_dir = tiny_dirs("llama", "float16")
    monkeypatch.setenv(accel_blocks.ENV_CPU_BLOCKS, "0")
    mlx_blocks, _ = load_dense(flash_dir, fast_cpu=True)
    fast, _ = load_dense(flash_dir, fast_cpu=True)
    monkeypatch.delenv(accel_blocks.ENV_CPU_BLOCKS)
    for a, b in zip(mlx_blocks.layers, fast.layers, strict=True):
        a.mlp = ScaledMLP(64)
        b.mlp = a.mlp
    mx.eval(mlx_blocks.parameters())
    assert accel_blocks.install(fast) == len(fast.layers)
    caches = make_prompt_cache(fast), make_prompt_cache(mlx_blocks)
    for ids in ([[5, 9, 17]], [[7]]):
        got = fast(mx.array(ids), cache=caches[0])
        want = mlx_blocks(mx.array(ids), cache=caches[1])
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-3, atol=1e-3)
