from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_source  # noqa: E402


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
