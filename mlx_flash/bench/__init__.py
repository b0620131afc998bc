"""The benchmark (`mlx-flash bench`, `python -m mlx_flash.bench`); imported only by the CLI.

caps (DRAM caps), contenders (what runs), harness (each run in a fresh capped child process),
worker (inside the child: load, generate, measure), report (derived numbers, markdown, plots),
replay (window sweep and I/O replay), baselines (mmap'd FFN, unbundled store), cli (flags).
Nothing is imported here: `python -m mlx_flash.bench.worker` must find the worker unloaded.
"""
