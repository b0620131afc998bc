"""The FFN over cached neuron rows, and the window update of the cache buffer.

The neuron cache keeps each layer's rows part-major: `weights` is `(P, capacity, d_model)` where
P = 3 for a gated FFN (gate, up, down rows) and 2 for a plain one (up, down). Slot s of every part
belongs to the same neuron, so `weights[p, :n]` is a contiguous matrix of the first n cached
neurons. Biases of the input projections, when the FFN has them, are `(P - 1, capacity)`.

This module has two levels:

- The pure-MLX reference (`ffn_over_rows`, `window_update` in `reference.py`): the definition of
  correct, and what runs on CPU. Nothing is computed when they return: they build lazy graphs.
- Dispatchers (`compute_ffn`, `apply_window_update`, here) that run the custom GPU kernels from
  the top-level `kernels/` directory when `backend()` is "metal" or "cuda", and the reference
  otherwise. `MLX_FLASH_KERNELS=reference` or `with force_reference():` pins the
  reference.

The kernel sources are bodies for `mx.fast.metal_kernel` / `mx.fast.cuda_kernel`, several per file,
separated by marker lines (see `parse_kernel_source`). Each kernel is built once, lazily, on its
first call; MLX then compiles one specialisation per set of template arguments (dtypes, P, tokens,
activation, flags) and caches it.

Self-check: the first time the dispatchers meet a specialisation on a GPU they run it and the
reference on a small random input (`_trusted`). A compile error or a result that disagrees gives
one RuntimeWarning naming the kernel, and that specialisation runs the reference from then on.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..format.arch import ACTIVATION_CODES
from ..format.home import kernel_dir as home_kernel_dir
from ..format.manifest import round_up
from .reference import _check_activation, ffn_over_rows, window_update

ENV_KERNELS = "MLX_FLASH_KERNELS"  # "auto" (default) or "reference"


ENV_WINDOW_KERNEL = "MLX_FLASH_WINDOW_KERNEL"  # "1": window updates use the GPU kernel


_force_reference: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "mlx_flash_force_reference", default=False)


@contextlib.contextmanager
def force_reference() -> Iterator[None]:
    """Run the MLX reference inside the block, whatever the backend (tests, A/B checks)."""
    token = _force_reference.set(True)
    try:
        yield
    finally:
        _force_reference.reset(token)


def _cuda_available() -> bool:
    cuda = getattr(mx, "cuda", None)  # mx.cuda exists from MLX 0.29 on
    return bool(cuda is not None and cuda.is_available())


def backend() -> str:
    """What the dispatchers run now: "metal", "cuda" or "reference".

    The reference when forced (env var or `force_reference`), when the default device is the CPU,
    or when MLX has neither GPU back end (Linux CPU wheels).
    """
    choice = os.environ.get(ENV_KERNELS, "auto").strip().lower()
    if choice not in ("auto", "reference"):
        raise ValueError(f"{ENV_KERNELS}={choice!r}: expected 'auto' or 'reference'")
    if choice == "reference" or _force_reference.get():
        return "reference"
    if mx.default_device() != mx.gpu:
        return "reference"
    if mx.metal.is_available():
        return "metal"
    if _cuda_available():
        return "cuda"
    return "reference"


SOURCE_FILES = {"metal": ("sparse_ffn.metal", "window_update.metal"),
                "cuda": ("sparse_ffn.cu", "window_update.cu")}


_HEADER_RE = re.compile(r"^// @header\s*$")


_KERNEL_RE = re.compile(r"^// @kernel (\w+)\(([\w, ]*)\) -> \(([\w, ]*)\)\s*$")


@dataclass(frozen=True)
class KernelSource:
    """One kernel body and the names MLX puts in its generated signature."""

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    header: str
    source: str


def _names(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def parse_kernel_source(text: str) -> dict[str, KernelSource]:
    """Split a kernel file into its kernels.

    Lines before the first marker are the file's comment block. `// @header` starts the helpers
    every kernel of the file gets as `header=`; `// @kernel NAME(in, ...) -> (out, ...)` starts a
    kernel body, which runs to the next marker.
    """
    header: list[str] = []
    bodies: dict[str, tuple[tuple[str, ...], tuple[str, ...], list[str]]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if _HEADER_RE.match(line):
            current = header
            continue
        match = _KERNEL_RE.match(line)
        if match:
            name, ins, outs = match.groups()
            if name in bodies:
                raise ValueError(f"kernel {name!r} is defined twice")
            current = []
            bodies[name] = (_names(ins), _names(outs), current)
            continue
        if current is not None:
            current.append(line)
    head = "\n".join(header).strip() + "\n"
    return {name: KernelSource(name, ins, outs, head, "\n".join(body).strip() + "\n")
            for name, (ins, outs, body) in bodies.items()}


def kernel_dir() -> Path:
    """Where the .metal / .cu sources are (`format.home.kernel_dir`)."""
    return home_kernel_dir(SOURCE_FILES["metal"][0])


@functools.cache
def kernel_sources(which: str) -> dict[str, KernelSource]:
    """All kernels of one back end ("metal" or "cuda"), by name."""
    sources: dict[str, KernelSource] = {}
    for file_name in SOURCE_FILES[which]:
        sources.update(parse_kernel_source((kernel_dir() / file_name).read_text()))
    return sources


@functools.cache
def _kernel(name: str, which: str) -> Callable[..., list[mx.array]]:
    """The MLX kernel object, built on first use (building compiles nothing yet)."""
    src = kernel_sources(which)[name]
    make = mx.fast.metal_kernel if which == "metal" else mx.fast.cuda_kernel
    return make(name=name, input_names=list(src.input_names),
                output_names=list(src.output_names), source=src.source, header=src.header)


SIMD = 32  # lanes per Apple simdgroup / NVIDIA warp: one per neuron row in flash_ffn_act


ROWS_PER_GROUP = 8  # neurons (simdgroups) per threadgroup of flash_ffn_act: 256 threads


COLS_PER_GROUP = 128  # output columns per threadgroup of flash_ffn_down


NEURON_CHUNK = 64  # neurons per split-K partial sum of flash_ffn_down


COPY_GROUP = 256  # threads per threadgroup of flash_window_update


MAX_KERNEL_TOKENS = 16  # per-token accumulators live in registers; more tokens -> reference


KERNEL_DTYPES = (mx.float16, mx.bfloat16, mx.float32)


MAX_GRID_Y = 65535  # CUDA's limit on blocks in y; both back ends use the same launch



def _dummy(dtype: mx.Dtype) -> mx.array:
    """Stand-in for an absent optional input: the kernel reads it only under a false flag."""
    return mx.zeros((1,), dtype=dtype)


def ffn_kernel(x: mx.array, weights: mx.array, n: int, activation: str,
               mask: mx.array | None = None, in_bias: mx.array | None = None,
               which: str | None = None) -> mx.array:
    """`ffn_over_rows` on the GPU: the fused sparse FFN over the first n rows of the buffer.

    x: (T, d) with T <= MAX_KERNEL_TOKENS; weights: (P, capacity, d) row-contiguous, P in {2, 3};
    mask: (T, n) or (n,) or None; in_bias: (P - 1, capacity) or None.
    Returns (T, d) in x's dtype. Phase 1 writes h (T, n) in float32, phase 2 writes per-chunk
    partial sums (chunks, T, d) in float32, summed here: accumulation is float32 throughout.
    """
    which = which or backend()
    tokens, d = x.shape
    parts, capacity, _ = weights.shape
    if n == 0:
        return mx.zeros_like(x)
    mask_in = _dummy(mx.float32) if mask is None else \
        mx.broadcast_to(mask.astype(mx.float32), (tokens, n))
    bias_in = _dummy(mx.float32) if in_bias is None else in_bias.astype(mx.float32)
    params = mx.array([n, d, capacity, NEURON_CHUNK], dtype=mx.int32)
    n_pad = round_up(n, ROWS_PER_GROUP)
    chunks = -(-n // NEURON_CHUNK)
    assert n_pad // ROWS_PER_GROUP <= MAX_GRID_Y and chunks <= MAX_GRID_Y, n
    h = _kernel("flash_ffn_act", which)(
        inputs=[x, weights, mask_in, bias_in, params],
        template=[("WT", weights.dtype), ("XT", x.dtype), ("P", parts), ("NTOK", tokens),
                  ("ACT", ACTIVATION_CODES[activation]), ("HAS_MASK", mask is not None),
                  ("HAS_BIAS", in_bias is not None)],
        grid=(SIMD, n_pad, 1), threadgroup=(SIMD, ROWS_PER_GROUP, 1),
        output_shapes=[(tokens, n)], output_dtypes=[mx.float32])[0]
    partial = _kernel("flash_ffn_down", which)(
        inputs=[h, weights, params],
        template=[("WT", weights.dtype), ("P", parts), ("NTOK", tokens)],
        grid=(round_up(d, COLS_PER_GROUP), chunks, 1), threadgroup=(COLS_PER_GROUP, 1, 1),
        output_shapes=[(chunks, tokens, d)], output_dtypes=[mx.float32])[0]
    return partial.sum(axis=0).astype(x.dtype)


def window_update_kernel(weights: mx.array, dst: mx.array, src: mx.array, slots: mx.array,
                         rows: mx.array, which: str | None = None) -> mx.array:
    """`window_update` on the GPU. Returns a NEW buffer; `weights` is left as it was.

    MLX custom kernels cannot write into an input, so the kernel writes the whole (P, capacity,
    d) output: out[p, s] = weights[p, code[s]] or rows[p, code[s] - capacity], where code is the
    identity with code[dst] = src, then code[slots] = capacity + j (moves read the old buffer,
    inserts win: the reference's order).
    """
    which = which or backend()
    parts, capacity, d = weights.shape
    code = mx.arange(capacity, dtype=mx.int32)
    if dst.size:
        code[dst] = src.astype(mx.int32)
    if slots.size:
        code[slots] = capacity + mx.arange(slots.size, dtype=mx.int32)
    rows_in = rows.astype(weights.dtype) if slots.size else _dummy(weights.dtype)
    params = mx.array([capacity, d, int(slots.size), 0], dtype=mx.int32)
    total = parts * capacity * d
    return _kernel("flash_window_update", which)(
        inputs=[weights, code, rows_in, params],
        template=[("WT", weights.dtype), ("P", parts)],
        grid=(round_up(total, COPY_GROUP), 1, 1), threadgroup=(COPY_GROUP, 1, 1),
        output_shapes=[weights.shape], output_dtypes=[weights.dtype])[0]


def _kernel_backend(x: mx.array, weights: mx.array) -> str | None:
    """The GPU back end for this call, or None when the reference must run."""
    which = backend()
    if which == "reference":
        return None
    if x.ndim != 2 or x.shape[0] > MAX_KERNEL_TOKENS or weights.shape[0] not in (2, 3):
        return None
    if x.dtype not in KERNEL_DTYPES or weights.dtype not in KERNEL_DTYPES:
        return None
    return which


def _check_ffn_args(x: mx.array, weights: mx.array, n: int, activation: str) -> None:
    _check_activation(activation)
    if weights.ndim != 3 or x.shape[-1] != weights.shape[2]:
        raise ValueError(f"x {tuple(x.shape)} and weights {tuple(weights.shape)} disagree: "
                         "expected x (T, d) and weights (P, capacity, d)")
    if not 0 <= n <= weights.shape[1]:
        raise ValueError(f"n={n} is outside the buffer's 0..{weights.shape[1]} rows")


_verified: dict[tuple, bool] = {}  # specialisation -> whether its self-check passed


SELF_CHECK_TOL = {mx.float32: 1e-4, mx.float16: 1e-2, mx.bfloat16: 5e-2}  # x max |reference|


def _trusted(key: tuple, what: str, run: Callable[[], tuple[mx.array, mx.array]],
             tol: float) -> bool:
    """Whether the kernel specialisation `key` may run: on first use `run()` gives (kernel,
    reference) on a small random input; a compile error or a difference over `tol` x the
    reference's largest value warns once and pins the reference for `key`."""
    if key in _verified:
        return _verified[key]
    try:
        got, want = (a.astype(mx.float32) for a in run())
        mx.eval(got, want)
        err = mx.max(mx.abs(got - want)).item()
        scale = max(mx.max(mx.abs(want)).item(), 1.0)
        ok = bool(np.isfinite(err) and err <= tol * scale)
        reason = f"differs from the MLX reference by {err:.3g} (allowed {tol * scale:.3g})"
    except Exception as e:  # a kernel that does not compile or launch on this GPU
        ok, reason = False, f"failed to compile or run ({type(e).__name__}: {e})"
    if not ok:
        warnings.warn(f"mlx-flash: kernel {key[0]} on {key[1]} ({what}) {reason}; the MLX "
                      f"reference runs instead from now on (set {ENV_KERNELS}=reference to use "
                      "it for every kernel, and please report this GPU)", RuntimeWarning,
                      stacklevel=4)
    _verified[key] = ok
    return ok


def _ffn_trusted(which: str, x: mx.array, weights: mx.array, activation: str, masked: bool,
                 biased: bool) -> bool:
    """`_trusted` for the FFN kernel pair with x's and weights' template arguments, on
    (T, 40) inputs and 9 of 12 rows (past one 8-row group)."""
    tokens, parts = x.shape[0], weights.shape[0]
    key = ("flash_ffn", which, str(weights.dtype), str(x.dtype), parts, tokens, activation,
           masked, biased)
    what = (f"weights {weights.dtype}, x {x.dtype}, P={parts}, tokens={tokens}, activation "
            f"{activation}, mask {masked}, bias {biased}")

    def run() -> tuple[mx.array, mx.array]:
        rng = np.random.default_rng(0)
        xs = mx.array(rng.standard_normal((tokens, 40)), dtype=x.dtype)
        ws = mx.array(0.3 * rng.standard_normal((parts, 12, 40)), dtype=weights.dtype)
        mask = mx.array(rng.random((tokens, 9)) < 0.7, dtype=mx.float32) if masked else None
        bias = mx.array(rng.standard_normal((parts - 1, 12)), dtype=weights.dtype) \
            if biased else None
        return (ffn_kernel(xs, ws, 9, activation, mask, bias, which),
                ffn_over_rows(xs, ws, 9, activation, mask, bias))

    return _trusted(key, what, run, SELF_CHECK_TOL[weights.dtype])


def compute_ffn(x: mx.array, weights: mx.array, n: int, activation: str,
                mask: mx.array | None = None, in_bias: mx.array | None = None) -> mx.array:
    """`ffn_over_rows` on the current back end (same arguments, same result)."""
    _check_ffn_args(x, weights, n, activation)
    which = _kernel_backend(x, weights)
    if which is None or not _ffn_trusted(which, x, weights, activation, mask is not None,
                                         in_bias is not None):
        return ffn_over_rows(x, weights, n, activation, mask, in_bias)
    return ffn_kernel(x, weights, n, activation, mask, in_bias, which)


def window_kernel_enabled() -> bool:
    """Whether `apply_window_update` uses the GPU kernel (opt-in, `MLX_FLASH_WINDOW_KERNEL=1`).

    Off by default: the kernel must rewrite the whole buffer (see `window_update_kernel`), while
    the reference's scatter writes only the moved rows when MLX can donate the buffer (the cache
    holds the only reference). Turn it on where a GPU measurement says it wins.
    """
    return os.environ.get(ENV_WINDOW_KERNEL, "0").strip() == "1"


def apply_window_update(weights: mx.array, dst: mx.array, src: mx.array, slots: mx.array,
                        rows: mx.array) -> mx.array:
    """`window_update` on the current back end. Always use the returned array."""
    which = backend()
    if which == "reference" or not window_kernel_enabled() or weights.dtype not in KERNEL_DTYPES \
            or not _window_trusted(which, weights):
        return window_update(weights, dst, src, slots, rows)
    return window_update_kernel(weights, dst, src, slots, rows, which)


def _window_trusted(which: str, weights: mx.array) -> bool:
    """`_trusted` for the window kernel with weights' dtype and P: moves and inserts into a
    (P, 6, 8) buffer must equal the reference exactly (it copies)."""
    parts = weights.shape[0]
    key = ("flash_window_update", which, str(weights.dtype), parts)

    def run() -> tuple[mx.array, mx.array]:
        rng = np.random.default_rng(0)
        buf = mx.array(rng.standard_normal((parts, 6, 8)), dtype=weights.dtype)
        dst, src = mx.array([0, 1], dtype=mx.int32), mx.array([4, 5], dtype=mx.int32)
        slots = mx.array([2, 4], dtype=mx.int32)
        new = mx.array(rng.standard_normal((parts, 2, 8)), dtype=weights.dtype)
        return (window_update_kernel(buf, dst, src, slots, new, which),
                window_update(buf, dst, src, slots, new))

    return _trusted(key, f"weights {weights.dtype}, P={parts}", run, 0.0)
