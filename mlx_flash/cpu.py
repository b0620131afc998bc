"""The fast CPU path: C kernels over 16-bit weights, called on zero-copy numpy views.

On this project's CPU machine the `mlx[cpu]` wheel multiplies f32 matrices with a reference
BLAS and runs f16/bf16 matmuls at 1-2.5 GB/s, so a decode step of the default model took ~450 ms
in MLX (BENCHMARKS.md, issue 11). Here the weights stay in their 16-bit storage type and
`kernels/cpu_kernels.c` widens them to f32 in registers (F16C/AVX2/FMA, OpenMP threads):

- `FastLinear` replaces `nn.Linear` (attention projections, lm_head, a dense MLP); sibling
  projections that read the same input (q/k/v, gate/up) are fused into one call.
- `ffn16` / `ffnq` compute the FFN over the neuron cache's rows (`BundleFFN` /
  `QuantBundleFFN`); the cache buffers are then numpy arrays that the window update edits in
  place.

The C file is compiled on first use with the system compiler (`cc`, or $CC) into
`$MLX_FLASH_HOME/kernels` (default ~/.cache/mlx_flash/kernels), keyed by the source, compiler
and CPU, written under a temporary name and renamed. Without a compiler the fast path is
unavailable and the MLX path (the reference, and what runs on a GPU) is used, with the reason in
`unavailable_reason()`. `MLX_FLASH_CPU_KERNELS=0` turns the fast path off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .format import FFNLayout
from .quant import unpack_bundles

ENV_CPU_KERNELS = "MLX_FLASH_CPU_KERNELS"  # "0" disables the fast CPU path
DT_CODES = {"float16": 0, "bfloat16": 1}
ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_approx": 2, "relu": 3, "relu2": 4}
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class CpuKernelsUnavailable(RuntimeError):
    """The C kernels could not be built or loaded here (the message says why)."""


# -- building and loading the library -------------------------------------------------------


def kernel_source() -> Path:
    from .kernels import kernel_dir

    return kernel_dir() / "cpu_kernels.c"


def kernel_cache_dir() -> Path:
    home = os.environ.get("MLX_FLASH_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "mlx_flash"
    return base / "kernels"


def _cpu_fingerprint() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("flags", "model name"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"], ["-O3"])


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
        fd, tmp = tempfile.mkstemp(prefix=".cpu_kernels-", suffix=".so", dir=out_dir)
        os.close(fd)
        cmd = [compiler, *flags, "-shared", "-fPIC", str(source), "-o", tmp, "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode == 0:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, out)
            return out
        os.unlink(tmp)
        errors.append(f"{' '.join(cmd)}:\n{done.stderr.strip()[-800:]}")
    raise CpuKernelsUnavailable("building the CPU kernels failed:\n" + "\n".join(errors))


_VOIDP, _INT, _I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
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


class CpuKernels:
    """ctypes bindings of the built library."""

    def __init__(self, path: Path):
        # OpenMP threads that spin between calls steal the core MLX and the reads need (measured
        # on 2 busy cores: a 4864-row linear 12 ms spinning, 0.3 ms passive). Read at load.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        single_threaded_blas()
        lib = ctypes.CDLL(str(path))
        lib.linear16.argtypes = [_VOIDP, _I64, _INT, _INT, _INT, _VOIDP, _INT, _VOIDP, _VOIDP]
        lib.ffn16.argtypes = [_VOIDP, _I64, _I64, _INT, _VOIDP, _INT, _INT, _INT, _VOIDP, _INT,
                              _VOIDP, _I64, _VOIDP, _INT, _VOIDP, _VOIDP, _VOIDP]
        lib.linear_q.argtypes = [_VOIDP, _VOIDP, _VOIDP, _INT, _INT, _INT, _INT, _VOIDP, _INT,
                                 _VOIDP, _VOIDP, _VOIDP]
        lib.ffnq.argtypes = [_VOIDP, _VOIDP, _VOIDP, _INT, _INT, _I64, _INT, _INT, _INT, _INT,
                             _VOIDP, _INT, _VOIDP, _VOIDP, _VOIDP, _INT, _VOIDP, _VOIDP, _VOIDP]
        for fn in (lib.linear16, lib.ffn16, lib.linear_q, lib.ffnq):
            fn.restype = None
        self._lib, self.path = lib, path
        self.threads: int = lib.flash_threads()
        self.vector: bool = bool(lib.flash_vector_path())

    def linear16(self, weight: np.ndarray, dtype: str, x: np.ndarray,
                 bias: np.ndarray | None = None) -> np.ndarray:
        """x (T, d) f32 contiguous, weight (rows, d) 16-bit storage -> (T, rows) f32."""
        rows, d = weight.shape
        _check_operands(weight, x, d)
        y = np.empty((x.shape[0], rows), dtype=np.float32)
        self._lib.linear16(weight.ctypes.data, weight.strides[0] // 2, rows, d, DT_CODES[dtype],
                           x.ctypes.data, x.shape[0], _ptr(bias), y.ctypes.data)
        return y

    def linear_q(self, wq: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int,
                 group_size: int, x: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
        """x (T, d) f32 times MLX affine-quantized rows: wq (rows, d * bits / 32) uint32,
        scales/biases (rows, d / group_size) f32 -> (T, rows) f32."""
        rows, d = wq.shape[0], wq.shape[1] * 32 // bits
        if wq.dtype != np.uint32 or not wq.flags.c_contiguous or bits not in (4, 8):
            raise ValueError(f"linear_q needs contiguous uint32 4/8-bit rows, got {wq.dtype} "
                             f"{bits}-bit")
        _check_x(x, d)
        xsum = _group_sums(x, group_size)
        y = np.empty((x.shape[0], rows), dtype=np.float32)
        self._lib.linear_q(wq.ctypes.data, scales.ctypes.data, biases.ctypes.data, rows, d, bits,
                           group_size, x.ctypes.data, x.shape[0], xsum.ctypes.data, _ptr(bias),
                           y.ctypes.data)
        return y

    def ffnq(self, q: np.ndarray, scales: np.ndarray, biases: np.ndarray, dtype: str, n: int,
             bits: int, group_size: int, x: np.ndarray, activation: str,
             mask: np.ndarray | None = None, in_bias: np.ndarray | None = None) -> np.ndarray:
        """`ffn16` over quantized rows: q (P, capacity, d * bits / 32) uint32, scales/biases
        (P, capacity, d / group_size) uint16 bits of `dtype`, neurons [0, n); in_bias
        (P - 1, capacity) f32 or None. Returns (T, d) f32."""
        parts, capacity, words = q.shape
        d = words * 32 // bits
        for a in (q, scales, biases):
            if not a.flags.c_contiguous:
                raise ValueError("ffnq needs contiguous buffers")
        if d // group_size > 512:
            raise ValueError(f"{d // group_size} groups per row: at most 512 supported")
        tokens = x.shape[0]
        _check_x(x, d)
        mask = _mask_rows(mask, tokens, n)
        xsum = _group_sums(x, group_size)
        h, partial, y = self._ffn_scratch(tokens, n, d)
        self._lib.ffnq(q.ctypes.data, scales.ctypes.data, biases.ctypes.data, DT_CODES[dtype],
                       parts, capacity, n, d, bits, group_size, x.ctypes.data, tokens,
                       xsum.ctypes.data, _ptr(in_bias), _ptr(mask),
                       ACTIVATION_CODES[activation], h.ctypes.data, partial.ctypes.data,
                       y.ctypes.data)
        return y

    def ffn16(self, base: np.ndarray, strides: tuple[int, int], parts: int, n: int, d: int,
              dtype: str, x: np.ndarray, activation: str, mask: np.ndarray | None = None,
              in_bias: np.ndarray | None = None, slots: np.ndarray | None = None) -> np.ndarray:
        """The FFN over n neurons of a 16-bit buffer (`kernels.ffn_over_rows`' result).

        base: uint16 array holding the rows; strides: (part, neuron) in elements, e.g.
        (capacity * d, d) for a part-major (P, capacity, d) buffer or (d, stride / 2) for raw
        bundles (k, stride). x: (T, d) f32; mask: (T, n) or None; in_bias: (P - 1, m) f32
        indexed by slot, or None; slots: (n,) int32 or None for neurons [0, n).
        Returns (T, d) f32.
        """
        if base.dtype != np.uint16 or not base.flags.c_contiguous:
            raise ValueError(f"ffn16 needs a contiguous uint16 buffer, got {base.dtype}")
        tokens = x.shape[0]
        _check_operands(base.reshape(-1, base.shape[-1]), x, d)
        mask = _mask_rows(mask, tokens, n)
        if in_bias is not None:
            in_bias = np.ascontiguousarray(in_bias, dtype=np.float32)
        if slots is not None:
            slots = np.ascontiguousarray(slots, dtype=np.int32)
        h, partial, y = self._ffn_scratch(tokens, n, d)
        self._lib.ffn16(base.ctypes.data, strides[0], strides[1], parts, _ptr(slots), n, d,
                        DT_CODES[dtype], x.ctypes.data, tokens, _ptr(in_bias),
                        0 if in_bias is None else in_bias.shape[1], _ptr(mask),
                        ACTIVATION_CODES[activation], h.ctypes.data, partial.ctypes.data,
                        y.ctypes.data)
        return y


    def _ffn_scratch(self, tokens: int, n: int, d: int) -> tuple[np.ndarray, ...]:
        """The FFN kernels' h (T, n) and per-thread partial sums, and the output (T, d)."""
        return (np.empty((tokens, max(n, 1)), dtype=np.float32),
                np.empty((self.threads, tokens, d), dtype=np.float32),
                np.empty((tokens, d), dtype=np.float32))


def _mask_rows(mask: np.ndarray | None, tokens: int, n: int) -> np.ndarray | None:
    return None if mask is None else \
        np.ascontiguousarray(mask, dtype=np.float32).reshape(tokens, n)


def _group_sums(x: np.ndarray, group_size: int) -> np.ndarray:
    """(T, d) -> (T, d / group_size): what the affine biases multiply."""
    return np.ascontiguousarray(x.reshape(x.shape[0], -1, group_size).sum(-1))


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def _check_operands(weight: np.ndarray, x: np.ndarray, d: int) -> None:
    if weight.dtype != np.uint16 or weight.strides[-1] != 2:
        raise ValueError(f"16-bit weights must be a uint16 view with unit column stride, got "
                         f"{weight.dtype} strides {weight.strides}")
    if weight.shape[-1] < d:
        raise ValueError(f"rows of {weight.shape[-1]} elements cannot hold {d} columns")
    _check_x(x, d)


def _check_x(x: np.ndarray, d: int) -> None:
    if x.dtype != np.float32 or not x.flags.c_contiguous or x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"x must be a contiguous (T, {d}) float32 array, got {x.dtype} "
                         f"{x.shape}")


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
    import warnings

    warnings.warn(f"mlx-flash: fast CPU path unavailable, using MLX's CPU kernels: {reason}",
                  stacklevel=3)


