"""Speculative decoding with the drafter vs plain greedy decoding, in one process.

    python scripts/spec_bench.py --model DIR [--dense] [--configs 1x4,2x4] [--tokens 48]
        [--load-args '{"window": 5}'] [--prompt P [--prompt P2 ...]] [--out result.json]

Loads the model once (`--load-args` passed to `mlx_flash.load`, or `load_dense`), warms up,
then for the plain greedy run and each BEAMSxLENGTH drafter setting: the generated token ids
(checked identical to plain greedy), tokens/s over the generated tokens (prefill excluded),
tokens per verification step, acceptance, draft and verify time, and for flash models the
bytes read per token. Prints a markdown table; --out writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from mlx_flash.runtime.generate import format_prompt, generate_text
from mlx_flash.runtime.loader import load, load_dense
from mlx_flash.spec.drafter import find_drafter, load_drafter
from mlx_flash.spec.speculative import SpecSettings, Speculation

DEFAULT_PROMPT = "Write a Python function that checks whether a number is prime."


def run_once(model, tokenizer, ids, tokens, spec=None) -> dict:
    """One generation; tokens/s from the first token to the last (prefill excluded)."""
    flash = getattr(model, "flash", None)
    if flash is not None:
        flash.stats.reset()
    times, out = [], []

    def on_token(response):
        times.append(time.perf_counter())
        out.append(response.token)

    generate_text(model, tokenizer, ids, tokens, on_token=on_token, speculative=spec)
    row = {"tokens": len(out), "tok_per_s": (len(out) - 1) / (times[-1] - times[0]),
           "ids": out}
    if flash is not None:
        totals = flash.stats.totals()
        row["mib_read_per_token"] = totals["bytes_read_per_token"] / 2**20
        row["hit_rate"] = totals["hit_rate"]
    if spec is not None:
        row.update({k: v for k, v in spec.stats.totals().items()})
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dense", action="store_true")
    p.add_argument("--load-args", default="{}",
                   help="JSON kwargs for mlx_flash.load (or load_dense with --dense)")
    p.add_argument("--drafter", default=None,
                   help="default: the model dir's, else the packaged one for the model")
    p.add_argument("--configs", default="1x4,2x4,3x4", help="BEAMSxLENGTH,...")
    p.add_argument("--policies", default="keep", help="flash window policies to run")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--prompt", action="append", default=None,
                   help="repeat for several prompts, each its own table (one load)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    loader = load_dense if args.dense else load
    model, tokenizer = loader(args.model, **json.loads(args.load_args))
    drafter = load_drafter(args.drafter or find_drafter(args.model), args.model).attach(
        model, args.model)
    everything = []
    for prompt in args.prompt or [DEFAULT_PROMPT]:
        ids = format_prompt(tokenizer, prompt)
        generate_text(model, tokenizer, ids, 4)  # warm-up: first-call allocations, page cache
        rows = [{"config": "greedy", **run_once(model, tokenizer, ids, args.tokens)}]
        for config in args.configs.split(","):
            width, length = (int(x) for x in config.lower().split("x"))
            for policy in args.policies.split(","):
                spec = Speculation(drafter, SpecSettings(width, length, policy))
                row = run_once(model, tokenizer, ids, args.tokens, spec)
                rows.append({"config": f"{config}" + (f" {policy}" if not args.dense else ""),
                             **row})
        report(rows, args, prompt)
        everything += [{"prompt": prompt, **r} for r in rows]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(everything, f, indent=1)
    return 0


def report(rows: list[dict], args, prompt: str) -> None:
    base = rows[0]
    print(f"# {args.model} {'dense' if args.dense else 'flash'} {args.load_args}, "
          f"{args.tokens} tokens, load {os.getloadavg()[0]:.1f}\n# prompt: {prompt}")
    print("| drafter | tok/s | speedup | tokens/step | accepted/step | candidates | draft s | "
          "verify s | MiB read/token | same ids |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mib = f"{r['mib_read_per_token']:.1f}" if "mib_read_per_token" in r else "-"
        same = "yes" if r["ids"] == base["ids"] else "NO"
        spec = (f"{r['tokens_per_step']:.2f} | {r['accepted_per_step']:.2f} | "
                f"{r['candidates_per_step']:.1f} | {r['draft_seconds']:.2f} | "
                f"{r['verify_seconds']:.2f}") if "tokens_per_step" in r else "1 | 0 | 1 | - | -"
        print(f"| {r['config']} | {r['tok_per_s']:.2f} | {r['tok_per_s'] / base['tok_per_s']:.2f}x"
              f" | {spec} | {mib} | {same} |")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
