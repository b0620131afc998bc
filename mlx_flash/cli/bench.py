"""`mlx-flash bench`."""

from __future__ import annotations

from ..bench.cli import main


def run_bench(argv: list[str]) -> int:
    """The benchmark (mlx_flash.bench) with every flag after `bench`."""
    return main(argv, prog="mlx-flash bench")
