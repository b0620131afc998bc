"""`mlx-flash generate`.

Without --max-kv-tokens the DRAM plan reserves KV cache for what this run can hold: the
prompt's tokens, --max-tokens and a drafter's draft (the other commands: 2048 tokens), so the
tokenizer is loaded first and handed to `load`. The prompt is encoded once: a byte-level BPE
tokenizer then keeps only its decoding table (FlashTokenizer.drop_encoder: ~44 MiB less for
Qwen2.5's, before the plan is made).
"""

from __future__ import annotations

import argparse
import sys

from ..format.manifest import read_manifest
from ..runtime.generate import format_prompt, generate_text
from ..runtime.loader import check_budget_early, load_tokenizer
from ..runtime.tokenizer import DECODE_TABLE_RSS
from .common import (
    LiveStats,
    add_drafter_arguments,
    add_model_arguments,
    load_model,
    load_options,
    load_speculation,
    model_dir,
)

DEFAULT_KV_TOKENS = 2048  # --max-tokens -1 (no limit) without --max-kv-tokens

DEFAULT_PROMPT = "Write a Python function that checks whether a number is prime."


def cmd_generate(args) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    tokenizer = None
    if not args.dense:
        root = model_dir(args)
        options = load_options(args, root)  # refuse a far too small budget before the tokenizer
        options["max_kv_tokens"] = args.max_kv_tokens or kv_tokens(args, 1)
        check_budget_early(root, tokenizer_rss=DECODE_TABLE_RSS, **options)
        tokenizer = load_tokenizer(root, read_manifest(root))
        ids = format_prompt(tokenizer, prompt, args.system_prompt,
                            use_chat_template=not args.ignore_chat_template)
        tokenizer.drop_encoder()
        if args.max_kv_tokens is None:
            args.max_kv_tokens = kv_tokens(args, len(ids))
    model, tokenizer = load_model(args, tokenizer)
    stats = None if args.dense else model.flash.stats
    spec = load_speculation(args, model)
    if args.dense:
        ids = format_prompt(tokenizer, prompt, args.system_prompt,
                            use_chat_template=not args.ignore_chat_template)
    live = LiveStats(stats) if args.verbose else None
    result = generate_text(model, tokenizer, ids, args.max_tokens, args.temp, args.top_p,
                           args.seed, on_token=_printer(live), speculative=spec)
    print()
    print("=" * 10, file=sys.stderr)
    print(f"Prompt: {result.prompt_tokens} tokens, {result.prompt_tps:.3f} tokens-per-sec\n"
          f"Generation: {result.generation_tokens} tokens, {result.generation_tps:.3f} "
          f"tokens-per-sec\nPeak RSS: {result.peak_rss_bytes / 2**30:.3f} GB", file=sys.stderr)
    if spec is not None:
        t = spec.stats.totals()
        print(f"Speculative: {t['tokens_per_step']:.2f} tokens per verification step "
              f"({t['verify_steps']} steps, {t['candidates_per_step']:.1f} candidates each), "
              f"acceptance {t['acceptance_rate']:.1%} of {t['draft_length']} drafted, draft "
              f"{t['draft_seconds']:.2f} s, verify {t['verify_seconds']:.2f} s", file=sys.stderr)
        if stats is not None:
            stats.speculative = t
    if stats is not None:
        totals = stats.totals()
        print(f"Flash: {totals['bytes_read_per_token'] / 2**20:.2f} MiB read/token, "
              f"{totals['reads_per_token']:.0f} reads/token, hit rate {totals['hit_rate']:.1%}, "
              f"cache capacity {stats.settings['capacity']} neurons/layer", file=sys.stderr)
        truncated = sum(s.truncated for s in stats.decode_steps())
        if truncated:
            print(f"warning: {truncated / max(1, totals['decode_tokens']):.0f} active neurons per "
                  "token did not fit the neuron caches and were read again for every token "
                  "(exact but slow): raise --dram-budget, lower --keep, or use a smaller "
                  "--window", file=sys.stderr)
        if args.stats_json:
            stats.write_json(args.stats_json)
        model.flash.close()
    return 0


def kv_tokens(args: argparse.Namespace, prompt_tokens: int) -> int:
    """KV positions this run can fill: the prompt, every generated token and the drafted
    tokens a verification step appends before it is trimmed."""
    if args.max_tokens < 0:
        return DEFAULT_KV_TOKENS
    drafted = args.beam_width * args.draft_length if args.drafter is not None else 0
    return prompt_tokens + args.max_tokens + drafted + 1


def _printer(live):
    def on_token(response) -> None:
        print(response.text, end="", flush=True)
        if live is not None:
            live(response)

    return on_token


def add_arguments(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="generate text (flags as in mlx_lm.generate)")
    add_model_arguments(p)
    p.set_defaults(max_kv_tokens=None)  # the prompt's tokens + --max-tokens (module doc)
    p.add_argument("--prompt", "-p", default=DEFAULT_PROMPT, help="prompt, or - for stdin")
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--ignore-chat-template", action="store_true")
    p.add_argument("--max-tokens", "-m", type=int, default=100)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--verbose", action="store_true", help="live per-token flash stats")
    p.add_argument("--stats-json", default=None, help="write per-token stats to this file")
    add_drafter_arguments(p)
    p.set_defaults(func=cmd_generate)
    return p
