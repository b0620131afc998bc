"""compute/: the MLX reference against dense numpy, the dispatcher, and the GPU kernel bodies.

What runs where:
- The reference (`ffn_over_rows`, `window_update`) against a dense numpy model.
- The Metal and CUDA kernel bodies, executed on the CPU by a small emulator: the body is compiled
  with g++ inside stand-in definitions of the thread indices, `simd_sum` / `__shfl_xor_sync`
  (one std::thread per lane, lockstep through a barrier) and the Metal address-space words; the
  production launch code in compute/gpu.py (`ffn_kernel`, `window_update_kernel`) drives it. This
  checks indexing, padding, masks and edge cases; it does not check dtypes other than float32
  (every array is float in the emulator) nor real GPU scheduling.
- The CUDA sources compiled by nvcc exactly as MLX's cuda_kernel wraps them (when nvcc exists).
- The real kernels against the reference: only where MLX has the back end (skipped here).
"""

from __future__ import annotations

import ctypes
import math
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mlx_flash.compute.gpu as compute_gpu
import mlx_flash.compute.gpu as kernels
from mlx_flash.compute.gpu import (
    apply_window_update,
    backend,
    compute_ffn,
    ffn_kernel,
    force_reference,
    kernel_sources,
    window_update_kernel,
)
from mlx_flash.compute.reference import ffn_over_rows, window_update
from mlx_flash.format.arch import ACTIVATION_FNS

ACTIVATIONS = sorted(ACTIVATION_FNS)
HAS_METAL = mx.metal.is_available()
HAS_CUDA = bool(getattr(mx, "cuda", None) is not None and mx.cuda.is_available())
TOL = {mx.float32: (2e-5, 2e-5), mx.bfloat16: (5e-2, 5e-2), mx.float16: (1e-2, 1e-2)}

# -- a dense numpy model -----------------------------------------------------------------------

_erf = np.vectorize(math.erf, otypes=[np.float64])


def np_act(a: np.ndarray, activation: str) -> np.ndarray:
    if activation == "silu":
        return a / (1.0 + np.exp(-a))
    if activation == "gelu":
        return 0.5 * a * (1.0 + _erf(a / math.sqrt(2.0)))
    if activation == "gelu_approx":
        return 0.5 * a * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (a + 0.044715 * a**3)))
    if activation == "identity":
        return a
    r = np.maximum(a, 0.0)
    return r if activation == "relu" else r * r


def np_ffn(x, weights, rows, activation, mask=None, in_bias=None) -> np.ndarray:
    """Dense float64 FFN over buffer rows `rows`. x: (T, d); weights: (P, cap, d)."""
    x, w = np.asarray(x, np.float64), np.asarray(weights, np.float64)
    first = x @ w[0, rows].T
    if in_bias is not None:
        first = first + np.asarray(in_bias, np.float64)[0, rows]
    h = np_act(first, activation)
    if w.shape[0] == 3:
        up = x @ w[1, rows].T
        if in_bias is not None:
            up = up + np.asarray(in_bias, np.float64)[1, rows]
        h = h * up
    if mask is not None:
        h = h * np.asarray(mask, np.float64)
    return h @ w[-1, rows]


def make_case(rng, tokens, d, cap, parts, dtype=mx.float32):
    x = rng.standard_normal((tokens, d)).astype(np.float32)
    w = (rng.standard_normal((parts, cap, d)) / math.sqrt(d)).astype(np.float32)
    bias = (0.1 * rng.standard_normal((parts - 1, cap))).astype(np.float32)
    # Round through the dtype so the numpy model sees the same values as MLX.
    x, w, bias = (np.array(mx.array(a).astype(dtype).astype(mx.float32)) for a in (x, w, bias))
    return x, w, bias


def as_mx(a: np.ndarray, dtype=mx.float32) -> mx.array:
    return mx.array(a).astype(dtype)


def random_mask(rng, tokens, n, shape_1d=False) -> np.ndarray:
    m = (rng.random((tokens, n)) < 0.6).astype(np.float32)
    return m[0] if shape_1d else m


def assert_close(got: mx.array, want: np.ndarray, dtype) -> None:
    rtol, atol = TOL[dtype]
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), want, rtol=rtol,
                               atol=atol * max(1.0, float(np.abs(want).max(initial=0.0))))


# -- the reference against numpy -------------------------------------------------------------