# -- 16-bit arrays between MLX and numpy ----------------------------------------------------


def storage_view(a: mx.array) -> tuple[np.ndarray, str]:
    """A 16-bit MLX array as (uint16 numpy array, "float16" | "bfloat16"), zero-copy."""
    if a.dtype == mx.float16:
        return np.asarray(a).view(np.uint16), "float16"
    if a.dtype == mx.bfloat16:
        return np.asarray(a.view(mx.uint16)), "bfloat16"
    raise ValueError(f"expected a float16/bfloat16 array, got {a.dtype}")


def to_f32_rows(x: mx.array) -> np.ndarray:
    """(..., d) MLX array -> contiguous (T, d) float32 numpy array (evaluates x)."""
    flat = np.asarray(x.astype(mx.float32) if x.dtype != mx.float32 else x)
    return np.ascontiguousarray(flat.reshape(-1, x.shape[-1]))


# -- modules ---------------------------------------------------------------------------------


class FastLinear(nn.Module):
    """nn.Linear over a 16-bit weight, computed by `linear16`; output in float32.

    Several FastLinear may share one fused weight (`_FusedWeight`): the first member called
    with an input computes every member's output, the others slice it.
    """

    def __init__(self, fused: _FusedWeight, start: int, stop: int):
        super().__init__()
        self._fused, self._start, self._stop = fused, start, stop  # underscored: no parameters

    def __call__(self, x: mx.array) -> mx.array:
        y = self._fused(x)
        if (self._start, self._stop) != (0, y.shape[-1]):
            y = y[..., self._start:self._stop]
        return y

    @property
    def fused(self) -> _FusedWeight:
        """The weight this linear shares with its fused siblings (cpu_decode.py calls it)."""
        return self._fused

    @property
    def span(self) -> slice:
        """This linear's columns in the fused output."""
        return slice(self._start, self._stop)


