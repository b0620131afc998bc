"""NeuronCache: one layer's preallocated DRAM buffer of neuron rows, and the sliding window.

State (all allocated once, at construction):
  buffers     name -> (parts, capacity, width) arrays, slot s of each holding neuron_of[s]:
              "w" (P, capacity, d_model) rows, part-major (see compute/gpu.py), or for quantized
              bundles "q" / "scales" / "biases"; "bias" (P - 1, capacity, 1) input biases
  slot_of     (n_neurons,) slot of each neuron, -1 when not cached
  neuron_of   (capacity,) neuron in each slot; only the first `n` slots are live
  last_step   (capacity,) the last token step at which the slot's neuron was active

A token's `advance(ids)` keeps every neuron active in the last `window` steps. Neurons that left
the window are evicted by moving the last live rows into their holes (swap-delete), the new ones
are appended after the live rows (append-insert), so the live rows are always `[:n]` and the FFN
is one compact matmul. When the window's union is larger than the capacity, the least recently
active neurons go first. The index math here is numpy; the row moves happen in
`compute.gpu.apply_window_update` (or the fast path's update) on the plan that `advance`
returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

PINNED_STEP = np.iinfo(np.int64).max // 2  # last_step of a pinned slot: never leaves the window


@dataclass
class WindowPlan:
    """What one `advance` decided: row moves, then new neurons to read into `slots`."""

    dst: np.ndarray  # (m,) holes in the live region, filled from...
    src: np.ndarray  # (m,) ...the last live rows
    slots: np.ndarray  # (k,) where the new neurons go
    new_ids: np.ndarray  # (k,) neurons to read from flash, ascending
    evicted: int
    hits: int  # active neurons already cached
    truncated: int  # active neurons that did not fit (FlashFFN streams them instead)
    dropped: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # those ids


class NeuronCache:
    """Per-layer cache of neuron rows with a sliding window of `window` tokens."""

    def __init__(self, n_neurons: int, capacity: int, n_parts: int, d_model: int,
                 dtype: mx.Dtype, window: int, n_bias: int = 0,
                 buffers: dict[str, tuple[int, int, mx.Dtype]] | None = None,
                 zeros: Callable[[tuple[int, int, int], mx.Dtype], object] | None = None):
        """buffers: name -> (parts, width, dtype); default one "w" buffer of d_model-wide
        rows (and "bias" when n_bias). zeros(shape, dtype) allocates a buffer (default
        mx.zeros; the fast CPU path passes numpy's)."""
        if not 1 <= capacity <= n_neurons:
            raise ValueError(f"cache capacity must be in [1, {n_neurons}], got {capacity}")
        if window < 1:
            raise ValueError(f"window must be >= 1 token, got {window}")
        self.n_neurons, self.capacity, self.window = n_neurons, capacity, window
        if buffers is None:
            buffers = {"w": (n_parts, d_model, dtype)}
            if n_bias:
                buffers["bias"] = (n_bias, 1, dtype)
        zeros = zeros or (lambda shape, dt: mx.zeros(shape, dtype=dt))
        self.buffers = {name: zeros((parts, capacity, width), dt)
                        for name, (parts, width, dt) in buffers.items()}
        self.layer = 0  # which layer's rows it holds (the backend's new_cache sets it)
        self.down = None  # the layer's DownTable (rows.py) when down is stored along neurons
        self.slot_of = np.full(n_neurons, -1, dtype=np.int64)
        self.neuron_of = np.full(capacity, -1, dtype=np.int64)
        self.last_step = np.zeros(capacity, dtype=np.int64)
        self.n = 0
        self.step = 0
        self.pinned = 0  # slots [0, pinned) hold pinned neurons, never evicted

    @property
    def weights(self) -> mx.array:
        return self.buffers["w"]

    @weights.setter
    def weights(self, value: mx.array) -> None:
        self.buffers["w"] = value

    @property
    def bias(self) -> mx.array | None:
        """(P - 1, capacity) input-projection biases, or None."""
        return self.buffers["bias"][:, :, 0] if "bias" in self.buffers else None

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers.values())

    def slots(self, ids: np.ndarray) -> np.ndarray:
        """Slots of cached neurons `ids` (every id must be cached)."""
        slots = self.slot_of[ids]
        assert (slots >= 0).all(), "asked for the slot of a neuron that is not cached"
        return slots

    def advance(self, ids: np.ndarray) -> WindowPlan:
        """Make this token's active `ids` (priority order, best first) cached; plan the moves.

        ids: (k,) unique neuron ids. If k exceeds the capacity the lowest-priority ids are
        dropped (counted in `truncated`).
        """
        self.step += 1
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size == self.n == self.n_neurons:  # every neuron, all cached: nothing moves
            self.last_step[self.pinned:self.n] = self.step
            none = ids[:0]
            return WindowPlan(none, none, none, none, 0, self.n, 0, none)
        slots = self.slot_of[ids]
        dropped = ids[:0]
        if ids.size > self.capacity - self.pinned:  # else everything fits
            pinned = (slots >= 0) & (slots < self.pinned)
            # Pinned ids are free; the others share what the pinned slots leave, best first.
            fits = pinned | (np.cumsum(~pinned) <= self.capacity - self.pinned)
            dropped = ids[~fits]
            ids, slots = ids[fits], slots[fits]
        cached = slots >= 0
        hits = int(np.count_nonzero(cached))
        self.last_step[slots[cached & (slots >= self.pinned)]] = self.step
        missing = np.sort(ids[~cached]) if hits < ids.size else ids[:0]
        evict = self._choose_evictions(missing.size)
        dst, src = self._evict(evict)
        slots = np.arange(self.n, self.n + missing.size)
        self.neuron_of[slots] = missing
        self.slot_of[missing] = slots
        self.last_step[slots] = self.step
        self.n += missing.size
        self._check_written(np.concatenate((dst, slots)))
        return WindowPlan(dst, src, slots, missing, evict.size, hits, int(dropped.size),
                          dropped)

    def _choose_evictions(self, incoming: int) -> np.ndarray:
        """Slots to free: every neuron out of the window, plus LRU ones if still too full."""
        live_steps = self.last_step[: self.n]
        expired = np.nonzero(live_steps <= self.step - self.window)[0]
        overflow = self.n - expired.size + incoming - self.capacity
        if overflow <= 0:
            return expired
        # Still too full: the least recently active in-window neurons go, never this token's.
        candidates = np.nonzero((live_steps > self.step - self.window)
                                & (live_steps < self.step))[0]
        order = np.argsort(live_steps[candidates], kind="stable")
        extra = candidates[order[:overflow]]
        assert extra.size == overflow, "this token's neurons alone exceed the capacity"
        return np.concatenate((expired, extra))

    def _evict(self, evict: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Swap-delete: the last live rows move into the holes below the new end."""
        if evict.size == 0:
            return evict, evict
        new_n = self.n - evict.size
        self.slot_of[self.neuron_of[evict]] = -1
        holes = np.sort(evict[evict < new_n])
        tail = np.arange(new_n, self.n)
        movers = tail[~np.isin(tail, evict)]
        assert movers.size == holes.size
        self.neuron_of[holes] = self.neuron_of[movers]
        self.last_step[holes] = self.last_step[movers]
        self.slot_of[self.neuron_of[holes]] = holes
        self.neuron_of[new_n:self.n] = -1
        self.n = new_n
        return holes, movers

    def check(self) -> None:
        """The index maps agree: slot_of and neuron_of are inverse on the live region (O(n);
        each write checks only what it wrote, `_check_written`)."""
        live = self.neuron_of[: self.n]
        assert (live >= 0).all() and (self.slot_of[live] == np.arange(self.n)).all()
        assert int((self.slot_of >= 0).sum()) == self.n

    def _check_written(self, slots: np.ndarray) -> None:
        """The slots just written hold live neurons that map back to them."""
        assert 0 <= self.n <= self.capacity
        if slots.size:
            held = self.neuron_of[slots]
            assert (slots < self.n).all() and (held >= 0).all()
            assert (self.slot_of[held] == slots).all()

    def expire(self, ids: np.ndarray) -> int:
        """Mark the cached ones of `ids` out of the window: the next `advance` evicts them
        first. Returns how many were cached."""
        slots = self.slot_of[np.asarray(ids, dtype=np.int64)]
        slots = slots[slots >= self.pinned]  # not cached (-1) or pinned: left alone
        self.last_step[slots] = self.step - self.window
        return int(slots.size)

    def mask(self, ids: np.ndarray) -> np.ndarray:
        """(n,) float32 0/1 mask of the live slots holding `ids` (those cached)."""
        out = np.zeros(self.n, dtype=np.float32)
        slots = self.slot_of[np.asarray(ids, dtype=np.int64)]
        out[slots[slots >= 0]] = 1.0
        return out

    def pin(self, ids: np.ndarray) -> np.ndarray:
        """Cache `ids` (unique) for good in slots [0, k), before the first token; returns
        those slots (the caller writes the rows). At most half the capacity may be pinned."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.n:
            raise ValueError("pin neurons before the first token: the cache is not empty")
        if ids.size > self.capacity // 2:
            raise ValueError(f"cannot pin {ids.size} neurons in a cache of {self.capacity}: "
                             "at most half of it (raise the DRAM budget or pin fewer)")
        slots = np.arange(ids.size)
        self.neuron_of[slots] = ids
        self.slot_of[ids] = slots
        self.last_step[slots] = PINNED_STEP
        self.n = self.pinned = int(ids.size)
        self.check()
        return slots

    def reset(self, unpin: bool = False) -> None:
        """Forget every neuron but the pinned ones (their rows stay in slots [0, pinned));
        unpin: those too."""
        if unpin:
            self.pinned = 0
        p = self.pinned
        self.slot_of[:] = -1
        self.neuron_of[p:] = -1
        self.slot_of[self.neuron_of[:p]] = np.arange(p)
        self.last_step[p:] = 0
        self.n = p
        self.step = 0
