"""Perplexity effect of the int8 activations of linear_q / ffnq (issue 20).

Loads a 4/8-bit flash dir on the fast CPU path (every neuron cached, resident linears quantized
with --resident-bits), scores --tokens tokens of a text file teacher-forced in --chunk-token
calls, once with int8 activations and once with exact f32 ones, and prints both perplexities
and how often the greedy next token agrees.

    nice -n 5 python scripts/quant_ppl.py --model DIR --text-file FILE [--tokens 256]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from mlx_flash.accel.build import kernels
from mlx_flash.runtime.loader import load


def score(model, ids: list[int], chunk: int) -> tuple[float, np.ndarray]:
    """(mean NLL of ids[1:], greedy next-token ids) feeding `chunk` tokens per call."""
    cache, nll, greedy = make_prompt_cache(model), [], []
    for start in range(0, len(ids) - 1, chunk):
        part = ids[start:start + chunk + 1]
        logits = model(mx.array([part[:-1]]), cache=cache)[0].astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        target = mx.array(part[1:])
        nll.append(-np.asarray(mx.take_along_axis(logp, target[:, None], axis=-1))[:, 0])
        greedy.append(np.asarray(mx.argmax(logits, axis=-1)))
    return float(np.concatenate(nll).mean()), np.concatenate(greedy)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--text-file", type=Path, required=True)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--chunk", type=int, default=16, help="tokens per call (1: decode only)")
    p.add_argument("--resident-bits", type=int, default=4)
    args = p.parse_args(argv)
    model, tokenizer = load(args.model, fast_cpu=True, selector="oracle", oracle_rule="all",
                            resident_bits=args.resident_bits)
    ids = tokenizer.encode(args.text_file.read_text())[:args.tokens + 1]
    k, results = kernels(), {}
    for label, exact in (("int8", False), ("f32", True)):
        k.exact_quant = exact
        results[label] = score(model, ids, args.chunk)
        print(f"{label}: perplexity {math.exp(results[label][0]):.3f} over {len(ids) - 1} "
              f"tokens", flush=True)
    agree = float(np.mean(results["int8"][1] == results["f32"][1]))
    print(f"greedy next token: int8 agrees with f32 at {agree:.1%} of positions; perplexity "
          f"ratio {math.exp(results['int8'][0] - results['f32'][0]):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
