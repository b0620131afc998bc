"""Benchmark mlx-flash against its baselines under a real DRAM cap (issue 5).

    mlx-flash bench --model /tmp/qwen-flash --caps 0.7,1.0 --tokens 32
    python -m mlx_flash.bench --model /tmp/qwen-flash --caps 0.7,1.0 --tokens 32

For one flash model dir and each DRAM cap (bytes, "700MiB", or a fraction of the model's size)
every contender runs in its own process inside a cgroup v1 memory group whose
`memory.limit_in_bytes` is the cap (page cache included), after the page cache was dropped:

  dense       mlx_lm with the whole model in DRAM, no cap (the upper bound; run once)
  naive       flash, every layer's whole FFN streamed from the bundles every token (the paper's
              baseline)
  mmap        the FFN memory-mapped and computed densely with numpy (what llama.cpp does)
  llama.cpp   llama-cpp-python on the source GGUF, mmap'd, same cap (when installed)
  flash       mlx-flash defaults, then one switch off at a time: flash-window1,
              flash-no-predictor, flash-no-bundling, flash-threads1

The child joins the cgroup before it imports anything (a `sh -c 'echo $$ > cgroup.procs; exec
python ...'` wrapper), so the cap covers the whole process; the worker reports its baseline RSS
(Python + MLX imported, no weights). An OOM kill is a result, not a crash of the benchmark.
Without root or the cgroup v1 memory controller the caps cannot be enforced: the benchmark says
so, runs uncapped, and the flash contenders read with O_DIRECT (labelled in every row).

`--regime users` (issue 20, `users.py`) is the users' regime instead: a 4-bit model (a flash dir
or a known model's name) under caps that are fractions of its GGUF's size (0.5, 0.7, 1.0, 1.3,
none), against llama.cpp on the same GGUF, with each contender's perplexity beside its speed.

The same run measures the disk (sequential 1 MiB direct reads; random direct reads against read
size and thread count, the paper's Figure 2b) and writes results.json, results.md and PNG plots
under --out (default /tmp/bench).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from ..format.manifest import Manifest, read_manifest
from ..offline.calibrate_disk import calibrate
from ..runtime import disk
from .baselines import write_unbundled
from .caps import MIB, cap_label, model_bytes, parse_caps
from .contenders import (
    ABLATIONS,
    ALL_CONTENDERS,
    IO_ABLATIONS,
    Contender,
    build_contenders,
    llama_cpp_available,
)
from .harness import Setup, make_setup, private_copy, run_one
from .perplexity import PPL_TOKENS
from .replay import io_replay, window_sweep
from .report import (
    agreement,
    command_line,
    derive,
    fmt,
    machine_description,
    source_stamp,
    speedups,
    write_report,
)
from .users import CELL_SECONDS, USERS_CONTENDERS, USERS_TOKENS, run_users

DEFAULT_CAPS = ("0.4", "0.5", "0.7", "1.0")
PAPER_TOKENS = 32
DEFAULT_PROMPT = "Write a Python function that checks whether a number is prime."


def default_gguf(model: Path) -> Path | None:
    """The GGUF the model was converted from, if the manifest names one."""
    source = read_manifest(model).source
    return Path(source["path"]) if source.get("kind") == "gguf" and source.get("path") else None


def run_all(setup: Setup, contenders: list[Contender], caps: list[int | None],
            ablation_caps: list[int | None] | None = None) -> list[dict]:
    """Dense once (uncapped), the main contenders at every cap, the ablations at
    `ablation_caps` (default: every cap); progress on stderr."""
    rows = []
    for c in contenders:
        at = caps if ablation_caps is None or c.name not in ABLATIONS + IO_ABLATIONS \
            else ablation_caps
        for cap in ([None] if not c.capped else at):
            print(f"[bench] {c.name} @ {cap_label(cap, setup.size)} ...", file=sys.stderr,
                  end="", flush=True)
            row = run_one(setup, c, cap)
            print(f" {row['status']} {fmt(row.get('decode_tps'), digits=2)} tok/s "
                  f"({row.get('wall_s', 0):.0f} s)", file=sys.stderr)
            rows.append(row)
    return rows


def sweeps(rows: list[dict], model: Path) -> dict:
    """The window sweep of each recorded `flash` run, by its cap ("700 MiB")."""
    out = {}
    for r in rows:
        if r["name"] == "flash" and r.get("ids_file") and Path(r["ids_file"]).exists():
            capacity = int(r["memory_plan"]["capacity"])
            key = f"{r['cap_bytes'] / MIB:.0f} MiB"
            out[key] = {str(w): b for w, b in window_sweep(Path(r["ids_file"]), model,
                                                            capacity).items()}
    return out


def disk_report(model: Path, manifest: Manifest, args: argparse.Namespace) -> dict:
    """The disk table: this device's stored cost model (`mlx-flash calibrate-disk`), else
    measured now on the model's bundle files and stored for next time."""
    stored = None if args.measure_disk else disk.cost_model_for(model)
    if stored is None:
        print("[bench] measuring the disk (stored for later runs) ...", file=sys.stderr)
        stored = calibrate(model, [model / e.file for e in manifest.layers], args.disk_seconds)
        disk.save(stored, disk.model_path(model))
    return disk.as_report(stored)


