"""`python -m mlx_flash.bench ...`: the benchmark (see mlx_flash.bench.cli)."""

import sys

from .cli import main

sys.exit(main(prog="python -m mlx_flash.bench"))
