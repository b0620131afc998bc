"""A few tests on the real default model (the fixtures real_dir, dense, dense_text are in
conftest.py; the prompt in real.py)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from real import greedy

pytestmark = pytest.mark.real_model


def test_dense_text_is_coherent(dense_text):
    assert "def factorial(n):" in dense_text, dense_text
    assert dense_text.count("factorial") >= 3, dense_text


def test_dense_equals_mlx_lm_on_the_same_weights(real_dir, dense, tmp_path):
    """Save load_dense's weights as an ordinary mlx_lm dir; mlx_lm.load must build the same
    model: the same class and arguments, every weight equal, the same logits on a few tokens
    (a 48-token greedy run on both took 58-93 s in float16 on this CPU and adds nothing that
    equal weights in the same module do not already fix)."""
    import shutil

    import mlx_lm
    from mlx.utils import tree_flatten

    model, _ = dense
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), weights)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(real_dir / name, tmp_path / name)
    ref, _ = mlx_lm.load(str(tmp_path))
    assert type(ref) is type(model) and ref.args == model.args
    theirs = dict(tree_flatten(ref.parameters()))
    assert theirs.keys() == weights.keys()
    for name, value in weights.items():
        assert theirs[name].dtype == value.dtype and mx.array_equal(theirs[name], value), name
    tokens = mx.array([[785, 6722, 315, 9625, 374, 220, 16, 17, 18]])
    np.testing.assert_array_equal(np.array(ref(tokens).astype(mx.float32)),
                                  np.array(model(tokens).astype(mx.float32)))


def test_flash_all_neurons_equals_dense(flash_load, real_dir, dense_text):
    model, tokenizer = flash_load(real_dir, selector="oracle", oracle_rule="all", window=4)
    assert greedy(model, tokenizer) == dense_text
