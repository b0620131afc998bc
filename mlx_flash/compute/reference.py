"""Pure-MLX references of every kernel: the FFN over cached rows, the window update, quantized rows."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..format.arch import ACTIVATION_FNS
from ..format.manifest import FFNLayout, PartQuant


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

    h = hidden(lambda part: project(part, x, True), layout, n, mask, in_bias)
    return project(q.shape[0] - 1, h, False)  # (T, d)


def hidden(project_in, layout: FFNLayout, n: int, mask: mx.array | None,
           in_bias: mx.array | None) -> mx.array:
    """The down projection's input over n neurons, (T, n): act(gate x) * up x (a plain FFN:
    act(up x)), masked; project_in(i) gives input projection i of x, (T, n)."""
    act = ACTIVATION_FNS[layout.activation]
    first = project_in(0)
    if in_bias is not None:
        first = first + in_bias[0, :n]
    if layout.kind == "gated":
        up = project_in(1)
        if in_bias is not None:
            up = up + in_bias[1, :n]
        h = act(first) * up
    else:
        h = act(first)
    return h if mask is None else h * mask


def unpack_values(q: mx.array, bits: int) -> mx.array:
    """(k, w) packed uint32 (MLX's affine packing) -> (k, w * 32 / bits) float32 integers."""
    ones = mx.ones((q.shape[0], q.shape[1] * 32 // bits // 32), dtype=mx.float32)
    return mx.dequantize(q, ones, mx.zeros_like(ones), group_size=32, bits=bits)


def dequantize_down(q: mx.array, bits: int, group_of: mx.array, scales: mx.array,
                    biases: mx.array) -> mx.array:
    """Columns of a down projection quantized along the neurons -> (k, d): q (k, d * bits /
    32) each column's integers, group_of (k,) int32 its neuron group, scales and biases (n /
    group, d) the layer's table; w = scales[g] * q + biases[g], in the table's dtype."""
    return scales[group_of] * unpack_values(q, bits).astype(scales.dtype) + biases[group_of]


def dequantize_piece(pieces: dict[str, mx.array], name: str, quant: PartQuant,
                     dtype: mx.Dtype) -> mx.array:
    """A format-3 part quantized along d_model (or 16-bit) from its pieces -> (k, d) `dtype`."""
    if not quant.packed:
        return pieces[f"{name}.w"].astype(dtype)
    return mx.dequantize(pieces[f"{name}.q"], pieces[f"{name}.scales"].astype(mx.float32),
                         pieces[f"{name}.biases"].astype(mx.float32),
                         group_size=quant.group_size, bits=quant.bits).astype(dtype)


def ffn_over_parts(x: mx.array, buffers: dict[str, mx.array], n: int, layout: FFNLayout,
                   group_of: mx.array | None = None, down: tuple[mx.array, mx.array] | None = None,
                   mask: mx.array | None = None, in_bias: mx.array | None = None) -> mx.array:
    """The FFN over the first n cached rows of a format-3 layer, each part at its own
    precision (same semantics as ffn_over_rows): x (T, d); buffers: `segments` name -> (1,
    capacity, width); group_of (n,) int32 and down (scales, biases (n / group, d)) for a down
    part quantized along the neurons; mask (T, n); in_bias (P - 1, capacity). -> (T, d)."""
    if n == 0:
        return mx.zeros_like(x)
    names = layout.matrix_names

    def project(name: str, inp: mx.array, transpose: bool) -> mx.array:
        quant = layout.part_quant(name)
        if not quant.packed:
            w = buffers[f"{name}.w"][0, :n].astype(inp.dtype)
            return inp @ (w.T if transpose else w)
        return mx.quantized_matmul(inp, buffers[f"{name}.q"][0, :n],
                                   buffers[f"{name}.scales"][0, :n].astype(inp.dtype),
                                   buffers[f"{name}.biases"][0, :n].astype(inp.dtype),
                                   transpose=transpose, group_size=quant.group_size,
                                   bits=quant.bits)

    h = hidden(lambda part: project(names[part], x, True), layout, n, mask, in_bias)
    quant = layout.part_quant(names[-1])
    if quant.axis != "neurons" or not quant.packed:
        return project(names[-1], h, False)
    w = dequantize_down(buffers[f"{names[-1]}.q"][0, :n], quant.bits, group_of, *down)
    return h @ w.astype(h.dtype)  # (T, d)


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
