"""The drafter's training requests and the batched teacher's numpy head."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import _get_classes
from tiny import tiny_config

from mlx_flash.offline.answers import (
    _by_length,
    answer_prompts,
    general_requests,
    head_argmax,
    mixed_prompts,
)

DOCS = ["def f():\n    return 1\n" * 40, "A paragraph about names. " * 40]


def test_general_requests_are_packaged_distinct_and_counted():
    assert general_requests(0) == [] and len(general_requests(1)) == 1
    with pytest.raises(ValueError, match="--general .* at most"):
        general_requests(10**6)
    some = general_requests(300)
    assert len(set(some)) == 300 and not any("def " in r or "```" in r for r in some)
    assert general_requests(5) == some[:5]


def test_mixed_prompts_interleave_both_kinds_in_order():
    doc = answer_prompts(iter(DOCS), 2)
    gen = general_requests(6)
    mixed = mixed_prompts(iter(DOCS), 2, 6)
    assert sorted(mixed) == sorted(doc + gen)
    assert [p for p in mixed if p in doc] == doc and [p for p in mixed if p in gen] == gen
    # the tail (the held-out part of training) holds both kinds
    assert any(p in doc for p in mixed[-3:]) and any(p in gen for p in mixed[-3:])
    assert mixed_prompts(iter(DOCS), 0, 3) == gen[:3]


def test_batches_are_sorted_by_length_within_blocks():
    prompts = ["aaaa", "a", "aaa", "aa", "aaaaa", "b"]
    order = _by_length(list(range(6)), prompts, block=3)
    assert order == [1, 2, 0, 5, 3, 4]


def test_numpy_tied_head_gives_the_models_argmax():
    """A tied float embedding table: the numpy head's argmax is MLX's."""
    config = tiny_config("qwen2", tie_word_embeddings=True)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    assert "lm_head" not in model
    h = mx.random.normal((3, 5, config["hidden_size"]), key=mx.random.key(0))
    want = np.array(mx.argmax(model.model.embed_tokens.as_linear(h), axis=-1))
    got = head_argmax(model)(h)
    assert got.shape == (3, 5)
    np.testing.assert_array_equal(got, want)
