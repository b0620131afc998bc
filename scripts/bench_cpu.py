"""Decode speed on CPU: MLX's own kernels vs the fast CPU path vs llama.cpp (issue 11).

Every contender runs in its own process (mlx_flash.bench's workers: same prompt ids, greedy,
same token count, page cache dropped before each run, a cgroup v1 memory group per run):

  dense-mlx     mlx_lm dense, MLX CPU kernels (f32 compute)      no cap
  dense-fast    mlx_lm dense, the fast CPU path (16-bit weights) no cap
  flash-mlx     mlx-flash, every neuron (oracle "all"), MLX      no cap
  flash-fast    mlx-flash, every neuron, fast CPU path           no cap and each --caps
  llama.cpp     llama-cpp-python on --gguf (and --gguf-f16)     no cap and each --caps

Caps are fractions of the flash dir's size (its 16-bit weights) or sizes; a GGUF contender is
capped at the same fraction of its own file. Writes cpu_bench.json and cpu_bench.md to --out.

  sudo python scripts/bench_cpu.py --model DIR --gguf Q4.gguf --gguf-f16 F16.gguf --caps 0.5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mlx_flash.bench.caps import model_bytes
from mlx_flash.bench.contenders import Contender, llama_cpp_available
from mlx_flash.bench.harness import make_setup, private_copy, run_one
from mlx_flash.bench.report import fmt, machine_description, source_stamp

# every neuron (exact); a 1024-token KV reserve (the run needs ~120) leaves the half-size cap
# room for a few hundred cached neurons per layer
ORACLE_ALL = {"selector": "oracle", "oracle_rule": "all", "window": 5, "threads": 8,
              "max_kv_tokens": 1024}


def contenders(gguf: Path | None, gguf_f16: Path | None) -> list[Contender]:
    llama = llama_cpp_available()
    out = [
        Contender("dense-mlx", "dense", "dense mlx_lm, MLX CPU kernels, f32",
                  {"fast_cpu": False}, capped=False),
        Contender("dense-fast", "dense", "dense mlx_lm, fast CPU path, f16 weights",
                  {"fast_cpu": True}, capped=False),
        Contender("flash-mlx", "flash", "mlx-flash all neurons, MLX CPU kernels, f32",
                  dict(ORACLE_ALL, fast_cpu=False), capped=False),
        Contender("flash-fast", "flash", "mlx-flash all neurons, fast CPU path, f16",
                  dict(ORACLE_ALL, fast_cpu=True)),
        Contender("flash-fast-mlx-blocks", "flash",
                  "mlx-flash all neurons, fast CPU path, MLX blocks (no cpu_decode)",
                  dict(ORACLE_ALL, fast_cpu=True, env={"MLX_FLASH_CPU_BLOCKS": "0"}),
                  capped=False),
    ]
    for name, path in (("llama.cpp-q4", gguf), ("llama.cpp-f16", gguf_f16)):
        c = Contender(name, "llama_cpp", f"llama.cpp (llama-cpp-python) on {path}",
                      {"gguf": str(path) if path else None})
        c.skip = llama or (None if path and path.exists() else f"no GGUF ({path})")
        out.append(c)
    return out


def cap_for(c: Contender, fraction: float, flash_size: int) -> int:
    """The same fraction of what the contender runs: the flash dir, or the GGUF file."""
    size = Path(c.options["gguf"]).stat().st_size if c.kind == "llama_cpp" else flash_size
    return int(fraction * size)


def run(args: argparse.Namespace) -> dict:
    copied_from = None
    if args.copy_to:  # files no other process keeps in the page cache (see private_copy)
        copied_from = args.model
        model, args.gguf = private_copy(Path(args.model), args.gguf, Path(args.copy_to))
        _, args.gguf_f16 = private_copy(model, args.gguf_f16, Path(args.copy_to))
        args.model = str(model)
    size = model_bytes(Path(args.model))
    args.dtype, args.direct, args.cgroup_parent = None, False, None
    args.prompt_ids = None
    setup = make_setup(args, size)
    rows = []
    for c in contenders(args.gguf, args.gguf_f16):
        if args.only and c.name not in args.only:
            continue
        fractions = [None] + ([] if not c.capped else args.caps)
        for fraction in fractions:
            cap = None if fraction is None or c.skip else cap_for(c, fraction, size)
            print(f"[bench-cpu] {c.name} cap {fraction} ...", file=sys.stderr, end="", flush=True)
            row = run_one(setup, c, cap)
            row["cap_fraction"] = fraction
            print(f" {row['status']} {fmt(row.get('decode_tps'), digits=2)} tok/s",
                  file=sys.stderr)
            rows.append(row)
    return {"machine": machine_description(Path(args.model)), "model": args.model,
            "copied_from": copied_from,
            "tokens": args.tokens, "prompt_tokens": len(setup.prompt_ids),
            "load_average_end": os.getloadavg(), "source": source_stamp(), "rows": rows}


def markdown(report: dict) -> str:
    copied = f" (private copy of {report['copied_from']})" if report.get("copied_from") else ""
    lines = [f"Machine: {report['machine']}; model {report['model']}{copied}; "
             f"{report['prompt_tokens']} prompt tokens, "
             f"{report['tokens']} generated (greedy), decode = tokens 2..N.", "",
             "| contender | cap | status | decode tok/s | ms/token | prompt+first token s "
             "| peak RSS MiB | cgroup peak MiB | disk MiB/token |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        cap = "none" if r["cap_bytes"] is None else \
            f"{r['cap_fraction']:.2f}x ({r['cap_bytes'] / 2**20:.0f} MiB)"
        lines.append(
            f"| {r['name']} | {cap} | {r['status']} | {fmt(r.get('decode_tps'), digits=2)}"
            f" | {fmt(r.get('ms_per_token'))} | {fmt(r.get('ttft_s'), digits=2)} | "
            f"{fmt(r.get('peak_rss_bytes'), 2**20, 0)} | "
            f"{fmt((r.get('cgroup') or {}).get('max_usage_bytes'), 2**20, 0)} | "
            f"{fmt(r.get('disk_bytes_per_token'), 2**20)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="16-bit flash model dir")
    p.add_argument("--gguf", type=Path, default=None, help="GGUF for llama.cpp (e.g. Q4_K_M)")
    p.add_argument("--gguf-f16", type=Path, default=None,
                   help="an f16 GGUF of the same model (scripts/gguf_to_f16.py)")
    p.add_argument("--caps", default="0.5", help="comma-separated fractions ('' for none)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt", default="Write a Python function that checks whether a string "
                                       "is a palindrome, with a docstring and tests.")
    p.add_argument("--out", default="bench-cpu")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--copy-to", default=None,
                   help="copy the model dir and GGUFs here first (recommended on a shared "
                        "machine: pages other processes cached would make capped reads free)")
    p.add_argument("--only", default="", help="comma-separated contender names to run")
    p.add_argument("--no-cgroup", action="store_true", help="run without memory groups")
    args = p.parse_args(argv)
    args.caps = [float(f) for f in args.caps.split(",") if f.strip()]
    args.only = [n for n in args.only.split(",") if n]
    report = run(args)
    out = Path(args.out)
    (out / "cpu_bench.json").write_text(json.dumps(report, indent=1))
    (out / "cpu_bench.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
