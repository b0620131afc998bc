"""`mlx-flash chat`: an interactive terminal chat with a live flash status line.

Tokens stream as they are generated; the terminal's last row shows, updated per token, what
makes a flash model different: DRAM in use against the budget, bytes read from flash for the
last token, the neuron-cache hit rate over the reply, and tokens/s. Conversations are multi-turn
through the tokenizer's chat template, and the KV cache (mlx_lm's `make_prompt_cache`, passed to
`stream_generate` as `prompt_cache`) is kept across turns: each turn feeds only the tokens the
cache does not hold yet.

`conversation_ids` is shared with `mlx-flash serve`; the model flags and loading are
`cli/common.py`'s, as for `mlx-flash generate`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models import cache as kv
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from ..runtime.generate import cached_tokens, common_prefix, conversation_ids, stream_generate
from ..runtime.stats import current_rss_bytes
from .common import add_model_arguments, load_model, model_dir

HELP = "Type a message. /reset starts a new conversation; /quit or Ctrl-D leaves."


class Conversation:
    """A multi-turn chat whose KV cache is kept across turns.

    `cached_ids` are the token ids whose keys and values the cache holds, in order. A new turn
    templates the whole conversation, keeps the cache's longest prefix in common with it
    (templates may re-tokenize or drop earlier text: the cache is trimmed back to where they
    differ), and feeds only the rest.
    """

    def __init__(self, model, tokenizer, system_prompt: str | None = None):
        self.model, self.tokenizer, self.system_prompt = model, tokenizer, system_prompt
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = ([{"role": "system", "content": self.system_prompt}]
                                     if self.system_prompt else [])
        self.cache = make_prompt_cache(self.model)
        self.cached_ids: list[int] = []

    def _sync_cache(self, ids: list[int]) -> list[int]:
        """Trim the cache to its common prefix with `ids`; return the ids it still needs."""

        keep = min(common_prefix(self.cached_ids, ids), len(ids) - 1)  # feed >= 1 for logits
        extra = len(self.cached_ids) - keep
        if extra and kv.can_trim_prompt_cache(self.cache):
            kv.trim_prompt_cache(self.cache, extra)
        elif extra:  # e.g. a sliding-window cache that has wrapped: start it again
            self.cache, keep = kv.make_prompt_cache(self.model), 0
        self.cached_ids = ids[:keep]
        return ids[keep:]

    def ask(self, text: str, max_tokens: int = 512, sampler=None) -> Iterator:
        """Add a user message and stream the reply (mlx_lm GenerationResponses).

        The reply joins the conversation when the stream ends, also when it is stopped early.
        """

        self.messages.append({"role": "user", "content": text})
        ids = conversation_ids(self.tokenizer, self.messages)
        todo = self._sync_cache(ids)
        reply, tokens = [], []
        try:
            for response in stream_generate(self.model, self.tokenizer, todo,
                                            max_tokens=max_tokens, sampler=sampler,
                                            prompt_cache=self.cache):
                reply.append(response.text)
                tokens.append(response.token)
                yield response
        finally:
            self.messages.append({"role": "assistant", "content": "".join(reply)})
            fed = ids + tokens  # generate_step feeds each token before yielding it
            held = cached_tokens(self.cache)
            self.cached_ids = fed[:held] if held is not None else fed

    @property
    def kv_tokens(self) -> int:
        return len(self.cached_ids)


@dataclass
class Status:
    """What the status line shows after one token."""

    dram_used: int  # bytes, this process's resident set
    dram_budget: int | None  # bytes, None when the model has no budget (or is dense)
    bytes_read: int | None  # flash bytes read for the last decoded token
    reads: int | None  # flash reads for the last decoded token
    hit_rate: float | None  # neuron-cache hits over this reply's decoded tokens
    tokens_per_second: float
    kv_tokens: int
    skipped: int = 0  # active neurons of the last token that did not fit the caches

    def line(self) -> str:
        mib = 2**20
        budget = f"{self.dram_budget / mib:.0f}" if self.dram_budget else "no budget"
        parts = [f"DRAM {self.dram_used / mib:.0f}/{budget} MiB"]
        if self.bytes_read is not None:
            parts.append(f"read {self.bytes_read / mib:.2f} MiB/tok in {self.reads} reads")
        if self.hit_rate is not None:
            parts.append(f"hit {self.hit_rate:.1%}")
        parts += [f"{self.tokens_per_second:.1f} tok/s", f"kv {self.kv_tokens} tok"]
        if self.skipped:
            parts.append(f"{self.skipped} neurons skipped: raise --dram-budget")
        return " | ".join(parts)


def status_after(model, response, kv_tokens: int) -> Status:
    """The status after `response` (stats since the last `stats.reset()`, i.e. this reply)."""

    stats = getattr(getattr(model, "flash", None), "stats", None)
    if stats is None:  # the dense reference
        return Status(current_rss_bytes(), None, None, None, None, response.generation_tps,
                      kv_tokens)
    decode = stats.decode_steps()
    last = decode[-1] if decode else None
    active = sum(s.neurons_active for s in decode)
    return Status(current_rss_bytes(), stats.memory.get("budget"),
                  last.bytes_read if last else None, last.reads if last else None,
                  sum(s.neurons_hit for s in decode) / active if active else None,
                  response.generation_tps, kv_tokens, last.truncated if last else 0)


class StatusBar:
    """One line pinned to the terminal's last row, redrawn in place.

    The rows above it are made a scroll region (as apt's progress bar does), so the streamed
    answer scrolls while the status stays. When the output is not a terminal, only the final
    status of each reply is printed, as an ordinary line.
    """

    def __init__(self, out=None, pinned: bool | None = None):
        self.out = out or sys.stdout
        if pinned is None:
            pinned = (self.out.isatty() and os.environ.get("TERM", "dumb") != "dumb"
                      and shutil.get_terminal_size().lines >= 3)
        self.pinned, self._rows = pinned, 0

    def __enter__(self) -> StatusBar:
        if self.pinned:
            self._reserve()
        return self

    def __exit__(self, *exc) -> None:
        if self.pinned:
            self._write(f"\0337\033[{self._rows};1H\033[2K\033[r\0338")

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def _reserve(self) -> None:
        """Make room for the last row and set the scroll region above it."""
        self._rows = shutil.get_terminal_size().lines
        # newline for room; save cursor; region rows 1..n-1 (homes the cursor); restore; up
        self._write(f"\n\0337\033[1;{self._rows - 1}r\0338\033[1A")

    def show(self, line: str) -> None:
        """Redraw the status line (a no-op when not on a terminal)."""
        if not self.pinned:
            return
        size = shutil.get_terminal_size()
        if size.lines != self._rows:  # resized: move the region
            self._reserve()
        text = line[: max(0, size.columns - 1)].ljust(size.columns - 1)
        self._write(f"\0337\033[{self._rows};1H\033[2K\033[7m{text}\033[0m\0338")

    def final(self, line: str) -> None:
        """The status at the end of a reply: redrawn when pinned, else printed as a line."""
        if self.pinned:
            self.show(line)
        else:
            self._write(f"[{line}]\n")


def run_chat(args: argparse.Namespace) -> int:
    """The interactive loop behind `mlx-flash chat`."""

    path = model_dir(args)
    args.model = str(path)
    print(f"loading {path} ...", file=sys.stderr, flush=True)
    model, tokenizer = load_model(args)
    if args.seed is not None:
        mx.random.seed(args.seed)
    sampler = make_sampler(temp=args.temp, top_p=args.top_p)
    conversation = Conversation(model, tokenizer, args.system_prompt)
    print(f"mlx-flash chat: {path}\n{HELP}", flush=True)
    try:
        with StatusBar() as bar:
            _loop(conversation, bar, args.max_tokens, sampler)
    finally:
        if hasattr(model, "flash"):
            model.flash.close()
    return 0


def _loop(conversation: Conversation, bar: StatusBar, max_tokens: int, sampler) -> None:
    try:
        import readline  # noqa: F401  (optional: line editing and history for input())
    except ImportError:
        pass
    while True:
        try:
            text = input(">>> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text in ("/quit", "/exit"):
            return
        if text == "/reset":
            conversation.reset()
            print("(new conversation)")
        elif text:
            _reply(conversation, bar, text, max_tokens, sampler)


class StopBetweenTokens:
    """Ctrl-C during a reply stops it after the current token, never inside one.

    A token interrupted half-way could leave a layer's neuron cache with its bookkeeping
    updated and its rows not yet written.
    """

    def __enter__(self) -> StopBetweenTokens:
        self.requested = False
        self._previous = signal.signal(signal.SIGINT, self._request)
        return self

    def _request(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)


def _reply(conversation: Conversation, bar: StatusBar, text: str, max_tokens: int,
           sampler) -> None:
    """Stream one reply with the status line redrawn per token; Ctrl-C stops the reply."""
    stats = getattr(getattr(conversation.model, "flash", None), "stats", None)
    if stats is not None:
        stats.reset()  # the status is per reply; a long chat must not grow the step list
    status = None
    with StopBetweenTokens() as stop:
        for response in conversation.ask(text, max_tokens, sampler):
            sys.stdout.write(response.text)
            sys.stdout.flush()
            status = status_after(conversation.model, response, conversation.kv_tokens
                                  + response.prompt_tokens + response.generation_tokens)
            bar.show(status.line())
            if stop.requested:
                sys.stdout.write(" [stopped]")
                break
    print()
    if status is not None:
        status.kv_tokens = conversation.kv_tokens
        bar.final(status.line())


def add_arguments(subparsers) -> argparse.ArgumentParser:
    """Register `chat` on the `mlx-flash` subparsers; returns its parser."""
    p = subparsers.add_parser("chat", help="interactive chat with a live flash status line")
    add_model_arguments(p)
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--max-tokens", "-m", type=int, default=512, help="per reply")
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=run_chat)
    return p
