"""Pure-MLX references of every kernel: the FFN over cached rows, the window update, quantized rows."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..format.arch import ACTIVATION_FNS
from ..format.manifest import FFNLayout


def dequantize(q: mx.array, scales: mx.array, biases: mx.array, layout: FFNLayout) -> mx.array:
    """(..., k, w) packed rows -> (..., k, d) float32."""
    return mx.dequantize(q, scales.astype(mx.float32), biases.astype(mx.float32),
                         group_size=layout.group_size, bits=layout.bits)


def storage_to_mx(arr: np.ndarray, dtype: str) -> mx.array:
    out = mx.array(np.ascontiguousarray(arr))
    return out.view(mx.bfloat16) if dtype == "bfloat16" else out


def ffn_over_qrows(x: mx.array, q: mx.array, scales: mx.array, biases: mx.array, n: int,
                   layout: FFNLayout, mask: mx.array | None = None,
                   in_bias: mx.array | None = None) -> mx.array:
    """The FFN over the first n quantized cached rows (same semantics as ffn_over_rows).

    x: (T, d); q: (P, capacity, d*bits/32) uint32; scales/biases: (P, capacity, d/group);
    in_bias: (P - 1, capacity) or None; mask: (T, n) or None. Returns (T, d).
    """
    if n == 0:
        return mx.zeros_like(x)
    gs, bits = layout.group_size, layout.bits

    def project(part: int, inp: mx.array, transpose: bool) -> mx.array:
        return mx.quantized_matmul(inp, q[part, :n], scales[part, :n].astype(inp.dtype),
                                   biases[part, :n].astype(inp.dtype), transpose=transpose,
                                   group_size=gs, bits=bits)

    act = ACTIVATION_FNS[layout.activation]
    first = project(0, x, True)  # (T, n)
    if in_bias is not None:
        first = first + in_bias[0, :n]
    if layout.kind == "gated":
        up = project(1, x, True)
        if in_bias is not None:
            up = up + in_bias[1, :n]
        h = act(first) * up
    else:
        h = act(first)
    if mask is not None:
        h = h * mask
    return project(q.shape[0] - 1, h, False)  # (T, d)


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATION_FNS:
        raise ValueError(f"unknown activation {activation!r}; expected one of "
                         f"{sorted(ACTIVATION_FNS)}")


def neuron_activations(x: mx.array, weights: mx.array, n: int, activation: str,
                       in_bias: mx.array | None = None) -> mx.array:
    """Activations of the first n cached neurons.

    x: (T, d); weights: (P, capacity, d); in_bias: (P - 1, capacity) or None.
    Returns h: (T, n), the input of the down projection.
    """
    act = ACTIVATION_FNS[activation]
    gated = weights.shape[0] == 3
    # `weights[p, :n]` is a contiguous (n, d) view of the buffer: the matmuls read it in place
    # (measured: the same time as on a standalone (n, d) array, scripts/bench_kernels.py).
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
    # Down rows are stored (n, d), so this is h @ rows, not mlx_lm's h @ down_proj.T: on this CPU
    # ~20% faster in float32 and ~5% slower in bfloat16 (scripts/bench_kernels.py).
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