@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("parts", [3, 2], ids=["gated", "plain"])
def test_ffn_over_rows_matches_numpy(parts, activation, tokens):
    rng = np.random.default_rng(7 * parts + tokens)
    d, cap = 40, 23
    x, w, bias = make_case(rng, tokens, d, cap, parts)
    for n in (0, 1, 6, cap):  # none, one, odd, all
        for mask in (None, random_mask(rng, tokens, n), random_mask(rng, tokens, n, True)):
            for in_bias in (None, bias):
                got = ffn_over_rows(as_mx(x), as_mx(w), n, activation,
                                    None if mask is None else as_mx(mask),
                                    None if in_bias is None else as_mx(in_bias))
                assert got.shape == (tokens, d) and got.dtype == mx.float32
                assert_close(got, np_ffn(x, w, np.arange(n), activation, mask, in_bias),
                             mx.float32)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("parts", [3, 2], ids=["gated", "plain"])
def test_ffn_over_rows_low_precision(parts, dtype):
    rng = np.random.default_rng(11)
    d, cap, tokens = 64, 37, 3
    x, w, bias = make_case(rng, tokens, d, cap, parts, dtype)
    mask = random_mask(rng, tokens, 29)
    got = ffn_over_rows(as_mx(x, dtype), as_mx(w, dtype), 29, "silu", as_mx(mask, dtype),
                        as_mx(bias, dtype))
    assert got.dtype == dtype
    assert_close(got, np_ffn(x, w, np.arange(29), "silu", mask, bias), dtype)


def test_all_neurons_equal_dense_mlx():
    """Every row, no mask: the dense mlx_lm-style FFN (Linear weights, down as (d, n))."""
    rng = np.random.default_rng(5)
    x, w, _ = make_case(rng, 2, 48, 31, 3)
    xm, wm = as_mx(x), as_mx(w)
    dense = (ACTIVATION_FNS["silu"](xm @ wm[0].T) * (xm @ wm[1].T)) @ mx.array(w[2].T.copy()).T
    np.testing.assert_allclose(np.array(ffn_over_rows(xm, wm, 31, "silu")), np.array(dense),
                               rtol=1e-5, atol=1e-5)


def np_window_update(buf, dst, src, slots, rows) -> np.ndarray:
    new = buf.copy()
    new[:, dst] = buf[:, src]
    new[:, slots] = rows
    return new


@st.composite
def window_updates(draw):
    """A buffer shape and a sequence of (dst, src, slots, rows-seed) updates."""
    parts = draw(st.sampled_from([1, 2, 3]))
    cap = draw(st.integers(1, 12))
    d = draw(st.sampled_from([1, 3, 8]))
    steps = []
    for _ in range(draw(st.integers(1, 5))):
        m = draw(st.integers(0, cap))
        dst = draw(st.permutations(range(cap)))[:m]
        src = [draw(st.integers(0, cap - 1)) for _ in range(m)]
        k = draw(st.integers(0, cap))
        slots = draw(st.permutations(range(cap)))[:k]
        steps.append((dst, src, slots, draw(st.integers(0, 2**16))))
    return parts, cap, d, steps


def _run_updates(update, parts, cap, d, steps, dtype=mx.float32):
    rng = np.random.default_rng(0)
    buf_np = rng.standard_normal((parts, cap, d)).astype(np.float32)
    buf = as_mx(buf_np, dtype)
    buf_np = np.array(buf.astype(mx.float32))
    for dst, src, slots, seed in steps:
        rows = np.random.default_rng(seed).standard_normal((parts, len(slots), d))
        rows = np.array(as_mx(rows.astype(np.float32), dtype).astype(mx.float32))
        i32 = (mx.array(np.array(a, dtype=np.int32)) for a in (dst, src, slots))
        buf = update(buf, *i32, as_mx(rows, dtype))
        buf_np = np_window_update(buf_np, dst, src, slots, rows)
    np.testing.assert_array_equal(np.array(buf.astype(mx.float32)), buf_np)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(window_updates())
def test_window_update_matches_numpy_model(case):
    _run_updates(window_update, *case)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16], ids=["bf16", "f16"])
def test_window_update_low_precision(dtype):
    steps = [([0, 3], [5, 0], [5, 1], 1), ([], [], [2], 2), ([4], [4], [], 3)]
    _run_updates(window_update, 3, 6, 5, steps, dtype)


# -- the dispatcher --------------------------------------------------------------------------


@pytest.mark.skipif(HAS_METAL or HAS_CUDA, reason="this machine has a GPU back end")
def test_backend_is_reference_on_this_cpu():
    assert backend() == "reference"


def test_backend_is_reference_when_the_default_device_is_cpu(monkeypatch):
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.cpu))
    assert backend() == "reference"


