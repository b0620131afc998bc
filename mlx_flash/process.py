"""Process-wide settings, applied in one named place (allocator, MLX cache limit, BLAS threads)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path


def return_freed_memory_to_os() -> None:
    """Make glibc give large freed buffers back to the OS (Linux only; no-op elsewhere).

    glibc raises its mmap threshold each time a large block is freed, so the store's 5-25 MB
    read buffers end up in the heap and stay there after free: ~120 MB of RSS that no budget
    planned for. A fixed threshold keeps every block over 1 MiB in its own mapping.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
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
    import ctypes
    import ctypes.util
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc
