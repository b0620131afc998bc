"""Build and load the C kernels of the fast CPU path (compiled once, cached)."""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path

import mlx.core as mx

from ..format.home import home, kernel_dir
from ..format.storage import atomic_write
from .kernels import CpuKernels

ENV_CPU_KERNELS = "MLX_FLASH_CPU_KERNELS"  # "0" disables the fast CPU path


class CpuKernelsUnavailable(RuntimeError):
    """The C kernels could not be built or loaded here (the message says why)."""


def kernel_source() -> Path:
    return kernel_dir("cpu_kernels.c") / "cpu_kernels.c"


def kernel_cache_dir() -> Path:
    return home() / "kernels"


def _cpu_fingerprint() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("flags", "model name"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


# -fno-math-errno: lrintf inlined to one conversion (it was a libm call per quantized value:
# x in every call, h in every down batch); the results are the same bits.
FLAG_SETS = (["-O3", "-march=native", "-fno-math-errno", "-fopenmp"],
             ["-O3", "-march=native", "-fno-math-errno"], ["-O3"])


def build_library(source: Path | None = None, out_dir: Path | None = None,
                  flag_sets: tuple[list[str], ...] = FLAG_SETS) -> Path:
    """Compile the kernels (once per source/compiler/CPU/flags) and return the library path.

    flag_sets: tried in order until one compiles (the tests build the portable scalar path
    with ["-O3"] alone)."""
    source = source or kernel_source()
    out_dir = out_dir or kernel_cache_dir()
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") \
        or shutil.which("clang")
    if not compiler:
        raise CpuKernelsUnavailable("no C compiler found (install one, e.g. `apt install gcc` or "
                                    "Xcode's command line tools, or set CC)")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise CpuKernelsUnavailable(f"C compiler {compiler} does not run: {e}") from e
    key = hashlib.sha256(source.read_bytes() + version.encode() + _cpu_fingerprint().encode()
                         + platform.machine().encode() + repr(flag_sets).encode()
                         ).hexdigest()[:16]
    out = out_dir / f"cpu_kernels-{key}.so"
    if out.exists():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in flag_sets:  # OpenMP or -march=native may be missing (Apple clang: no OpenMP)
        try:
            with atomic_write(out) as tmp:
                _compile(compiler, flags, source, tmp)
            return out
        except CpuKernelsUnavailable as e:
            errors.append(str(e))
    raise CpuKernelsUnavailable("building the CPU kernels failed:\n" + "\n".join(errors))


def _compile(compiler: str, flags: list[str], source: Path, out: Path) -> None:
    """`cc FLAGS -shared SOURCE -o OUT`; raises CpuKernelsUnavailable with the command and the
    end of the compiler's errors."""
    cmd = [compiler, *flags, "-shared", "-fPIC", str(source), "-o", str(out), "-lm"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise CpuKernelsUnavailable(f"{' '.join(cmd)}:\n{done.stderr.strip()[-800:]}")


_state: dict[str, object] = {}


def kernels() -> CpuKernels:
    """The loaded kernels (built on first call); raises CpuKernelsUnavailable."""
    if "kernels" not in _state:
        if os.environ.get(ENV_CPU_KERNELS, "1") == "0":
            raise CpuKernelsUnavailable(f"{ENV_CPU_KERNELS}=0")
        if "error" in _state:  # a failed build is not retried on every load
            raise _state["error"]  # type: ignore[misc]
        try:
            _state["kernels"] = CpuKernels(build_library())
        except CpuKernelsUnavailable as e:
            _state["error"] = e
            raise
        except OSError as e:
            _state["error"] = CpuKernelsUnavailable(f"loading the CPU kernels failed: {e}")
            raise _state["error"] from e
    return _state["kernels"]  # type: ignore[return-value]


def unavailable_reason() -> str | None:
    """None when the fast CPU path can run here, else why not."""
    try:
        kernels()
    except CpuKernelsUnavailable as e:
        return str(e)
    return None


def wanted(fast_cpu: bool | None) -> bool:
    """Resolve a `fast_cpu` argument: None = on when MLX computes on the CPU and it builds."""
    if fast_cpu is False:
        return False
    on_cpu = mx.default_device() == mx.cpu
    if fast_cpu is None and not on_cpu:
        return False
    reason = unavailable_reason()
    if reason is None:
        return True
    if fast_cpu:
        raise CpuKernelsUnavailable(f"fast_cpu=True but {reason}")
    _warn_once(reason)
    return False


@functools.cache
def _warn_once(reason: str) -> None:
    warnings.warn(f"mlx-flash: fast CPU path unavailable, using MLX's CPU kernels: {reason}",
                  stacklevel=3)