def test_env_var_forces_reference(monkeypatch):
    monkeypatch.setenv(compute_gpu.ENV_KERNELS, "reference")
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    assert backend() == "reference"
    monkeypatch.setenv(compute_gpu.ENV_KERNELS, "fast")
    with pytest.raises(ValueError, match="MLX_FLASH_KERNELS"):
        backend()


def test_force_reference_context(monkeypatch):
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    assert backend() == "metal"
    with force_reference():
        assert backend() == "reference"
    assert backend() == "metal"


def test_dispatchers_run_the_reference_here():
    rng = np.random.default_rng(1)
    x, w, bias = make_case(rng, 2, 40, 23, 3)
    mask = random_mask(rng, 2, 9)
    args = (as_mx(x), as_mx(w))
    want = ffn_over_rows(*args, 9, "gelu", as_mx(mask), as_mx(bias))
    got = compute_ffn(*args, 9, "gelu", as_mx(mask), as_mx(bias))
    assert mx.array_equal(got, want)
    dst, src, slots = mx.array([0]), mx.array([5]), mx.array([7])
    rows = mx.ones((3, 1, 40))
    got_buf = apply_window_update(as_mx(w), dst, src, slots, rows)
    assert mx.array_equal(got_buf, window_update(as_mx(w), dst, src, slots, rows))


def test_dispatcher_rejects_bad_arguments():
    x, w = mx.zeros((1, 8)), mx.zeros((3, 4, 8))
    with pytest.raises(ValueError, match="activation"):
        compute_ffn(x, w, 2, "swish")
    with pytest.raises(ValueError, match="n=5"):
        compute_ffn(x, w, 5, "silu")
    with pytest.raises(ValueError, match="disagree"):
        compute_ffn(mx.zeros((1, 7)), w, 2, "silu")


def test_kernel_sources_are_found_and_paired():
    """Both back ends define the same kernels with the same inputs and outputs."""
    assert (compute_gpu.kernel_dir() / "sparse_ffn.metal").is_file()
    metal, cuda = kernel_sources("metal"), kernel_sources("cuda")
    assert set(metal) == set(cuda) == {"flash_ffn_act", "flash_ffn_down", "flash_window_update"}
    for name in metal:
        assert metal[name].input_names == cuda[name].input_names
        assert metal[name].output_names == cuda[name].output_names


# The documented Metal -> CUDA substitutions (top comment of each kernel file), per kernel.
METAL_TO_CUDA = {
    "flash_ffn_act": [("int(thread_position_in_threadgroup.x)", "int(threadIdx.x)"),
                      ("int(thread_position_in_grid.y)",
                       "int(blockIdx.y * blockDim.y + threadIdx.y)")],
    "flash_ffn_down": [("int(thread_position_in_grid.x)",
                        "int(blockIdx.x * blockDim.x + threadIdx.x)"),
                       ("int(thread_position_in_grid.y)", "int(blockIdx.y)")],
    "flash_window_update": [("int64_t(thread_position_in_grid.x)",
                             "int64_t(blockIdx.x) * blockDim.x + threadIdx.x")],
}


def _code_lines(text: str) -> list[str]:
    lines = (re.sub(r"//.*$", "", line).rstrip() for line in text.splitlines())
    return [line for line in lines if line.strip()]


@pytest.mark.parametrize("name", sorted(METAL_TO_CUDA))
def test_metal_and_cuda_bodies_agree_line_by_line(name):
    metal = kernel_sources("metal")[name].source
    for old, new in METAL_TO_CUDA[name]:
        assert old in metal, old
        metal = metal.replace(old, new)
    assert _code_lines(metal) == _code_lines(kernel_sources("cuda")[name].source)


# -- the kernel bodies, emulated on the CPU --------------------------------------------------

