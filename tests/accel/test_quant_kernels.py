"""linear_q / ffnq with int8 activations (issue 20) against the pure-MLX quantized reference.

The int8 path quantizes x per block of 32 (x ~ dx * xq, |xq| <= 127) and computes the integer
dot products exactly, so it must equal the MLX reference fed the dequantized x (`dequant_x`) to
float rounding (1e-4 of the output's scale), and the reference fed the exact x within the
quantization error (2e-2 of the output's scale; measured 0.4-1%). exact=True (f32 activations)
must equal the exact reference to 1e-5 / 1e-4. Every build (AVX-512 VNNI, 256-bit AVX-VNNI,
AVX2 without VNNI, portable scalar) computes the same integers.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

import mlx_flash.accel.build as accel_build
import mlx_flash.accel.ffn as ffn_accel
import mlx_flash.accel.kernels as accel_kernels
from mlx_flash.compute.reference import ffn_over_parts, ffn_over_qrows, hidden
from mlx_flash.format.bundles import pack_bits
from mlx_flash.format.manifest import FFNLayout
from mlx_flash.offline.convert import convert
from mlx_flash.runtime.loader import load

REASON = accel_build.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"CPU kernels: {REASON}")

INT8_TOL = 2e-2  # int8 activations vs the exact reference, relative to max |output|
ROUNDING_TOL = 1e-4  # int8 activations vs the reference on the dequantized x


def rand(shape, seed, scale=1.0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale


def dequant_x(x: np.ndarray) -> np.ndarray:
    """What the kernels' int8 activations stand for: x rounded per block of 32 to 127 steps."""
    blocks = x.reshape(x.shape[0], -1, 32)
    step = np.abs(blocks).max(-1, keepdims=True) / 127
    q = np.clip(np.rint(blocks / np.where(step > 0, step, 1)), -127, 127)
    return (q * step).reshape(x.shape).astype(np.float32)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def quantized(shape, seed, bits, group, scale=1.0):
    """Random rows as MLX affine-quantized (q, scales f16, biases f16)."""
    q, s, b = mx.quantize(mx.array(rand(shape, seed, scale)), group_size=group, bits=bits)
    return q, s.astype(mx.float16), b.astype(mx.float16)


def test_builds_take_the_paths_they_claim(builds):
    assert builds["scalar"].int_dot == "scalar" and not builds["scalar"].vector
    for name in set(builds) - {"native", "scalar"}:  # the x86 builds this CPU can run
        assert builds[name].int_dot == name
    assert builds["native"].int_dot in accel_kernels.INT_DOT_PATHS


CASES = [(bits, group, d) for bits in (4, 8) for group in (32, 64, 128)
         for d in (128, 896, 96) if d % group == 0]  # 96: a last 4-bit chunk of 32


