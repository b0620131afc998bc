"""Bigger than memory: the default model under a memory cap smaller than the model, beside dense.

    sudo python examples/bigger_than_memory.py             # a real cap: a cgroup v1 memory group
    python examples/bigger_than_memory.py --no-cgroup      # a declared dram_budget only

Runs `mlx-flash generate` in fresh processes, the same prompt and greedy decoding each time:
  dense      the ordinary mlx_lm model, whole in RAM, no cap (the reference)
  flash      FFN neurons on flash, dram_budget = the cap, inside a cgroup capped there when root
             (scripts/run_capped.sh: cold page cache, and the page cache counts against the cap)
  dense+cap  (root only) the dense model under the same cap: it does not fit
and prints peak memory, speed, flash bytes read per token, hit rate, and how much of the text
agrees with dense. Without predictors the active neurons come from the oracle; at a cap below
the model's size only a fraction of them can be cached (--flash-args sets the rule: see README).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CGROUP = Path("/sys/fs/cgroup/memory")
PROMPT = "def fibonacci(n):"


@dataclass
class Run:
    name: str
    limit: str
    returncode: int
    text: str
    tokens_per_second: float | None = None
    peak_rss: int | None = None  # bytes, the process's peak resident set
    cgroup_peak: int | None = None  # bytes, the group's peak usage, page cache included
    flash: dict | None = None  # --stats-json totals, plus select_bytes_per_token


def model_bytes(path: Path) -> tuple[int, int]:
    """(resident, FFN) bytes on disk of a flash model dir."""
    from mlx_flash.format.manifest import read_manifest

    manifest = read_manifest(path)
    return manifest.resident["size"], manifest.ffn_bytes


def can_cap() -> bool:
    return os.geteuid() == 0 and os.access(CGROUP, os.W_OK)


def generate(name: str, model: Path, args, extra: list[str], cap: int | None) -> Run:
    """One `mlx-flash generate` in a fresh process (inside the cgroup when `cap`)."""
    with tempfile.TemporaryDirectory() as tmp:
        stats = Path(tmp) / "stats.json"
        cmd = [sys.executable, "-m", "mlx_flash", "generate", "--model", str(model),
               "--prompt", args.prompt, "--max-tokens", str(args.max_tokens),
               "--ignore-chat-template", *extra]
        if "--dense" not in extra:
            cmd += ["--stats-json", str(stats)]
        if cap is not None:
            cmd = ["bash", str(ROOT / "scripts" / "run_capped.sh"), str(cap), *cmd]
        print(f"[{name}] {shlex.join(cmd)}", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        flash = flash_totals(json.loads(stats.read_text())) if stats.exists() else None
    limit = f"{gib(cap)} (cgroup)" if cap else (f"{gib(args.cap)} (budget)" if flash else "none")
    run = Run(name, limit, proc.returncode, proc.stdout.strip(), flash=flash)
    if m := re.search(r"Generation: \d+ tokens, ([\d.]+) tokens-per-sec", proc.stderr):
        run.tokens_per_second = float(m.group(1))
    if m := re.search(r"peak usage (\d+) B", proc.stderr):
        run.cgroup_peak = int(m.group(1))
    if m := re.search(r"Peak RSS: ([\d.]+) GB", proc.stderr):
        run.peak_rss = int(float(m.group(1)) * 2**30)
    if proc.returncode and not run.text:
        print(proc.stderr[-2000:], file=sys.stderr)
    return run


def flash_totals(stats: dict) -> dict:
    """The run's totals, plus what selecting the neurons read per token (the oracle reads
    every row of every layer to find them; predictors read nothing)."""
    decode = [s for s in stats["steps"] if s["tokens"] == 1]
    totals = dict(stats["totals"])
    totals["select_bytes_per_token"] = (sum(s["predictor_bytes"] for s in decode)
                                        / max(1, len(decode)))
    return totals


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def agreement(text: str, reference: str) -> str:
    """How many leading words of `text` match the reference's."""
    a, b = text.split(), reference.split()
    n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a),
                                                                                  len(b)))
    return "identical" if a == b else f"first {n}/{len(b)} words"


def report(runs: list[Run], resident: int, ffn: int, capped: bool) -> None:
    print(f"\nmodel on disk: {gib(resident + ffn)} (resident {gib(resident)} + FFN {gib(ffn)})")
    print("cap: a cgroup v1 memory limit (page cache included, cold cache)" if capped else
          "cap: the declared dram_budget only (run as root for a cgroup cap)")
    header = (f"{'run':<10} {'limit':<18} {'peak RSS':>10} {'cgroup peak':>11} {'tok/s':>6} "
              f"{'MiB read/tok':>13} {'select':>7} {'hit':>5}  text vs dense")
    print(header + "\n" + "-" * len(header))
    dense = runs[0].text
    for r in runs:
        if r.returncode:
            print(f"{r.name:<10} {r.limit:<18} did not finish (exit status {r.returncode}: "
                  f"{'killed, out of memory' if r.returncode in (137, -9) else 'failed'})")
            continue
        f = r.flash
        read = f"{f['bytes_read_per_token'] / 2**20:.2f}" if f else "-"
        select = f"{f['select_bytes_per_token'] / 2**20:.0f}" if f else "-"
        hit = f"{f['hit_rate']:.0%}" if f else "-"
        tps = f"{r.tokens_per_second:.2f}" if r.tokens_per_second else "-"
        same = "(reference)" if r is runs[0] else agreement(r.text, dense)
        print(f"{r.name:<10} {r.limit:<18} {gib(r.peak_rss):>10} {gib(r.cgroup_peak):>11} "
              f"{tps:>6} {read:>13} {select:>7} {hit:>5}  {same}")
    print("MiB read/tok: the window's reads of new neurons; select: what finding the active "
          "neurons read (MiB/tok)")
    print(f"\ndense: {dense!r}")
    for r in runs[1:]:
        if not r.returncode:
            print(f"{r.name}: {r.text!r}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="flash model dir (default: the default model)")
    p.add_argument("--cap", default="0.9", help="memory cap: bytes, '1GB', or a fraction of "
                                                "the model's size on disk (default 0.9)")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--flash-args", default="--rule top --keep 0.3 --window 1",
                   help="extra `mlx-flash generate` flags for the flash run")
    p.add_argument("--no-cgroup", action="store_true", help="declare the budget only")
    args = p.parse_args()

    from mlx_flash.cli.common import default_model_dir
    from mlx_flash.runtime.memory import parse_budget

    model = Path(args.model) if args.model else default_model_dir()
    resident, ffn = model_bytes(model)
    args.cap = parse_budget(args.cap, resident + ffn)
    cap = args.cap if can_cap() and not args.no_cgroup else None
    if cap is None and not args.no_cgroup:
        print(f"no cgroup cap (needs root and {CGROUP}): using the declared budget only",
              file=sys.stderr)
    flash = ["--dram-budget", str(args.cap), *shlex.split(args.flash_args)]
    runs = [generate("dense", model, args, ["--dense"], None),
            generate("flash", model, args, flash, cap)]
    if cap is not None:
        runs.append(generate("dense+cap", model, args, ["--dense"], cap))
    report(runs, resident, ffn, cap is not None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