EMU_PRELUDE = r"""
#include <barrier>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <thread>
#include <vector>

struct EmuDim3 { unsigned x, y, z; };
struct EmuSimd {
  explicit EmuSimd(int lanes) : bar(lanes) {}
  std::barrier<> bar;
  float slots[32];
};
static thread_local EmuSimd* emu_simd = nullptr;
static thread_local int emu_lane = 0;

// A lane that has left reads as NaN: a non-uniform exit poisons the sum instead of hanging.
inline float emu_exchange(float v, int from_lane) {
  emu_simd->slots[emu_lane] = v;
  emu_simd->bar.arrive_and_wait();
  float r = emu_simd->slots[from_lane];
  emu_simd->bar.arrive_and_wait();
  return r;
}
inline float emu_simd_sum(float v) {
  emu_simd->slots[emu_lane] = v;
  emu_simd->bar.arrive_and_wait();
  float s = 0.0f;
  for (int l = 0; l < 32; ++l) s += emu_simd->slots[l];
  emu_simd->bar.arrive_and_wait();
  return s;
}

// Run `thread` for every position of the launch. With lockstep, the 32 lanes of a simdgroup
// (consecutive linear indices in a threadgroup) run as 32 threads sharing a barrier.
static void emu_launch(const int* grid, const int* tg, bool metal, bool lockstep,
                       const std::function<void(EmuDim3, EmuDim3, EmuDim3)>& thread) {
  const unsigned groups[3] = {unsigned((grid[0] + tg[0] - 1) / tg[0]),
                              unsigned((grid[1] + tg[1] - 1) / tg[1]),
                              unsigned((grid[2] + tg[2] - 1) / tg[2])};
  const int per_group = tg[0] * tg[1] * tg[2];
  for (unsigned gz = 0; gz < groups[2]; ++gz)
  for (unsigned gy = 0; gy < groups[1]; ++gy)
  for (unsigned gx = 0; gx < groups[0]; ++gx) {
    for (int first = 0; first < per_group; first += 32) {
      std::vector<std::pair<int, EmuDim3>> lanes;
      for (int lin = first; lin < first + 32 && lin < per_group; ++lin) {
        EmuDim3 local{unsigned(lin % tg[0]), unsigned(lin / tg[0] % tg[1]),
                      unsigned(lin / (tg[0] * tg[1]))};
        EmuDim3 pos{gx * tg[0] + local.x, gy * tg[1] + local.y, gz * tg[2] + local.z};
        bool inside = pos.x < unsigned(grid[0]) && pos.y < unsigned(grid[1]) &&
                      pos.z < unsigned(grid[2]);
        if (metal && !inside) continue;  // dispatchThreads: no threads outside the grid
        lanes.push_back({lin - first, local});
      }
      EmuDim3 group{gx, gy, gz};
      if (!lockstep) {
        for (auto& [lane, local] : lanes) thread(group, local, EmuDim3{unsigned(tg[0]),
                                                 unsigned(tg[1]), unsigned(tg[2])});
        continue;
      }
      if (lanes.empty()) continue;
      EmuSimd simd(int(lanes.size()));
      std::vector<std::thread> workers;
      for (auto& [lane, local] : lanes) {
        workers.emplace_back([&, lane = lane, local = local] {
          emu_simd = &simd;
          emu_lane = lane;
          thread(group, local, EmuDim3{unsigned(tg[0]), unsigned(tg[1]), unsigned(tg[2])});
          simd.slots[lane] = std::numeric_limits<float>::quiet_NaN();
          simd.bar.arrive_and_drop();
        });
      }
      for (auto& w : workers) w.join();
    }
  }
}
"""

EMU_METAL = r"""
#define device
#define constant
#define threadgroup
using uint = unsigned int;
using uint3 = EmuDim3;
using bfloat16_t = float;
using float16_t = float;
namespace metal {
inline float exp(float v) { return std::exp(v); }
inline float tanh(float v) { return std::tanh(v); }
inline float fabs(float v) { return std::fabs(v); }
inline float simd_sum(float v) { return emu_simd_sum(v); }
}
"""

EMU_CUDA = r"""
#define __device__
#define __forceinline__ inline
static thread_local EmuDim3 threadIdx, blockIdx, blockDim;
inline float __shfl_xor_sync(unsigned, float v, int offset) {
  return emu_exchange(v, emu_lane ^ offset);
}
using __half = float;
using __nv_bfloat16 = float;
"""

# Template constants become runtime arguments in the emulator (one build for every case;
# `float acc[NTOK]` compiles as a GNU variable-length array). Types are all float.
EMU_CONSTANTS = {
    "flash_ffn_act": ("P", "NTOK", "ACT", "HAS_MASK", "HAS_BIAS"),
    "flash_ffn_down": ("P", "NTOK"),
    "flash_window_update": ("P",),
}
INT_INPUTS = {"params", "code"}
LOCKSTEP = {"flash_ffn_act"}


