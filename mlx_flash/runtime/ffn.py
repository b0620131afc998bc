"""FlashFFN: the nn.Module that replaces `layer.mlp` of an mlx_lm model.

For one decoded token and one layer (the numbered steps of DESIGN.md):
  1. ids  = selector(x)                   which neurons this token needs (predictor or oracle)
  2. plan = cache.advance(ids)            window: who stays, who leaves, who is new
  3. rows = store.read(layer, plan.new)   parallel preads of whole bundles
  4. window_update(cache, plan, rows)     swap-delete + append-insert in the preallocated buffer
  5. y    = ffn_over_rows(x, cache[:n], mask)

Steps 1-4 need concrete neuron ids, so each FlashFFN call evaluates the graph up to its input:
that sync is inherent to the method (the paper's implementation does the same per layer).

A call with more than `max_sparse_tokens` tokens (a prompt) streams the layer's whole FFN from
flash in chunks instead (exact, one pass over the weights for all prompt tokens), then seeds the
window with the active sets of the prompt's last tokens. Streamed chunks (a prompt's, and the
active neurons a too-small cache cannot hold) are read ahead on a background reader while the
previous chunk is computed (`FlashRuntime.read_chunks`, `store.ReadAhead`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..accel.ffn import BundleFFN, QuantBundleFFN
from ..accel.linear import to_f32_rows
from ..compute.gpu import apply_window_update, compute_ffn
from ..compute.reference import ffn_over_qrows
from ..format.manifest import FFNLayout, Manifest
from .cache import NeuronCache, WindowPlan
from .rows import cache_rows, split_bundles
from .selectors.base import Selection
from .stats import RunStats, TokenStats
from .store import IOStats, NeuronStore, ReadAhead


@dataclass
class FlashSettings:
    window: int = 5  # tokens whose active neurons stay cached
    compute_on: str = "active"  # "active": this token's neurons only; "cached": every cached row
    max_sparse_tokens: int = 16  # calls with more tokens stream the dense FFN (prefill)
    prefill_chunk: int = 1024  # neurons per read when streaming a layer
    naive: bool = False  # the paper's baseline: stream every layer's whole FFN every token
    read_ahead: int = 3  # streamed chunks in flight: the next one and those read ahead (0: off)

    def __post_init__(self):
        if self.compute_on not in ("active", "cached"):
            raise ValueError(f"compute_on must be 'active' or 'cached', got {self.compute_on!r}")
        if self.read_ahead < 0:
            raise ValueError(f"read_ahead must be >= 0, got {self.read_ahead}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")


class FlashRuntime:
    """What all FlashFFN layers of one model share: the store, the selector, the stats."""

    def __init__(self, manifest: Manifest, store: NeuronStore, selector, settings: FlashSettings,
                 dtype: mx.Dtype):
        self.manifest, self.store, self.selector = manifest, store, selector
        self.settings, self.dtype = settings, dtype
        self.stats = RunStats()
        self.fast: BundleFFN | QuantBundleFFN | None = None  # load(): the fast CPU path
        self.ahead = (ReadAhead(store, settings.read_ahead, settings.prefill_chunk)
                      if settings.read_ahead else None)
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
        fixed = self.settings.naive or getattr(self.selector, "fixed", False)
        nxt = layer + 1
        while len(out) < depth and (prefill or fixed) and nxt < layer + n_layers:
            if prefill and nxt >= n_layers:
                break  # the prompt's pass ends; the next call is a decode step
            if not prefill and nxt % n_layers not in self._streamed:
                break  # no decode step streamed that layer yet: nothing to go by
            guess = (self.store.layer_chunks(nxt, self.settings.prefill_chunk) if prefill
                     else self._streamed[nxt % n_layers])
            out += [(nxt % n_layers, c) for c in guess[:depth - len(out)]]
            nxt += 1
        return out

    def close(self) -> None:
        if self.ahead is not None:
            self.ahead.close()
        self.store.close()


class FlashFFN(nn.Module):
    """Predictor-gated sparse FFN whose rows come from flash through a windowed cache."""

    def __init__(self, layer: int, runtime: FlashRuntime, cache: NeuronCache,
                 out_bias: mx.array | None = None):
        super().__init__()
        # Underscored attributes are not parameters: nothing here is loaded or saved as weights.
        self._layer, self._rt, self._cache, self._out_bias = layer, runtime, cache, out_bias
        self._layout: FFNLayout = runtime.manifest.ffn
        self._last_ids: list[np.ndarray] | None = None  # per token, of the last window-path call

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
        x2 = x.reshape(-1, shape[-1]).astype(rt.dtype)  # (T, d)
        step = self._step(x2.shape[0])
        t0 = time.perf_counter()
        mx.eval(x2)  # the selector and the reads need this layer's input now
        step.seconds["compute"] += time.perf_counter() - t0
        return self._forward(x2, step).reshape(shape).astype(x.dtype)

    def forward_f32(self, x: np.ndarray) -> np.ndarray:
        """The fast CPU path's entry (cpu_decode.py): x (T, d) contiguous f32 -> (T, d) f32.

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
        """x: (T, d) evaluated, in the runtime's dtype -> (T, d)."""
        rt = self._rt
        if rt.settings.naive or x.shape[0] > rt.settings.max_sparse_tokens:
            y = self._dense_stream(x, step)
        else:
            y = self._sparse(x, step)
        return y if self._out_bias is None else y + self._out_bias

    # -- decode (and small batches): the window path

    def _sparse(self, x: mx.array, step: TokenStats) -> mx.array:
        selection = self._select(x, step)
        self._last_ids = selection.ids
        union = ordered_union(selection.ids)
        plan = self._advance(union, step)
        cache = self._cache
        step.neurons_active += int(union.size)
        step.neurons_cached += cache.n
        mask = None
        every_slot = len(selection.ids) == 1 and union.size - plan.truncated == cache.n
        if self._rt.settings.compute_on == "active" and not every_slot:
            mask = np.stack([cache.mask(ids) for ids in selection.ids])  # (T, n)
            if mask.all():  # every cached neuron is active for every token: no mask pass
                mask = None
        if self._rt.fast is not None:
            y = mx.array(self._rt.fast.over_cache(cache, to_f32_rows(x), mask))
        elif self._layout.quantized:
            b = cache.buffers
            y = ffn_over_qrows(x, b["q"], b["scales"], b["biases"], cache.n, self._layout,
                               None if mask is None else mx.array(mask), cache.bias)
        else:
            y = compute_ffn(x, cache.weights, cache.n, self._layout.activation,
                            None if mask is None else mx.array(mask), cache.bias)
        if plan.dropped.size:
            y = self._stream_overflow(x, y, plan.dropped, selection.ids, step)
        return y

    def _stream_overflow(self, x: mx.array, y: mx.array, ids: np.ndarray,
                         per_token: list[np.ndarray], step: TokenStats) -> mx.array:
        """Active neurons the cache could not hold: read and computed this call, not kept
        (chunked like prefill, so the scratch stays bounded). Exact, at the cost of the reads."""
        rt = self._rt
        chunk = rt.settings.prefill_chunk
        x32 = to_f32_rows(x) if rt.fast is not None else None
        ids = np.sort(ids)  # the store returns rows in ascending id order
        chunks = [ids[start:start + chunk] for start in range(0, ids.size, chunk)]
        n = rt.manifest.layers[self._layer].n_neurons
        every = all(t.size == n for t in per_token)  # each token needs every neuron: no masks
        for part, (rows, io) in zip(chunks, rt.read_chunks(self._layer, chunks, False),
                                    strict=True):
            mask = None
            if len(per_token) > 1 and not every:  # each token only its own neurons
                mask = np.stack([np.isin(part, t) for t in per_token]).astype(np.float32)
            y = self._add_rows(x, x32, y, rows, io, step, mask)
            step.bytes_needed += io.needed
        return y

    def _add_rows(self, x: mx.array, x32: np.ndarray | None, y: mx.array, rows: np.ndarray,
                  io: IOStats, step: TokenStats, mask: np.ndarray | None = None) -> mx.array:
        """y + the FFN over a chunk of read bundles, evaluated now (one chunk alive at a time);
        x32: x as f32 rows on the fast path, else None. Counts the chunk's read and compute."""
        t1 = time.perf_counter()  # io.seconds is the read's own time
        if x32 is not None:
            y = y + mx.array(self._rt.fast.over_rows(rows, x32, mask))
        else:
            weights, bias = split_bundles(rows, self._rt.manifest, self._rt.dtype)
            y = y + compute_ffn(x, weights, weights.shape[1], self._layout.activation,
                                None if mask is None else mx.array(mask), bias)
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
        """Window bookkeeping, the flash read of the new neurons, and the buffer update."""
        cache, rt = self._cache, self._rt
        t0 = time.perf_counter()
        plan = cache.advance(ids)
        t1 = time.perf_counter()
        rows, io = rt.store.read(self._layer, plan.new_ids)
        t2 = time.perf_counter()
        if rt.fast is not None:  # numpy buffers, moved in place
            rt.fast.update(cache.buffers, plan.dst, plan.src, plan.slots, rows)
        else:
            self._update_mlx_buffers(plan, rows)
        t3 = time.perf_counter()
        step.seconds["memory"] += (t1 - t0) + (t3 - t2)
        step.seconds["io"] += t2 - t1
        step.bytes_read += io.bytes
        step.bytes_needed += io.needed
        step.reads += io.reads
        step.neurons_new += int(plan.new_ids.size)
        step.neurons_hit += plan.hits
        step.truncated += plan.truncated
        return plan

    def _update_mlx_buffers(self, plan: WindowPlan, rows: np.ndarray) -> None:
        cache, rt = self._cache, self._rt
        new = cache_rows(rows, rt.manifest, rt.dtype)
        dst, src, slots = (mx.array(a.astype(np.int32)) for a in (plan.dst, plan.src, plan.slots))
        for name, buffer in cache.buffers.items():
            cache.buffers[name] = apply_window_update(buffer, dst, src, slots, new[name])
        mx.eval(*cache.buffers.values())  # time the row moves here, not in the next compute

    # -- prefill: stream the whole layer once for all tokens

    def _dense_stream(self, x: mx.array, step: TokenStats) -> mx.array:
        rt = self._rt
        y = mx.zeros_like(x)
        x32 = to_f32_rows(x) if rt.fast is not None else None
        chunks = rt.store.layer_chunks(self._layer, rt.settings.prefill_chunk)  # file order
        for rows, io in rt.read_chunks(self._layer, chunks, not rt.settings.naive, False):
            y = self._add_rows(x, x32, y, rows, io, step)
        if not rt.settings.naive:
            self._seed_window(x[-rt.settings.window:], step)
        return y

    def _seed_window(self, x: mx.array, step: TokenStats) -> None:
        """Warm the cache with the active sets of the prompt's last tokens, oldest first."""
        selection = self._select(x, step)
        for ids in selection.ids:
            self._advance(ids, step)


def ordered_union(ids: list[np.ndarray]) -> np.ndarray:
    """Union of several tokens' ids keeping first-seen priority order."""
    if len(ids) == 1:
        return ids[0]
    cat = np.concatenate(ids)
    _, first = np.unique(cat, return_index=True)
    return cat[np.sort(first)]
