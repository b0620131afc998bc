"""The real default model's test prompt and greedy text (the fixtures are in conftest.py).

Qwen2.5-Coder-0.5B-Instruct, pulled from PyPI and converted once into $MLX_FLASH_HOME (or
~/.cache/mlx_flash). Without network the real-model tests skip with the reason, unless
MLX_FLASH_REQUIRE_REAL_MODEL=1 (CI), where not having the model is a failure.
"""

from __future__ import annotations

PROMPT = "Write a Python function that returns the factorial of n."
TOKENS = 48


def prompt_ids(tokenizer) -> list[int]:
    """PROMPT in the model's chat template, as generation sees it."""
    from mlx_flash.runtime.generate import format_prompt

    return format_prompt(tokenizer, PROMPT)


def greedy(model, tokenizer) -> str:
    """TOKENS greedy tokens of text after PROMPT, through mlx_lm's own generate."""
    from mlx_lm import generate

    return generate(model, tokenizer, prompt_ids(tokenizer), max_tokens=TOKENS, verbose=False)
