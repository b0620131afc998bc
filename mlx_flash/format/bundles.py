"""Quantized neuron bundles: packing at convert time, unpacking at read time, and the FFN over
quantized cached rows.

Each row (gate_i, up_i, down_i: d_model values) is quantized on its own with MLX's affine
quantization (`mx.quantize`, groups of `group_size` along d_model), so a neuron's bundle is
self-contained and one read gets it all. The cache keeps the rows quantized and the FFN runs
`mx.quantized_matmul` on them: on this CPU that is as fast as the f32 matmul of the same rows
(1.2 ms for 1459 x 896, see BENCHMARKS.md) and the cache holds 4-8x more neurons per byte.

A format-3 layout (`FFNLayout.quant`) stores each part at its own precision, as a quantized
mlx_lm checkpoint holds it (`Carried`: the checkpoint's integers, scales and biases, copied,
never re-quantized); a down part quantized along the neurons keeps only column i's integers in
the bundle, its scales and biases in the layer's resident down table.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .manifest import FFNLayout, PartQuant
from .storage import NP_STORAGE, cast


@dataclass
class Carried:
    """A matrix as a quantized checkpoint stores it, in the checkpoint's orientation (gate/up
    (n, d), down (d, n)): q (r, c) integers in [0, 2**bits), scales and biases (r, c / group)
    float32; w = scales * q + biases."""

    q: np.ndarray
    scales: np.ndarray
    biases: np.ndarray


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """(r, c) integer values in [0, 2**bits) -> (r, c * bits / 32) uint32 in MLX's affine
    packing (a little-endian bit stream per row, for every `bits` mx.quantize supports)."""
    rows, cols = q.shape
    out = np.empty((rows, cols * bits // 32), np.uint32)
    shifts = np.arange(bits, dtype=np.uint8)
    for start in range(0, rows, 4096):  # the bit stream is 8 * bits bytes per value
        block = q[start:start + 4096].astype(np.uint8)
        stream = (block[:, :, None] >> shifts) & 1
        out[start:start + 4096] = np.packbits(stream.reshape(len(block), -1), axis=1,
                                              bitorder="little").view(np.uint32)
    return out


def quantize_rows(rows: np.ndarray, dtype: str, bits: int, group_size: int
                  ) -> tuple[np.ndarray, ...]:
    """rows: (k, d) float32 -> (q (k, d*bits/32) uint32, scales (k, g), biases (k, g)).

    Scales and biases come back in the storage dtype `dtype` (bfloat16 as uint16 bits).
    """
    q, scales, biases = mx.quantize(mx.array(rows), group_size=group_size, bits=bits)
    to_storage = [cast(np.array(a.astype(mx.float32)), "float32", dtype)
                  for a in (scales, biases)]
    return np.array(q), *to_storage


def _part_pieces(name: str, part: np.ndarray | Carried, quant: PartQuant, layout: FFNLayout,
                 start: int, stop: int) -> dict[str, np.ndarray]:
    """One matrix part of neurons [start, stop) as the bundle's pieces (`segments` names)."""
    down = name == "down"
    if isinstance(part, Carried):
        if quant.axis == "neurons":  # column i's integers; the scales go to the DownTable
            return {f"{name}.q": pack_bits(part.q[:, start:stop].T, quant.bits)}
        if down:
            raise ValueError("a carried down part must be quantized along the neurons")
        pieces = {f"{name}.q": pack_bits(part.q[start:stop], quant.bits)}
        for kind in ("scales", "biases"):
            pieces[f"{name}.{kind}"] = cast(getattr(part, kind)[start:stop], "float32",
                                            layout.dtype)
        return pieces
    rows = part[:, start:stop].T if down else part[start:stop]
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if not quant.packed:
        return {f"{name}.w": cast(rows, "float32", layout.dtype)}
    if quant.axis == "neurons":
        raise ValueError(f"{name}: only a checkpoint's own blocks are stored along the neurons")
    q, scales, biases = quantize_rows(rows, layout.dtype, quant.bits, quant.group_size)
    return {f"{name}.q": q, f"{name}.scales": scales, f"{name}.biases": biases}


def pack_bundles(parts: dict[str, np.ndarray | Carried], layout: FFNLayout, start: int,
                 stop: int, stride: int) -> np.ndarray:
    """Quantized bundles of neurons [start, stop) as (k, stride) uint8.

    parts: role -> float32 tensor ("gate"/"up" (n, d), "down" (d, n), "*_bias" (n,)) or, for
    a matrix the source stores quantized as this layout keeps it, `Carried`.
    """
    k = stop - start
    pieces: dict[str, np.ndarray] = {}
    for name in layout.matrix_names:
        pieces.update(_part_pieces(name, parts[name], layout.part_quant(name), layout, start,
                                   stop))
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


def unpack_pieces(rows: np.ndarray, layout: FFNLayout) -> dict[str, np.ndarray]:
    """(k, stride) uint8 -> each `segments` piece (k, count) in its storage dtype."""
    pieces, offset = {}, 0
    for name, dtype, count in layout.segments():
        nbytes = count * NP_STORAGE[dtype].itemsize
        pieces[name] = rows[:, offset:offset + nbytes].copy().view(NP_STORAGE[dtype])
        offset += nbytes
    return pieces


def unpack_bundles(rows: np.ndarray, layout: FFNLayout) -> dict[str, np.ndarray]:
    """(k, stride) uint8 -> {"q": (P, k, w) uint32, "scales"/"biases": (P, k, g), "bias":
    (nb, k) or absent}, in storage dtypes (numpy views where possible)."""
    pieces = unpack_pieces(rows, layout)
    names = layout.matrix_names
    out = {kind: np.stack([pieces[f"{m}.{kind}"] for m in names])
           for kind in ("q", "scales", "biases")}
    if layout.bias_names:
        out["bias"] = np.stack([pieces[b][:, 0] for b in layout.bias_names])
    return out
