"""The quantized-copy selector: a 4-bit copy of each layer's input projections in DRAM scores
every neuron; each token's top `keep` fraction is what FlashFFN reads from flash.

Trained low-rank predictors cannot rank SwiGLU neurons well: on the default model the
rank-128 one needs 97% of the neurons to keep perplexity (BENCHMARKS.md, issue 4). The FFN's own
gate/up rows quantized to 4 bits (MLX's affine quantization, groups of 64) rank them like the
true activations: keeping each token's top 50% by |act(g^ x) * (u^ x)| gave perplexity 13.88
against 13.95 dense and 13.85 for the oracle's top 50% (`scripts/quant_selector_probe.py`).
The copy costs ~a fifth of the FFN's 16-bit bytes in DRAM (125 MiB for the default model, f32
scales and biases included) and is built at load from the bundles themselves: no training, no
calibration data.

Scores are the load's CacheBackend's `quantized_matmul` (`linear_q` on the fast CPU path,
`mx.quantized_matmul` elsewhere); selection is per token (`top_ids`: top k by score, best
first), like the oracle's "top" rule.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ...accel.linear import to_f32_rows
from ...format.arch import np_activation
from ...format.manifest import Manifest
from ..config import check_fraction
from ..rows import split_bundles
from ..store import NeuronStore
from .base import Selection, top_ids

BITS, GROUP_SIZE = 4, 64


def selector_bytes(manifest: Manifest) -> int:
    """DRAM the copies of every layer take: packed rows, f32 scales and biases."""
    parts = 2 if manifest.ffn.kind == "gated" else 1
    d = manifest.ffn.d_model
    rows = parts * sum(layer.n_neurons for layer in manifest.layers)
    return rows * (d * BITS // 8 + 2 * 4 * (d // GROUP_SIZE) + 4 * bool(manifest.ffn.bias_names))


DEFAULT_KEEP = 0.5  # measured: perplexity within noise of dense on the default model


class QuantCopySelector:
    """FlashFFN's selector from b-bit copies of the input projections (see the module doc)."""

    def __init__(self, store: NeuronStore, manifest: Manifest, backend,
                 keep: float = DEFAULT_KEEP, chunk: int = 1024):
        """backend: the load's CacheBackend; it keeps the copies and multiplies by them."""
        check_fraction("keep", keep)
        if manifest.ffn.d_model % GROUP_SIZE:
            raise ValueError(f"the quantized-copy selector needs d_model divisible by "
                             f"{GROUP_SIZE}, got {manifest.ffn.d_model}; use --selector oracle")
        self.manifest, self.keep, self.backend = manifest, keep, backend
        self.parts = 2 if manifest.ffn.kind == "gated" else 1
        self.activation = manifest.ffn.activation
        self.layers = [self._copy(store, layer, chunk) for layer in range(manifest.n_layers)]

    def _copy(self, store: NeuronStore, layer: int, chunk: int) -> dict[str, object]:
        """One layer's copy: rows [part 0 of neurons 0..n-1, part 1 of 0..n-1] quantized."""
        n, d = self.manifest.layers[layer].n_neurons, self.manifest.ffn.d_model
        q = np.zeros((self.parts * n, d * BITS // 32), dtype=np.uint32)
        scales = np.zeros((self.parts * n, d // GROUP_SIZE), dtype=np.float32)
        biases = np.zeros_like(scales)
        in_bias = None
        for ids, rows, _ in store.iter_layer(layer, chunk):
            weights, bias = split_bundles(rows, self.manifest, mx.float32, layer,
                                          activations_only=True)  # (P, k, d), down unused
            for part in range(self.parts):
                wq, s, b = mx.quantize(weights[part], group_size=GROUP_SIZE, bits=BITS)
                at = part * n + ids
                q[at], scales[at], biases[at] = np.asarray(wq), np.asarray(s), np.asarray(b)
            if bias is not None:
                if in_bias is None:
                    in_bias = np.zeros(self.parts * n, dtype=np.float32)
                for part in range(self.parts):
                    in_bias[part * n + ids] = np.asarray(bias[part].astype(mx.float32))
        return self.backend.quantized_rows({"q": q, "scales": scales, "biases": biases,
                                            "bias": in_bias})

    def scores(self, layer: int, x: np.ndarray) -> np.ndarray:
        """x: (T, d) f32 -> (T, n) estimated |activation| of every neuron."""
        pre = self.backend.quantized_matmul(self.layers[layer], x, BITS, GROUP_SIZE)
        n = pre.shape[1] // self.parts
        h = np_activation(self.activation, pre[:, :n])
        return np.abs(h * pre[:, n:] if self.parts == 2 else h)

    def select(self, layer: int, x: mx.array) -> Selection:
        """x: (T, d) evaluated -> each token's top `keep` neurons, best first."""
        return Selection([top_ids(z, self.keep) for z in self.scores(layer, to_f32_rows(x))])

