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
- `linear_q` / `ffnq` (4/8-bit rows) quantize x to int8 per block of 32 and take integer dot
  products (AVX-512 VNNI, AVX-VNNI, AVX2 or scalar: `int_dot`), as llama.cpp does: ~0.5% error
  on each output, 2-3x faster than decoding the weights to f32 (issue 20). The FFN kernels'
  down projections take integer products on the vector builds as well (a batch's h quantized to
  int8 for 4-bit rows, int16 for 8-bit ones: issue 20, session 9). `exact=True` or
  MLX_FLASH_QUANT_ACTIVATIONS=f32 keeps f32 activations and an f32 down projection.

The C file is compiled on first use with the system compiler (`cc`, or $CC) into
`$MLX_FLASH_HOME/kernels` (default ~/.cache/mlx_flash/kernels), keyed by the source, compiler
and CPU, written under a temporary name and renamed. Without a compiler the fast path is
unavailable and the MLX path (the reference, and what runs on a GPU) is used, with the reason in
`unavailable_reason()`. `MLX_FLASH_CPU_KERNELS=0` turns the fast path off.
"""

from __future__ import annotations

import ctypes
import os
import threading
import weakref
from pathlib import Path

import numpy as np

from ..format.arch import ACTIVATION_CODES
from ..process import apply_cpu_kernel_settings

DT_CODES = {"float16": 0, "bfloat16": 1}
SCALE_CODES = {**DT_CODES, "float32": 2}  # linear_q's scales / biases may also be f32
ENV_QUANT_ACTIVATIONS = "MLX_FLASH_QUANT_ACTIVATIONS"  # "f32": exact linear_q / ffnq


INT_DOT_PATHS = ("scalar", "avx2", "vnni", "avx512vnni")  # flash_int_dot_path(): the int8 dot products
_VOIDP, _INT, _I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64


class CpuKernels:
    """ctypes bindings of the built library."""

    def __init__(self, path: Path):
        apply_cpu_kernel_settings()  # passive OpenMP, one BLAS thread: before the library loads
        lib = ctypes.CDLL(str(path))
        lib.linear16.argtypes = [_VOIDP, _I64, _INT, _INT, _INT, _VOIDP, _INT, _VOIDP, _VOIDP]
        lib.ffn16.argtypes = [_VOIDP, _I64, _I64, _INT, _INT, _INT, _INT, _VOIDP, _INT, _VOIDP,
                              _I64, _VOIDP, _INT, _VOIDP, _VOIDP, _VOIDP]
        lib.linear_q.argtypes = [_VOIDP, _VOIDP, _VOIDP, _INT, _INT, _INT, _INT, _INT, _VOIDP,
                                 _INT, _VOIDP, _VOIDP, _VOIDP, _INT]
        lib.ffnq.argtypes = [_VOIDP, _VOIDP, _VOIDP, _INT, _INT, _I64, _INT, _INT, _INT, _INT,
                             _VOIDP, _INT, _VOIDP, _VOIDP, _VOIDP, _INT, _VOIDP, _VOIDP, _VOIDP,
                             _INT]
        lib.ffnp.argtypes = [_VOIDP, _VOIDP, _VOIDP, _VOIDP, _VOIDP, _VOIDP, _INT, _INT,
                             _VOIDP, _INT, _VOIDP, _VOIDP, ctypes.c_float, _VOIDP, _VOIDP,
                             _VOIDP, _INT, _INT,
                             _I64, _INT, _INT, _VOIDP, _INT, _VOIDP, _VOIDP, _VOIDP, _INT,
                             _VOIDP, _VOIDP, _VOIDP, _INT]
        lib.rms_norm_f32.argtypes = [_VOIDP, _VOIDP, ctypes.c_float, _INT, _INT, _VOIDP]
        lib.decode_attention.argtypes = [_VOIDP, _INT, _INT, _INT, _INT, _INT, _VOIDP, _VOIDP,
                                         _VOIDP, _VOIDP, _I64, _INT, ctypes.c_float, _VOIDP]
        for fn in (lib.linear16, lib.ffn16, lib.rms_norm_f32):
            fn.restype = None
        for fn in (lib.linear_q, lib.ffnq, lib.ffnp, lib.flash_int_dot_path,
                   lib.decode_attention):
            fn.restype = _INT
        self._lib, self.path = lib, path
        self.threads: int = lib.flash_threads()
        self.vector: bool = bool(lib.flash_vector_path())
        self.int_dot: str = INT_DOT_PATHS[lib.flash_int_dot_path()]
        # int8 activations in linear_q / ffnq unless the environment asks for exact f32 ones
        self.exact_quant: bool = os.environ.get(ENV_QUANT_ACTIVATIONS, "int8") == "f32"
        self._local = threading.local()  # the FFN kernels' scratch (_ffn_scratch)

    def linear16(self, weight: np.ndarray, dtype: str, x: np.ndarray,
                 bias: np.ndarray | None = None) -> np.ndarray:
        """x (T, d) f32 contiguous, weight (rows, d) 16-bit storage -> (T, rows) f32."""
        rows, d = weight.shape
        _check_operands(weight, x, d)
        y = np.empty((x.shape[0], rows), dtype=np.float32)
        self._lib.linear16(_addr(weight), weight.strides[0] // 2, rows, d, DT_CODES[dtype],
                           x.ctypes.data, x.shape[0], _addr(bias), y.ctypes.data)
        return y

    def linear_q(self, wq: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int,
                 group_size: int, x: np.ndarray, bias: np.ndarray | None = None,
                 scale_dtype: str | None = None, exact: bool | None = None) -> np.ndarray:
        """x (T, d) f32 times MLX affine-quantized rows: wq (rows, d * bits / 32) uint32,
        scales/biases (rows, d / group_size) f32 or float16 (or uint16 bits of `scale_dtype`)
        -> (T, rows) f32. exact: f32 activations (default: int8 ones unless
        $MLX_FLASH_QUANT_ACTIVATIONS=f32; within ~1e-2 relative of the exact result)."""
        rows, d = wq.shape[0], wq.shape[1] * 32 // bits
        if wq.dtype != np.uint32 or not wq.flags.c_contiguous or bits not in (4, 8):
            raise ValueError(f"linear_q needs contiguous uint32 4/8-bit rows, got {wq.dtype} "
                             f"{bits}-bit")
        sdt = SCALE_CODES[scale_dtype or str(scales.dtype)]
        for a in (scales, biases):
            if a.shape != (rows, d // group_size) or not a.flags.c_contiguous \
                    or a.itemsize != (4 if sdt == 2 else 2):
                raise ValueError(f"linear_q needs contiguous ({rows}, {d // group_size}) "
                                 f"{scale_dtype or scales.dtype} scales/biases, got {a.dtype} "
                                 f"{a.shape}")
        _check_x(x, d)
        exact = self._exact(exact)
        xsum = _group_sums(x, group_size) if _f32_path(exact, d, group_size) else None
        y = np.empty((x.shape[0], rows), dtype=np.float32)
        done = self._lib.linear_q(_addr(wq), _addr(scales), _addr(biases), sdt, rows, d, bits,
                                  group_size, x.ctypes.data, x.shape[0], _ptr(xsum), _addr(bias),
                                  y.ctypes.data, exact)
        _check_done(done, "linear_q")
        return y

    def ffnq(self, q: np.ndarray, scales: np.ndarray, biases: np.ndarray, dtype: str, n: int,
             bits: int, group_size: int, x: np.ndarray, activation: str,
             mask: np.ndarray | None = None, in_bias: np.ndarray | None = None,
             exact: bool | None = None) -> np.ndarray:
        """`ffn16` over quantized rows: q (P, capacity, d * bits / 32) uint32, scales/biases
        (P, capacity, d / group_size) uint16 bits of `dtype`, neurons [0, n); in_bias
        (P - 1, capacity) f32 or None; exact as in `linear_q`. Returns (T, d) f32."""
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
        exact = self._exact(exact)
        xsum = _group_sums(x, group_size) if _f32_path(exact, d, group_size) else None
        h, partial, y = self._ffn_scratch(tokens, n, d)
        done = self._lib.ffnq(_addr(q), _addr(scales), _addr(biases), DT_CODES[dtype], parts,
                              capacity, n, d, bits, group_size, x.ctypes.data, tokens,
                              _ptr(xsum), _ptr(in_bias), _ptr(mask),
                              ACTIVATION_CODES[activation], h, partial, y.ctypes.data, exact)
        _check_done(done, "ffnq")
        return y

    def ffnp(self, rows: dict[str, np.ndarray], table: tuple[np.ndarray, np.ndarray | None],
             group_of: np.ndarray | TableSegments, dtype: str, n: int, bits: int,
             group_size: int, bits_down: int, x: np.ndarray, activation: str,
             mask: np.ndarray | None = None, in_bias: np.ndarray | None = None,
             exact: bool | None = None, table_zero: float = 0.0) -> np.ndarray:
        """The FFN over a format-3 cache (parts apart): rows "gate.q"/"up.q" (capacity, d *
        bits / 32) uint32 with ".scales"/".biases" (capacity, d / group_size) uint16 bits of
        `dtype` ("up" alone for a plain FFN), "down.q" (capacity, d * bits_down / 32) the
        down columns' integers; table (scales, biases) (groups, d) uint16 bits (biases None:
        a symmetric table, biases = -table_zero * scales: see ffn.table_zero_point), group_of
        (n,) int32 each slot's table row (or its `TableSegments`, which a caller may keep
        while the slots stay); neurons [0, n). Returns (T, d) f32."""
        first = "gate" if "gate.q" in rows else "up"
        second = "up" if first == "gate" else None
        parts = [rows[f"{first}.{k}"] for k in ("q", "scales", "biases")]
        parts += [rows[f"{second}.{k}"] if second else None for k in ("q", "scales", "biases")]
        down, (tab_s, tab_z) = rows["down.q"], table
        seg = group_of if isinstance(group_of, TableSegments) else TableSegments(group_of)
        for a in [*parts, down, tab_s, tab_z]:
            if a is not None and not a.flags.c_contiguous:
                raise ValueError("ffnp needs contiguous buffers")
        if tab_z is not None and tab_z.shape != tab_s.shape:
            raise ValueError(f"ffnp: table biases {tab_z.shape} for scales {tab_s.shape}")
        capacity, d = down.shape[0], down.shape[1] * 32 // bits_down
        if d // group_size > 512 or seg.group_of.shape != (n,):
            raise ValueError(f"ffnp: {d // group_size} groups per row (at most 512) and "
                             f"group_of {seg.group_of.shape} for {n} neurons")
        tokens = x.shape[0]
        _check_x(x, d)
        mask = _mask_rows(mask, tokens, n)
        exact = self._exact(exact)
        xsum = _group_sums(x, group_size) if _f32_path(exact, d, group_size) else None
        h, partial, y = self._ffn_scratch(tokens, n, d)
        done = self._lib.ffnp(*[_addr(a) for a in parts], bits, group_size, _addr(down),
                              bits_down, _addr(tab_s), _addr(tab_z), table_zero, *seg.pointers,
                              DT_CODES[dtype], capacity, n, d, x.ctypes.data, tokens,
                              _ptr(xsum), _ptr(in_bias), _ptr(mask),
                              ACTIVATION_CODES[activation], h, partial, y.ctypes.data, exact)
        _check_done(done, "ffnp")
        return y

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        """x (T, d) contiguous f32, weight (d,) f32 -> mlx's rms_norm over the rows, (T, d)."""
        _check_x(x, weight.shape[0])
        if weight.dtype != np.float32 or not weight.flags.c_contiguous:
            raise ValueError(f"rms_norm needs a contiguous float32 weight, got {weight.dtype}")
        out = np.empty_like(x)
        self._lib.rms_norm_f32(x.ctypes.data, _addr(weight), eps, x.shape[0], x.shape[1],
                               out.ctypes.data)
        return out

    def decode_attention(self, qkv: np.ndarray, heads: int, kv_heads: int, rope: tuple,
                         keys: np.ndarray, values: np.ndarray, offset: int,
                         scale: float) -> np.ndarray:
        """One position's attention (batch 1), in C: qkv (1, (heads + 2 kv_heads) * D) f32 its
        q | k | v projections, rotated here (in place); rope (rot, traditional, cos, sin) the
        rotated dims per head, the pairing and the (rot / 2,) f32 rotation at this position;
        keys / values (1, kv_heads, capacity, D) f32, the new k / v written at `offset` (the
        caller counts it). Returns (1, heads * D) f32 = softmax(q k^T scale) v per head."""
        kv, capacity, dim = keys.shape[1:]
        rot, traditional, cos, sin = rope
        if (qkv.shape != (1, (heads + 2 * kv_heads) * dim) or qkv.dtype != np.float32
                or not qkv.flags.c_contiguous or kv != kv_heads or heads % kv_heads
                or not offset < capacity or values.shape != keys.shape
                or not (keys.flags.c_contiguous and values.flags.c_contiguous)
                or keys.dtype != np.float32 or values.dtype != np.float32
                or not 0 < rot <= dim or rot % 2 or cos.shape != (rot // 2,)
                or sin.shape != cos.shape or {cos.dtype, sin.dtype} != {np.dtype(np.float32)}
                or not (cos.flags.c_contiguous and sin.flags.c_contiguous)):
            raise ValueError(f"decode_attention: qkv {qkv.shape} {qkv.dtype}, {heads}/"
                             f"{kv_heads} heads, caches {keys.shape} at {offset}, rope {rot}")
        out = np.empty((1, heads * dim), dtype=np.float32)
        done = self._lib.decode_attention(qkv.ctypes.data, heads, kv_heads, dim, rot,
                                          int(traditional), cos.ctypes.data, sin.ctypes.data,
                                          _addr(keys), _addr(values), capacity, offset, scale,
                                          out.ctypes.data)
        _check_done(done, "decode_attention")
        return out

    def _exact(self, exact: bool | None) -> int:
        return int(self.exact_quant if exact is None else exact)

    def ffn16(self, base: np.ndarray, strides: tuple[int, int], parts: int, n: int, d: int,
              dtype: str, x: np.ndarray, activation: str, mask: np.ndarray | None = None,
              in_bias: np.ndarray | None = None) -> np.ndarray:
        """The FFN over neurons [0, n) of a 16-bit buffer (`compute.reference.ffn_over_rows`'
        result).

        base: uint16 array holding the rows; strides: (part, neuron) in elements, e.g.
        (capacity * d, d) for a part-major (P, capacity, d) buffer or (d, stride / 2) for raw
        bundles (k, stride). x: (T, d) f32; mask: (T, n) or None; in_bias: (P - 1, m) f32 or
        None. Returns (T, d) f32.
        """
        if base.dtype != np.uint16 or not base.flags.c_contiguous:
            raise ValueError(f"ffn16 needs a contiguous uint16 buffer, got {base.dtype}")
        tokens = x.shape[0]
        _check_operands(base.reshape(-1, base.shape[-1]), x, d)
        mask = _mask_rows(mask, tokens, n)
        if in_bias is not None:
            in_bias = np.ascontiguousarray(in_bias, dtype=np.float32)
        h, partial, y = self._ffn_scratch(tokens, n, d)
        self._lib.ffn16(_addr(base), strides[0], strides[1], parts, n, d,
                        DT_CODES[dtype], x.ctypes.data, tokens, _ptr(in_bias),
                        0 if in_bias is None else in_bias.shape[1], _ptr(mask),
                        ACTIVATION_CODES[activation], h, partial, y.ctypes.data)
        return y

    def _ffn_scratch(self, tokens: int, n: int, d: int) -> tuple[int, int, np.ndarray]:
        """The addresses of the FFN kernels' scratch - h (T, n) and the per-thread partial
        sums (threads, T, d), kept between calls of one shape (a decode step's are the same
        every layer) - and a new output (T, d)."""
        key, local = (tokens, n, d), self._local  # per thread: calls may come from several
        if getattr(local, "key", None) != key:
            h = np.empty((tokens, max(n, 1)), dtype=np.float32)
            partial = np.empty((self.threads, tokens, d), dtype=np.float32)
            local.scratch, local.key = (h, partial, h.ctypes.data, partial.ctypes.data), key
        return local.scratch[2], local.scratch[3], np.empty((tokens, d), dtype=np.float32)


class TableSegments:
    """A format-3 layer's slots in table-row order, as ffnp visits them: group_of (n,) int32
    each slot's row, order (n,) the slots sorted by it (stable), starts (segments + 1,) where
    each row's run begins. Argsorting every call cost ~0.1 ms a layer; PartsBundleFFN keeps
    one while the cache's slots stay."""

    def __init__(self, group_of: np.ndarray):
        self.group_of = np.ascontiguousarray(group_of, dtype=np.int32)
        self.order = np.argsort(self.group_of, kind="stable").astype(np.int32)
        ordered = self.group_of[self.order]
        self.starts = np.flatnonzero(np.diff(ordered, prepend=-1, append=-1)).astype(np.int32)
        self.pointers = (self.group_of.ctypes.data, self.order.ctypes.data,
                         self.starts.ctypes.data, len(self.starts) - 1)


_ADDRESSES: dict[int, tuple[weakref.ref, int]] = {}


def _addr(a: np.ndarray | None) -> int | None:
    """a's data address, remembered for long-lived arrays (weights, cache buffers, tables):
    `a.ctypes.data` costs ~3.5 us here, and a decode step passes ~300 of them. The entry goes
    when the array does (a numpy array's data never moves)."""
    if a is None:
        return None
    key = id(a)
    entry = _ADDRESSES.get(key)
    if entry is not None and entry[0]() is a:
        return entry[1]
    address = a.ctypes.data
    try:
        ref = weakref.ref(a, lambda _, key=key: _ADDRESSES.pop(key, None))
    except TypeError:
        return address
    _ADDRESSES[key] = (ref, address)
    return address


def _f32_path(exact: int, d: int, group_size: int) -> bool:
    """Whether a quantized kernel runs with f32 activations (and so needs x's group sums):
    asked for, or a shape the int8 path does not take (the C kernels' condition)."""
    return bool(exact or d % 32 or group_size % 32 or group_size & (group_size - 1))


def _check_done(status: int, kernel: str) -> None:
    if status != 0:
        raise MemoryError(f"{kernel}: the C kernel could not allocate its scratch memory")


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
