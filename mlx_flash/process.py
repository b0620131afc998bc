"""Process-wide settings: the one place mlx-flash changes the allocator, MLX or thread pools.

Each setting affects the whole process, not just one model; two entry points apply them:

- `apply_budget_settings(cache_limit)`: `load()` calls it when a DRAM budget is given.
  1. MLX's buffer cache limit (`mx.set_cache_limit`). MLX keeps freed buffers for reuse; under
     a budget that cache is RSS the plan did not count, so it is limited to the plan's scratch.
     Undone: the returned function restores the previous limit (`FlashRuntime.close()` calls
     it). With two models loaded, closing one restores the limit from before it was loaded.
  2. glibc's mmap threshold fixed at 1 MiB (`return_freed_memory_to_os`). Not undone: glibc
     cannot go back to its adaptive threshold, and the fixed one only returns large freed
     blocks to the OS sooner.
- `apply_cpu_kernel_settings()`: the fast CPU path's kernels call it before loading their
  library (accel/kernels.py).
  3. OMP_WAIT_POLICY=PASSIVE unless the environment sets it. Not undone: OpenMP reads it once,
     when the kernels' library loads.
  4. numpy's OpenBLAS on one thread unless OPENBLAS_NUM_THREADS is set
     (`single_threaded_blas`). Not undone: numpy's own matmuls stay single-threaded after.

`trim_heap()` is a one-off action, not a setting: it hands free heap pages back now (the
manifest reader calls it after parsing large placement lists).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx


def apply_budget_settings(cache_limit: int) -> Callable[[], None]:
    """Settings 1 and 2 of the module doc, for a budget whose plan leaves `cache_limit` bytes
    to MLX's buffer cache. Returns the undo (restores MLX's previous cache limit)."""
    previous = mx.set_cache_limit(cache_limit)
    return_freed_memory_to_os()

    def restore() -> None:
        mx.set_cache_limit(previous)

    return restore


def apply_cpu_kernel_settings() -> None:
    """Settings 3 and 4 of the module doc: before the CPU kernels' library is loaded.

    OpenMP threads that spin between calls steal the core MLX and the reads need (measured on
    2 busy cores: a 4864-row linear 12 ms spinning, 0.3 ms passive)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    single_threaded_blas()


def _libc() -> ctypes.CDLL | None:
    """glibc on Linux, else None (macOS, or a libc without the calls: musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def return_freed_memory_to_os() -> None:
    """Make glibc give large freed buffers back to the OS (Linux only; no-op elsewhere).

    glibc raises its mmap threshold each time a large block is freed, so the store's 5-25 MB
    read buffers end up in the heap and stay there after free: ~120 MB of RSS that no budget
    planned for. A fixed threshold keeps every block over 1 MiB in its own mapping.
    """
    libc = _libc()
    try:
        if libc is not None:
            libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except AttributeError:
        pass  # not glibc (musl): nothing to tune


_BLAS_THREAD_SETTERS = ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_",
                        "openblas_set_num_threads")


def single_threaded_blas() -> bool:
    """Put numpy's OpenBLAS on one thread, unless OPENBLAS_NUM_THREADS says otherwise.

    Its threads spin between calls and take the cores the kernels' OpenMP threads need: the
    numpy attention's (343, 64) x (64, 49) product of a prefill took 8 ms with OpenBLAS's two
    threads on a busy machine and 35 us with one (BENCHMARKS.md, issue 11). Returns whether an
    OpenBLAS was found (none on macOS, where numpy uses Accelerate)."""
    if "OPENBLAS_NUM_THREADS" in os.environ:
        return False
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    paths = {line.split()[-1] for line in maps.splitlines()
             if "openblas" in line.lower() and line.split()[-1].startswith("/")}
    for path in sorted(paths):
        lib = ctypes.CDLL(path)  # already loaded by numpy: the same handle
        for name in _BLAS_THREAD_SETTERS:
            setter = getattr(lib, name, None)
            if setter is not None:
                setter(1)
                return True
    return False


def trim_heap() -> None:
    """Give glibc's free heap pages back to the OS (Linux/glibc only; no-op elsewhere)."""
    libc = _libc()
    try:
        if libc is not None:
            libc.malloc_trim(0)
    except AttributeError:
        pass  # not glibc
