"""Quantized CPU kernels (issue 20): GB/s of weight bytes per call, int8 vs f32 activations.

For 4-bit (and --bits 8) MLX affine rows of the default model's shapes it times, per T:

  linear_q  a 4864 x 896 matrix (an FFN-sized gemv) and the 151936 x 896 lm_head
  ffnq      one layer's FFN over all 4864 neurons (gate, up, down)

each with int8 activations (the default) and exact f32 ones (`exact=True`), interleaved call by
call (the machine is shared), median of --repeat calls after a warm-up. Each call reads the next
of --copies weight copies so the rows come from DRAM as in decoding. GB/s counts the packed
weights plus the 16-bit scales and biases.

    nice -n 5 python scripts/bench_quant.py [--bits 4] [--group-size 64] [--json F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_flash.accel.build import kernels

D_MODEL, NEURONS, VOCAB = 896, 4864, 151936


def quantized(rows: int, parts: int, bits: int, group: int, seed: int) -> tuple[np.ndarray, ...]:
    """(parts, rows, d) random weights as MLX affine rows: q uint32, scales/biases f16 bits."""
    w = mx.random.normal((parts, rows, D_MODEL), key=mx.random.key(seed)) * 0.05
    q, s, b = mx.quantize(w, group_size=group, bits=bits)
    return (np.asarray(q), np.asarray(s.astype(mx.float16)).view(np.uint16),
            np.asarray(b.astype(mx.float16)).view(np.uint16))


def nbytes(arrays: tuple[np.ndarray, ...]) -> int:
    return sum(a.nbytes for a in arrays)


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench(name: str, copies: list[tuple[np.ndarray, ...]], call, tokens: int,
          repeat: int) -> dict:
    """call(arrays, x, exact) timed for exact False/True, interleaved; GB/s of one copy."""
    x = np.random.default_rng(tokens).standard_normal((tokens, D_MODEL)).astype(np.float32)
    times: dict[str, list[float]] = {"int8": [], "f32": []}
    step = [0]

    def one(exact: bool) -> None:
        call(copies[step[0] % len(copies)], x, exact)
        step[0] += 1

    for exact in (False, True):
        one(exact)  # warm-up
    for _ in range(repeat):
        for label, exact in (("int8", False), ("f32", True)):
            times[label] += timed(lambda e=exact: one(e), 1)
    size = nbytes(copies[0])
    row = {"kernel": name, "tokens": tokens, "weight_MB": size / 1e6}
    for label, ts in times.items():
        ms = 1e3 * statistics.median(ts)
        row[f"{label}_ms"], row[f"{label}_GBps"] = ms, size / ms / 1e6
    row["speedup"] = row["f32_ms"] / row["int8_ms"]
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=4, choices=(4, 8))
    p.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128))
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--copies", type=int, default=4, help="FFN-sized copies rotated through")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    k, bits, group = kernels(), args.bits, args.group_size
    print(f"kernels: int dot {k.int_dot}, {k.threads} threads, {bits}-bit, groups of {group}")

    def linear(a, x, exact):
        q, s, b = (m[0] for m in a)
        return k.linear_q(q, s, b, bits, group, x, scale_dtype="float16", exact=exact)

    def ffn(a, x, exact):
        return k.ffnq(*a, "float16", NEURONS, bits, group, x, "silu", exact=exact)

    gemv = [quantized(NEURONS, 1, bits, group, i) for i in range(args.copies)]
    layer = [quantized(NEURONS, 3, bits, group, 10 + i) for i in range(args.copies)]
    head = [quantized(VOCAB, 1, bits, group, 20)]
    rows = []
    for tokens in (1, 4):
        for name, copies, call, repeat in (
                ("linear_q 4864x896", gemv, linear, args.repeat),
                ("linear_q 151936x896", head, linear, max(3, args.repeat // 3)),
                ("ffnq 3x4864x896", layer, ffn, args.repeat)):
            row = bench(name, copies, call, tokens, repeat)
            rows.append(row)
            print(f"{name:22s} T={tokens}: int8 {row['int8_ms']:7.2f} ms "
                  f"{row['int8_GBps']:5.1f} GB/s | f32 {row['f32_ms']:7.2f} ms "
                  f"{row['f32_GBps']:5.1f} GB/s | x{row['speedup']:.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"bits": bits, "group_size": group,
                                         "int_dot": k.int_dot, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