class _FusedWeight:
    """The concatenated rows of sibling linears and the last (input, output) pair.

    16-bit weights (zero-copy when there is one member) or MLX affine-quantized ones (4/8 bits,
    scales and biases widened to f32 once)."""

    def __init__(self, linears: list[nn.Module]):
        first = linears[0]
        self.bits = getattr(first, "bits", 16)
        if self.bits == 16:
            views = [storage_view(lin.weight) for lin in linears]
            assert len({dt for _, dt in views}) == 1, "fused linears must share a dtype"
            self.dtype = views[0][1]
            self.weight = _concat([v for v, _ in views])
        else:
            self.group_size = first.group_size
            self.weight = _concat([np.asarray(lin.weight) for lin in linears])
            self.scales, self.biases = (
                _concat([np.asarray(getattr(lin, k).astype(mx.float32)) for lin in linears])
                for k in ("scales", "biases"))
        has_bias = any("bias" in lin for lin in linears)
        biases = [np.asarray(lin.bias.astype(mx.float32)) if "bias" in lin
                  else np.zeros(lin.weight.shape[0], np.float32) for lin in linears]
        self.bias = np.ascontiguousarray(np.concatenate(biases)) if has_bias else None
        self.rows = self.weight.shape[0]
        self._last: tuple[mx.array, mx.array] | None = None

    def __call__(self, x: mx.array) -> mx.array:
        if self._last is not None and self._last[0] is x:
            return self._last[1]
        y = self.apply(to_f32_rows(x))
        out = mx.array(y).reshape(*x.shape[:-1], y.shape[1])
        self._last = (x, out)
        return out

    def apply(self, x: np.ndarray) -> np.ndarray:
        """x: (T, d) contiguous f32 -> (T, rows) f32: every member's output, no MLX graph."""
        if self.bits == 16:
            return kernels().linear16(self.weight, self.dtype, x, self.bias)
        return kernels().linear_q(self.weight, self.scales, self.biases, self.bits,
                                  self.group_size, x, self.bias)


