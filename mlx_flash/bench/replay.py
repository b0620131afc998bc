"""Replays of active neuron sets: recorded ones through the window cache (bytes per window
size), and held-out calibration tokens through real O_DIRECT reads (`--io-replay`, issue 9)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..format.manifest import Manifest, read_manifest
from ..offline import placement
from ..offline.calibrate_disk import drop_page_cache
from ..runtime import disk
from ..runtime.cache import NeuronCache
from ..runtime.store import IOStats, NeuronStore
from .caps import MIB
from .report import command_line, machine_description
from .worker import load_calls

REPLAY_PLANNERS = ("neuron", "runs", "cost")


# ---------------------------------------------------------------- window sweep


def window_sweep(ids_file: Path, model: Path, capacity: int, windows=range(1, 9)) -> dict:
    """Bytes read per decoded token for each window size, replaying recorded active sets.

    The recorded run's selections (prompt seeding, then one call per token and layer) go through
    a fresh NeuronCache of the same capacity per window; new neurons x stride = bytes read (as
    with buffered reads; O_DIRECT alignment not included). Returns {window: bytes/token}.
    """
    manifest = read_manifest(model)
    calls = load_calls(ids_file)
    return {w: _replay(calls, manifest, capacity, w) for w in windows}


def _replay(calls: list, manifest: Manifest, capacity: int, window: int) -> float:
    """Bytes/token of one window size; like flash_result, the first decode call is skipped."""
    caches: dict[int, NeuronCache] = {}
    decoded: dict[int, int] = {}
    new = 0
    for layer, per_token in calls:
        entry = manifest.layers[layer]
        if layer not in caches:  # (1, capacity, 1) buffer: only the index math is used
            caches[layer] = NeuronCache(entry.n_neurons, min(capacity, entry.n_neurons), 1, 1,
                                        mx.float32, window)
        if len(per_token) > 1:  # the prompt's seeding of the window, oldest first
            for ids in per_token[-window:]:
                caches[layer].advance(ids)
            continue
        plan = caches[layer].advance(per_token[0])  # a decoded token
        decoded[layer] = decoded.get(layer, 0) + 1
        if decoded[layer] > 1:
            new += int(plan.new_ids.size) * entry.stride
    return new / max(1, max(decoded.values(), default=1) - 1)


# ---------------------------------------------------------------- I/O replay (issue 9)


def replay_sets(calibration: Path, manifest: Manifest, keep: float, tokens: int,
                holdout: float = 0.2) -> list[list]:
    """Per layer, per held-out calibration token: its top-`keep` ids, largest |h| first."""
    info = json.loads((calibration / "calibration.json").read_text())
    out = []
    for layer in range(manifest.n_layers):
        mag = placement.calibration_mags(calibration, manifest, layer)
        start = placement.split_holdout(len(mag), holdout, int(info.get("seq_len", 1)))
        block = np.asarray(mag[start:start + tokens], dtype=np.float32)
        k = max(1, int(np.ceil(keep * block.shape[1])))
        out.append([np.argsort(-row, kind="stable")[:k] for row in block])
    return out


def replay_io(model: Path, sets: list[list], planner: str, window: int, capacity: int,
              pin: int = 0) -> dict:
    """Real O_DIRECT reads of what a window cache of `capacity` neurons/layer misses, token by
    token over `sets` (page cache dropped first); per-token reads, bytes, amplification, ms."""
    manifest = read_manifest(model)
    cost = disk.cost_model_for(model) or disk.FALLBACK
    caches = [NeuronCache(e.n_neurons, capacity, 1, 1, mx.float32, window)
              for e in manifest.layers]
    if pin:
        for cache, entry in zip(caches, manifest.layers, strict=True):
            cache.pin(np.asarray(entry.hot[:pin]))
    total, tokens = IOStats(), len(sets[0])
    drop_page_cache()
    with NeuronStore(model, manifest, direct=True, threads=8, planner=planner,
                     cost=cost) as store:
        for t in range(tokens):
            for layer, cache in enumerate(caches):
                _, stats = store.read(layer, cache.advance(sets[layer][t]).new_ids)
                if t:  # the first token fills the cache: not a steady-state token
                    total.add(stats)
    n = max(1, tokens - 1)
    return {"reads": total.reads / n, "bytes": total.bytes / n, "needed": total.needed / n,
            "amplification": total.amplification, "io_ms": 1e3 * total.seconds / n}


def replay_rows(args, dirs: list[Path], sets: list[list]) -> list[dict]:
    """replay_io of every (dir, planner, pin) combination: each planner on the original dir,
    the cost planner (with and without --pin) on the placed ones."""
    rows = []
    for d in dirs:
        placed = read_manifest(d).placement
        label = placed["method"] if placed else "original"
        runs = [(p, 0) for p in REPLAY_PLANNERS] if not placed else [("cost", 0)]
        if placed and args.pin:
            runs.append(("cost", args.pin))
        for planner, pin in runs:
            print(f"[replay] {label} {planner} pin={pin} ...", file=sys.stderr, flush=True)
            rows.append({"dir": str(d), "placement": label, "planner": planner, "pin": pin,
                         **replay_io(d, sets, planner, args.window, args.capacity, pin)})
    base = next(r["io_ms"] for r in rows if r["planner"] == "neuron")
    for r in rows:
        r["io_speedup_vs_neuron"] = base / r["io_ms"] if r["io_ms"] else None
    return rows


def io_replay(args) -> int:
    """The --io-replay mode: every (dir, planner, pin) combination, one table."""
    dirs = [Path(args.model)] + [Path(d) for d in filter(None, (args.placed or "").split(","))]
    manifest = read_manifest(dirs[0])
    sets = replay_sets(Path(args.io_replay), manifest, args.keep, args.replay_tokens + 1)
    rows = replay_rows(args, dirs, sets)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"command": command_line(), "keep": args.keep,
              "window": args.window, "capacity": args.capacity,
              "tokens": args.replay_tokens, "machine": machine_description(dirs[0]),
              "rows": rows}
    if args.study_layers:
        print("[replay] cost-model study of placement ...", file=sys.stderr, flush=True)
        report["study"] = placement_study(Path(args.io_replay), dirs[0], args.keep, args.window,
                                          args.replay_tokens,
                                          [int(x) for x in args.study_layers.split(",")])
    (out / "io_replay.json").write_text(json.dumps(report, indent=1))
    print(replay_table(report))
    return 0


def placement_study(calibration: Path, model: Path, keep: float, window: int, tokens: int,
                    layers: list[int]) -> list[dict]:
    """Cost-model replay (no I/O) of sample layers: one read per neuron, the cost planner on
    the id order, on hot-first and on co-activation orders; per token and layer."""
    manifest = read_manifest(model)
    cost = disk.cost_model_for(model) or disk.FALLBACK
    info = json.loads((calibration / "calibration.json").read_text())
    names = ("one read per neuron", "cost planner, id order", "cost planner, hot-first",
             "cost planner, co-activation order")
    totals = {name: placement.ReadTotals() for name in names}
    for layer in layers:
        mag = placement.calibration_mags(calibration, manifest, layer)
        train = placement.split_holdout(len(mag), 0.2, int(info.get("seq_len", 1)))
        fit = placement.active_sets(mag[:train], keep)
        new = placement.new_sets(placement.active_sets(mag[train:train + tokens], keep), window)
        stride, ident = manifest.layers[layer].stride, np.arange(mag.shape[1])
        placement.evaluate(ident, new, stride, cost, "neuron", totals=totals[names[0]])
        orders = (ident, placement.hot_order(fit), placement.coact_order(fit))
        for name, order in zip(names[1:4], orders, strict=True):
            placement.evaluate(order, new, stride, cost, "cost", totals=totals[name])
    return [{"layout": name, **t.per_token()} for name, t in totals.items()]


def replay_table(report: dict) -> str:
    """The I/O replay's markdown: one line per (dir, planner, pin), then the study."""
    lines = [f"keep {report['keep']}, window {report['window']}, capacity "
             f"{report['capacity']} neurons/layer, {report['tokens']} held-out tokens",
             "", "| placement | planner | pinned/layer | reads/tok | MiB read/tok | "
             "MiB needed/tok | amplification | I/O ms/tok | vs one read per neuron |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['placement']} | {r['planner']} | {r['pin']} | {r['reads']:.0f} | "
                     f"{r['bytes'] / MIB:.1f} | {r['needed'] / MIB:.1f} | "
                     f"{r['amplification']:.2f} | {r['io_ms']:.0f} | "
                     f"{r['io_speedup_vs_neuron']:.2f}x |")
    if report.get("study"):
        lines += ["", "Cost model only (no I/O), per token and layer, sample layers:", "",
                  "| layout | reads | KiB read | amplification | modelled ms |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['layout']} | {r['reads']:.0f} | {r['bytes'] / 1024:.0f} | "
                  f"{r['amplification']:.2f} | {r['ms']:.2f} |" for r in report["study"]]
    return "\n".join(lines)
