"""FlashFFN in mlx_lm models: exact against the dense reference, and the window saves reads."""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import generate
from tiny import ARCHS

import mlx_flash.accel.build as accel_build
from mlx_flash.format.manifest import read_manifest
from mlx_flash.runtime.config import FlashConfig, option_names
from mlx_flash.runtime.ffn import ordered_union
from mlx_flash.runtime.loader import fit_budget, load, load_dense
from mlx_flash.runtime.memory import CODE_PAGES

PROMPT = [5, 9, 17, 33, 65, 129, 7, 8]


def greedy(model, tokenizer, n=12):
    return generate(model, tokenizer, PROMPT, max_tokens=n, verbose=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_all_neurons_equals_dense(flash_load, arch, tiny_dirs):
    _, flash_dir = tiny_dirs(arch)
    dense, tokenizer = load_dense(flash_dir)
    flash, _ = flash_load(flash_dir, window=3)
    x = mx.array([PROMPT])
    np.testing.assert_allclose(np.array(flash(x)), np.array(dense(x)), atol=1e-4)
    assert greedy(flash, tokenizer) == greedy(dense, tokenizer)


def test_relu_family_nonzero_rule_is_exact(flash_load, tiny_dirs):
    """nemotron's relu^2 FFN: neurons with zero activation contribute nothing."""
    _, flash_dir = tiny_dirs("nemotron")
    dense, tokenizer = load_dense(flash_dir)
    flash, _ = flash_load(flash_dir, oracle_rule="nonzero", window=2)
    assert greedy(flash, tokenizer) == greedy(dense, tokenizer)
    steps = flash.flash.stats.decode_steps()
    assert np.mean([s.neurons_active for s in steps]) < 0.8 * 2 * 128  # really sparse


def test_long_prompt_streams_dense_and_stays_exact(flash_load, tiny_dirs):
    _, flash_dir = tiny_dirs("qwen2")
    dense, _ = load_dense(flash_dir)
    flash, _ = flash_load(flash_dir, max_sparse_tokens=4, oracle_rule="top", keep=0.5)
    x = mx.array([PROMPT])
    np.testing.assert_allclose(np.array(flash(x)), np.array(dense(x)), atol=1e-4)
    step = flash.flash.stats.steps[0]
    assert step.tokens == len(PROMPT) and step.neurons_new > 0  # window seeded


@pytest.mark.parametrize("fast_cpu", [False, True])
def test_a_prompt_over_full_caches_reads_nothing(flash_load, tiny_dirs, fast_cpu):
    """A first prompt (more positions than max_sparse_tokens) streams each row once, into the
    caches as it goes (the window is then seeded without reading them again); once they hold
    every neuron a prompt is computed from them with no read, in blocks of positions
    (prefill_chunk 16 of 128 neurons, max_kv_tokens 32: blocks of 4, two here). Both equal
    dense."""
    if fast_cpu and accel_build.unavailable_reason():
        pytest.skip(f"CPU kernels: {accel_build.unavailable_reason()}")
    _, flash_dir = tiny_dirs("qwen2", "float16")  # the fast path's storage
    dense, _ = load_dense(flash_dir)
    flash, _ = flash_load(flash_dir, max_sparse_tokens=4, prefill_chunk=16, max_kv_tokens=32,
                          fast_cpu=fast_cpu)
    x = mx.array([PROMPT])
    first = np.array(flash(x))  # streams every layer into the caches: all cached
    assert all(layer.mlp.cache.n == layer.mlp.cache.n_neurons == 128 for layer in flash.layers)
    step = flash.flash.stats.steps[-1]
    ffn_bytes = sum(e.n_neurons * e.stride for e in read_manifest(flash_dir).layers)
    assert step.bytes_read == ffn_bytes and step.neurons_new == 0  # each row read once
    np.testing.assert_allclose(first, np.array(dense(x)), atol=1e-4)
    second = np.array(flash(x))
    step = flash.flash.stats.steps[-1]
    assert step.tokens == len(PROMPT) and step.bytes_read == 0 and step.reads == 0
    np.testing.assert_allclose(second, np.array(dense(x)), atol=1e-4)
    np.testing.assert_allclose(second, first, atol=1e-4)


def test_window_cuts_bytes_per_token(flash_load, tiny_dirs):
    _, flash_dir = tiny_dirs("llama")
    per_window = {}
    for window in (1, 4):
        model, tokenizer = flash_load(flash_dir, oracle_rule="top", keep=0.3, window=window)
        greedy(model, tokenizer, n=16)
        steps = model.flash.stats.decode_steps()[4:]
        per_window[window] = np.mean([s.bytes_read for s in steps])
        assert all(s.neurons_hit + s.neurons_new == s.neurons_active for s in steps)
    assert per_window[4] < per_window[1]


def test_budget_caps_capacity_and_refuses_too_small(tiny_dirs):
    _, flash_dir = tiny_dirs("llama")
    model, _ = load(flash_dir, dram_budget=10**10)
    assert model.flash.stats.settings["capacity"] == 128
    # the plan for a fixed runtime RSS (a second load in this process measures a few MiB more)
    manifest, runtime = read_manifest(flash_dir), 100 * 2**20
    config = FlashConfig(oracle_rule="top", keep=0.25, embed_on_flash=False)
    full = fit_budget(flash_dir, manifest, 10**10, config, runtime).plan
    tight = fit_budget(flash_dir, manifest, full.minimum + 40 * full.per_neuron, config,
                       runtime).plan
    assert tight.capacity == 40
    with pytest.raises(ValueError, match="too small.*resident part alone needs"):
        fit_budget(flash_dir, manifest, full.minimum // 2, config, runtime)
    with pytest.raises(ValueError, match="too small.*resident part alone needs"):
        load(flash_dir, dram_budget=full.minimum // 2)


def test_embedding_on_flash_matches(tiny_dirs):
    _, flash_dir = tiny_dirs("qwen2")
    dense, tokenizer = load_dense(flash_dir)
    flash, _ = load(flash_dir, embed_on_flash=True)
    assert type(flash.model.embed_tokens).__name__ == "FlashEmbedding"
    assert greedy(flash, tokenizer) == greedy(dense, tokenizer)


def test_stats_are_filled(tiny_dirs, tmp_path):
    import json

    _, flash_dir = tiny_dirs("gemma3_text")
    model, tokenizer = load(flash_dir, oracle_rule="top", keep=0.5)
    greedy(model, tokenizer, n=5)
    path = tmp_path / "stats.json"
    model.flash.stats.write_json(path)
    data = json.loads(path.read_text())
    assert data["totals"]["decode_tokens"] >= 4
    assert data["totals"]["bytes_read_per_token"] > 0
    assert set(data["steps"][1]["seconds"]) == {"predictor", "io", "memory", "compute"}


def test_naive_flash_reads_everything_every_token(tiny_dirs):
    _, flash_dir = tiny_dirs("llama")
    dense, tokenizer = load_dense(flash_dir)
    model, _ = load(flash_dir, naive=True)
    assert greedy(model, tokenizer, n=4) == greedy(dense, tokenizer, n=4)
    ffn_bytes = model.flash.manifest.ffn_bytes
    assert all(s.bytes_read == ffn_bytes for s in model.flash.stats.decode_steps())


@pytest.mark.parametrize("fast_cpu", [False, True])
def test_overflow_is_streamed_not_dropped(tiny_dirs, fast_cpu, caches_of_three_neurons):
    """A cache smaller than the active set: the rest is read and computed each call, so flash
    with every neuron stays equal to dense (it used to drop them)."""

    if fast_cpu and accel_build.unavailable_reason():
        pytest.skip(f"CPU kernels: {accel_build.unavailable_reason()}")
    _, flash_dir = tiny_dirs("qwen2", "float16")
    dense, tokenizer = load_dense(flash_dir, dtype="float32")
    model, _ = load(flash_dir, selector="oracle", oracle_rule="all", fast_cpu=fast_cpu,
                    dtype=None if fast_cpu else "float32")
    assert model.layers[0].mlp.cache.capacity == 3
    prompt = [5, 9, 17, 33]
    assert generate(model, tokenizer, prompt, max_tokens=6) == \
        generate(dense, tokenizer, prompt, max_tokens=6)
    steps = model.flash.stats.decode_steps()
    assert sum(s.truncated for s in steps) > 0 and sum(s.bytes_read for s in steps) > 0


def test_read_ahead_streams_the_same_bytes_without_wrong_guesses(flash_load, tiny_dirs,
                                                                 caches_of_three_neurons):
    """The overflow stream of a fixed selection is read ahead across layers and steps: the
    same tokens and bytes as reading each chunk when needed, and no guess is wrong."""
    _, flash_dir = tiny_dirs("qwen2", "float16")
    prompt, runs = [5, 9, 17, 33], {}
    for depth in (0, 3):
        model, tokenizer = flash_load(flash_dir, fast_cpu=False, dtype="float32", read_ahead=depth)
        model.flash.config.prefill_chunk = 16  # several chunks per layer
        tokens = generate(model, tokenizer, prompt, max_tokens=6)
        steps = model.flash.stats.decode_steps()
        runs[depth] = tokens, [s.bytes_read for s in steps], sum(s.bytes_wasted for s in steps)
    assert runs[3][0] == runs[0][0]
    assert runs[3][1] == runs[0][1] and runs[3][2] == 0


def test_direct_reads_are_on_under_a_budget(flash_load, tiny_dirs):
    from mlx_flash.runtime.store import supports_direct

    _, flash_dir = tiny_dirs("qwen2", "float16")
    model, _ = flash_load(flash_dir)
    assert model.flash.store.direct is False  # no budget: the page cache may keep it all
    model, _ = flash_load(flash_dir, dram_budget="16GB")
    manifest = model.flash.manifest
    assert model.flash.store.direct == supports_direct(flash_dir / manifest.layers[0].file)
    with pytest.raises(ValueError, match="read_ahead"):
        flash_load(flash_dir, read_ahead=-1)


def test_reserved_bytes_come_out_of_the_budget(flash_load, tiny_dirs):
    _, flash_dir = tiny_dirs("qwen2", "float16")
    model, _ = flash_load(flash_dir, dram_budget="16GB", reserve=1 << 30)
    plan = model.flash.stats.memory
    assert plan["reserved"] == 1 << 30 and plan["capacity"] == plan["n_neurons"]
    with pytest.raises(ValueError, match=r"hold less beside the model \(a drafter: 16384 MiB\)"):
        flash_load(flash_dir, dram_budget="16GB", reserve=16 << 30)


def test_fast_path_plans_no_converted_chunks(flash_load, tiny_dirs):
    """The fast CPU path computes streamed chunks from their raw rows: its plan's scratch
    leaves out the MLX path's two converted chunks, and nothing else."""

    if accel_build.unavailable_reason():
        pytest.skip(f"CPU kernels: {accel_build.unavailable_reason()}")
    _, flash_dir = tiny_dirs("qwen2", "float16")
    scratch = {}
    for fast in (False, True):
        model, _ = flash_load(flash_dir, dram_budget="16GB", fast_cpu=fast, dtype="float16")
        settings, layout = model.flash.config, model.flash.manifest.ffn
        scratch[fast] = model.flash.stats.memory["scratch"]
    assert scratch[False] - scratch[True] == 2 * settings.prefill_chunk * layout.elements * 2


@pytest.mark.parametrize("read_ahead", [0, 3])
def test_prefill_streams_one_read_per_chunk_whatever_the_planner(flash_load, tiny_dirs, read_ahead):
    _, flash_dir = tiny_dirs("qwen2", "float16")
    model, tokenizer = flash_load(flash_dir, read_planner="neuron", read_ahead=read_ahead)
    model.flash.config.prefill_chunk = 50  # 128 neurons: chunks of 50, 50, 28
    store, seen = model.flash.store, []
    read = store.read

    def spy(layer, ids, out=None, planned=True):
        rows, stats = read(layer, ids, out, planned)
        if not planned:
            seen.append(stats.reads)
        return rows, stats

    store.read = spy
    generate(model, tokenizer, list(range(3, 40)), max_tokens=1)  # > 16 tokens: streamed
    assert seen == [1] * 3 * model.flash.manifest.n_layers


@pytest.mark.parametrize("option,value,allowed", [
    ("window", 0, ">= 1"), ("selector", "best", "'auto', 'predictor', 'oracle', 'quant'"),
    ("oracle_rule", "some", "'all', 'nonzero', 'top'"), ("keep", 0.0, r"\(0, 1\]"),
    ("keep", 1.5, r"\(0, 1\]"), ("read_planner", "fast", "'neuron', 'runs', 'cost'"),
    ("store_mode", "aio", "'pread', 'mmap'"), ("resident_bits", 2, "None, 4, 8, 16"),
    ("threads", 0, ">= 1"), ("read_ahead", -1, ">= 0"), ("pin_hot", 1.0, r"\[0, 1\)"),
    ("reserve", -5, ">= 0"), ("compute_on", "all", "'active', 'cached'"),
    ("dtype", "int8", "float16"), ("predictor_recall", 2.0, r"\(0, 1\]")])
def test_bad_option_values_name_the_option_and_the_allowed_values(option, value, allowed):
    with pytest.raises(ValueError, match=f"^{option} must .*{allowed}"):
        FlashConfig(**{option: value})


def test_unknown_options_are_named_with_the_known_ones(tiny_dirs):
    _, flash_dir = tiny_dirs("qwen2")
    with pytest.raises(TypeError, match="unknown load.. option windw; the options are: window, "
                                        "selector, oracle_rule"):
        load(flash_dir, windw=3)
    with pytest.raises(ValueError, match="window must be an integer >= 1, got 0"):
        load(flash_dir, window=0)


def test_settings_are_the_config_plus_what_load_resolved(tiny_dirs):
    _, flash_dir = tiny_dirs("qwen2", "float16")
    config = FlashConfig(window=2, oracle_rule="top", keep=0.5, fast_cpu=False)
    model, _ = load(flash_dir, config=config, threads=2)  # options replace config's fields
    rt = model.flash
    assert rt.config == replace(config, threads=2) and config.threads == 8
    settings = rt.stats.settings
    resolved = {"rule", "dtype", "direct", "embed_on_flash", "resident_bits", "capacity",
                "backend", "fast_cpu", "fast_linears", "pinned"}
    assert set(settings) == set(option_names()) - {"oracle_rule"} | resolved
    for name in option_names():
        if name not in ("oracle_rule", "dtype", "direct", "embed_on_flash", "resident_bits",
                        "fast_cpu"):
            assert settings[name] == getattr(rt.config, name), name
    assert settings["rule"] == "top" and settings["threads"] == 2
    assert settings["dtype"] == str(mx.float32) and settings["resident_bits"] == 16
    assert settings["direct"] is False and settings["embed_on_flash"] is False
    assert settings["capacity"] == rt.stats.memory["capacity"] and settings["fast_cpu"] is False
    # the README's --stats-json schema
    assert {"window", "selector", "rule", "keep", "dtype", "threads", "direct", "store_mode",
            "embed_on_flash", "compute_on", "capacity", "naive", "read_planner",
            "pinned"} <= set(settings)
    rt.close()


def test_close_restores_the_cache_limit_a_budget_set(tiny_dirs):
    _, flash_dir = tiny_dirs("qwen2", "float16")
    before = mx.set_cache_limit(12345 << 20)
    try:
        model, _ = load(flash_dir, dram_budget="16GB")
        assert mx.set_cache_limit(model.flash.stats.memory["scratch"] - CODE_PAGES) != 12345 << 20
        model.flash.close()
        assert mx.set_cache_limit(before) == 12345 << 20
    finally:
        mx.set_cache_limit(before)


@pytest.mark.parametrize("fast_cpu", [False, None])
def test_window_reads_new_neurons_in_prefill_chunks(tiny_dirs, flash_load, fast_cpu):
    """A step that brings many neurons in at once (the first one: the whole layer) reads and
    writes them a prefill_chunk at a time, so its scratch is bounded like prefill's; the text
    is the same as with one read per step."""
    _, flash_dir = tiny_dirs("qwen2")
    whole, tokenizer = flash_load(flash_dir, fast_cpu=fast_cpu, max_sparse_tokens=16)
    chunked, _ = flash_load(flash_dir, fast_cpu=fast_cpu, max_sparse_tokens=16,
                            prefill_chunk=16)
    sizes = []
    read = chunked.flash.store.read

    def spy(layer, ids, **kw):
        sizes.append(len(ids))
        return read(layer, ids, **kw)

    chunked.flash.store.read = spy
    assert greedy(chunked, tokenizer) == greedy(whole, tokenizer)
    assert max(sizes) == 16 and sum(sizes) >= 128  # the first step's 128 neurons, 16 at a time


def test_ordered_union_keeps_priority_and_passes_one_set_through():
    every = np.arange(6)
    assert ordered_union([every] * 4) is every  # a fixed selector's tokens: no union pass
    got = ordered_union([np.array([5, 1, 3]), np.array([3, 0, 5, 2])])
    assert got.tolist() == [5, 1, 3, 0, 2]
    twins = ordered_union([np.array([2, 1]), np.array([2, 1])])  # equal, not the same array
    assert twins.tolist() == [2, 1]
