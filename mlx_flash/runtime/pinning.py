"""Pinning hot neurons in the neuron caches for the whole run."""

from __future__ import annotations

import numpy as np

from ..compute.gpu import apply_window_update
from .rows import cache_rows


def pin_hot(model, count: int) -> int:
    """Pin each layer's `count` most frequently active neurons (manifest `hot` lists) in its
    neuron cache for the whole run; returns the neurons pinned per layer.

    Needs a placed dir (`mlx-flash place`) and room: count <= capacity / 2.
    """
    runtime = model.flash
    manifest = runtime.manifest
    if any(e.hot is None for e in manifest.layers):
        raise ValueError(f"{runtime.store.root}: no hot-neuron lists in the manifest; run "
                         "`mlx-flash place DIR --calibration CALIB` first, or do not pin")
    for i, layer in enumerate(model.layers):
        cache = layer.mlp.cache
        ids = np.sort(np.asarray(manifest.layers[i].hot[:count], dtype=np.int64))
        slots = cache.pin(ids)
        rows, _ = runtime.store.read(i, ids)
        _fill_slots(runtime, cache, slots, rows)
    return count


def _fill_slots(runtime, cache, slots: np.ndarray, rows: np.ndarray) -> None:
    """Write raw bundle rows (k, stride) into `slots` of a cache, as FlashFFN's update does."""
    empty = np.zeros(0, dtype=np.int64)
    if getattr(runtime, "fast", None) is not None:  # the fast CPU path's numpy buffers
        runtime.fast.update(cache.buffers, empty, empty, slots, rows)
        return
    import mlx.core as mx

    new = cache_rows(rows, runtime.manifest, runtime.dtype)
    none, at = mx.array(empty.astype(np.int32)), mx.array(slots.astype(np.int32))
    for name, buffer in cache.buffers.items():
        cache.buffers[name] = apply_window_update(buffer, none, none, at, new[name])
    mx.eval(*cache.buffers.values())  # load the pinned rows now, not in the first token
