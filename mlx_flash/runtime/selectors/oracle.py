"""The oracle selector: reads every row to compute the true activations (exact; the test reference)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ...compute.reference import neuron_activations
from ...format.manifest import Manifest
from ..config import ORACLE_RULES, check_fraction
from ..rows import split_bundles
from ..store import IOStats, NeuronStore
from .base import Selection, top_ids


class OracleSelector:
    """Exact active sets from the true activations (reads all of a layer's rows).

    rule: "all" (every neuron), "nonzero" (activation != 0; exact for ReLU-family FFNs), or
    "top" (the `keep` fraction of neurons with the largest |activation|). This is the reference
    for tests and the mode without predictors; it reads the whole layer every token, so it is
    not a fast mode.
    """

    def __init__(self, store: NeuronStore, manifest: Manifest, rule: str = "all",
                 keep: float = 1.0, dtype: mx.Dtype = mx.float32, chunk: int = 4096):
        if rule not in ORACLE_RULES:
            raise ValueError(f"oracle rule must be one of {ORACLE_RULES}, got {rule!r}")
        check_fraction("keep", keep)
        self.store, self.manifest, self.rule, self.keep = store, manifest, rule, keep
        self.dtype, self.chunk = dtype, chunk

    @property
    def fixed(self) -> bool:
        """Whether every call selects the same neurons (the runtime then reads ahead across
        layers)."""
        return self.rule == "all"

    def select(self, layer: int, x: mx.array) -> Selection:
        """x: (T, d) evaluated. Returns each token's active ids."""
        n = self.manifest.layers[layer].n_neurons
        if self.rule == "all":
            return Selection([np.arange(n)] * x.shape[0])
        h, io = self.activations(layer, x)
        return Selection([self._pick(row) for row in np.abs(h)], io)

    def activations(self, layer: int, x: mx.array) -> tuple[np.ndarray, IOStats]:
        """True activations of every neuron: (T, n) float32, and the I/O it took."""
        return layer_activations(self.store, self.manifest, layer, x, self.dtype, self.chunk)

    def _pick(self, magnitude: np.ndarray) -> np.ndarray:
        if self.rule == "nonzero":
            ids = np.nonzero(magnitude)[0]
            return ids[np.argsort(-magnitude[ids], kind="stable")]
        return top_ids(magnitude, self.keep)


def rows_activations(x: mx.array, rows: np.ndarray, manifest: Manifest, dtype: mx.Dtype,
                     layer: int) -> np.ndarray:
    """True activations of the neurons whose raw bundles of `layer` are `rows`: x (T, d), rows
    (k, stride) uint8 -> (T, k) float32, evaluated."""
    weights, bias = split_bundles(rows, manifest, dtype, layer, activations_only=True)
    h = neuron_activations(x, weights, weights.shape[1], manifest.ffn.activation, bias)
    return np.array(h.astype(mx.float32))  # np.array evaluates: needed now


def layer_activations(store: NeuronStore, manifest: Manifest, layer: int, x: mx.array,
                      dtype: mx.Dtype, chunk: int = 4096) -> tuple[np.ndarray, IOStats]:
    """True activations of every neuron of `layer`, its whole FFN read in file order: x (T, d)
    -> (T, n) float32, and the I/O it took."""
    n, io = manifest.layers[layer].n_neurons, IOStats()
    out = np.empty((x.shape[0], n), dtype=np.float32)
    for ids, rows, stats in store.iter_layer(layer, chunk):
        io.add(stats)
        out[:, ids] = rows_activations(x, rows, manifest, dtype, layer)
    return out, io
