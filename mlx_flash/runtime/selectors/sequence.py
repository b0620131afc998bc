"""The per-sequence selector (GRIFFIN, arXiv 2402.19427): one neuron set per layer, chosen from
the prompt's true activations, used for every decoded token.

Prefill (a FlashFFN call of more than `max_sparse_tokens` tokens, which streams the whole layer
anyway) shows each chunk of rows to `watch_prompt`'s watcher, which computes the prompt tokens'
true activations from those rows (no extra reads; the gate/up products once more). GRIFFIN's
statistic: per token the |activations| normalised to unit L2 norm over the neurons, then per
neuron the L2 norm over the tokens; each layer keeps its top `keep` fraction (default 0.7).
Decode and speculative verification (calls of at most `max_sparse_tokens` tokens) return that
set for every token, so once the window holds it a decode step reads nothing.

A later prompt (a chat turn's) adds its tokens to the statistic and the set grows by its new top
neurons. `refresh` N > 0: every N decoded tokens per layer the recent tokens' activations (the
whole layer read once: the cost of a refresh) join the prompt's and the set is chosen again.
No set yet and a short call (a prompt of few tokens): that call's own activations choose it,
reading the layer like the oracle does. `reset()` forgets the sequence (a new conversation).

The set never exceeds the room of the layer's neuron cache (capacity less pinned slots): when
keep * n does, the room's best neurons are kept and `summary()["capped_layers"]` counts it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from ...format.manifest import Manifest
from ..config import check_fraction
from ..store import IOStats, NeuronStore
from .base import Selection, top_k
from .oracle import layer_activations, rows_activations

DEFAULT_KEEP = 0.7  # 0.5B model, set from 256 prompt tokens, next 256 scored: ppl +41% at 0.7,
# +116% at 0.5, exact at 1.0 (/tmp/team/sparsity-findings.md): no keep below 1 holds quality there


def normalised_squares(h: np.ndarray) -> np.ndarray:
    """h: (T, n) activations -> (n,) sum over tokens of (|h_t| / ||h_t||_2)^2: the square of
    GRIFFIN's per-neuron statistic for these tokens (an all-zero token adds nothing)."""
    h = h.astype(np.float64)
    norms = np.sqrt((h * h).sum(axis=1, keepdims=True))
    z = h / np.where(norms > 0, norms, 1.0)
    return (z * z).sum(axis=0)


@dataclass
class LayerState:
    """One layer's sequence statistic and set."""

    squares: np.ndarray  # (n,) float64 prompt tokens' normalised squares, summed
    ids: np.ndarray | None = None  # the set, best first
    recent: list[np.ndarray] = field(default_factory=list)  # decode inputs since the refresh
    since_refresh: int = 0  # decode tokens since the set was last chosen
    grown: int = 0  # neurons later prompts added
    capped: bool = False  # keep * n exceeded the cache's room


