"""Whole-model decode against llama.cpp on the same machine (issue 20), alternating runs.

Each round runs, one after the other, in fresh processes:

  llama.cpp     llama-cpp-python on the GGUF (the same chat prompt): n_ctx 512, --threads,
                64 greedy tokens
  mlx-flash     `mlx-flash generate` on a 4-bit flash dir, --resident-bits 4, no cap, with
                int8 activations (the default) and with exact f32 ones
                ($MLX_FLASH_QUANT_ACTIVATIONS=f32)

(with --before DIR: also the package checked out in DIR, e.g. the commit before) and prints
each run's decode tok/s (llama.cpp: generated tokens after the first over the time
after the first; mlx-flash: its --stats-json generation_tps), then the medians.

    nice -n 5 python scripts/bench_vs_llamacpp.py --gguf MODEL.gguf --flash DIR [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Write a Python function that reverses a string."


def llama_cpp_tps(gguf: Path, tokens: int, threads: int) -> float:
    """Decode tok/s of llama-cpp-python, greedy, in a child process."""
    code = f"""
import time, llama_cpp
m = llama_cpp.Llama(model_path={str(gguf)!r}, n_ctx=512, n_threads={threads}, verbose=False)
msgs = [{{"role": "user", "content": {PROMPT!r}}}]
stamps = []
for _ in m.create_chat_completion(msgs, max_tokens={tokens}, temperature=0.0, stream=True):
    stamps.append(time.perf_counter())
print((len(stamps) - 2) / (stamps[-1] - stamps[1]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def mlx_flash_tps(flash: Path, tokens: int, activations: str, threads: int,
                  source: Path | None = None) -> float:
    """Decode tok/s of `mlx-flash generate` (its kernels on `threads` OpenMP threads), of the
    package in `source` (a checkout, e.g. `git archive` of an older commit) when given."""
    with tempfile.TemporaryDirectory() as tmp:
        stats = Path(tmp) / "stats.json"
        env = dict(os.environ, MLX_FLASH_QUANT_ACTIVATIONS=activations,
                   OMP_NUM_THREADS=str(threads))
        if source is not None:
            env["PYTHONPATH"] = str(source)
        subprocess.run(["mlx-flash", "generate", "--model", str(flash), "--resident-bits", "4",
                        "--max-tokens", str(tokens), "--prompt", PROMPT, "--stats-json",
                        str(stats)], env=env, capture_output=True, text=True, check=True)
        return float(json.loads(stats.read_text())["generation"]["generation_tps"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", type=Path, required=True)
    p.add_argument("--flash", type=Path, required=True, help="a 4-bit flash dir of the GGUF")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2,
                   help="llama.cpp's n_threads and mlx-flash's OMP_NUM_THREADS (on a shared "
                        "machine 1 is the fair setting: llama.cpp's 2 threads spin-wait on a "
                        "busy core)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip-llama-cpp", action="store_true")
    p.add_argument("--before", type=Path, default=None,
                   help="also run the mlx_flash package of this checkout (the code before)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    runs: dict[str, list[float]] = {}
    for r in range(args.rounds):
        jobs = [("mlx-flash int8", lambda: mlx_flash_tps(args.flash, args.tokens, "int8", args.threads)),
                ("mlx-flash f32", lambda: mlx_flash_tps(args.flash, args.tokens, "f32", args.threads))]
        if args.before:
            jobs.append(("mlx-flash before", lambda: mlx_flash_tps(
                args.flash, args.tokens, "f32", args.threads, args.before)))
        if not args.skip_llama_cpp:
            jobs.insert(0, ("llama.cpp", lambda: llama_cpp_tps(args.gguf, args.tokens,
                                                                args.threads)))
        for name, job in jobs:
            t0 = time.perf_counter()
            tps = job()
            runs.setdefault(name, []).append(tps)
            print(f"round {r}: {name:15s} {tps:6.2f} tok/s ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    medians = {k: statistics.median(v) for k, v in runs.items()}
    for name, tps in medians.items():
        ratio = f", {tps / medians['llama.cpp']:.2f}x llama.cpp" if "llama.cpp" in medians else ""
        print(f"median {name:15s} {tps:6.2f} tok/s{ratio}")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "medians": medians}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
