"""Evaluation as generation sees it: the set chosen from a prefix, scored on the continuation;
greedy agreement over a prompt file; one report per selector."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import tomllib

from mlx_flash.format.manifest import read_manifest
from mlx_flash.offline.evaluate import (
    PROMPT_SET,
    EvalConfig,
    evaluate_selectors,
    parse_selectors,
    perplexity,
    prefix_split,
    read_prompts,
)
from mlx_flash.runtime.loader import load_tokenizer

ROOT = Path(__file__).parents[2]
PREFIX = 12


def tokenizer_of(flash_dir):
    return load_tokenizer(flash_dir, read_manifest(flash_dir))


def sets(model) -> list[np.ndarray]:
    return [np.sort(s.ids) for _, s in sorted(model.flash.selector.layers.items())]


def watched_tokens(model) -> list[int]:
    """Instrument the selector: the token count of every prompt it is shown."""
    selector, seen = model.flash.selector, []
    watch = selector.watch_prompt

    def spy(layer, x):
        seen.append(x.shape[0])
        return watch(layer, x)

    selector.watch_prompt = spy
    return seen


def test_the_set_comes_from_the_prefix_only(flash_load, tiny_dirs):
    _, flash_dir = tiny_dirs("qwen2")
    model, _ = flash_load(flash_dir, selector="sequence", keep=0.3, max_sparse_tokens=4)
    seen = watched_tokens(model)
    rng = np.random.default_rng(0)
    prefix = rng.integers(3, 250, PREFIX).astype(np.int32)
    results = []
    for seed in (1, 2):
        rest = np.random.default_rng(seed).integers(3, 250, 20).astype(np.int32)
        ppl = perplexity(model, np.concatenate([prefix, rest]), 4, PREFIX)
        results.append((ppl, sets(model)))
    assert seen == [PREFIX] * 4  # two runs x two layers, each shown the prefix alone
    assert results[0][0] != results[1][0]  # the continuations were scored ...
    for a, b in zip(results[0][1], results[1][1], strict=True):
        np.testing.assert_array_equal(a, b)  # ... and never changed the set
    model.flash.selector.reset()  # a new sequence: the prefix alone
    mx.eval(model(mx.array(prefix[None])))
    for a, b in zip(results[0][1], sets(model), strict=True):
        np.testing.assert_array_equal(a, b)


def test_prefix_split_fits_short_texts():
    assert prefix_split(1000, 256, 256) == (256, 256)
    assert prefix_split(81, 256, 256) == (40, 40)
    assert prefix_split(3, 256, 256) == (1, 1)


def test_parse_selectors():
    assert parse_selectors("sequence:0.5, quant", 0.7) == [("sequence", 0.5), ("quant", 0.7)]
    with pytest.raises(ValueError, match="number"):
        parse_selectors("sequence:half")


def test_the_packaged_prompt_set(tiny_dirs):
    lines = [json.loads(line) for line in PROMPT_SET.read_text().splitlines()]
    kinds = [line["kind"] for line in lines]
    assert len(lines) >= 20 and {"code", "prose", "chat"} <= set(kinds)
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]
    assert any(PROMPT_SET.match(f"mlx_flash/offline/{pattern}")
               for pattern in package_data.get("mlx_flash.offline", [])), "ship the prompts"
    _, flash_dir = tiny_dirs("qwen2")
    prompts, got = read_prompts(tokenizer_of(flash_dir), PROMPT_SET)
    assert got == kinds and all(p.size > 0 for p in prompts)


def test_a_bad_prompt_line_names_the_file_and_line(tmp_path, tiny_dirs):
    _, flash_dir = tiny_dirs("qwen2")
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"text": "w5 w6"}\n{"kind": "code"}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:2"):
        read_prompts(tokenizer_of(flash_dir), bad)


def test_reports_per_selector(tmp_path, tiny_dirs):
    _, flash_dir = tiny_dirs("qwen2")
    rng = np.random.default_rng(3)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i}" for i in rng.integers(0, 250, 80)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(
        json.dumps({"kind": kind, "text": " ".join(f"w{i}" for i in rng.integers(0, 250, 20))})
        + "\n" for kind in ("code", "prose", "chat")))
    cfg = EvalConfig(ppl_tokens=30, max_tokens=4, prompt_file=str(prompts))
    full, half = evaluate_selectors(flash_dir, text, cfg, [("sequence", 1.0),
                                                           ("sequence", 0.3)])
    assert (full.prefix_tokens, full.continuation_tokens) == (39, 40)  # 80 tokens
    assert full.flash_prefix_ppl == pytest.approx(full.dense_prefix_ppl, rel=1e-3)
    assert full.greedy_match == 1.0 and set(full.greedy_match_by_kind) == {"code", "prose",
                                                                           "chat"}
    assert half.flash_prefix_ppl != pytest.approx(half.dense_prefix_ppl, rel=1e-3)
    assert half.selector["set_fraction"] == pytest.approx(0.3, abs=0.01)
    assert half.dense_prefix_ppl == full.dense_prefix_ppl  # one dense run for both


def test_eval_cli_runs_every_repeated_selector_flag(tmp_path, monkeypatch):
    """`--selector oracle --selector gate:0.8` scores both (argparse had kept the last alone:
    a 0.5B sweep ran gate 0.6 and nothing else)."""
    import mlx_flash.cli.eval as eval_cmd
    from mlx_flash.cli.main import main

    seen = []
    monkeypatch.setattr(eval_cmd, "evaluate_selectors",
                        lambda d, t, cfg, runs, progress: seen.append(runs) or [])
    text = tmp_path / "t.txt"
    text.write_text("x")
    argv = ["eval", str(tmp_path), "--text-file", str(text)]
    assert main([*argv, "--selector", "oracle", "--selector", "gate:0.8,quant"]) == 0
    assert main(argv) == 0
    assert seen == [[("oracle", None), ("gate", 0.8), ("quant", None)], [("auto", None)]]
