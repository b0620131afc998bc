"""Generation on a loaded model: mlx_lm's decode loop, without transformers.

`stream_generate` is mlx_lm's (the same steps, prefill chunks, stop rules and responses) for
token-id prompts; mlx_lm.generate itself imports transformers (~40 MiB, 1-2 s), which the
generate/serve path never needs (runtime/tokenizer.py). Models and tokenizers from mlx_lm
work too: a tokenizer needs `detokenizer` and `eos_token_ids` (mlx_lm's TokenizerWrapper,
FlashTokenizer).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from .memory import PREFILL_STEP
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


@dataclass
class GenerationResponse:
    """One step of `stream_generate`: mlx_lm's GenerationResponse, the same fields in order."""

    text: str
    token: int
    logprobs: mx.array | None
    from_draft: bool
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: str | None = None


def log_softmax(logits: mx.array) -> mx.array:
    """logits - logsumexp(logits) over the last axis, in the logits' dtype. On MLX's CPU
    backend through numpy: MLX's CPU exp is scalar (a 152k vocabulary's logsumexp 2.4 ms a
    token here, 5% of the 0.5B's decode step; numpy's 0.16 ms), and the fast CPU path's
    logits are computed already. Elsewhere lazily in MLX, as mlx_lm does."""
    if mx.default_device() != mx.cpu:
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    x = np.asarray(logits.astype(mx.float32))
    top = x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(x - top).sum(axis=-1, keepdims=True)) + top
    return mx.array(x - lse).astype(logits.dtype)


def feed_prompt(body, prompt: mx.array, cache: list, step: int = PREFILL_STEP) -> mx.array:
    """All but the last position of `prompt` (n,) through the transformer stack `body` (the
    model's inner one: no logits, which for a long prompt would be positions x vocab floats
    beyond the DRAM plan), `step` positions a call, filling `cache`; returns the last (1,)."""
    while prompt.size > 1:
        n = min(step, prompt.size - 1)
        body(prompt[:n][None], cache=cache)
        mx.eval([c.state for c in cache])
        prompt = prompt[n:]
        mx.clear_cache()
    return prompt


def generate_step(prompt: mx.array, model, sampler: Callable[[mx.array], mx.array],
                  prompt_cache: list | None = None, prefill_step: int = PREFILL_STEP
                  ) -> Iterator[tuple[int, mx.array]]:
    """(token, logprobs (vocab,)) per generated token, as mlx_lm's generate_step: the prompt
    (n,) but its last token in chunks of `prefill_step` (through the model's inner
    transformer when it has one: no logits for them, which mlx_lm computes and drops), then
    one token per step, the next step's graph built before the current token is handed out."""
    if prompt_cache is None:  # a new sequence: a per-sequence selector forgets the last one's set
        reset = getattr(getattr(getattr(model, "flash", None), "selector", None), "reset", None)
        if reset is not None:
            reset()
    cache = make_prompt_cache(model) if prompt_cache is None else prompt_cache
    body = getattr(model, "model", model)

    def step(tokens: mx.array) -> tuple[mx.array, mx.array]:
        logits = model(tokens[None], cache=cache)[:, -1, :]
        logprobs = log_softmax(logits)
        return sampler(logprobs), logprobs.squeeze(0)

    y, logprobs = step(feed_prompt(body, prompt, cache, prefill_step))
    mx.async_eval(y, logprobs)
    n = 0
    while True:
        next_y, next_logprobs = step(y)
        mx.async_eval(next_y, next_logprobs)
        yield y.item(), logprobs
        if n % 256 == 0:
            mx.clear_cache()
        y, logprobs = next_y, next_logprobs
        n += 1


def stream_generate(model, tokenizer, prompt: list[int] | mx.array, max_tokens: int = 256,
                    sampler: Callable[[mx.array], mx.array] | None = None,
                    prompt_cache: list | None = None) -> Iterator[GenerationResponse]:
    """mlx_lm.stream_generate for a token-id prompt: a response per token, the end-of-sequence
    token not emitted, the last response (finish_reason "stop" or "length") with the rest of
    the text."""
    if max_tokens == 0:
        raise ValueError("max_tokens must be non-zero (use -1 for no limit)")
    prompt = prompt if isinstance(prompt, mx.array) else mx.array(prompt)
    sampler = sampler or (lambda logprobs: mx.argmax(logprobs, axis=-1))
    detokenizer, eos = tokenizer.detokenizer, tokenizer.eos_token_ids
    tic = time.perf_counter()
    token, step, n, prompt_tps = None, (None, None), 0, 0.0

    def response(text: str, step: tuple, reason: str | None = None) -> GenerationResponse:
        return GenerationResponse(text, *step, False, prompt.size, prompt_tps, n + 1,
                                  (n + 1) / (time.perf_counter() - tic),
                                  mx.get_peak_memory() / 1e9, reason)

    for n, step in enumerate(generate_step(prompt, model, sampler, prompt_cache)):
        token = step[0]
        if n == 0:
            prompt_tps = prompt.size / (time.perf_counter() - tic)
            tic = time.perf_counter()
        if token in eos:
            break
        detokenizer.add_token(token)
        if n + 1 == max_tokens:
            break
        yield response(detokenizer.last_segment, step)
    detokenizer.finalize()
    yield response(detokenizer.last_segment, step, "stop" if token in eos else "length")


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
