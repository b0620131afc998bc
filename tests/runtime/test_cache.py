"""NeuronCache: the window's invariants over random sequences of active sets."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_flash.compute.reference import window_update
from mlx_flash.runtime.cache import NeuronCache

N = 40


def run_tokens(cache: NeuronCache, tokens: list[list[int]]) -> None:
    """Advance through tokens, applying each plan to the buffer, checking it every step.

    The buffer row of neuron i is filled with the value i, so after each update the buffer
    must agree with neuron_of.
    """
    history: list[set[int]] = []
    for ids in tokens:
        ids = np.array(list(dict.fromkeys(ids)), dtype=np.int64)
        plan = cache.advance(ids)
        rows = mx.broadcast_to(mx.array(plan.new_ids.astype(np.float32))[None, :, None],
                               (1, plan.new_ids.size, 2))
        cache.weights = window_update(cache.weights, mx.array(plan.dst.astype(np.int32)),
                                      mx.array(plan.src.astype(np.int32)),
                                      mx.array(plan.slots.astype(np.int32)), rows)
        live = cache.neuron_of[: cache.n]
        assert np.array_equal(np.array(cache.weights[0, : cache.n, 0]), live.astype(np.float32))
        kept = ids[: cache.capacity]
        assert (cache.slot_of[kept] >= 0).all(), "this token's neurons must all be cached"
        history.append(set(kept.tolist()))
        recent = set().union(*history[-cache.window:])
        assert set(live.tolist()) <= recent, "a cached neuron left the window"
        if len(recent) <= cache.capacity:
            assert set(live.tolist()) == recent, "an in-window neuron was evicted needlessly"
        assert plan.truncated == max(0, ids.size - cache.capacity)


active_sets = st.lists(st.lists(st.integers(0, N - 1), max_size=15), min_size=1, max_size=25)


@settings(max_examples=60, deadline=None)
@given(tokens=active_sets, window=st.integers(1, 6), capacity=st.integers(1, N))
def test_window_invariants(tokens, window, capacity):
    cache = NeuronCache(N, capacity, n_parts=1, d_model=2, dtype=mx.float32, window=window)
    run_tokens(cache, tokens)


def test_lru_eviction_when_window_overflows():
    cache = NeuronCache(N, capacity=4, n_parts=1, d_model=2, dtype=mx.float32, window=10)
    for ids in ([0, 1], [2, 3], [4]):
        cache.advance(np.array(ids))
    # 0 and 1 were active longest ago; ties go by slot order, so 0 made room for 4
    assert set(cache.neuron_of[: cache.n].tolist()) == {1, 2, 3, 4}
    cache.advance(np.array([2]))
    plan = cache.advance(np.array([5, 6]))
    assert plan.evicted == 2 and 2 in cache.neuron_of[: cache.n]


def test_hits_are_not_reread():
    cache = NeuronCache(N, capacity=N, n_parts=1, d_model=2, dtype=mx.float32, window=3)
    cache.advance(np.array([1, 2, 3]))
    plan = cache.advance(np.array([2, 3, 4]))
    assert plan.hits == 2 and plan.new_ids.tolist() == [4]


def test_bad_capacity_and_window():
    with pytest.raises(ValueError, match="capacity"):
        NeuronCache(N, 0, 1, 2, mx.float32, 1)
    with pytest.raises(ValueError, match="window"):
        NeuronCache(N, 4, 1, 2, mx.float32, 0)
