"""Generation on a loaded model with mlx_lm's own loop."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import mlx.core as mx
from mlx_lm import stream_generate
from mlx_lm.sample_utils import make_sampler

from .stats import peak_rss_bytes


def conversation_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation, ending where the assistant's next reply starts.

    messages: [{"role": "system" | "user" | "assistant", "content": str}, ...]. Through the
    tokenizer's chat template when it has one; a model without a template is a plain language
    model, so its conversation is the contents joined by newlines (the text just continues).
    """
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=True))
    return list(tokenizer.encode("\n".join(m["content"] for m in messages)))


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def cached_tokens(cache: list) -> int | None:
    """Tokens held by an mlx_lm prompt cache (None when its kind does not say)."""
    return getattr(cache[0], "offset", None) if cache else None


@dataclass
class GenerationResult:
    """One generation's text and the figures mlx_lm's generate prints (tokens/s as mlx_lm
    counts them: the prompt's prefill, then from the first generated token to the last)."""

    text: str
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    peak_rss_bytes: int
    time_to_first_token_s: float = 0.0  # from the call to the first token, prefill included

    def figures(self) -> dict:
        """Everything but the text (the "generation" entry of `--stats-json`)."""
        out = asdict(self)
        del out["text"]
        return out


def format_prompt(tokenizer, prompt: str, system: str | None = None,
                  use_chat_template: bool = True) -> list[int]:
    """Token ids of the prompt, through the chat template when the tokenizer has one."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else [])
        return conversation_ids(tokenizer, [*messages, {"role": "user", "content": prompt}])
    return tokenizer.encode(prompt)


def stream(model, tokenizer, prompt_ids: list[int], max_tokens: int, temp: float = 0.0,
           top_p: float = 1.0, seed: int | None = None, speculative=None) -> Iterator:
    """mlx_lm.stream_generate with a sampler for temp/top_p; yields its responses.

    speculative: a `Speculation` (drafter, settings, stats): greedy speculative decoding."""

    if speculative is not None:
        yield from speculative.stream(model, tokenizer, prompt_ids, max_tokens, temp)
        return
    if seed is not None:
        mx.random.seed(seed)
    sampler = make_sampler(temp=temp, top_p=top_p)
    yield from stream_generate(model, tokenizer, prompt_ids, max_tokens=max_tokens,
                               sampler=sampler)


def generate_text(model, tokenizer, prompt_ids: list[int], max_tokens: int, temp: float = 0.0,
                  top_p: float = 1.0, seed: int | None = None, on_token=None,
                  speculative=None) -> GenerationResult:
    """Generate and collect the text; `on_token(response)` is called per token.

    On a flash model the result's figures also go into `model.flash.stats.generation`
    (`--stats-json`'s "generation" entry)."""
    text, last, first_at = "", None, None
    started = time.perf_counter()
    for response in stream(model, tokenizer, prompt_ids, max_tokens, temp, top_p, seed,
                           speculative):
        if first_at is None:
            first_at = time.perf_counter()
        text += response.text
        last = response
        if on_token is not None:
            on_token(response)
    if last is None:
        result = GenerationResult("", len(prompt_ids), 0, 0.0, 0.0, peak_rss_bytes())
    else:
        result = GenerationResult(text, last.prompt_tokens, last.generation_tokens,
                                  last.prompt_tps, last.generation_tps, peak_rss_bytes(),
                                  first_at - started)
    flash = getattr(model, "flash", None)
    if flash is not None:
        flash.stats.generation = result.figures()
    return result
