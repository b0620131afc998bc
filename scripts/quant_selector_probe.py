"""How good is a b-bit copy of gate/up as a neuron selector for a SwiGLU model (issue 4)?

For each token and layer, the selector scores every neuron by |silu(g^ x) * (u^ x)| with g^, u^
the layer's gate/up rows quantized to `bits` (MLX affine, group 64) and keeps the top `keep`
fraction. Reported next to the oracle (the true top-|h| neurons, same count): the activation
mass kept and the perplexity of the dense model whose FFNs keep only those neurons (evaluate.py's
sweep harness), on any text file.

    python scripts/quant_selector_probe.py --model DIR --text-file F [--bits 2,3,4]
        [--keep 0.3,0.5,0.7] [--ppl-tokens 256] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_flash.format.arch import np_activation
from mlx_flash.format.manifest import read_manifest
from mlx_flash.offline.calibration import numpy_linears, recording
from mlx_flash.offline.evaluate import perplexity, read_text_tokens
from mlx_flash.offline.train_predictors import layer_weights
from mlx_flash.runtime.loader import load_dense


def quantized_copy(w: np.ndarray, bits: int, group_size: int = 64) -> np.ndarray:
    """w (rows, d) -> the f32 values of its b-bit affine quantization."""
    q, scales, biases = mx.quantize(mx.array(w.astype(np.float32)), group_size=group_size,
                                    bits=bits)
    return np.asarray(mx.dequantize(q, scales, biases, group_size=group_size, bits=bits))


def top_mask(score: np.ndarray, keep: float) -> np.ndarray:
    """(T, n) scores -> (T, n) bool, each row's top ceil(keep * n)."""
    k = max(1, int(np.ceil(keep * score.shape[1])))
    idx = np.argpartition(-score, k - 1, axis=1)[:, :k]
    mask = np.zeros(score.shape, dtype=bool)
    np.put_along_axis(mask, idx, True, axis=1)
    return mask


class Selector:
    """recording()'s sink: each token's top `keep` neurons by the copies' scores (None: by
    the true |h|); keeps the activation mass each selection held."""

    def __init__(self, copies: list[tuple[np.ndarray, np.ndarray]] | None, keep: float,
                 activation: str):
        self.copies, self.keep, self.activation, self.mass = copies, keep, activation, []

    def __call__(self, layer: int, x: np.ndarray, mag: np.ndarray) -> np.ndarray:
        if self.copies is None:
            score = mag
        else:
            gate, up = self.copies[layer]
            score = np.abs(np_activation(self.activation, x @ gate.T) * (x @ up.T))
        mask = top_mask(score, self.keep)
        total = np.maximum(mag.sum(1), 1e-30)
        self.mass.append(float(np.mean((mag * mask).sum(1) / total)))
        return mask


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path, help="flash model dir (gated FFN)")
    p.add_argument("--text-file", required=True, type=Path)
    p.add_argument("--bits", default="2,3,4")
    p.add_argument("--keep", default="0.3,0.5,0.7")
    p.add_argument("--ppl-tokens", type=int, default=256)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    manifest = read_manifest(args.model)
    if manifest.ffn.kind != "gated":
        p.error(f"{args.model}: a gated (SwiGLU/GeGLU) FFN is needed, got {manifest.ffn.kind}")
    bits = [int(b) for b in args.bits.split(",")]
    keeps = [float(k) for k in args.keep.split(",")]
    model, tokenizer = load_dense(args.model, dtype="float32")
    tokens = read_text_tokens(tokenizer, args.text_file)[:args.ppl_tokens + 1]
    started = time.perf_counter()
    gate_up = [layer_weights(args.model, manifest, layer)[0][:2]
               for layer in range(manifest.n_layers)]
    rows = []
    with numpy_linears(model):
        dense = perplexity(model, tokens, tokens.size)
        print(f"dense perplexity {dense:.3f} over {tokens.size - 1} tokens", flush=True)
        for b in [0, *bits]:  # 0: the oracle
            copies = None if b == 0 else [(quantized_copy(g, b), quantized_copy(u, b))
                                          for g, u in gate_up]
            for keep in keeps:
                select = Selector(copies, keep, manifest.ffn.activation)
                with recording(model, manifest, select):
                    ppl = perplexity(model, tokens, tokens.size)
                row = {"selector": "oracle" if b == 0 else f"{b}-bit gate/up", "keep": keep,
                       "mass_kept": float(np.mean(select.mass)), "ppl": ppl,
                       "selector_mib": 0 if b == 0 else selector_mib(manifest, b)}
                rows.append(row)
                print(f"{row['selector']:>14} keep {keep:.0%}: mass {row['mass_kept']:.3f}, "
                      f"ppl {ppl:.3f} ({ppl / dense - 1:+.1%}), selector "
                      f"{row['selector_mib']:.0f} MiB  [{time.perf_counter() - started:.0f} s]",
                      flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"dense_ppl": dense, "rows": rows}, indent=1))
    return 0


def selector_mib(manifest, bits: int, group_size: int = 64) -> float:
    """DRAM of the b-bit gate/up copies of every layer, with 16-bit scales and biases."""
    n, d = manifest.layers[0].n_neurons, manifest.ffn.d_model
    per_layer = 2 * n * (d * bits / 8 + 2 * 2 * d / group_size)
    return per_layer * manifest.n_layers / 2**20


if __name__ == "__main__":
    sys.exit(main())