@pytest.mark.parametrize("bits,group,d", CASES)
@pytest.mark.parametrize("tokens", [1, 4, 6])  # 4: the 4-token pass; 6: 4 + 2
def test_linear_q_int8_matches_mlx(builds, bits, group, d, tokens):
    rows = 37  # odd
    q, s, b = quantized((rows, d), 0, bits, group)
    x = rand((tokens, d), 1)
    bias = rand(rows, 2)

    def reference(xx):
        out = mx.quantized_matmul(mx.array(xx), q, s.astype(mx.float32), b.astype(mx.float32),
                                  transpose=True, group_size=group, bits=bits)
        return np.asarray(out) + bias

    exact_ref, dq_ref = reference(x), reference(dequant_x(x))
    qn, sn, bn = np.asarray(q), np.asarray(s), np.asarray(b)
    for name, k in builds.items():
        got = k.linear_q(qn, sn, bn, bits, group, x, bias, exact=False)
        assert rel_err(got, dq_ref) < ROUNDING_TOL, name
        assert rel_err(got, exact_ref) < INT8_TOL, name
        exact = k.linear_q(qn, sn, bn, bits, group, x, bias, exact=True)
        np.testing.assert_allclose(exact, exact_ref, rtol=1e-5, atol=1e-4 * np.abs(exact_ref).max())
    f32 = builds["native"].linear_q(qn, np.asarray(s.astype(mx.float32)),
                                    np.asarray(b.astype(mx.float32)), bits, group, x, bias)
    assert rel_err(f32, dq_ref) < ROUNDING_TOL  # f32 scales: the same numbers


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group,d", [(32, 96), (64, 128), (128, 256)])
@pytest.mark.parametrize("kind,activation", [("gated", "silu"), ("plain", "relu2")])
@pytest.mark.parametrize("tokens", [1, 5])
def test_ffnq_int8_matches_reference(builds, bits, group, d, kind, activation, tokens):
    parts, capacity, n = (3 if kind == "gated" else 2), 45, 37
    layout = FFNLayout(kind=kind, activation=activation, d_model=d, dtype="float16",
                       has_bias=True, bits=bits, group_size=group)
    q, s, b = quantized((parts, capacity, d), 3, bits, group, 0.3)
    x = rand((tokens, d), 4)
    mask = (np.random.default_rng(5).random((tokens, n)) < 0.7).astype(np.float32)
    in_bias = rand((parts - 1, capacity), 6)

    def reference(xx):
        return np.asarray(ffn_over_qrows(mx.array(xx), q, s.astype(mx.float32),
                                         b.astype(mx.float32), n, layout, mx.array(mask),
                                         mx.array(in_bias)))

    exact_ref, dq_ref = reference(x), reference(dequant_x(x))
    int_ref = dq_ref
    if bits == 4:  # vector builds: the 4-bit down rows take int8 coefficients as well
        sf, bf = s.astype(mx.float32), b.astype(mx.float32)
        h = np.asarray(hidden(lambda i: mx.quantized_matmul(
            mx.array(dequant_x(x)), q[i, :n], sf[i, :n], bf[i, :n], transpose=True,
            group_size=group, bits=bits), layout, n, mx.array(mask), mx.array(in_bias)))
        down = np.asarray(mx.dequantize(q[-1, :n], mx.ones_like(sf[-1, :n]),
                                        mx.zeros_like(bf[-1, :n]), group_size=group, bits=4))
        int_ref = int_rows_reference(h, down, np.asarray(sf[-1, :n]), np.asarray(bf[-1, :n]),
                                     mask.any(0))
    args = (np.asarray(q), np.asarray(s).view(np.uint16), np.asarray(b).view(np.uint16),
            "float16", n, bits, group, x, activation, mask, in_bias)
    for name, k in builds.items():
        got = k.ffnq(*args, exact=False)
        assert rel_err(got, dq_ref if name == "scalar" else int_ref) < ROUNDING_TOL, name
        assert rel_err(got, exact_ref) < INT8_TOL, name
        assert rel_err(k.ffnq(*args, exact=True), exact_ref) < 1e-4, name


def int_rows_reference(h: np.ndarray, q: np.ndarray, scales: np.ndarray, biases: np.ndarray,
                       needed: np.ndarray, batch: int = 32, sub: int = 16) -> np.ndarray:
    """ffnq's down projection over 4-bit rows with int8 coefficients, restated: h (T, n), q
    (n, d) the rows' integers, scales / biases (n, d / group). Slots go in batches of
    `batch`, whose needed ones go `sub` at a time: per token and group the coefficients
    c = h * scale ~ D * rint(c / D), D = max |c| / 127, over the 64-element chunks (the rest
    of d in f32); the biases' term h * bias is exact."""
    tokens, (n, d) = h.shape[0], q.shape
    group = d // scales.shape[1]
    full = d - d % 64
    y = h.astype(np.float64) @ np.repeat(biases, group, axis=1)
    for start in range(0, n, batch):
        kept = [j for j in range(start, min(start + batch, n)) if needed[j]]
        for k in range(0, len(kept), sub):
            js = kept[k:k + sub]
            for t in range(tokens):
                c = h[t, js, None].astype(np.float64) * scales[js]  # (m, groups)
                scale = np.abs(c).max(0) / 127
                cq = np.where(scale > 0, np.rint(c / np.where(scale > 0, scale, 1)) * scale, c)
                y[t, :full] += (np.repeat(cq, group, axis=1) * q[js])[:, :full].sum(0)
                y[t, full:] += (np.repeat(c, group, axis=1) * q[js])[:, full:].sum(0)
    return y.astype(np.float32)