def _emu_kernel(src: compute_gpu.KernelSource, which: str) -> str:
    consts = EMU_CONSTANTS[src.name]
    args = [f"const {'int32_t' if n in INT_INPUTS else 'float'}* {n}" for n in src.input_names]
    args += [f"float* {n}" for n in src.output_names]
    args += [f"const int {c}" for c in consts]
    if which == "metal":
        args += ["uint3 thread_position_in_grid", "uint3 thread_position_in_threadgroup"]
    body = f"static void body_{src.name}({', '.join(args)}) {{\n" \
           f"  using WT = float;\n  using XT = float;\n{src.source}}}\n"
    names = list(src.input_names) + list(src.output_names)
    call = [f"({'const int32_t' if n in INT_INPUTS else 'float'}*)bufs[{i}]"
            for i, n in enumerate(names)]
    call += [f"consts[{i}]" for i in range(len(consts))]
    if which == "metal":
        setup = "uint3 pos{g.x * s.x + l.x, g.y * s.y + l.y, g.z * s.z + l.z};"
        call += ["pos", "l"]
    else:
        setup = "threadIdx = l; blockIdx = g; blockDim = s;"
    lockstep = "true" if src.name in LOCKSTEP else "false"
    return body + (
        f'extern "C" void run_{src.name}(void** bufs, const int* consts, const int* grid, '
        f"const int* tg) {{\n"
        f"  emu_launch(grid, tg, {str(which == 'metal').lower()}, {lockstep}, "
        f"[&](EmuDim3 g, EmuDim3 l, EmuDim3 s) {{\n    {setup}\n"
        f"    body_{src.name}({', '.join(call)});\n  }});\n}}\n")


def _build_emulator(which: str, out_dir: Path) -> ctypes.CDLL:
    srcs = kernel_sources(which)
    headers = {s.header for s in srcs.values()}
    code = EMU_PRELUDE + (EMU_METAL if which == "metal" else EMU_CUDA) + "".join(headers)
    code += "".join(_emu_kernel(s, which) for s in srcs.values())
    cpp, lib = out_dir / f"emu_{which}.cpp", out_dir / f"emu_{which}.so"
    cpp.write_text(code)
    result = subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread",
                             "-Wall", "-Wno-vla", "-Wno-unused-local-typedefs", "-Werror",
                             str(cpp), "-o", str(lib)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return ctypes.CDLL(str(lib))


class EmulatedKernel:
    """Stands in for an `mx.fast.*_kernel` object: the same call, run by the emulator."""

    def __init__(self, lib: ctypes.CDLL, name: str):
        self.fn, self.name = getattr(lib, f"run_{name}"), name
        self.src = kernel_sources("cuda")[name]

    def __call__(self, *, inputs, template, grid, threadgroup, output_shapes, output_dtypes):
        values = dict(template)
        consts = [int(values[c]) for c in EMU_CONSTANTS[self.name]]
        arrays = [np.ascontiguousarray(np.array(a.astype(mx.float32)),
                                       np.int32 if n in INT_INPUTS else np.float32)
                  for a, n in zip(inputs, self.src.input_names, strict=True)]
        outs = [np.full(s, np.nan, np.float32) for s in output_shapes]  # unwritten -> NaN
        bufs = (ctypes.c_void_p * (len(arrays) + len(outs)))(
            *[a.ctypes.data for a in arrays + outs])
        ints = lambda v: (ctypes.c_int * len(v))(*v)  # noqa: E731
        self.fn(bufs, ints(consts), ints(grid), ints(threadgroup))
        return [mx.array(o).astype(dt) for o, dt in zip(outs, output_dtypes, strict=True)]


