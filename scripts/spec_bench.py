"""Speculative decoding with the drafter vs plain greedy decoding, in one process.

    python scripts/spec_bench.py --model DIR [--dense] [--configs 1x4,2x4] [--tokens 48]
        [--load-args '{"window": 5}'] [--prompt P [--prompt P2 ...] | --prompt-file F.jsonl]
        [--drafter PATH | --drafter NAME=PATH ...] [--out result.json]

Loads the model once (`--load-args` passed to `mlx_flash.load`, or `load_dense`), warms up,
then for the plain greedy run and each BEAMSxLENGTH drafter setting: the generated token ids
(checked identical to plain greedy), tokens/s over the generated tokens (prefill excluded),
tokens per verification step, acceptance, draft and verify time, and for flash models the
bytes read per token. Prints a markdown table per prompt, and with --prompt-file (JSONL as
`mlx-flash eval --prompt-file` reads it: scripts/data/drafter_prompts.jsonl holds code, prose and chat
requests whose topics are not among the drafter's training requests) the mean tokens per step of
each drafter and setting per kind. Several --drafter NAME=PATH compare drafters on one load;
--out writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from itertools import product
from pathlib import Path

from mlx_flash.offline.evaluate import prompt_entries, prompt_ids
from mlx_flash.runtime.generate import generate_text
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
    p.add_argument("--drafter", action="append", default=None,
                   help="PATH or NAME=PATH, repeatable (default: the model dir's, else the "
                        "packaged one for the model)")
    p.add_argument("--configs", default="1x4,2x4,3x4", help="BEAMSxLENGTH,...")
    p.add_argument("--policies", default="keep", help="flash window policies to run")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--prompt", action="append", default=None,
                   help="repeat for several prompts, each its own table (one load)")
    p.add_argument("--prompt-file", default=None,
                   help='prompts from this JSONL file ({"kind", "text", "chat"} a line)')
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.prompt and args.prompt_file:
        p.error("give --prompt or --prompt-file, not both")

    loader = load_dense if args.dense else load
    model, tokenizer = loader(args.model, **json.loads(args.load_args))
    drafters = {name: load_drafter(path, args.model).attach(model, args.model)
                for name, path in drafter_paths(args.drafter, args.model)}
    everything = []
    for kind, prompt, chat in prompts(args):
        ids = prompt_ids(tokenizer, prompt, chat).tolist()
        generate_text(model, tokenizer, ids, 4)  # warm-up: first-call allocations, page cache
        rows = [{"config": "greedy", **run_once(model, tokenizer, ids, args.tokens)}]
        for (name, drafter), config in product(drafters.items(), args.configs.split(",")):
            width, length = (int(x) for x in config.lower().split("x"))
            for policy in args.policies.split(","):
                spec = Speculation(drafter, SpecSettings(width, length, policy))
                row = run_once(model, tokenizer, ids, args.tokens, spec)
                label = (f"{name} " if len(drafters) > 1 else "") + config
                rows.append({"config": label + (f" {policy}" if not args.dense else ""),
                             **row})
        report(rows, args, prompt)
        everything += [{"kind": kind, "prompt": prompt, **r} for r in rows]
    if args.prompt_file:
        summary(everything)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(everything, f, indent=1)
    return 0


def drafter_paths(specs: list[str] | None, model: str) -> list[tuple[str, str]]:
    """--drafter values -> [(name, path)]: NAME=PATH, a bare PATH (named by its file), or
    none (the model's own drafter, else the packaged one)."""
    if not specs:
        return [("drafter", find_drafter(model))]
    return [tuple(s.split("=", 1)) if "=" in s else (Path(s).stem, s) for s in specs]


def prompts(args) -> list[tuple[str, str, bool]]:
    """(kind, request, chat) per prompt: --prompt-file's entries, the --prompt values, or the
    default (requests: through the chat template)."""
    if args.prompt_file:
        return prompt_entries(args.prompt_file)
    return [("prompt", text, True) for text in args.prompt or [DEFAULT_PROMPT]]


def summary(rows: list[dict]) -> None:
    """Mean tokens per step (and speedup) per drafter setting and prompt kind."""
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    configs = list(dict.fromkeys(r["config"] for r in rows if r["config"] != "greedy"))
    base = {r["prompt"]: r["tok_per_s"] for r in rows if r["config"] == "greedy"}
    print("# mean over each kind's prompts: tokens per step (speedup over greedy)")
    counts = {k: sum(1 for r in rows if r["config"] == "greedy" and r["kind"] == k)
              for k in kinds}
    print("| setting | " + " | ".join(f"{k} ({counts[k]} prompts)" for k in kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for config in configs:
        cells = []
        for kind in kinds:
            mine = [r for r in rows if r["config"] == config and r["kind"] == kind]
            steps = sum(r["tokens_per_step"] for r in mine) / len(mine)
            speed = sum(r["tok_per_s"] / base[r["prompt"]] for r in mine) / len(mine)
            cells.append(f"{steps:.2f} ({speed:.2f}x)")
        print(f"| {config} | " + " | ".join(cells) + " |")
    sys.stdout.flush()


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
