"""What re-quantizing flash bundles costs: weight error and perplexity, 16 vs 8 vs 4 bits.

The default model's source is already a Q4_K_M GGUF; its FFN weights are dequantized to f16 at
convert time. Re-quantizing them to 8 or 4 bits adds error on top of llama.cpp's own. This
measures it both ways on the same text: relative weight error of the bundles against the
16-bit dir, and perplexity of the dense model rebuilt from each dir (`load_dense`, which uses
exactly the stored weights).

    python scripts/quant_error.py DIR16 DIR8 DIR4 --text FILE [--tokens 512]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_flash.format.manifest import read_manifest
from mlx_flash.runtime.loader import load_dense, read_layer_dense


def perplexity(model, ids: list[int]) -> float:
    tokens = mx.array([ids])
    logits = model(tokens[:, :-1]).astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    nll = -mx.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()
    return math.exp(nll.item())  # .item() evaluates


def weight_error(ref_dir: Path, other: Path, layers: list[int]) -> float:
    """Mean over layers and FFN matrices of ||W - W_ref|| / ||W_ref||."""
    errs = []
    for layer in layers:
        ref = read_layer_dense(ref_dir, read_manifest(ref_dir), layer, mx.float32)
        got = read_layer_dense(other, read_manifest(other), layer, mx.float32)
        for name, w in ref.items():
            errs.append(float(mx.linalg.norm(got[name] - w) / mx.linalg.norm(w)))
    return float(np.mean(errs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+")
    parser.add_argument("--text", required=True)
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args(argv)
    dirs = [Path(d) for d in args.dirs]
    print("| dir | bits | FFN MiB | weight rel. error vs first | perplexity |")
    print("|---|---|---|---|---|")
    for d in dirs:
        manifest = read_manifest(d)
        model, tokenizer = load_dense(d)
        ids = tokenizer.encode(Path(args.text).read_text())[: args.tokens]
        err = weight_error(dirs[0], d, [0, 11, 23]) if d != dirs[0] else 0.0
        print(f"| {d.name} | {manifest.ffn.bits} | {manifest.ffn_bytes / 2**20:.0f} | "
              f"{err:.4f} | {perplexity(model, ids):.3f} |", flush=True)
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
