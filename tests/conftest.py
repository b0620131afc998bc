from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from real import greedy  # noqa: E402
from tiny import make_source  # noqa: E402

import mlx_flash.runtime.loader as loader_module  # noqa: E402
import mlx_flash.runtime.memory as runtime_memory  # noqa: E402
from mlx_flash import load  # noqa: E402


@pytest.fixture
def flash_load():
    """`mlx_flash.load` that closes every runtime it opened (reader threads, files, the
    process-wide settings it changed) when the test ends, passed or failed."""
    opened = []

    def load_and_track(path, *args, **kwargs):
        model, tokenizer = load(path, *args, **kwargs)
        opened.append(model.flash)
        return model, tokenizer

    yield load_and_track
    for runtime in reversed(opened):
        runtime.close()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """arch -> (source dir, flash dir), converted once per session."""
    from mlx_flash.offline.convert import convert

    cache = {}

    def get(arch: str, dtype: str = "float32"):
        key = (arch, dtype)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"{arch}-{dtype}")
            src = make_source(root / "src", arch, dtype=dtype)
            convert(src, root / "flash")
            cache[key] = (src, root / "flash")
        return cache[key]

    return get


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


# The real default model, loaded once per session: each module that used a module-scoped
# copy loaded it and generated its greedy text again (48 s each on this CPU).
@pytest.fixture(scope="session")
def real_dir():
    """The default model's flash dir, pulled and converted once."""
    import os

    from mlx_flash.cli.common import default_model_dir

    try:
        return default_model_dir()
    except Exception as e:  # network or registry trouble: a skip with the reason, or a failure
        if os.environ.get("MLX_FLASH_REQUIRE_REAL_MODEL") == "1":
            raise
        pytest.skip(f"the default model could not be pulled ({e}); run `mlx-flash pull --convert`")


@pytest.fixture(scope="session")
def dense(real_dir):
    """(model, tokenizer): the dense rebuild of the default model."""
    from mlx_flash.runtime.loader import load_dense

    return load_dense(real_dir)


@pytest.fixture(scope="session")
def dense_text(dense):
    """The dense model's greedy text for real.PROMPT."""
    return greedy(*dense)