class PromptWatch:
    """Collects one prefill call's activations chunk by chunk (`add`), then sets the layer's
    statistic and set (`close`). Holds (T, n) float32 meanwhile."""

    def __init__(self, selector: SequenceSelector, layer: int, x: mx.array):
        self.selector, self.layer, self.x = selector, layer, x
        n = selector.manifest.layers[layer].n_neurons
        self.h = np.zeros((x.shape[0], n), dtype=np.float32)

    def add(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """ids (k,) ascending, rows (k, stride): the raw bundles the stream just read."""
        self.h[:, ids] = rows_activations(self.x, rows, self.selector.manifest,
                                          self.selector.dtype, self.layer)

    def close(self) -> None:
        self.selector.add_prompt(self.layer, self.h)
        self.h = None


class SequenceSelector:
    """FlashFFN's per-sequence selector (see the module doc)."""

    fixed = True  # decode selects the same set: the runtime may read ahead across layers

    def __init__(self, store: NeuronStore, manifest: Manifest, keep: float = DEFAULT_KEEP,
                 refresh: int = 0, dtype: mx.Dtype = mx.float32, chunk: int = 4096):
        check_fraction("keep", keep)
        if refresh < 0:
            raise ValueError(f"sequence_refresh must be >= 0 (0: off), got {refresh}")
        self.store, self.manifest, self.keep, self.refresh = store, manifest, keep, refresh
        self.dtype, self.chunk = dtype, chunk
        self.rooms: dict[int, int] = {}  # layer -> neurons its cache can hold for the set
        self.layers: dict[int, LayerState] = {}
        self.refreshes = 0

    def bind(self, layer: int, cache) -> None:
        """FlashFFN tells each layer's NeuronCache: the set must fit its unpinned slots."""
        self.rooms[layer] = max(1, cache.capacity - cache.pinned)

    def reset(self) -> None:
        """Forget every layer's statistic and set (a new sequence starts)."""
        self.layers.clear()

    def watch_prompt(self, layer: int, x: mx.array) -> PromptWatch:
        """A prefill call of x (T, d) begins on `layer`: its watcher sees the streamed rows."""
        return PromptWatch(self, layer, x)

    def add_prompt(self, layer: int, h: np.ndarray) -> None:
        """Prompt tokens' activations h (T, n) join the layer's statistic; the set grows by
        their statistic's new top neurons (a first prompt chooses it)."""
        state = self._state(layer)
        state.squares += normalised_squares(h)
        old = state.ids
        self._choose(layer, state)
        if old is not None:
            union = np.union1d(old, state.ids)
            room = self.rooms.get(layer, union.size)
            if union.size > room:
                union = union[top_k(state.squares[union], room)]
            else:
                union = union[np.argsort(-state.squares[union], kind="stable")]
            state.grown += union.size - old.size
            state.ids = union

    def select(self, layer: int, x: mx.array) -> Selection:
        """x: (T, d) evaluated, a decode step or a verification (T <= max_sparse_tokens):
        the layer's set for every token; with no set yet this call's activations choose it."""
        state, io = self._state(layer), IOStats()
        if state.ids is None:
            h, io = layer_activations(self.store, self.manifest, layer, x, self.dtype,
                                      self.chunk)
            state.squares += normalised_squares(h)
            self._choose(layer, state)
        elif self.refresh:
            io = self._maybe_refresh(layer, state, x)
        return Selection([state.ids] * x.shape[0], io)

    def summary(self) -> dict:
        """What the selector chose: set sizes (fraction of each layer), later prompts'
        growth, caps by the cache's room, refreshes."""
        sizes = [s.ids.size / self.manifest.layers[i].n_neurons
                 for i, s in sorted(self.layers.items()) if s.ids is not None]
        return {"keep": self.keep, "refresh": self.refresh,
                "set_fraction": float(np.mean(sizes)) if sizes else 0.0,
                "set_fraction_per_layer": sizes,
                "grown_neurons": int(sum(s.grown for s in self.layers.values())),
                "capped_layers": int(sum(s.capped for s in self.layers.values())),
                "refreshes": self.refreshes}

    def _state(self, layer: int) -> LayerState:
        if layer not in self.layers:
            n = self.manifest.layers[layer].n_neurons
            self.layers[layer] = LayerState(np.zeros(n, dtype=np.float64))
        return self.layers[layer]

    def _choose(self, layer: int, state: LayerState) -> None:
        """The set := the top `keep` of the statistic, at most the cache's room."""
        n = state.squares.size
        want = max(1, math.ceil(self.keep * n - 1e-9))
        room = self.rooms.get(layer, n)
        state.capped = state.capped or want > room
        state.ids = top_k(state.squares, min(want, room))
        state.recent, state.since_refresh = [], 0

    def _maybe_refresh(self, layer: int, state: LayerState, x: mx.array) -> IOStats:
        """Count this call's tokens; every `refresh` of them choose the set again from the
        prompt's statistic plus the recent tokens' (read from the whole layer)."""
        state.recent.append(np.array(x.astype(mx.float32)))
        state.since_refresh += x.shape[0]
        if state.since_refresh < self.refresh:
            return IOStats()
        recent = mx.array(np.concatenate(state.recent)).astype(self.dtype)
        h, io = layer_activations(self.store, self.manifest, layer, recent,
                                  self.dtype, self.chunk)
        prompt = state.squares
        state.squares = prompt + normalised_squares(h)
        self._choose(layer, state)
        state.squares = prompt  # the recent tokens count for this refresh only
        self.refreshes += 1
        return io