@pytest.fixture(scope="module", params=["metal", "cuda"])
def emulated(request, tmp_path_factory):
    """(back end name, name -> EmulatedKernel), for `compute.gpu._kernel` to return."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not found: the kernel-body emulator needs a C++20 compiler")
    lib = _build_emulator(request.param, tmp_path_factory.mktemp(f"emu-{request.param}"))
    return request.param, {n: EmulatedKernel(lib, n) for n in EMU_CONSTANTS}


@pytest.fixture
def use_emulator(emulated, monkeypatch):
    which, table = emulated
    monkeypatch.setattr(kernels, "_kernel", lambda name, _which: table[name])
    return which


EMU_SHAPES = [  # (tokens, d, cap, n): n = 1, 7, 8, 9, 69 (past one 64-neuron chunk); d = 33, 130
    (1, 33, 12, 1), (3, 33, 12, 7), (1, 130, 16, 8), (2, 40, 16, 9), (1, 40, 72, 69),
]


@pytest.mark.parametrize("shape", EMU_SHAPES, ids=lambda s: "T{}-d{}-cap{}-n{}".format(*s))
@pytest.mark.parametrize("parts", [3, 2], ids=["gated", "plain"])
def test_emulated_ffn_kernel_matches_reference(use_emulator, parts, shape):
    tokens, d, cap, n = shape
    rng = np.random.default_rng(tokens * 1000 + d + n + parts)
    x, w, bias = make_case(rng, tokens, d, cap, parts)
    mask = random_mask(rng, tokens, n)
    mask[:, : min(2, n)] = 0.0  # some neurons off for every token: the skip paths
    # 32 threads per neuron in the emulator: the large case runs two activations, not five.
    for activation in ACTIVATIONS if n < 16 else ("silu", "gelu"):
        for m, b in ((None, None), (mask, bias)):
            mm, bb = (None if m is None else as_mx(m)), (None if b is None else as_mx(b))
            got = ffn_kernel(as_mx(x), as_mx(w), n, activation, mm, bb, use_emulator)
            assert_close(got, np_ffn(x, w, np.arange(n), activation, m, b), mx.float32)


def test_emulated_ffn_kernel_edge_cases(use_emulator):
    rng = np.random.default_rng(2)
    x, w, _ = make_case(rng, 16, 33, 9, 3)
    assert mx.array_equal(ffn_kernel(as_mx(x), as_mx(w), 0, "silu", which=use_emulator),
                          mx.zeros((16, 33)))
    got = ffn_kernel(as_mx(x), as_mx(w), 9, "silu", which=use_emulator)  # 16 tokens, all rows
    assert_close(got, np_ffn(x, w, np.arange(9), "silu"), mx.float32)
    one_d = as_mx(random_mask(rng, 16, 9, shape_1d=True))  # (n,) mask, broadcast to (T, n)
    got = ffn_kernel(as_mx(x), as_mx(w), 9, "relu2", one_d, which=use_emulator)
    assert_close(got, np_ffn(x, w, np.arange(9), "relu2", np.array(one_d)), mx.float32)


def test_emulated_dispatch_routes_by_shape(use_emulator, monkeypatch):
    """compute_ffn takes the kernel for small T, the reference above MAX_KERNEL_TOKENS."""
    calls = []
    real = compute_gpu._kernel

    def counting(name, which):
        calls.append(name)
        return real(name, which)

    monkeypatch.setattr(kernels, "_kernel", counting)
    monkeypatch.setattr(kernels, "backend", lambda: use_emulator)
    monkeypatch.setattr(kernels, "_verified", {})
    rng = np.random.default_rng(4)
    x, w, _ = make_case(rng, compute_gpu.MAX_KERNEL_TOKENS + 1, 40, 10, 3)
    for tokens in (2, compute_gpu.MAX_KERNEL_TOKENS + 1):
        got = compute_ffn(as_mx(x[:tokens]), as_mx(w), 10, "silu")
        assert_close(got, np_ffn(x[:tokens], w, np.arange(10), "silu"), mx.float32)
    # the first use's self-check runs the pair once on its own input, then the call does
    assert calls == ["flash_ffn_act", "flash_ffn_down"] * 2


@settings(max_examples=25, deadline=None, derandomize=True)
@given(case=window_updates())
def test_emulated_window_kernel_matches_numpy_model(emulated, case):
    which, table = emulated
    kernels_kernel = compute_gpu._kernel
    try:
        compute_gpu._kernel = lambda name, _which: table[name]  # hypothesis: no monkeypatch fixture
        _run_updates(lambda *a: window_update_kernel(*a, which=which), *case)
    finally:
        compute_gpu._kernel = kernels_kernel


# -- the CUDA sources through nvcc, wrapped as MLX's cuda_kernel wraps them ------------------

CUDA_TYPES = {mx.float32: "float", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16",
              mx.int32: "int32_t"}
MLX_UTILS_STUB = """#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda/std/limits>
#include <cstdint>
"""


def _mlx_cuda_wrap(src: compute_gpu.KernelSource, tag: str, in_types, out_types, template) -> str:
    """The source mx.fast.cuda_kernel compiles (mlx/backend/cuda/custom_kernel.cpp)."""
    args = [f"    const {CUDA_TYPES[t]}* {n}" for n, t in zip(src.input_names, in_types, strict=True)]
    args += [f"    {CUDA_TYPES[t]}* {n}" for n, t in zip(src.output_names, out_types, strict=True)]
    consts = []
    for key, value in template:
        if isinstance(value, bool):
            consts.append(f"  constexpr bool {key} = {str(value).lower()};")
        elif isinstance(value, int):
            consts.append(f"  constexpr int {key} = {value};")
        else:
            consts.append(f"  using {key} = {CUDA_TYPES[value]};")
    return (f"namespace mlx::core::cu {{\nnamespace cg = cooperative_groups;\n"
            f"__global__ void custom_kernel_{src.name}_{tag}(\n" + ",\n".join(args) +
            ") {\n" + "\n".join(consts) + "\n\n" + src.source + "\n}\n}\n")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_sources_compile_with_nvcc(tmp_path):
    srcs = kernel_sources("cuda")
    (tmp_path / "mlx/backend/cuda/device").mkdir(parents=True)
    (tmp_path / "mlx/backend/cuda/device/utils.cuh").write_text(MLX_UTILS_STUB)
    code = ('#include "mlx/backend/cuda/device/utils.cuh"\n#include <cooperative_groups.h>\n'
            "#define inf cuda::std::numeric_limits<float>::infinity()\n")
    code += srcs["flash_ffn_act"].header
    f32, i32 = mx.float32, mx.int32
    for tag, (wt, parts, tokens, flag) in enumerate([(mx.float32, 3, 1, False),
                                                     (mx.float16, 2, 16, True),
                                                     (mx.bfloat16, 3, 4, True)]):
        code += _mlx_cuda_wrap(
            srcs["flash_ffn_act"], str(tag), [wt, wt, f32, f32, i32], [f32],
            [("WT", wt), ("XT", wt), ("P", parts), ("NTOK", tokens), ("ACT", tag + 1),
             ("HAS_MASK", flag), ("HAS_BIAS", flag)])
        code += _mlx_cuda_wrap(srcs["flash_ffn_down"], str(tag), [f32, wt, i32], [f32],
                               [("WT", wt), ("P", parts), ("NTOK", tokens)])
        code += _mlx_cuda_wrap(srcs["flash_window_update"], str(tag), [wt, i32, wt, i32], [wt],
                               [("WT", wt), ("P", parts)])
    (tmp_path / "k.cu").write_text(code)
    # Device code only (--ptx): the full front end and code generation, without host compile.
    result = subprocess.run(["nvcc", "-arch=compute_80", "--ptx", "-I", str(tmp_path),
                             str(tmp_path / "k.cu"), "-o", str(tmp_path / "k.ptx")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]


# -- the real kernels, where MLX has the back end --------------------------------------------

GPU_BACKENDS = [
    pytest.param("metal", marks=pytest.mark.skipif(
        not HAS_METAL, reason="Metal backend not available on this machine (Linux CPU); "
                              "kernel verified only on Apple GPUs")),
    pytest.param("cuda", marks=pytest.mark.skipif(
        not HAS_CUDA, reason="CUDA backend not available on this machine (Linux CPU); "
                             "kernel verified only on NVIDIA GPUs with mlx[cuda]")),
]
GPU_SHAPES = [(1, 896, 4864, 1459), (4, 896, 4864, 4864), (3, 33, 70, 69), (16, 130, 9, 9),
              (1, 64, 8, 1)]


@pytest.mark.parametrize("which", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16],
                         ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("parts", [3, 2], ids=["gated", "plain"])
def test_gpu_ffn_kernel_matches_reference(which, dtype, parts):
    for tokens, d, cap, n in GPU_SHAPES:
        rng = np.random.default_rng(tokens + d + n)
        x, w, bias = make_case(rng, tokens, d, cap, parts, dtype)
        mask = random_mask(rng, tokens, n)
        for activation in ACTIVATIONS:
            for m, b in ((None, None), (mask, bias)):
                mm = None if m is None else as_mx(m, dtype)
                bb = None if b is None else as_mx(b, dtype)
                got = ffn_kernel(as_mx(x, dtype), as_mx(w, dtype), n, activation, mm, bb,
                                 which)
                assert got.dtype == dtype
                assert_close(got, np_ffn(x, w, np.arange(n), activation, m, b), dtype)
    x, w, _ = make_case(np.random.default_rng(0), 2, 40, 8, parts, dtype)
    assert mx.array_equal(ffn_kernel(as_mx(x, dtype), as_mx(w, dtype), 0, "silu", which=which),
                          mx.zeros((2, 40), dtype=dtype))


@pytest.mark.parametrize("which", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16],
                         ids=["f32", "bf16", "f16"])
def test_gpu_window_kernel_matches_reference(which, dtype):
    steps = [([0, 3], [5, 0], [5, 1], 1), ([], [], [2], 2), ([4], [4], [], 3), ([], [], [], 4)]
    for parts, cap, d in ((3, 6, 5), (2, 4864, 896), (1, 6, 1)):
        _run_updates(lambda *a: window_update_kernel(*a, which=which), parts, cap, d, steps,
                     dtype)


# -- the self-check: a kernel that disagrees with the reference is not trusted -----------------


class WrongKernel:
    """A kernel object whose outputs are wrong (all 7s) or whose build raises (compile=False)."""

    def __init__(self, compiles: bool = True):
        self.compiles, self.calls = compiles, 0

    def __call__(self, *, output_shapes, output_dtypes, **_):
        self.calls += 1
        if not self.compiles:
            raise RuntimeError("[metal_kernel] Unable to build kernel: error: expected ';'")
        return [mx.full(shape, 7.0, dtype) for shape, dtype in zip(output_shapes, output_dtypes,
                                                                    strict=True)]


@pytest.fixture
def fake_gpu(monkeypatch):
    """The dispatchers believe they are on Metal; every self-check result is forgotten."""
    monkeypatch.setattr(kernels, "backend", lambda: "metal")
    monkeypatch.setattr(kernels, "_verified", {}, raising=False)
    monkeypatch.setenv(compute_gpu.ENV_WINDOW_KERNEL, "1")


@pytest.mark.parametrize("compiles", [True, False], ids=["wrong-result", "compile-error"])
def test_a_kernel_that_disagrees_falls_back_to_the_reference_with_one_warning(
        fake_gpu, monkeypatch, compiles):
    wrong = WrongKernel(compiles)
    monkeypatch.setattr(kernels, "_kernel", lambda name, which: wrong)
    rng = np.random.default_rng(5)
    x, w, _ = make_case(rng, 2, 40, 10, 3)
    want = ffn_over_rows(as_mx(x), as_mx(w), 10, "silu")
    with pytest.warns(RuntimeWarning, match="flash_ffn.*metal.*MLX_FLASH_KERNELS=reference"):
        got = compute_ffn(as_mx(x), as_mx(w), 10, "silu")
    assert mx.array_equal(got, want)
    calls = wrong.calls
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, and the kernel is not run again
        assert mx.array_equal(compute_ffn(as_mx(x), as_mx(w), 10, "silu"), want)
    assert wrong.calls == calls


def test_each_specialisation_is_checked_on_its_own(fake_gpu, monkeypatch):
    wrong = WrongKernel()
    monkeypatch.setattr(kernels, "_kernel", lambda name, which: wrong)
    rng = np.random.default_rng(6)
    x, w, _ = make_case(rng, 2, 40, 10, 3)
    with pytest.warns(RuntimeWarning, match="silu"):
        compute_ffn(as_mx(x), as_mx(w), 10, "silu")
    with pytest.warns(RuntimeWarning, match="relu2"):  # another activation: checked again
        compute_ffn(as_mx(x), as_mx(w), 10, "relu2")
    with pytest.warns(RuntimeWarning, match="float16"):  # another dtype too
        compute_ffn(as_mx(x).astype(mx.float16), as_mx(w).astype(mx.float16), 10, "silu")


def test_a_wrong_window_kernel_falls_back_to_the_reference(fake_gpu, monkeypatch):
    wrong = WrongKernel()
    monkeypatch.setattr(kernels, "_kernel", lambda name, which: wrong)
    rng = np.random.default_rng(7)
    weights = mx.array(rng.standard_normal((3, 6, 8)).astype(np.float32))
    dst, src = mx.array([0], dtype=mx.int32), mx.array([5], dtype=mx.int32)
    slots = mx.array([2], dtype=mx.int32)
    rows = mx.array(rng.standard_normal((3, 1, 8)).astype(np.float32))
    want = window_update(weights, dst, src, slots, rows)
    with pytest.warns(RuntimeWarning, match="flash_window_update.*MLX_FLASH_KERNELS"):
        got = apply_window_update(weights, dst, src, slots, rows)
    assert mx.array_equal(got, want)


def test_a_kernel_that_agrees_is_used_without_a_warning(use_emulator, monkeypatch):
    monkeypatch.setattr(kernels, "backend", lambda: use_emulator)
    monkeypatch.setattr(kernels, "_verified", {}, raising=False)
    rng = np.random.default_rng(8)
    x, w, _ = make_case(rng, 2, 40, 10, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = compute_ffn(as_mx(x), as_mx(w), 10, "silu")
    assert_close(got, np_ffn(x, w, np.arange(10), "silu"), mx.float32)
    monkeypatch.setenv(compute_gpu.ENV_WINDOW_KERNEL, "1")
    weights = mx.array(rng.standard_normal((3, 6, 8)).astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_window_update(weights, mx.array([0], dtype=mx.int32), mx.array([5], dtype=mx.int32),
                            mx.array([], dtype=mx.int32), mx.zeros((3, 0, 8)))
    assert list(kernels._verified.values()) == [True, True]
