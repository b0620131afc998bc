"""Quantized neuron bundles: packing at convert time, unpacking at read time, and the FFN over
quantized cached rows.

Each row (gate_i, up_i, down_i: d_model values) is quantized on its own with MLX's affine
quantization (`mx.quantize`, groups of `group_size` along d_model), so a neuron's bundle is
self-contained and one read gets it all. The cache keeps the rows quantized and the FFN runs
`mx.quantized_matmul` on them: on this CPU that is as fast as the f32 matmul of the same rows
(1.2 ms for 1459 x 896, see BENCHMARKS.md) and the cache holds 4-8x more neurons per byte.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .manifest import FFNLayout
from .storage import NP_STORAGE, cast


def quantize_rows(rows: np.ndarray, layout: FFNLayout) -> tuple[np.ndarray, ...]:
    """rows: (k, d) float32 -> (q (k, d*bits/32) uint32, scales (k, g), biases (k, g)).

    Scales and biases come back in the layout's storage dtype (bfloat16 as uint16 bits).
    """
    q, scales, biases = mx.quantize(mx.array(rows), group_size=layout.group_size,
                                    bits=layout.bits)
    to_storage = [cast(np.array(a.astype(mx.float32)), "float32", layout.dtype)
                  for a in (scales, biases)]
    return np.array(q), *to_storage


def pack_bundles(parts: dict[str, np.ndarray], layout: FFNLayout, start: int, stop: int,
                 stride: int) -> np.ndarray:
    """Quantized bundles of neurons [start, stop) as (k, stride) uint8.

    parts: role -> float32 tensor; "gate"/"up" (n, d), "down" (d, n), "*_bias" (n,).
    """
    k = stop - start
    pieces: dict[str, np.ndarray] = {}
    for name in layout.matrix_names:
        rows = parts[name][:, start:stop].T if name == "down" else parts[name][start:stop]
        q, scales, biases = quantize_rows(np.ascontiguousarray(rows, dtype=np.float32), layout)
        pieces.update({f"{name}.q": q, f"{name}.scales": scales, f"{name}.biases": biases})
    for name in layout.bias_names:
        pieces[name] = cast(parts[name][start:stop, None].astype(np.float32), "float32",
                            layout.dtype)
    out = np.zeros((k, stride), dtype=np.uint8)
    offset = 0
    for name, _, _ in layout.segments():
        block = np.ascontiguousarray(pieces[name]).view(np.uint8).reshape(k, -1)
        out[:, offset:offset + block.shape[1]] = block
        offset += block.shape[1]
    return out


def unpack_bundles(rows: np.ndarray, layout: FFNLayout) -> dict[str, np.ndarray]:
    """(k, stride) uint8 -> {"q": (P, k, w) uint32, "scales"/"biases": (P, k, g), "bias":
    (nb, k) or absent}, in storage dtypes (numpy views where possible)."""
    pieces, offset = {}, 0
    for name, dtype, count in layout.segments():
        nbytes = count * NP_STORAGE[dtype].itemsize
        pieces[name] = rows[:, offset:offset + nbytes].copy().view(NP_STORAGE[dtype])
        offset += nbytes
    names = layout.matrix_names
    out = {kind: np.stack([pieces[f"{m}.{kind}"] for m in names])
           for kind in ("q", "scales", "biases")}
    if layout.bias_names:
        out["bias"] = np.stack([pieces[b][:, 0] for b in layout.bias_names])
    return out
