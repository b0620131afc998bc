"""Where a decode step's time goes on CPU (issue 11): kernels vs MLX graph vs Python.

For one model dir, greedy decode after a short prompt, per token (median over --tokens):

  mlx-dense    mlx_lm dense, MLX CPU kernels (f32): total, and the same model with every
               Linear's product replaced by zeros of the right shape (so what is left is the
               rest of the graph: norms, RoPE, attention, sampling, Python)
  fast-dense   the fast CPU path on the dense model
  fast-flash   mlx-flash with every neuron cached (oracle "all"), fast CPU path
  fast-pred    mlx-flash with the dir's predictors (selector "predictor"), fast CPU path

For the fast modes the C kernels' calls are timed by kind (attention projections, lm_head, FFN)
and so is the evaluation of the MLX graph between them (numpy views force it).

  python scripts/profile_decode.py --model DIR --tokens 24 [--modes fast-flash,...] [--json F]
      [--resident-bits 4]   (a 4-bit dir: OMP_NUM_THREADS=1 on a shared machine)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

import mlx_flash.accel.build as accel_build
import mlx_flash.accel.kernels as accel_kernels
import mlx_flash.accel.linear as accel_linear
from mlx_flash.runtime.loader import load, load_dense
from mlx_flash.runtime.selectors.predictor import PredictorSelector

MODES = ("mlx-dense", "mlx-glue", "fast-dense", "fast-flash", "fast-pred")


class Timers:
    """Seconds per label within the current token."""

    def __init__(self):
        self.now: dict[str, float] = defaultdict(float)
        self.tokens: list[dict[str, float]] = []
        self.in_predictor = False

    def wrap(self, label_of, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.now[label_of(args)] += time.perf_counter() - t0
        return timed

    def next_token(self, total: float) -> None:
        self.tokens.append(dict(self.now, total=total))
        self.now = defaultdict(float)

    def reset(self) -> None:
        self.now, self.tokens = defaultdict(float), []

    def medians(self) -> dict[str, float]:
        keys = {k for t in self.tokens for k in t}
        return {k: 1e3 * statistics.median(t.get(k, 0.0) for t in self.tokens)
                for k in sorted(keys)}


def instrument(timers: Timers) -> None:
    """Time the kernels by kind and the MLX evaluation that `to_f32_rows` forces."""
    k = accel_kernels.CpuKernels

    def linear_kind(args) -> str:
        if timers.in_predictor:
            return "_inside_predictor"  # counted by timed_select as a whole
        rows = args[1].shape[0]
        return "kernel lm_head" if rows > 50_000 else "kernel linear (attention/MLP)"

    k.linear16 = timers.wrap(linear_kind, k.linear16)
    k.linear_q = timers.wrap(linear_kind, k.linear_q)
    k.ffn16 = timers.wrap(lambda a: "kernel FFN", k.ffn16)
    k.ffnq = timers.wrap(lambda a: "kernel FFN", k.ffnq)
    select = PredictorSelector.select

    def timed_select(self, layer, x):
        t0, timers.in_predictor = time.perf_counter(), True
        try:
            return select(self, layer, x)
        finally:
            timers.in_predictor = False
            timers.now["predictor (kernels and numpy)"] += time.perf_counter() - t0
            timers.now.pop("_inside_predictor", None)

    PredictorSelector.select = timed_select
    original = accel_linear.to_f32_rows

    def to_rows(x):
        t0 = time.perf_counter()
        mx.eval(x)
        timers.now["MLX graph eval"] += time.perf_counter() - t0
        return original(x)

    accel_linear.to_f32_rows = to_rows


class ZeroLinear(nn.Module):
    """A Linear that returns zeros of its output shape: what remains is everything else."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self._out = linear.weight.shape[0]

    def __call__(self, x: mx.array) -> mx.array:
        return mx.zeros((*x.shape[:-1], self._out), dtype=x.dtype)


def zero_linears(model: nn.Module) -> None:
    for _, parent in model.named_modules():
        for name, child in parent.children().items():
            if type(child) is nn.Linear:
                setattr(parent, name, ZeroLinear(child))


def build(mode: str, model_dir: Path, resident_bits: int | None = None):
    if mode in ("mlx-dense", "mlx-glue"):
        model, tokenizer = load_dense(model_dir, dtype="float32")
        if mode == "mlx-glue":
            zero_linears(model)
        return model, tokenizer
    if mode == "fast-dense":
        return load_dense(model_dir, fast_cpu=True)
    quant = {} if resident_bits is None else {"resident_bits": resident_bits}
    if mode == "fast-pred":
        return load(model_dir, fast_cpu=True, selector="predictor", **quant)
    return load(model_dir, fast_cpu=True, selector="oracle", oracle_rule="all", **quant)


TIMERS = Timers()


def profile(mode: str, model_dir: Path, tokens: int, prompt: str,
            resident_bits: int | None = None) -> dict:
    model, tokenizer = build(mode, model_dir, resident_bits)
    timers = TIMERS
    timers.reset()
    cache = make_prompt_cache(model)
    logits = model(mx.array([tokenizer.encode(prompt)]), cache=cache)
    token = mx.argmax(logits[:, -1], -1)
    mx.eval(token)
    for i in range(tokens + 3):
        t0 = time.perf_counter()
        token = mx.argmax(model(token[None], cache=cache)[:, -1], -1)
        mx.eval(token)
        if i >= 3:  # warm-up tokens left out
            timers.next_token(time.perf_counter() - t0)
        else:
            timers.now.clear()
    result = timers.medians()
    if mode.startswith("fast"):
        known = sum(v for k, v in result.items() if k != "total")
        result["Python and the rest"] = max(0.0, result["total"] - known)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--prompt", default="def quicksort(arr):")
    p.add_argument("--json", default=None)
    p.add_argument("--resident-bits", type=int, default=None, choices=(16, 8, 4),
                   help="fast-flash/fast-pred: quantize the resident linears (lm_head and "
                        "attention then run on linear_q)")
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        p.error(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    if any(m.startswith("fast") for m in modes):
        if accel_build.unavailable_reason():
            p.error(f"the fast CPU path is unavailable: {accel_build.unavailable_reason()}")
        instrument(TIMERS)
    report = {}
    for mode in modes:
        report[mode] = result = profile(mode, args.model, args.tokens, args.prompt,
                                        args.resident_bits)
        parts = ", ".join(f"{k} {v:.1f}" for k, v in result.items() if k != "total")
        print(f"{mode}: {result['total']:.1f} ms/token ({parts})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