class FastEmbedding(nn.Module):
    """nn.Embedding over a 16-bit table that returns f32 rows; `as_linear` (a tied lm_head)
    runs on `linear16`."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.weight = embedding.weight  # a parameter still: the model's weights stay loadable
        self._head: _FusedWeight | None = None

    def __call__(self, ids: mx.array) -> mx.array:
        return self.weight[ids].astype(mx.float32)

    def as_linear(self, x: mx.array) -> mx.array:
        if self._head is None:
            self._head = _FusedWeight([self])
        return self._head(x)


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    """One contiguous array of the members' rows (a copy: the MLX arrays can then go)."""
    return np.ascontiguousarray(arrays[0]) if len(arrays) == 1 else np.concatenate(arrays)


def _is_fast_linear(module) -> bool:
    """16-bit nn.Linear, or 4/8-bit affine nn.QuantizedLinear with groups of 8k <= 128."""
    if type(module) is nn.Linear:
        return module.weight.dtype in (mx.float16, mx.bfloat16)
    return (type(module) is nn.QuantizedLinear and module.bits in (4, 8)
            and getattr(module, "mode", "affine") == "affine" and module.group_size % 8 == 0
            and module.group_size <= 128)


def accelerate(model: nn.Module) -> int:
    """Swap every 16-bit `nn.Linear` of `model` for a FastLinear, fusing q/k/v and gate/up.

    16-bit embedding tables become FastEmbedding (f32 rows out, fast tied lm_head), and
    llama-family blocks run in numpy (cpu_decode.install). Returns how many linears were
    swapped. f32 linears stay MLX's.
    """
    swapped = 0
    for _, parent in model.named_modules():
        for name, child in parent.children().items():
            if type(child) is nn.Embedding and child.weight.dtype in (mx.float16, mx.bfloat16):
                setattr(parent, name, FastEmbedding(child))
        children = {k: v for k, v in parent.children().items() if _is_fast_linear(v)}
        for group in FUSED_SIBLINGS:
            members = [name for name in group if name in children]
            if len(members) > 1 and len({_fusion_key(children[m]) for m in members}) == 1:
                fused = _FusedWeight([children.pop(m) for m in members])
                start = 0
                for name in members:
                    rows = parent[name].weight.shape[0]
                    setattr(parent, name, FastLinear(fused, start, start + rows))
                    start += rows
                    swapped += 1
        for name, linear in children.items():
            fused = _FusedWeight([linear])
            setattr(parent, name, FastLinear(fused, 0, fused.rows))
            swapped += 1
    mx.clear_cache()  # the replaced MLX weights: give their memory back now
    from . import cpu_decode

    cpu_decode.install(model)  # then llama-family blocks run without an MLX graph
    return swapped


