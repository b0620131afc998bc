"""Under a DRAM budget, and on the fast CPU path, a multi-position call with a KV cache defers
its output head and goes PIECE positions at a time (accel/blocks.defer_prompt_logits): mlx_lm's
prefill hands the model up to 2048 positions and discards their logits, (positions, vocab)
floats no plan counts and the fast head would compute eagerly."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import generate
from mlx_lm.models.cache import make_prompt_cache

import mlx_flash.accel.blocks as accel_blocks
import mlx_flash.accel.build as accel_build
import mlx_flash.accel.linear as accel_linear
from mlx_flash.offline.convert import convert
from tests.tiny import make_source

REASON = accel_build.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"CPU kernels: {REASON}")
PROMPT = list(range(3, 40))  # 37 positions


def head_calls(monkeypatch) -> list[int]:
    """Rows of every output-head product the C kernels compute (the vocabulary's 256 rows)."""
    calls = []
    apply = accel_linear._FusedWeight.apply

    def counted(self, x):
        if self.rows == 256:
            calls.append(x.shape[0])
        return apply(self, x)

    monkeypatch.setattr(accel_linear._FusedWeight, "apply", counted)
    return calls


@pytest.fixture(scope="module", params=["f16-untied", "f16-tied", "q4-untied"])
def flash_dir(request, tmp_path_factory):
    kind, tie = request.param.split("-")
    root = tmp_path_factory.mktemp(request.param)
    src = make_source(root / "src", "qwen2", dtype="float16",
                      tie_word_embeddings=tie == "tied")
    convert(src, root / "flash", **({"bits": 4, "resident_bits": 4} if kind == "q4" else {}))
    return root / "flash"


def eager_logits(model, ids: mx.array) -> np.ndarray:
    """The prompt's logits from the C kernels: the stack, then the fast head outside any
    deferral (as qwen2's Model.__call__ applies it)."""
    hidden = model.model(ids, cache=make_prompt_cache(model))
    tied = model.args.tie_word_embeddings
    return np.asarray(model.model.embed_tokens.as_linear(hidden) if tied
                      else model.lm_head(hidden))


@pytest.mark.parametrize("budget", [None, "16GB"])
def test_deferred_logits_are_the_eager_ones(flash_load, flash_dir, monkeypatch, budget):
    model, _ = flash_load(flash_dir, dram_budget=budget)
    ids = mx.array([PROMPT])
    calls = head_calls(monkeypatch)
    want = eager_logits(model, ids)
    assert calls == [len(PROMPT)]  # the reference did run the C head
    calls.clear()
    monkeypatch.setattr(accel_blocks, "PIECE", 8)  # 37 positions: five calls, logits lazy
    cache = make_prompt_cache(model)
    got = model(ids, cache=cache)
    assert calls == [] and cache[0].offset == len(PROMPT)  # the stack ran, the head did not
    # MLX's f32 product; a 4-bit head's C kernel takes int8 activations (~1% of a logit)
    tol = 0.1 if "q4" in flash_dir.parent.name else 2e-3
    np.testing.assert_allclose(np.asarray(got), want, rtol=tol, atol=tol)
    one = model(mx.array([[7]]), cache=cache)  # decode: the fast head, as before
    assert calls == [1] and one.shape == (1, 1, 256)


@pytest.mark.parametrize("fast_cpu", [True, False])
def test_mlx_lm_generate_under_a_budget_is_unchanged(flash_load, flash_dir, monkeypatch,
                                                     fast_cpu):
    eager, tokenizer = flash_load(flash_dir, fast_cpu=fast_cpu)
    want = generate(eager, tokenizer, PROMPT, max_tokens=6)
    budgeted, _ = flash_load(flash_dir, dram_budget="16GB", fast_cpu=fast_cpu)
    calls = head_calls(monkeypatch)
    monkeypatch.setattr(accel_blocks, "PIECE", 8)
    assert generate(budgeted, tokenizer, PROMPT, max_tokens=6) == want
    # the prefill's 36 positions never reached the kernels (the MLX path has no fast head)
    assert set(calls) == ({1} if fast_cpu else set()) and (calls or not fast_cpu)


def test_speculative_prefill_computes_one_position_of_logits(flash_load, flash_dir, monkeypatch):
    """The drafter's prefill: the prompt through the stack PREFILL_STEP at a time, the head on
    the last position only (it computed the whole prompt's logits and dropped them)."""
    import mlx_flash.spec.speculative as speculative

    model, tokenizer = flash_load(flash_dir, dram_budget="16GB")
    want = generate(model, tokenizer, PROMPT, max_tokens=1)
    calls = head_calls(monkeypatch)
    monkeypatch.setattr(speculative, "PREFILL_STEP", 8)
    cache = speculative.make_cache(model)
    h, token = speculative.prefill(model, cache, PROMPT)
    assert calls == [1] and cache[0].offset == len(PROMPT) and h.ndim == 1
    assert tokenizer.decode([token]) == want
