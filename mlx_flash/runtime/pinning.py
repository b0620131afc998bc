"""Pinning hot neurons in the neuron caches for the whole run."""

from __future__ import annotations

import numpy as np


def pin_hot(model, count: int) -> int:
    """Pin each layer's `count` most frequently active neurons (manifest `hot` lists) in its
    neuron cache for the whole run; returns the neurons pinned per layer.

    Needs a placed dir (`mlx-flash place`) and room: count <= capacity / 2. All or nothing:
    if a read fails every cache is left empty and unpinned and the error raised.
    """
    runtime = model.flash
    manifest = runtime.manifest
    if any(e.hot is None for e in manifest.layers):
        raise ValueError(f"{runtime.store.root}: no hot-neuron lists in the manifest; run "
                         "`mlx-flash place DIR --calibration CALIB` first, or do not pin")
    pinned = []  # the caches this call pinned
    try:
        for i, layer in enumerate(model.layers):
            cache = layer.mlp.cache
            ids = np.sort(np.asarray(manifest.layers[i].hot[:count], dtype=np.int64))
            rows, _ = runtime.store.read(i, ids)  # before the cache records them
            slots = cache.pin(ids)
            pinned.append(cache)
            empty = np.zeros(0, dtype=np.int64)  # no row moves: the cache is empty
            runtime.backend.write_rows(cache, empty, empty, slots, rows)
    except BaseException:  # a failed read (or update): no layer keeps a pin, all or nothing
        for cache in pinned:
            cache.reset(unpin=True)
        raise
    return count