def run(args: argparse.Namespace) -> int:
    """The benchmark from parsed arguments: every contender at every cap, then the report."""
    if args.regime == "users":
        return run_users(args)
    args.tokens = args.tokens or PAPER_TOKENS
    args.caps = args.caps or ",".join(DEFAULT_CAPS)
    args.contenders = args.contenders or ",".join(ALL_CONTENDERS)
    model = source = Path(args.model)
    gguf = Path(args.gguf) if args.gguf else default_gguf(model)
    if args.copy_to:
        model, gguf = private_copy(model, gguf, Path(args.copy_to))
        args.model = str(model)
    manifest = read_manifest(model)
    size = model_bytes(model)
    caps = parse_caps(args.caps, size)
    setup = make_setup(args, size)
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    contenders = build_contenders(names, (model / "predictors.safetensors").exists(),
                                  args.keep, gguf, llama_cpp_available(),
                                  Path(args.placed.split(",")[0]) if args.placed else None,
                                  args.pin_hot)
    if any(c.name == "flash-no-bundling" and not c.skip for c in contenders):
        print("[bench] writing the unbundled copy for flash-no-bundling ...", file=sys.stderr)
        setup.unbundled_dir = write_unbundled(model, Path(args.out) / "unbundled")
    disk_table = None if args.skip_disk else disk_report(model, manifest, args)
    stamp = source_stamp()
    ablation_caps = None if args.ablation_caps == "all" else parse_caps(args.ablation_caps, size)
    rows = run_all(setup, contenders, caps, ablation_caps)
    if source_stamp()["sources_sha256"] != stamp["sources_sha256"]:
        stamp["warning"] = ("mlx_flash sources changed during the run: rows mix code versions "
                            "(run from a copy of the tree)")
        print(f"WARNING: {stamp['warning']}", file=sys.stderr)
    seq = disk_table["sequential_best"] if disk_table else None
    rows = [derive(r, seq) for r in rows]
    agreement(rows)
    report = {"command": command_line(),
              "machine": machine_description(model), "model": str(model),
              "copied_from": str(source) if source != model else None, "model_bytes": size,
              "gguf": str(gguf) if gguf else None, "code": stamp,
              "caps": caps, "caps_note": ", ".join(cap_label(c, size) for c in caps) +
              (" (NOT enforced: no cgroup)" if setup.cgroup_parent is None else
               " (cgroup v1 memory.limit_in_bytes on the whole process, page cache included)"),
              "tokens": args.tokens, "prompt": args.prompt, "prompt_ids": setup.prompt_ids,
              "dtype": args.dtype, "disk": disk_table, "runs": rows, "speedups": speedups(rows),
              "window_sweep": sweeps(rows, model)}
    write_report(report, Path(args.out))
    return 0


# ---------------------------------------------------------------- flags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's flags."""
    _run_flags(parser)
    _isolation_flags(parser)
    _replay_flags(parser)
    _disk_flags(parser)


