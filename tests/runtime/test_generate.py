"""The generation loop: the figures mlx_lm prints also land in the flash model's stats."""

from __future__ import annotations

import json

from mlx_flash import load_dense
from mlx_flash.runtime.generate import generate_text

FIGURES = {"prompt_tokens", "generation_tokens", "prompt_tps", "generation_tps",
           "peak_rss_bytes", "time_to_first_token_s"}


def test_generation_figures_reach_the_stats_and_the_json(flash_load, tiny_dirs, tmp_path):
    _, flash_dir = tiny_dirs("qwen2")
    model, tokenizer = flash_load(flash_dir)
    ids = [1, 2, 3, 4, 5]
    result = generate_text(model, tokenizer, ids, 6)
    figures = model.flash.stats.generation
    assert set(figures) == FIGURES
    assert figures["generation_tokens"] == result.generation_tokens == 6
    assert figures["prompt_tokens"] == len(ids)
    assert figures["prompt_tps"] > 0 and figures["generation_tps"] > 0
    assert 0 < figures["time_to_first_token_s"] and figures["peak_rss_bytes"] > 0
    out = tmp_path / "stats.json"
    model.flash.stats.write_json(out)
    assert json.loads(out.read_text())["generation"] == figures
    model.flash.stats.reset()
    assert "generation" not in model.flash.stats.to_dict()


def test_a_dense_model_generates_without_flash_stats(tiny_dirs):
    _, flash_dir = tiny_dirs("qwen2")
    model, tokenizer = load_dense(flash_dir)
    result = generate_text(model, tokenizer, [1, 2, 3], 4)
    assert result.generation_tokens == 4 and result.time_to_first_token_s > 0
    assert not hasattr(model, "flash")
