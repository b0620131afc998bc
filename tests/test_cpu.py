"""The numpy CPU path computes what the MLX path computes."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm import generate

from mlx_flash.cpu import NumpyLinear, use_numpy_lm_head
from mlx_flash.model import load, load_dense


@pytest.mark.parametrize("bias", [False, True])
def test_numpy_linear_equals_linear(bias):
    linear = nn.Linear(48, 80, bias=bias)
    x = mx.random.normal((2, 3, 48), key=mx.random.key(0))
    want = linear(x)
    got = NumpyLinear(linear)(x)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)


def test_numpy_linear_refuses_half_precision():
    linear = nn.Linear(8, 8)
    linear.set_dtype(mx.bfloat16)
    with pytest.raises(ValueError, match="f32"):
        NumpyLinear(linear)


def test_flash_with_numpy_lm_head_matches_dense(tiny_dirs):
    _, flash_dir = tiny_dirs("qwen2")
    dense, tokenizer = load_dense(flash_dir)
    model, _ = load(flash_dir, numpy_lm_head=True)
    assert type(model.lm_head).__name__ == "NumpyLinear"
    prompt = [5, 9, 17, 33]
    assert generate(model, tokenizer, prompt, max_tokens=8) == \
        generate(dense, tokenizer, prompt, max_tokens=8)
    assert not use_numpy_lm_head(dense.model)  # no lm_head there: nothing swapped
