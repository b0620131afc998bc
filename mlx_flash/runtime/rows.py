"""Raw bundle rows (bytes as read) -> MLX arrays in the compute dtype: the MLX path's neuron
cache buffers and the dense weights of streamed chunks."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..compute.reference import dequantize, dequantize_down, dequantize_piece, storage_to_mx
from ..format.bundles import unpack_bundles, unpack_pieces
from ..format.manifest import FFNLayout, Manifest
from .store import bundles_as


@dataclass
class DownTable:
    """A layer's down scales and biases when its down part is quantized along the neurons
    (format 3, `down_table_names`): (n / group_size, d) each in the compute dtype."""

    scales: mx.array
    biases: mx.array
    group_size: int
    host: tuple | None = None  # the fast CPU path's numpy views of the tables' bits (made once)

    def group_of(self, ids: np.ndarray) -> mx.array:
        """(k,) neuron ids -> (k,) int32 rows of the table."""
        return mx.array((np.asarray(ids) // self.group_size).astype(np.int32))


def split_bundles(rows: np.ndarray, manifest: Manifest, dtype: mx.Dtype, layer: int = 0,
                  ids: np.ndarray | None = None, down: DownTable | None = None,
                  activations_only: bool = False) -> tuple[mx.array, mx.array | None]:
    """Raw bundle rows of layer `layer` -> dense part-major weights and biases in the compute
    dtype.

    rows: (k, stride) uint8. Returns weights (P, k, d) and biases (P - 1, k) or None.
    Quantized bundles are dequantized (the oracle, prefill streaming and load_dense use this).
    A format-3 layer whose down part is quantized along the neurons needs the rows' ids (k,)
    and the layer's `down` table; activations_only: the caller reads gate/up only (the
    selectors), the down part then comes back zero.
    """
    layout = manifest.layer_layout(layer)
    if layout.per_part:
        return _split_parts(rows, layout, dtype, ids, down, activations_only)
    if layout.quantized:
        parts = cache_rows(rows, manifest, mx.float32)
        weights = dequantize(parts["q"], parts["scales"], parts["biases"], layout)
        bias = parts["bias"][:, :, 0] if "bias" in parts else None
        return weights.astype(dtype), None if bias is None else bias.astype(dtype)
    elems = bundles_as(rows, manifest)  # (k, stride / itemsize), storage dtype
    d, n_parts = layout.d_model, len(layout.matrix_names)
    weights = elems[:, : n_parts * d].reshape(-1, n_parts, d).transpose(1, 0, 2)
    bias_parts = [p for p in layout.parts if p.name.endswith("_bias")]
    biases = elems[:, [p.offset for p in bias_parts]].T if bias_parts else None
    return to_mx(weights, layout.dtype, dtype), (to_mx(biases, layout.dtype, dtype)
                                                 if biases is not None else None)


def _split_parts(rows: np.ndarray, layout: FFNLayout, dtype: mx.Dtype, ids: np.ndarray | None,
                 down: DownTable | None, activations_only: bool
                 ) -> tuple[mx.array, mx.array | None]:
    """split_bundles of a format-3 layer."""
    pieces = cache_pieces(rows, layout, dtype)
    out = []
    for name in layout.matrix_names:
        quant = layout.part_quant(name)
        if quant.packed and quant.axis == "neurons":
            if activations_only:
                out.append(mx.zeros((len(rows), layout.d_model), dtype=dtype))
                continue
            if down is None or ids is None:
                raise ValueError("a down part quantized along the neurons needs the layer's "
                                 "down table and the rows' ids")
            out.append(dequantize_down(pieces[f"{name}.q"][0], quant.bits, down.group_of(ids),
                                       down.scales, down.biases).astype(dtype))
        else:
            out.append(dequantize_piece({k: v[0] for k, v in pieces.items()}, name, quant,
                                        dtype))
    bias = pieces["bias"][:, :, 0] if "bias" in pieces else None
    return mx.stack(out), bias


def cache_pieces(rows: np.ndarray, layout: FFNLayout, dtype: mx.Dtype) -> dict[str, mx.array]:
    """Format-3 bundle rows -> each `segments` piece (1, k, width) (floats in `dtype`), and
    "bias" (P - 1, k, 1) when the FFN has input biases: the neuron cache's buffers' rows."""
    pieces = unpack_pieces(rows, layout)
    out = {}
    for name, storage, _ in layout.segments():
        if name in layout.bias_names:
            continue
        arr = mx.array(pieces[name]) if storage == "uint32" else \
            storage_to_mx(pieces[name], storage).astype(dtype)
        out[name] = arr[None]
    if layout.bias_names:
        out["bias"] = mx.stack([storage_to_mx(pieces[b], layout.dtype).astype(dtype)
                                for b in layout.bias_names])
    return out


def cache_rows(rows: np.ndarray, manifest: Manifest, dtype: mx.Dtype, layer: int = 0
               ) -> dict[str, mx.array]:
    """Raw bundle rows of layer `layer` -> the arrays the neuron cache keeps, keyed like its
    buffers (`cache_buffers`).

    16-bit: {"w": (P, k, d)}; quantized: {"q": (P, k, w) uint32, "scales"/"biases": (P, k, g)};
    format 3: each `segments` piece (1, k, width) under its own name; plus {"bias": (P - 1,
    k, 1)} when the FFN has input biases. Floats are in `dtype`.
    """
    layout = manifest.layer_layout(layer)
    if layout.per_part:
        return cache_pieces(rows, layout, dtype)
    if not layout.quantized:
        weights, bias = split_bundles(rows, manifest, dtype)
        out = {"w": weights}
        if bias is not None:
            out["bias"] = bias[:, :, None]
        return out
    parts = unpack_bundles(rows, layout)
    out = {"q": mx.array(parts["q"])}
    for kind in ("scales", "biases", "bias"):
        if kind in parts:
            out[kind] = storage_to_mx(parts[kind], layout.dtype).astype(dtype)
    if "bias" in out:
        out["bias"] = out["bias"][:, :, None]
    return out


def cache_buffers(layout: FFNLayout, dtype: mx.Dtype) -> dict[str, tuple[int, int, mx.Dtype]]:
    """The neuron cache's buffers for this layout: name -> (parts, width, dtype); format 3:
    one buffer per `segments` piece."""
    n_parts, n_bias = len(layout.matrix_names), len(layout.bias_names)
    if layout.per_part:
        out = {name: (1, count, mx.uint32 if storage == "uint32" else dtype)
               for name, storage, count in layout.segments() if name not in layout.bias_names}
    elif layout.quantized:
        groups = layout.d_model // layout.group_size
        out = {"q": (n_parts, layout.d_model * layout.bits // 32, mx.uint32),
               "scales": (n_parts, groups, dtype), "biases": (n_parts, groups, dtype)}
    else:
        out = {"w": (n_parts, layout.d_model, dtype)}
    if n_bias:
        out["bias"] = (n_bias, 1, dtype)
    return out


def to_mx(arr: np.ndarray, storage: str, dtype: mx.Dtype) -> mx.array:
    """numpy storage-dtype array (bfloat16 as uint16 bits) -> mx.array of `dtype`."""
    return storage_to_mx(arr, storage).astype(dtype)
