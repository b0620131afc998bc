"""The per-sequence (GRIFFIN) selector: a set chosen from the prompt, reused for every decode
and verification call, exact at keep=1.0, and reading nothing after prefill when it fits."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from tiny import make_source

from mlx_flash.offline.convert import convert
from mlx_flash.runtime.config import FlashConfig
from mlx_flash.runtime.generate import stream
from mlx_flash.runtime.loader import load_dense
from mlx_flash.runtime.selectors.sequence import SequenceSelector, normalised_squares

PROMPT = [5, 9, 17, 33, 65, 129, 7, 8, 40, 41, 42, 43]
SHORT = 4  # max_sparse_tokens: PROMPT prefills by streaming


def greedy(model, tokenizer, prompt=PROMPT, n=10) -> list[int]:
    return [r.token for r in stream(model, tokenizer, prompt, n)]


def flash_layers(model):
    return [layer.mlp for layer in model.layers]


def sets(model) -> list[np.ndarray]:
    selector = model.flash.selector
    return [np.sort(selector.layers[i].ids) for i in range(len(model.layers))]


def test_statistic_is_griffins():
    """Per token normalised to unit L2 over neurons, then the L2 norm over tokens (squared)."""
    h = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, -2.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(normalised_squares(h), [0.36, 0.64, 1.0])


def test_options_are_checked():
    with pytest.raises(ValueError, match="sequence_refresh"):
        FlashConfig(selector="sequence", sequence_refresh=-1)
    with pytest.raises(ValueError, match="keep"):
        FlashConfig(selector="sequence", keep=1.5)


def test_keep_all_equals_dense(flash_load, tiny_dirs):
    _, flash_dir = tiny_dirs("qwen2")
    dense, tokenizer = load_dense(flash_dir)
    flash, _ = flash_load(flash_dir, selector="sequence", keep=1.0, max_sparse_tokens=SHORT)
    assert isinstance(flash.flash.selector, SequenceSelector)
    assert greedy(flash, tokenizer) == greedy(dense, tokenizer)
    flash.flash.selector.reset()
    caches = make_prompt_cache(flash), make_prompt_cache(dense)
    x = mx.array([PROMPT])
    for part in (x, mx.array([[3, 4, 5]])):  # a prefill, then a short (decode-path) call
        np.testing.assert_allclose(np.array(flash(part, cache=caches[0])),
                                   np.array(dense(part, cache=caches[1])), atol=1e-4)


def test_decode_reads_nothing_after_prefill(flash_load, tiny_dirs):
    _, flash_dir = tiny_dirs("llama")
    model, tokenizer = flash_load(flash_dir, selector="sequence", keep=0.5,
                                  max_sparse_tokens=SHORT)
    greedy(model, tokenizer, n=12)
    stats = model.flash.stats
    assert stats.steps[0].tokens == len(PROMPT) - 1 and stats.steps[0].bytes_read > 0
    decode = stats.decode_steps()
    assert len(decode) >= 10
    assert [s.bytes_read for s in decode] == [0] * len(decode)
    assert all(s.neurons_active == 2 * 64 for s in decode)  # half of 128, both layers
    summary = model.flash.selector.summary()
    assert summary["set_fraction"] == 0.5 and summary["capped_layers"] == 0


def test_verification_reuses_the_set(flash_load, tiny_dirs):
    """A short multi-token call after the prompt (speculative verification) is not a new
    prompt: every token gets the prompt's set and nothing is read."""
    _, flash_dir = tiny_dirs("qwen2")
    model, _ = flash_load(flash_dir, selector="sequence", keep=0.3, max_sparse_tokens=SHORT)
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([PROMPT]), cache=cache))
    before = sets(model)
    mx.eval(model(mx.array([[11, 12, 13]]), cache=cache))
    assert [s.tokens for s in model.flash.stats.steps] == [len(PROMPT), 3]
    assert model.flash.stats.steps[-1].bytes_read == 0
    for ffn, want in zip(flash_layers(model), before, strict=True):
        assert len(ffn.last_ids) == 3
        for ids in ffn.last_ids:
            np.testing.assert_array_equal(np.sort(ids), want)
    for got, want in zip(sets(model), before, strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_later_prompt_grows_the_set(flash_load, tiny_dirs):
    _, flash_dir = tiny_dirs("qwen2")
    model, _ = flash_load(flash_dir, selector="sequence", keep=0.2, max_sparse_tokens=SHORT)
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([PROMPT]), cache=cache))
    first = sets(model)
    mx.eval(model(mx.array([[200, 201, 202, 203, 204, 205, 206]]), cache=cache))
    second = sets(model)
    for a, b in zip(first, second, strict=True):
        assert np.isin(a, b).all()  # nothing dropped
    grown = model.flash.selector.summary()["grown_neurons"]
    assert grown == sum(b.size - a.size for a, b in zip(first, second, strict=True)) > 0


