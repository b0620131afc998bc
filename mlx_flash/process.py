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
manifest reader calls it after parsing large placement lists, the loader after the tokenizer).
`drop_page_cache(path)` hands a file's clean page cache back (the loader, after the resident
weights are copied): under a cgroup memory cap page cache counts against the cap.

`defer_mlx_lm_init()` (importing `mlx_flash` calls it first): mlx_lm's package __init__
imports transformers (~1-2 s, 35-45 MiB of RSS) for its tokenizer, generate and convert;
the generate/serve path needs only `mlx_lm.models.*` and `mlx_lm.sample_utils`. Until a name
of the package itself (`mlx_lm.load`, `from mlx_lm import generate`) or any other submodule
is used, the __init__ has not run; then it runs, once, and mlx_lm is the ordinary package.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.abc
import importlib.util
import os
import sys
import types
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


def drop_page_cache(path: Path) -> None:
    """posix_fadvise(DONTNEED) over the whole file: its clean cached pages are freed now
    (no-op where the call is missing)."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


LITE_MLX_LM = ("mlx_lm.models", "mlx_lm.sample_utils", "mlx_lm._version")


class _DeferredPackage(types.ModuleType):
    """mlx_lm before its __init__ ran: the first name looked up on it runs the __init__."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        _finish_mlx_lm()
        return types.ModuleType.__getattribute__(self, name)

    def __setattr__(self, name: str, value) -> None:
        # importing a submodule binds it on the package; the real __init__ binds some names
        # (generate, convert) to functions of the same name, which must stay the functions
        current = self.__dict__.get(name)
        if isinstance(value, types.ModuleType) and current is not None and \
                not isinstance(current, types.ModuleType):
            return
        types.ModuleType.__setattr__(self, name, value)


class _FinishFirst(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Runs mlx_lm's __init__ before any of its submodules outside LITE_MLX_LM is imported."""

    def find_spec(self, name, path, target=None):
        if not name.startswith("mlx_lm.") or name.startswith(LITE_MLX_LM):
            return None
        _finish_mlx_lm()
        # the __init__ may have imported `name` itself: hand that module back, do not rerun it
        return importlib.util.spec_from_loader(name, self) if name in sys.modules else None

    def create_module(self, spec):
        return sys.modules[spec.name]

    def exec_module(self, module) -> None:
        pass


_FINDER = _FinishFirst()


def defer_mlx_lm_init() -> bool:
    """Put mlx_lm in sys.modules with its __init__ deferred (module doc). Returns whether it
    did: not when mlx_lm is already imported or not installed."""
    if "mlx_lm" in sys.modules:
        return False
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or spec.loader is None:
        return False
    package = importlib.util.module_from_spec(spec)
    package.__class__ = _DeferredPackage
    sys.modules["mlx_lm"] = package
    sys.meta_path.insert(0, _FINDER)
    return True


def _finish_mlx_lm() -> None:
    """Run mlx_lm's real __init__ in the deferred package (once)."""
    package = sys.modules.get("mlx_lm")
    if not isinstance(package, _DeferredPackage):
        return
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
    package.__class__ = _Finished
    try:
        package.__spec__.loader.exec_module(package)
    except BaseException:
        package.__class__ = _DeferredPackage
        sys.meta_path.insert(0, _FINDER)
        raise
    package.__class__ = _Finished


class _Finished(_DeferredPackage):
    """mlx_lm while and after its __init__ runs: plain lookups, the setattr rule kept."""

    def __getattr__(self, name: str):
        raise AttributeError(f"module 'mlx_lm' has no attribute {name!r}")
