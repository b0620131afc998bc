"""`mlx-flash bench`."""

from __future__ import annotations

import sys
from pathlib import Path


def run_bench(argv: list[str]) -> int:
    """Run scripts/benchmark.py (it lives in the source checkout, beside the package)."""
    import importlib.util

    script = Path(__file__).resolve().parent.parent / "scripts" / "benchmark.py"
    if not script.exists():
        raise FileNotFoundError(f"{script} not found: `mlx-flash bench` runs the benchmark "
                                "script of a source checkout (pip install -e .)")
    spec = importlib.util.spec_from_file_location("mlx_flash_benchmark", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module.main(argv)
