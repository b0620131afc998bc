"""FlashFFN: the nn.Module that replaces `layer.mlp` of an mlx_lm model.

For one decoded token and one layer (the numbered steps of DESIGN.md):
  1. ids  = selector(x)                   which neurons this token needs (predictor or oracle)
  2. plan = cache.advance(ids)            window: who stays, who leaves, who is new
  3. rows = store.read(layer, plan.new)   parallel preads of whole bundles
  4. window_update(cache, plan, rows)     swap-delete + append-insert in the preallocated buffer
  5. y    = ffn_over_rows(x, cache[:n], mask)

Steps 4 and 5 (and a streamed chunk's FFN) are the runtime's CacheBackend's (backend.py):
MLX arrays and kernels, or the fast CPU path's numpy buffers and C kernels.

Steps 1-4 need concrete neuron ids, so each FlashFFN call evaluates the graph up to its input:
that sync is inherent to the method (the paper's implementation does the same per layer).

A call with more than `max_sparse_tokens` tokens (a prompt) streams the layer's whole FFN from
flash in chunks instead (exact, one pass over the weights for all prompt tokens), then seeds the
window with the active sets of the prompt's last tokens. Streamed chunks (a prompt's, and the
active neurons a too-small cache cannot hold) are read ahead on a background reader while the
previous chunk is computed (`FlashRuntime.read_chunks`, `store.ReadAhead`).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..format.manifest import Manifest
from .backend import CacheBackend
from .cache import NeuronCache, WindowPlan
from .config import FlashConfig
from .gate import ResidentGate
from .memory import PREFILL_STEP
from .selectors.base import Selection
from .stats import RunStats, TokenStats
from .store import IOStats, NeuronStore, ReadAhead


class FlashRuntime:
    """What all FlashFFN layers of one model share: the options, the store, the selector, the
    cache backend, the stats. `restore` undoes the process-wide settings `load` applied for
    this model (process.py); close() calls it."""

    def __init__(self, manifest: Manifest, store: NeuronStore, selector, config: FlashConfig,
                 backend: CacheBackend, restore: Callable[[], None] | None = None,
                 gate: ResidentGate | None = None):
        self.manifest, self.store, self.selector = manifest, store, selector
        self.config, self.backend, self.restore = config, backend, restore
        self.gate = gate  # a gate-resident dir's gate (gate.py): h = (up x) * act(gate x)
        self.stats = RunStats()
        self.lock = threading.RLock()  # held across each forward pass (`serialize_calls`)
        self.ahead = (ReadAhead(store, config.read_ahead, config.prefill_chunk)
                      if config.read_ahead else None)
        self._streamed: dict[int, list[np.ndarray]] = {}  # layer -> its last overflow chunks

    def read_chunks(self, layer: int, chunks: list[np.ndarray], prefill: bool,
                    planned: bool = True) -> Iterator[tuple[np.ndarray, IOStats]]:
        """The rows of each chunk of `layer` in turn (one alive at a time for the caller);
        planned=False: whole-layer pieces (`layer_chunks`), one read span each.

        With read-ahead the disk works while the caller computes: the rest of this layer's
        chunks are announced first, then what the next layers will stream if that can be known
        now: a prefill streams every layer whole; a decode step whose selector is fixed
        streams the same overflow chunks as last step (wrapping to the next step's layer 0)."""
        if not prefill:
            self._streamed[layer] = chunks
        for i, part in enumerate(chunks):
            if self.ahead is None:
                yield self.store.read(layer, part, planned=planned)
                continue
            for chunk_layer, chunk in self._upcoming(layer, chunks[i:], prefill):
                self.ahead.expect(chunk_layer, chunk, planned)  # the next layers alike
            rows, io = self.ahead.read(layer, part, planned)
            wasted = self.ahead.take_wasted()  # wrong guesses were read all the same
            step = self.stats.current
            step.bytes_read += wasted.bytes
            step.reads += wasted.reads
            step.bytes_wasted += wasted.bytes
            yield rows, io

    def _upcoming(self, layer: int, rest: list[np.ndarray], prefill: bool
                  ) -> list[tuple[int, np.ndarray]]:
        """(layer, ids) of the `depth` chunks this runtime expects to stream next, starting with
        `rest`, what is left of this layer's."""
        depth, n_layers = self.ahead.depth, self.manifest.n_layers
        out = [(layer, c) for c in rest[:depth]]
        fixed = self.config.naive or getattr(self.selector, "fixed", False)
        nxt = layer + 1
        while len(out) < depth and (prefill or fixed) and nxt < layer + n_layers:
            if prefill and nxt >= n_layers:
                break  # the prompt's pass ends; the next call is a decode step
            if not prefill and nxt % n_layers not in self._streamed:
                break  # no decode step streamed that layer yet: nothing to go by
            guess = (self.store.layer_chunks(nxt, self.config.prefill_chunk) if prefill
                     else self._streamed[nxt % n_layers])
            out += [(nxt % n_layers, c) for c in guess[:depth - len(out)]]
            nxt += 1
        return out

    def close(self) -> None:
        """Stop the reader threads, close the files, undo the process-wide settings (after
        the forward pass another thread may be running)."""
        with self.lock:
            if self.ahead is not None:
                self.ahead.close()
            self.store.close()
            if self.restore is not None:
                self.restore()
                self.restore = None


class FlashFFN(nn.Module):
    """Predictor-gated sparse FFN whose rows come from flash through a windowed cache."""

    def __init__(self, layer: int, runtime: FlashRuntime, cache: NeuronCache,
                 out_bias: mx.array | None = None):
        super().__init__()
        # Underscored attributes are not parameters: nothing here is loaded or saved as weights.
        self._layer, self._rt, self._cache, self._out_bias = layer, runtime, cache, out_bias
        if out_bias is not None:
            mx.eval(out_bias)  # now: a thread other than the loading one cannot evaluate it
        self._last_ids: list[np.ndarray] | None = None  # per token, of the last window-path call
        bind = getattr(runtime.selector, "bind", None)  # a selector sized to the caches
        if bind is not None:
            bind(layer, cache)

    @property
    def cache(self) -> NeuronCache:
        return self._cache

    @property
    def last_ids(self) -> list[np.ndarray] | None:
        """Each token's selected ids in the last window-path call (speculative.py reads them)."""
        return self._last_ids

    def __call__(self, x: mx.array) -> mx.array:
        """x: (B, L, d) -> (B, L, d)."""
        rt, shape = self._rt, x.shape
        x2 = x.reshape(-1, shape[-1]).astype(rt.backend.compute_dtype)  # (T, d)
        step = self._step(x2.shape[0])
        t0 = time.perf_counter()
        mx.eval(x2)  # the selector and the reads need this layer's input now
        step.seconds["compute"] += time.perf_counter() - t0
        return self._forward(x2, step).reshape(shape).astype(x.dtype)

    def forward_f32(self, x: np.ndarray) -> np.ndarray:
        """The fast CPU path's entry (accel/blocks.py): x (T, d) contiguous f32 -> (T, d) f32.

        The same computation as calling the module, without an MLX graph to evaluate: x is
        wrapped as an evaluated array and the kernels' result comes back as numpy."""
        y = self._forward(mx.array(x), self._step(x.shape[0]))
        return np.asarray(y, dtype=np.float32)  # evaluated already unless there is out_bias

    def _step(self, tokens: int) -> TokenStats:
        """This call's stats entry (a new one at the first layer)."""
        if self._layer == 0:
            self._rt.stats.new_step(tokens)
        return self._rt.stats.current

    def _forward(self, x: mx.array, step: TokenStats) -> mx.array:
        """x: (T, d) evaluated, in the backend's compute dtype -> (T, d)."""
        rt = self._rt
        if rt.config.naive or x.shape[0] > rt.config.max_sparse_tokens:
            y = self._dense_stream(x, step)
        else:
            y = self._sparse(x, step)
        return y if self._out_bias is None else y + self._out_bias

    # -- decode (and small batches): the window path

    def _sparse(self, x: mx.array, step: TokenStats) -> mx.array:
        gate = self._gate_values(x, step)
        selection = self._select(x, step)
        self._last_ids = selection.ids
        union = ordered_union(selection.ids)
        plan = self._advance(union, step)
        cache = self._cache
        step.neurons_active += int(union.size)
        step.neurons_cached += cache.n
        mask = None
        every_slot = _one_set(selection.ids) and union.size - plan.truncated == cache.n
        if self._rt.config.compute_on == "active" and not every_slot:
            mask = np.stack([cache.mask(ids) for ids in selection.ids])  # (T, n)
            if mask.all():  # every cached neuron is active for every token: no mask pass
                mask = None
        if gate is not None:  # h = (up x) * act(gate x) over the slots' neurons
            slot_gate = gate[:, cache.neuron_of[:cache.n]]
            mask = slot_gate if mask is None else mask * slot_gate
        y = self._rt.backend.over_cache(cache, x, mask)
        if plan.dropped.size:
            y = self._stream_overflow(x, y, plan.dropped, selection.ids, step, gate)
        return y

    def _gate_values(self, x: mx.array, step: TokenStats, rows: np.ndarray | None = None
                     ) -> np.ndarray | None:
        """A gate-resident dir's act(gate x) (T, n) for this layer, or (T, k) for neurons
        `rows` (timed as the predictor: it is what the gate selector scores), else None."""
        if self._rt.gate is None:
            return None
        t0 = time.perf_counter()
        values = self._rt.gate.values(self._layer, x, rows)
        step.seconds["predictor"] += time.perf_counter() - t0
        return values

    def _stream_overflow(self, x: mx.array, y: mx.array, ids: np.ndarray,
                         per_token: list[np.ndarray], step: TokenStats,
                         gate: np.ndarray | None = None) -> mx.array:
        """Active neurons the cache could not hold: read and computed this call, not kept
        (chunked like prefill, so the scratch stays bounded). Exact, at the cost of the reads."""
        rt = self._rt
        chunk = rt.config.prefill_chunk
        xin = rt.backend.compute_input(x)
        ids = np.sort(ids)  # the store returns rows in ascending id order
        chunks = [ids[start:start + chunk] for start in range(0, ids.size, chunk)]
        n = rt.manifest.layers[self._layer].n_neurons
        every = all(t.size == n for t in per_token)  # each token needs every neuron: no masks
        for part, (rows, io) in zip(chunks, rt.read_chunks(self._layer, chunks, False),
                                    strict=True):
            mask = None
            if len(per_token) > 1 and not every:  # each token only its own neurons
                mask = np.stack([np.isin(part, t) for t in per_token]).astype(np.float32)
            if gate is not None:
                mask = gate[:, part] if mask is None else mask * gate[:, part]
            y = self._add_rows(xin, y, rows, part, io, step, mask)
            step.bytes_needed += io.needed
        return y

    def _add_rows(self, xin: object, y: mx.array, rows: np.ndarray, ids: np.ndarray,
                  io: IOStats, step: TokenStats, mask: np.ndarray | None = None) -> mx.array:
        """y + the FFN over a chunk of read bundles (neurons `ids`, ascending), evaluated now
        (one chunk alive at a time); xin: the backend's `compute_input(x)`. Counts the
        chunk's read and compute."""
        t1 = time.perf_counter()  # io.seconds is the read's own time
        y = y + self._rt.backend.over_rows(rows, xin, mask, self._cache, ids)
        mx.eval(y)
        step.seconds["io"] += io.seconds
        step.seconds["compute"] += time.perf_counter() - t1
        step.bytes_read += io.bytes
        step.reads += io.reads
        return y

    def _select(self, x: mx.array, step: TokenStats) -> Selection:
        t0 = time.perf_counter()
        selection = self._rt.selector.select(self._layer, x)
        step.seconds["predictor"] += time.perf_counter() - t0
        step.predictor_bytes += selection.io.bytes
        return selection

    def _advance(self, ids: np.ndarray, step: TokenStats) -> WindowPlan:
        """Window bookkeeping, the flash read of the new neurons, and the buffer update. If
        the read or the update fails the cache is reset (pinned neurons kept) and the error
        raised: no slot claims a row it does not hold."""
        cache, rt = self._cache, self._rt
        t0 = time.perf_counter()
        plan = cache.advance(ids)
        io, t_io = IOStats(), 0.0
        try:
            # in chunks, as prefill streams: a first step (or a new prompt) may bring the whole
            # capacity in at once, and its read and unpacked rows are scratch the plan bounds
            for chunk, moves in self._new_chunks(plan):
                ta = time.perf_counter()
                rows, chunk_io = rt.store.read(self._layer, plan.new_ids[chunk])
                t_io += time.perf_counter() - ta
                io.add(chunk_io)
                dst, src = (plan.dst, plan.src) if moves else (plan.dst[:0], plan.src[:0])
                rt.backend.write_rows(cache, dst, src, plan.slots[chunk], rows)
                del rows
        except BaseException:
            # The plan holds only once its rows are in: forget every unpinned neuron (they
            # are read again when next active) rather than keep slots that were not written.
            cache.reset()
            raise
        t3 = time.perf_counter()
        step.seconds["memory"] += t3 - t0 - t_io
        step.seconds["io"] += t_io
        step.bytes_read += io.bytes
        step.bytes_needed += io.needed
        step.reads += io.reads
        step.neurons_new += int(plan.new_ids.size)
        step.neurons_hit += plan.hits
        step.truncated += plan.truncated
        return plan

    def _new_chunks(self, plan: WindowPlan) -> Iterator[tuple[slice, bool]]:
        """(slice of plan.new_ids, whether the plan's row moves go with it): the moves with
        the first chunk, every new neuron in chunks of prefill_chunk (one chunk when only rows
        move, none when nothing changes)."""
        chunk, n = self._rt.config.prefill_chunk, plan.new_ids.size
        if n == 0 and plan.dst.size == 0:
            return  # nothing new and nothing moves (every uncapped step): no read, no update
        for start in range(0, max(n, 1), chunk):
            yield slice(start, start + chunk), start == 0

    # -- prefill: stream the whole layer once for all tokens

    def _dense_stream(self, x: mx.array, step: TokenStats) -> mx.array:
        rt = self._rt
        if self._holds_layer():
            y = self._prompt_over_cache(x, step)
            self._seed_window(x[-rt.config.window:], step)
            return y
        y = mx.zeros_like(x)
        xin = rt.backend.compute_input(x)
        chunks = rt.store.layer_chunks(self._layer, rt.config.prefill_chunk)  # file order
        watch = getattr(rt.selector, "watch_prompt", None)  # a selector that sees the prompt
        watch = watch(self._layer, x) if watch is not None and not rt.config.naive else None
        fill = self._fill_from_stream()
        none = np.zeros(0, dtype=np.int64)  # the fill moves no rows: the cache was empty
        try:
            for part, (rows, io) in zip(chunks, rt.read_chunks(self._layer, chunks,
                                                               not rt.config.naive, False),
                                        strict=True):
                y = self._add_rows(xin, y, rows, part, io, step,
                                   self._gate_values(x, step, part))
                if fill is not None:  # the rows go into the slots planned for them
                    rt.backend.write_rows(self._cache, none, none, fill[np.sort(part)], rows)
                if watch is not None:
                    t0 = time.perf_counter()
                    watch.add(part, rows)
                    step.seconds["predictor"] += time.perf_counter() - t0
        except BaseException:
            if fill is not None:  # slots planned but not all written: forget them
                self._cache.reset()
            raise
        if watch is not None:
            watch.close()
        if not rt.config.naive:
            self._seed_window(x[-rt.config.window:], step)
        return y

    def _fill_from_stream(self) -> np.ndarray | None:
        """When this prompt's stream can fill the empty cache with what the window is then
        seeded with - every neuron: the every-neuron selector, a cache that holds them all -
        the cache's plan for that, made now: (n,) the slot of each neuron id. Else None. (The
        seeding read every row a second time: 1470 MiB for the 1.5B's first prompt.)"""
        cache = self._cache
        if (cache.n or cache.capacity < cache.n_neurons or not self._ffn_alone()
                or getattr(self._rt.selector, "rule", None) != "all"):
            return None
        plan = cache.advance(np.arange(cache.n_neurons))
        slot_of = np.empty(cache.n_neurons, dtype=np.int64)
        slot_of[plan.new_ids] = plan.slots
        return slot_of

    def _ffn_alone(self) -> bool:
        """Whether a prompt's streamed rows serve the FFN only: not a gate-resident dir's
        gate, a selector that watches the prompt's rows, or the naive baseline."""
        rt = self._rt
        return (not rt.config.naive and rt.gate is None
                and getattr(rt.selector, "watch_prompt", None) is None)

    def _holds_layer(self) -> bool:
        """Whether a prompt can be computed from the cache alone: it holds every neuron of the
        layer and nothing else needs the streamed rows."""
        return self._cache.n == self._cache.n_neurons and self._ffn_alone()

    def _prompt_over_cache(self, x: mx.array, step: TokenStats) -> mx.array:
        """x (T, d) -> the layer's FFN over every cached neuron (all of them): no reads. The
        positions go in blocks whose (block, n) kernel scratch is no larger than the plan's
        for a streamed prefill piece, (PREFILL_STEP, prefill_chunk)."""
        cache, rt = self._cache, self._rt
        piece = min(rt.config.max_kv_tokens, PREFILL_STEP) or 1
        block = max(1, piece * min(rt.config.prefill_chunk, cache.n) // cache.n)
        t0 = time.perf_counter()
        parts = []
        for start in range(0, x.shape[0], block):
            parts.append(rt.backend.over_cache(cache, x[start:start + block], None))
            mx.eval(parts[-1])
        y = parts[0] if len(parts) == 1 else mx.concatenate(parts)
        mx.eval(y)
        step.seconds["compute"] += time.perf_counter() - t0
        return y

    def _seed_window(self, x: mx.array, step: TokenStats) -> None:
        """Warm the cache with the active sets of the prompt's last tokens, oldest first."""
        selection = self._select(x, step)
        for ids in selection.ids:
            self._advance(ids, step)


def serialize_calls(model: nn.Module, lock: threading.RLock) -> None:
    """Make each call of `model`, and of its transformer stack `model.model` (what speculative
    decoding calls), hold `lock` across the whole forward pass, so threads sharing one loaded
    model take turns (the caches, the read-ahead and the stats are the runtime's, not the
    caller's). Swaps each instance's class for a subclass, as accel/blocks.py does for its
    blocks; the lazy output is evaluated by the caller, after the lock."""
    for module in (model, getattr(model, "model", None)):
        if isinstance(module, nn.Module):
            object.__setattr__(module, "_flash_lock", lock)  # not a parameter
            module.__class__ = _serialized_class(type(module))


@functools.cache
def _serialized_class(cls: type) -> type:
    def __call__(self, *args, **kwargs):
        with self._flash_lock:
            return cls.__call__(self, *args, **kwargs)

    return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


def _one_set(ids: list[np.ndarray]) -> bool:
    """Whether every token's ids are the same array (one token; a fixed selector's tokens)."""
    return all(i is ids[0] for i in ids[1:])


def ordered_union(ids: list[np.ndarray]) -> np.ndarray:
    """Union of several tokens' ids keeping first-seen priority order (one token's, or the
    one set a fixed selector gives every token, as it is)."""
    if _one_set(ids):
        return ids[0]
    cat = np.concatenate(ids)
    _, first = np.unique(cat, return_index=True)
    return cat[np.sort(first)]