def test_refresh_chooses_again_from_recent_tokens(flash_load, tiny_dirs):
    _, flash_dir = tiny_dirs("llama")
    model, tokenizer = flash_load(flash_dir, selector="sequence", keep=0.3,
                                  max_sparse_tokens=SHORT, sequence_refresh=4)
    greedy(model, tokenizer, n=10)
    selector = model.flash.selector
    assert selector.summary()["refreshes"] >= 2 * 2  # two layers, at least twice each
    assert sum(s.predictor_bytes for s in model.flash.stats.decode_steps()) > 0  # layer reads


def test_set_is_capped_to_the_cache(caches_of_three_neurons, flash_load, tiny_dirs):
    _, flash_dir = tiny_dirs("qwen2")
    model, tokenizer = flash_load(flash_dir, selector="sequence", keep=0.5,
                                  max_sparse_tokens=SHORT)
    greedy(model, tokenizer, n=4)
    summary = model.flash.selector.summary()
    assert summary["capped_layers"] == 2
    assert all(s.ids.size == 3 for s in model.flash.selector.layers.values())
    decode = model.flash.stats.decode_steps()
    assert [s.bytes_read for s in decode] == [0] * len(decode)


def test_finds_a_planted_set(flash_load, tmp_path):
    """Layer 0's neurons outside a known set get near-zero up rows: only the set carries the
    prompt's activations, and the selector must pick exactly it."""
    src = make_source(tmp_path / "src", "qwen2")
    weights = mx.load(str(src / "model.safetensors"))
    planted = np.sort(np.random.default_rng(1).choice(128, size=32, replace=False))
    scale = np.full((128, 1), 1e-3, dtype=np.float32)
    scale[planted] = 1.0
    name = "model.layers.0.mlp.up_proj.weight"
    weights[name] = weights[name] * mx.array(scale)
    mx.save_safetensors(str(src / "model.safetensors"), weights, metadata={"format": "mlx"})
    convert(src, tmp_path / "flash")
    model, _ = flash_load(tmp_path / "flash", selector="sequence", keep=32 / 128,
                          max_sparse_tokens=SHORT)
    mx.eval(model(mx.array([PROMPT])))
    np.testing.assert_array_equal(sets(model)[0], planted)


def test_a_new_generation_starts_a_new_set(flash_load, tiny_dirs):
    """stream_generate without a prompt cache is a new sequence: the set is chosen from its own
    prompt, not grown from the last one's (a serve process answers unrelated requests)."""
    _, flash_dir = tiny_dirs("qwen2")
    model, tokenizer = flash_load(flash_dir, selector="sequence", keep=0.2,
                                  max_sparse_tokens=SHORT)
    other = [200, 201, 202, 203, 204, 205, 206, 207, 208]
    greedy(model, tokenizer, prompt=other, n=2)
    greedy(model, tokenizer, n=2)
    after_other = sets(model)
    model.flash.selector.reset()
    greedy(model, tokenizer, n=2)
    for a, b in zip(after_other, sets(model), strict=True):
        np.testing.assert_array_equal(a, b)
