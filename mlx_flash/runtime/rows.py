"""Raw bundle rows (bytes as read) -> MLX arrays in the compute dtype: the MLX path's neuron
cache buffers and the dense weights of streamed chunks."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..compute.reference import dequantize, storage_to_mx
from ..format.bundles import unpack_bundles
from ..format.manifest import FFNLayout, Manifest
from .store import bundles_as


def split_bundles(rows: np.ndarray, manifest: Manifest, dtype: mx.Dtype
                  ) -> tuple[mx.array, mx.array | None]:
    """Raw bundle rows -> dense part-major weights and biases in the compute dtype.

    rows: (k, stride) uint8. Returns weights (P, k, d) and biases (P - 1, k) or None.
    Quantized bundles are dequantized (the oracle, prefill streaming and load_dense use this).
    """
    layout = manifest.ffn
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


def cache_rows(rows: np.ndarray, manifest: Manifest, dtype: mx.Dtype) -> dict[str, mx.array]:
    """Raw bundle rows -> the arrays the neuron cache keeps, keyed like its buffers.

    16-bit: {"w": (P, k, d)}; quantized: {"q": (P, k, w) uint32, "scales"/"biases": (P, k, g)};
    plus {"bias": (P - 1, k, 1)} when the FFN has input biases. Floats are in `dtype`.
    """
    layout = manifest.ffn
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
    """The neuron cache's buffers for this layout: name -> (parts, width, dtype)."""
    n_parts, n_bias = len(layout.matrix_names), len(layout.bias_names)
    if layout.quantized:
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