def _run_flags(parser: argparse.ArgumentParser) -> None:
    """What runs: the model, caps, contenders, prompt, tokens, dtype."""
    parser.add_argument("--regime", default="paper", choices=["paper", "users"],
                        help="paper: a flash dir under caps that are fractions of its own size, "
                             "with every ablation (issue 5); users: a 4-bit model under caps "
                             "that are fractions of its GGUF's size against llama.cpp, with "
                             "perplexity (issue 20)")
    parser.add_argument("--model", required=True,
                        help="flash model dir; with --regime users also a known model name "
                             "(pulled and converted to 4 bits on first use)")
    parser.add_argument("--models-dir", default=None,
                        help="where known models live (default $MLX_FLASH_HOME/models or "
                             "~/.cache/mlx_flash/models)")
    parser.add_argument("--caps", default=None,
                        help="comma-separated DRAM caps: fractions of the model size (0.5), "
                             "multiples (1.5x) or sizes (700MiB); --regime users: fractions of "
                             "the GGUF's size or none (default "
                             f"{','.join(DEFAULT_CAPS)}; users: 0.5,0.7,1.0,1.3,none)")
    parser.add_argument("--contenders", default=None,
                        help=f"comma-separated subset of: {', '.join(ALL_CONTENDERS)} (default "
                             f"all; users: {','.join(USERS_CONTENDERS)})")
    parser.add_argument("--cell-seconds", type=float, default=CELL_SECONDS,
                        help="--regime users: a cell stops decoding this many seconds after "
                             "its first token (at least 3 tokens; 0: never), its rate measured "
                             "over the tokens it made")
    parser.add_argument("--compute-threads", type=int, default=None,
                        help="--regime users: compute threads of every contender (llama.cpp's "
                             "n_threads, OMP_NUM_THREADS of mlx-flash's kernels; default 2 for "
                             "llama.cpp and all cores for mlx-flash): 1 compares both on one "
                             "core when the other is busy")
    parser.add_argument("--ppl-tokens", type=int, default=PPL_TOKENS,
                        help="--regime users: tokens of the fixed text each contender's "
                             "perplexity is measured on (0: none)")
    parser.add_argument("--ablation-caps", default="0.5",
                        help="caps the ablations (flash-window1 ... flash-placed-pinned) run at, "
                             "or 'all' for every --caps value (the default keeps the whole run "
                             "under 30 minutes on the default model)")
    parser.add_argument("--tokens", "--max-tokens", dest="tokens", type=int, default=None,
                        help=f"tokens generated per run (default {PAPER_TOKENS}; users: "
                             f"{USERS_TOKENS})")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT,
                        help="user message, through the chat template when there is one")
    parser.add_argument("--prompt-ids", default=None,
                        help="comma-separated token ids instead of --prompt")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="compute dtype of every MLX contender; default: the fast CPU path "
                             "(16-bit weights, f32 compute) where MLX runs on the CPU, else "
                             "load()'s choice. Giving one selects MLX's own kernels")
    parser.add_argument("--keep", type=float, default=0.3,
                        help="fraction of neurons the oracle keeps without predictors")
    parser.add_argument("--gguf", default=None, help="GGUF for llama.cpp (default: the source "
                                                     "in the manifest)")
    parser.add_argument("--flash-dirs", default=None,
                        help="--regime users: more mlx-flash contenders, NAME=DIR,... (other "
                             "conversions of the same GGUF, e.g. flash-q8=DIR), run with the "
                             "flash defaults")


def _isolation_flags(parser: argparse.ArgumentParser) -> None:
    """Where results go and how each run is isolated: timeout, cgroups, O_DIRECT, a copy."""
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "bench"),
                        help="where results, logs and plots go")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    parser.add_argument("--direct", action="store_true",
                        help="flash contenders read with O_DIRECT even under a cgroup")
    parser.add_argument("--no-cgroup", action="store_true",
                        help="do not use cgroups (caps not enforced, O_DIRECT for flash)")
    parser.add_argument("--cgroup-parent", default=None,
                        help="memory cgroup to create the run groups in (default: this "
                             "process's own)")
    parser.add_argument("--copy-to", default=None,
                        help="first copy the model dir and GGUF here and benchmark the copies "
                             "(on a shared machine: pages others cache are not charged to the "
                             "cap)")


def _replay_flags(parser: argparse.ArgumentParser) -> None:
    """The I/O replay mode and the placed-copy contenders (issue 9)."""
    parser.add_argument("--io-replay", default=None, metavar="CALIB",
                        help="instead of the contenders: replay held-out tokens of this "
                             "calibration recording through real O_DIRECT reads of --model (and "
                             "--placed dirs) with each read planner (issue 9)")
    parser.add_argument("--placed", default=None, help="comma-separated placed copies of --model")
    parser.add_argument("--replay-tokens", type=int, default=32)
    parser.add_argument("--study-layers", default=None,
                        help="with --io-replay: also a cost-model study of placement layouts "
                             "on these layers (e.g. 3,12,20)")
    parser.add_argument("--pin-hot", type=float, default=0.25,
                        help="fraction of the neuron cache pinned in flash-placed-pinned")
    parser.add_argument("--window", type=int, default=1, help="window of the I/O replay")
    parser.add_argument("--capacity", type=int, default=1616,
                        help="neurons cached per layer in the I/O replay (1616: the 4-bit "
                             "default model under a 0.5x cap)")
    parser.add_argument("--pin", type=int, default=0,
                        help="hot neurons pinned per layer (placed dirs) in the I/O replay")


def _disk_flags(parser: argparse.ArgumentParser) -> None:
    """The disk table of the report."""
    parser.add_argument("--skip-disk", action="store_true", help="no disk table in the report")
    parser.add_argument("--measure-disk", action="store_true",
                        help="measure the disk again even if its cost model is stored")
    parser.add_argument("--disk-seconds", type=float, default=0.5,
                        help="seconds per random-read point")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`python -m mlx_flash.bench` and `mlx-flash bench`: parse the flags, run, 2 on a bad
    argument or a missing file."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return io_replay(args) if args.io_replay else run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"benchmark: error: {e}", file=sys.stderr)
        return 2
