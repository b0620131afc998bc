from __future__ import annotations

import pytest

import mlx_flash.runtime.loader as loader_module
import mlx_flash.runtime.memory as runtime_memory


@pytest.fixture
def caches_of_three_neurons(monkeypatch) -> None:
    """Make `load` plan 3 neurons per layer's cache, whatever the budget: the window evicts
    and every token's overflow is streamed (what a tight budget does)."""
    plan_memory = runtime_memory.plan_memory

    def three_neurons(*args, **kwargs):
        plan = plan_memory(*args, **kwargs)
        plan.capacity = 3
        return plan

    monkeypatch.setattr(loader_module, "plan_memory", three_neurons)