def _fusion_key(linear: nn.Module) -> tuple:
    """Linears fuse when these agree: input width, dtype, quantization."""
    return (linear.weight.shape[1], linear.weight.dtype, getattr(linear, "bits", 16),
            getattr(linear, "group_size", 0))


# -- the neuron cache's buffers --------------------------------------------------------------


def window_update_numpy(buffer: np.ndarray, dst: np.ndarray, src: np.ndarray,
                        slots: np.ndarray, rows: np.ndarray) -> None:
    """`kernels.window_update` in place on a numpy buffer: swap-delete, then append-insert."""
    if dst.size:
        buffer[:, dst] = buffer[:, src]
    if slots.size:
        buffer[:, slots] = rows


class BundleFFN:
    """The fast path's FFN over 16-bit bundles. The cache buffer is (capacity, stride) bytes,
    each slot a bundle exactly as read from flash (gate | up | down | biases, see format.py):
    the window update moves whole bundles and the kernel reads each neuron from one place."""

    def __init__(self, layout: FFNLayout):
        self.d, self.parts = layout.d_model, len(layout.matrix_names)
        self.dtype, self.activation = layout.dtype, layout.activation
        self.bias_offsets = [p.offset for p in layout.parts if p.name.endswith("_bias")]

    def cache_spec(self, stride: int) -> dict[str, tuple[int, int, mx.Dtype]]:
        """NeuronCache buffers (name -> (parts, width, dtype)) for bundles of `stride` bytes."""
        return {"bundles": (1, stride, mx.uint8)}

    def update(self, buffers: dict[str, np.ndarray], dst: np.ndarray, src: np.ndarray,
               slots: np.ndarray, rows: np.ndarray) -> None:
        """A window update in place (see `window_update_numpy`); rows: the new neurons'
        bundles (k, stride) for `slots`."""
        window_update_numpy(buffers["bundles"], dst, src, slots, rows[None])

    def over_cache(self, cache, x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        return self.over_rows(cache.buffers["bundles"][0], x, mask, cache.n)

    def over_rows(self, bundles: np.ndarray, x: np.ndarray, mask: np.ndarray | None = None,
                  n: int | None = None) -> np.ndarray:
        """bundles: (k, stride) uint8; x: (T, d) f32 -> (T, d) f32 over bundles [0, n or k)."""
        n = bundles.shape[0] if n is None else n
        elems = bundles.view(np.uint16)
        in_bias = None
        if self.bias_offsets and n:
            in_bias = storage_to_f32(elems[:n, self.bias_offsets], self.dtype).T
        return kernels().ffn16(elems, (self.d, elems.shape[1]), self.parts, n, self.d,
                               self.dtype, x, self.activation, mask, in_bias)


class QuantBundleFFN:
    """The fast path's FFN over 4/8-bit bundles: the cache keeps the unpacked parts as numpy
    buffers like the MLX path's ("q" uint32, "scales"/"biases" 16-bit, "bias" f32) and `ffnq`
    decodes the rows in registers."""

    def __init__(self, layout: FFNLayout):
        self.layout = layout
        self.dtype, self.activation = layout.dtype, layout.activation
        self.bits, self.group_size = layout.bits, layout.group_size

    def cache_spec(self, stride: int) -> dict[str, tuple[int, int, mx.Dtype]]:
        layout = self.layout
        parts, groups = len(layout.matrix_names), layout.d_model // layout.group_size
        spec = {"q": (parts, layout.d_model * layout.bits // 32, mx.uint32),
                "scales": (parts, groups, mx.uint16), "biases": (parts, groups, mx.uint16)}
        if layout.bias_names:
            spec["bias"] = (len(layout.bias_names), 1, mx.float32)
        return spec

    def _unpack(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        parts = unpack_bundles(rows, self.layout)
        out = {k: np.ascontiguousarray(parts[k]).view(np.uint16 if k != "q" else np.uint32)
               for k in ("q", "scales", "biases")}
        if "bias" in parts:
            out["bias"] = storage_to_f32(parts["bias"].view(np.uint16), self.dtype)[:, :, None]
        return out

    def update(self, buffers: dict[str, np.ndarray], dst: np.ndarray, src: np.ndarray,
               slots: np.ndarray, rows: np.ndarray) -> None:
        new = self._unpack(rows)
        for name, buffer in buffers.items():
            window_update_numpy(buffer, dst, src, slots, new[name])

    def over_cache(self, cache, x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        return self._ffn(cache.buffers, cache.n, x, mask)

    def over_rows(self, rows: np.ndarray, x: np.ndarray, mask: np.ndarray | None = None,
                  n: int | None = None) -> np.ndarray:
        return self._ffn(self._unpack(rows), rows.shape[0] if n is None else n, x, mask)

    def _ffn(self, b: dict[str, np.ndarray], n: int, x: np.ndarray,
             mask: np.ndarray | None) -> np.ndarray:
        in_bias = np.ascontiguousarray(b["bias"][:, :, 0]) if "bias" in b else None
        return kernels().ffnq(b["q"], b["scales"], b["biases"], self.dtype, n, self.bits,
                              self.group_size, x, self.activation, mask, in_bias)


def fast_ffn(layout: FFNLayout) -> BundleFFN | QuantBundleFFN:
    """The fast path's FFN for this bundle layout."""
    if not supports(layout):
        raise ValueError(f"the fast CPU FFN needs 16-bit storage, got {layout.dtype}")
    return QuantBundleFFN(layout) if layout.quantized else BundleFFN(layout)


def supports(layout: FFNLayout) -> bool:
    """16-bit bundles, or 4/8-bit ones with 16-bit scales."""
    return layout.dtype in DT_CODES


_NP_DTYPES = {mx.uint8: np.uint8, mx.uint16: np.uint16, mx.uint32: np.uint32,
              mx.float32: np.float32}


def numpy_zeros(shape: tuple[int, ...], dtype: mx.Dtype) -> np.ndarray:
    """A zeroed numpy cache buffer, its pages touched now (the budget counts them from load)."""
    buffer = np.zeros(shape, dtype=_NP_DTYPES[dtype])
    buffer.fill(0)
    return buffer


def storage_to_f32(a: np.ndarray, dtype: str) -> np.ndarray:
    """uint16 bits of float16/bfloat16 values -> float32."""
    if dtype == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.view(np.float16).astype(np.float32)
