"""`python -m mlx_flash`: the `mlx-flash` command."""

import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