@pytest.mark.parametrize("bits,bits_down", [(4, 4), (8, 8), (4, 8)])
# table_group 64: one table row of 37 slots, more than one batch of down columns
@pytest.mark.parametrize("group,table_group,d", [(32, 16, 96), (64, 32, 128), (32, 64, 96)])
@pytest.mark.parametrize("kind", ["gated", "plain"])
@pytest.mark.parametrize("tokens", [1, 6])
def test_ffnp_matches_reference(builds, bits, bits_down, group, table_group, d, kind, tokens):
    """ffnp (format 3: gate/up rows along d, down columns along the neurons with the layer's
    table) against the MLX reference `ffn_over_parts`, slots in any order of neuron ids."""
    names = ["gate", "up", "down"] if kind == "gated" else ["up", "down"]
    quant = {m: {"bits": bits, "group_size": group, "axis": "d_model"} for m in names[:-1]}
    quant["down"] = {"bits": bits_down, "group_size": table_group, "axis": "neurons"}
    layout = FFNLayout(kind=kind, activation="silu", d_model=d, dtype="float16",
                       has_bias=True, quant=quant)
    capacity, n, n_neurons = 45, 37, 64
    rng = np.random.default_rng(7)
    rows = {}
    for i, m in enumerate(names[:-1]):
        q, sc, bi = quantized((capacity, d), 10 + i, bits, group, 0.3)
        rows.update({f"{m}.q": np.asarray(q), f"{m}.scales": np.asarray(sc).view(np.uint16),
                     f"{m}.biases": np.asarray(bi).view(np.uint16)})
    values = rng.integers(0, 2 ** bits_down, (capacity, d)).astype(np.uint8)
    rows["down.q"] = pack_bits(values, bits_down)
    table = [(rand((n_neurons // table_group, d), 20 + k, 0.05)).astype(np.float16)
             for k in range(2)]
    ids = rng.permutation(n_neurons)[:n]  # the slots' neurons
    x = rand((tokens, d), 4)
    mask = (rng.random((tokens, n)) < 0.7).astype(np.float32)
    in_bias = rand((len(names) - 1, capacity), 6)

    def reference(xx):
        buffers = {k: mx.array(v.view(np.float16) if v.dtype == np.uint16 else v)[None]
                   for k, v in rows.items()}
        buffers = {k: v.astype(mx.float32) if v.dtype == mx.float16 else v
                   for k, v in buffers.items()}
        group_of = mx.array((ids // table_group).astype(np.int32))
        down = tuple(mx.array(t.astype(np.float32)) for t in table)
        return np.asarray(ffn_over_parts(mx.array(xx), buffers, n, layout, group_of, down,
                                         mx.array(mask), mx.array(in_bias)))

    exact_ref, dq_ref = reference(x), reference(dequant_x(x))
    # vector builds: the down columns take integer h as well (int8 for 4-bit columns, int16
    # for 8-bit ones)
    buffers = {k: mx.array(v.view(np.float16).astype(np.float32) if v.dtype == np.uint16
                           else v)[None] for k, v in rows.items()}
    h = np.asarray(hidden(lambda i: mx.quantized_matmul(
        mx.array(dequant_x(x)), buffers[f"{names[i]}.q"][0, :n],
        buffers[f"{names[i]}.scales"][0, :n], buffers[f"{names[i]}.biases"][0, :n],
        transpose=True, group_size=group, bits=bits), layout, n, mx.array(mask),
        mx.array(in_bias)))
    int_ref = int_down_reference(h, values[:n], ids // table_group, mask.any(0), table,
                                 *((127, 16) if bits_down == 4 else (32767, 32)))
    args = (rows, tuple(t.view(np.uint16) for t in table), ids // table_group, "float16", n,
            bits, group, bits_down, x, "silu", mask, in_bias)
    for name, k in builds.items():
        got = k.ffnp(*args, exact=False)
        assert rel_err(got, dq_ref if name == "scalar" else int_ref) < ROUNDING_TOL, name
        assert rel_err(got, exact_ref) < INT8_TOL, name
        assert rel_err(k.ffnp(*args, exact=True), exact_ref) < 1e-4, name


@pytest.mark.parametrize("bits_down,table_group", [(8, 16), (4, 32)])
@pytest.mark.parametrize("tokens", [1, 6])
def test_ffnp_symmetric_table_skips_its_biases(builds, bits_down, table_group, tokens):
    """A table whose biases are -32 * its scales (a GGUF's Q6_K carried along the neurons)
    passed without its biases (table_zero 32) gives what the full table gives, on every build
    and both activation paths; table_zero_point finds the 32 and refuses a table off by one
    entry."""
    d, capacity, n, n_neurons = 160, 45, 37, 64  # 160: a 64-tile loop plus a tail of 32
    quant = {m: {"bits": 4, "group_size": 32, "axis": "d_model"} for m in ("gate", "up")}
    quant["down"] = {"bits": bits_down, "group_size": table_group, "axis": "neurons"}
    rng = np.random.default_rng(11)
    rows = {}
    for i, m in enumerate(("gate", "up")):
        q, sc, bi = quantized((capacity, d), 30 + i, 4, 32, 0.3)
        rows.update({f"{m}.q": np.asarray(q), f"{m}.scales": np.asarray(sc).view(np.uint16),
                     f"{m}.biases": np.asarray(bi).view(np.uint16)})
    rows["down.q"] = pack_bits(rng.integers(0, 2 ** bits_down, (capacity, d)).astype(np.uint8),
                               bits_down)
    scales = rand((n_neurons // table_group, d), 40, 0.05).astype(np.float16)
    biases = (-32 * scales).astype(np.float16)
    assert ffn_accel.table_zero_point(mx.array(scales), mx.array(biases)) == 32.0
    off = biases.copy()
    off[0, 3] += np.float16(0.01)
    assert ffn_accel.table_zero_point(mx.array(scales), mx.array(off)) is None
    ids = rng.permutation(n_neurons)[:n] // table_group
    x, mask = rand((tokens, d), 41), (rng.random((tokens, n)) < 0.7).astype(np.float32)
    args = (ids, "float16", n, 4, 32, bits_down, x, "silu", mask)
    for name, k in builds.items():
        for exact in (False, True):
            full = k.ffnp(rows, (scales.view(np.uint16), biases.view(np.uint16)), *args,
                          exact=exact)
            got = k.ffnp(rows, (scales.view(np.uint16), None), *args, exact=exact,
                         table_zero=32.0)
            assert rel_err(got, full) < 1e-5, (name, exact)


def int_down_reference(h: np.ndarray, q: np.ndarray, group_of: np.ndarray, needed: np.ndarray,
                       table: list[np.ndarray], levels: int, sub: int,
                       batch: int = 32) -> np.ndarray:
    """ffnp's down projection with integer h, restated: h (T, n), q (n, d) the columns'
    integers, group_of (n,) their table rows, needed (n,) the slots any token's mask keeps.
    Slots go a table row at a time (stable order), in batches of `batch` slots whose needed
    ones go `sub` at a time: per token h ~ D * rint(h / D), D = max |h| / levels, over the
    64-element chunks (the rest of d in f32); y += ts * G + tz * sum(h)."""
    tokens, d = h.shape[0], q.shape[1]
    ts, tz = (t.astype(np.float64) for t in table)
    full = d - d % 64
    y = np.zeros((tokens, d))
    order = np.argsort(group_of, kind="stable")
    runs = np.split(order, np.flatnonzero(np.diff(group_of[order])) + 1)
    for run in runs:
        g = group_of[run[0]]
        for start in range(0, run.size, batch):
            kept = [j for j in run[start:start + batch] if needed[j]]
            for k in range(0, len(kept), sub):
                js = kept[k:k + sub]
                for t in range(tokens):
                    hk = h[t, js].astype(np.float64)
                    scale = np.abs(hk).max() / levels
                    hq = np.rint(hk / scale) * scale if scale > 0 else hk
                    big = np.concatenate([hq @ q[js, :full], hk @ q[js, full:]])
                    y[t] += ts[g] * big + tz[g] * hk.sum()
    return y.astype(np.float32)


def test_exact_by_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(accel_kernels.ENV_QUANT_ACTIVATIONS, "f32")
    k = accel_kernels.CpuKernels(accel_build.kernels().path)
    assert k.exact_quant
    q, s, b = quantized((9, 64), 7, 4, 32)
    x = rand((1, 64), 8)
    want = np.asarray(mx.quantized_matmul(mx.array(x), q, s.astype(mx.float32),
                                          b.astype(mx.float32), transpose=True, group_size=32,
                                          bits=4))
    got = k.linear_q(np.asarray(q), np.asarray(s), np.asarray(b), 4, 32, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_linear_q_rejects_mismatched_scales():
    q, s, b = quantized((9, 64), 7, 4, 32)
    k = accel_build.kernels()
    with pytest.raises(ValueError, match="scales/biases"):
        k.linear_q(np.asarray(q), np.asarray(s)[:, :1].copy(), np.asarray(b), 4, 32,
                   rand((1, 64), 8))


def test_quantized_linear_keeps_16_bit_scales():
    from mlx_flash.accel.linear import accelerate

    linear = nn.QuantizedLinear(128, 40, bias=False, group_size=64, bits=4)
    linear.set_dtype(mx.float16)
    holder = nn.Module()
    holder.proj = linear
    x = mx.array(rand((2, 128), 9))
    want = np.asarray(linear(x.astype(mx.float16)).astype(mx.float32))
    accelerate(holder)
    fused = holder.proj.fused
    assert fused.scales.dtype == np.uint16 and fused.scale_dtype == "float16"
    assert rel_err(np.asarray(holder.proj(x)), want) < INT8_TOL


def logits_and_margins(model, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    out = np.asarray(model(mx.array([ids]), cache=make_prompt_cache(model))[0].astype(mx.float32))
    top2 = np.sort(out, axis=-1)[:, -2:]
    return out, top2[:, 1] - top2[:, 0]


@pytest.mark.parametrize("bits", [4, 8])
def test_tiny_model_greedy_tokens_with_int8(tiny_dirs, tmp_path, monkeypatch, bits):
    """4/8-bit bundles and resident linears: the fast path's logits within the int8 error of
    the MLX path's, and the same greedy token wherever the reference's top-2 margin exceeds
    twice that error (random tiny models have near ties); exact=True: a smaller error, so more
    positions where the tokens must agree."""
    src, _ = tiny_dirs("qwen2", "float16")
    out = tmp_path / f"q{bits}"
    convert(src, out, bits=bits, group_size=32)
    kwargs = dict(selector="oracle", oracle_rule="all", resident_bits=bits,
                  resident_group_size=32)
    ref, _ = load(out, fast_cpu=False, dtype="float32", **kwargs)
    fast, _ = load(out, fast_cpu=True, **kwargs)
    ids = list(range(3, 40))
    want, margin = logits_and_margins(ref, ids)
    got, _ = logits_and_margins(fast, ids)
    err = float(np.abs(got - want).max())
    assert err < 0.3 * want.std()  # measured 0.11 (4-bit), 0.18 (8-bit) std: random weights
    clear = margin > 2 * err
    assert clear.sum() >= len(ids) // 4  # the check below covers a good share of positions
    assert (got.argmax(-1)[clear] == want.argmax(-1)[clear]).all()
    monkeypatch.setattr(accel_build.kernels(), "exact_quant", True)
    exact, _ = logits_and_margins(fast, ids)
    exact_err = float(np.abs(exact - want).max())  # f16 scales vs the reference's f32 ones
    assert exact_err < 0.05 * want.std() and exact_err < err
    sure = margin > 2 * exact_err
    assert sure.sum() > clear.sum() and (exact.argmax(-1)[sure] == want.argmax(-1)[sure]).all()
