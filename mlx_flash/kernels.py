"""The FFN over cached neuron rows, and the window update of the cache buffer.

The neuron cache keeps each layer's rows part-major: `weights` is `(P, capacity, d_model)` where
P = 3 for a gated FFN (gate, up, down rows) and 2 for a plain one (up, down). Slot s of every part
belongs to the same neuron, so `weights[p, :n]` is a contiguous matrix of the first n cached
neurons. Biases of the input projections, when the FFN has them, are `(P - 1, capacity)`.

The functions here are the pure-MLX reference: the definition of correct, and what runs on CPU.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def relu2(x: mx.array) -> mx.array:
    return mx.square(nn.relu(x))


ACTIVATION_FNS = {
    "silu": nn.silu,
    "gelu": nn.gelu,
    "gelu_approx": nn.gelu_approx,
    "relu": nn.relu,
    "relu2": relu2,
}


def neuron_activations(x: mx.array, weights: mx.array, n: int, activation: str,
                       in_bias: mx.array | None = None) -> mx.array:
    """Activations of the first n cached neurons.

    x: (T, d); weights: (P, capacity, d); in_bias: (P - 1, capacity) or None.
    Returns h: (T, n), the input of the down projection.
    """
    act = ACTIVATION_FNS[activation]
    gated = weights.shape[0] == 3
    first = x @ weights[0, :n].T  # (T, n)
    if in_bias is not None:
        first = first + in_bias[0, :n]
    if not gated:
        return act(first)
    up = x @ weights[1, :n].T  # (T, n)
    if in_bias is not None:
        up = up + in_bias[1, :n]
    return act(first) * up


def ffn_over_rows(x: mx.array, weights: mx.array, n: int, activation: str,
                  mask: mx.array | None = None, in_bias: mx.array | None = None) -> mx.array:
    """y = down^T (act(gate x) * up x * mask) over the first n cached neurons.

    x: (T, d); weights: (P, capacity, d); mask: (T, n) or (n,) of 0/1 in x's dtype, or None for
    all n rows. Returns (T, d) in x's dtype. n == 0 gives zeros.
    """
    if n == 0:
        return mx.zeros_like(x)
    h = neuron_activations(x, weights, n, activation, in_bias)
    if mask is not None:
        h = h * mask
    return h @ weights[-1, :n]  # (T, d)


def window_update(weights: mx.array, dst: mx.array, src: mx.array, slots: mx.array,
                  rows: mx.array) -> mx.array:
    """Swap-delete then append-insert, in that order.

    weights: (P, capacity, d). dst/src: (m,) int32 - row src[j] moves into hole dst[j] (the
    last live rows fill the holes left by evicted neurons). slots: (k,) int32, rows: (P, k, d) -
    new neurons written at the end of the live region. Returns the updated buffer.
    """
    if dst.size:
        weights[:, dst] = weights[:, src]
    if slots.size:
        weights[:, slots] = rows.astype(weights.dtype)
    return weights
