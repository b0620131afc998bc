"""Bytes and reads per token vs window size k, on a real model.

Generates once with a given selection rule, recording every layer's active ids per token, then
replays those ids through a NeuronCache for each k. With compute_on="active" the output of a
token depends only on its own active set, so the ids (and the text) are the same for every k:
the replay gives exactly what a run with that window would read, without re-running the model.

    python scripts/window_curve.py --model DIR --rule top --keep 0.3 --tokens 32 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_flash.runtime.cache import NeuronCache
from mlx_flash.runtime.generate import format_prompt, generate_text
from mlx_flash.runtime.loader import load
from mlx_flash.runtime.planner import spans_across

PROMPT = "Write a Python function that checks whether a string is a palindrome, with tests."


class RecordingSelector:
    """Wraps a selector; keeps each decode token's ids per layer."""

    def __init__(self, inner, n_layers: int):
        self.inner, self.n_layers = inner, n_layers
        self.tokens: list[list[np.ndarray]] = []

    def select(self, layer: int, x: mx.array):
        selection = self.inner.select(layer, x)
        if x.shape[0] == 1:
            if layer == 0:
                self.tokens.append([])
            self.tokens[-1].append(selection.ids[0])
        return selection


def replay(tokens: list[list[np.ndarray]], n_neurons: int, window: int, capacity: int,
           stride: int, warmup: int) -> dict:
    """Per-token bytes and reads when the recorded ids go through a cache with this window."""
    n_layers = len(tokens[0])
    caches = [NeuronCache(n_neurons, capacity, 1, 1, mx.float32, window)
              for _ in range(n_layers)]
    bytes_per_token, reads_per_token = [], []
    for step in tokens:
        new = [c.advance(ids).new_ids for c, ids in zip(caches, step, strict=True)]
        bytes_per_token.append(sum(ids.size for ids in new) * stride)
        reads_per_token.append(sum(spans_across(ids, 0)[0].size for ids in new))
    kept = slice(warmup, None)
    return {"window": window, "bytes_per_token": float(np.mean(bytes_per_token[kept])),
            "reads_per_token": float(np.mean(reads_per_token[kept])),
            "cached_neurons_per_layer": float(np.mean([c.n for c in caches]))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--rule", default="top", choices=["top", "nonzero", "all"])
    parser.add_argument("--keep", type=float, default=0.3)
    parser.add_argument("--selector", default="oracle")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=8, help="tokens left out of the means")
    parser.add_argument("--windows", default="1,2,3,4,5,6,7,8")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    model, tokenizer = load(args.model, selector=args.selector, oracle_rule=args.rule,
                            keep=args.keep)
    runtime = model.flash
    recorder = RecordingSelector(runtime.selector, runtime.manifest.n_layers)
    runtime.selector = recorder
    result = generate_text(model, tokenizer, format_prompt(tokenizer, args.prompt), args.tokens)
    manifest = runtime.manifest
    n, stride = manifest.layers[0].n_neurons, manifest.layers[0].stride
    ffn_bytes = manifest.ffn_bytes
    rows = [replay(recorder.tokens, n, k, n, stride, args.warmup)
            for k in map(int, args.windows.split(","))]
    print(f"model {args.model}: {args.rule} keep={args.keep}, {len(recorder.tokens)} decode "
          f"tokens (first {args.warmup} left out); FFN on flash {ffn_bytes / 2**20:.0f} MiB")
    print("| window k | MiB read/token | % of FFN | reads/token | cached neurons/layer |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['window']} | {row['bytes_per_token'] / 2**20:.2f} | "
              f"{100 * row['bytes_per_token'] / ffn_bytes:.1f} | {row['reads_per_token']:.0f} | "
              f"{row['cached_neurons_per_layer']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "text": result.text,
                                               "ffn_bytes": ffn_bytes, "rows": rows}, indent=1))
    runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
