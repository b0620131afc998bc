"""The embedding table kept on flash: one row read per token."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..format.manifest import RESIDENT, Manifest, dequantize_rows, resident_quantization
from ..format.storage import tensor_sizes, to_f32
from .rows import to_mx

EMBED = "model.embed_tokens"


class FlashEmbedding(nn.Module):
    """An embedding table left in resident.safetensors: one row read per token (16-bit rows
    widened, or a quantized table's packed row, scales and biases dequantized)."""

    def __init__(self, path: Path, dtype: mx.Dtype, quant: dict | None = None):
        super().__init__()
        entries = tensor_sizes(path)
        self._dtype, self._quant = dtype, quant
        names = ("weight", "scales", "biases") if quant else ("weight",)
        self._tables = [entries[f"{EMBED}.{k}"].memmap(path) for k in names]
        self._storage = [entries[f"{EMBED}.{k}"].dtype for k in names]
        self._shape = entries[f"{EMBED}.weight"].shape

    def __call__(self, ids: mx.array) -> mx.array:
        flat = np.array(ids).reshape(-1)  # np.array evaluates the ids: needed now
        if self._quant is None:
            rows = to_mx(np.asarray(self._tables[0][flat]), self._storage[0], self._dtype)
        else:
            packed, scales, biases = (np.asarray(t[flat]) for t in self._tables)
            rows = mx.array(dequantize_rows(packed, to_f32(scales, self._storage[1]),
                                            to_f32(biases, self._storage[2]),
                                            self._quant["bits"], self._quant["group_size"]),
                            dtype=self._dtype)
        return rows.reshape(*ids.shape, rows.shape[-1])

    def as_linear(self, x: mx.array) -> mx.array:
        raise ValueError("this model ties lm_head to the embedding table, which then must stay "
                         "resident: load with embed_on_flash=False")


def flash_embedding(root: Path, manifest: Manifest, dtype: mx.Dtype) -> FlashEmbedding:
    """The embedding table left in resident.safetensors, read (or paged in) row by row."""
    return FlashEmbedding(root / RESIDENT, dtype, resident_quantization(manifest).get(EMBED))


def embedding_tensors(manifest: Manifest) -> tuple[str, ...]:
    """The resident tensors of the embedding table (what load skips when it stays on flash)."""
    parts = ("weight", "scales", "biases") if EMBED in resident_quantization(manifest) \
        else ("weight",)
    return tuple(f"{EMBED}.{k}" for k in parts)
