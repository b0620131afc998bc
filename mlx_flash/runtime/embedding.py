"""The embedding table kept on flash: one row read per token."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..format.manifest import RESIDENT
from ..format.storage import NP_STORAGE, tensor_sizes
from .rows import to_mx


class FlashEmbedding(nn.Module):
    """An embedding table left in resident.safetensors: one row read per token."""

    def __init__(self, path: Path, offset: int, shape: tuple[int, int], storage: str,
                 dtype: mx.Dtype):
        super().__init__()
        self._path, self._offset, self._shape = path, offset, shape
        self._storage, self._dtype = storage, dtype
        self._table = np.memmap(path, mode="r", offset=offset, shape=shape,
                                dtype=NP_STORAGE[storage])

    def __call__(self, ids: mx.array) -> mx.array:
        rows = self._table[np.array(ids).reshape(-1)]  # np.array evaluates the ids: needed now
        return to_mx(rows, self._storage, self._dtype).reshape(*ids.shape, self._shape[1])

    def as_linear(self, x: mx.array) -> mx.array:
        raise ValueError("this model ties lm_head to the embedding table, which then must stay "
                         "resident: load with embed_on_flash=False")


def flash_embedding(root: Path, dtype: mx.Dtype) -> FlashEmbedding:
    """The embedding table left in resident.safetensors, read (or paged in) row by row."""
    shape, offset, _, storage = tensor_sizes(root / RESIDENT)["model.embed_tokens.weight"]
    return FlashEmbedding(root / RESIDENT, offset, shape, storage, dtype)
