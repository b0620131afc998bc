"""What block checksums cost on a flash dir (issue 23): the first full pass and steady decode.

1. First pass: every bundle byte read once through a fresh NeuronStore (whole layers in
   file order, as prefill streams them), with verification (each 1 MiB block read and crc32'd
   once, then the rows read) and without (the manifest's blocks dropped). The page cache is
   dropped before each pass when run as root (else the passes are warm: say so in a report).
   The resident file's whole check at load (check_resident) is timed beside a plain read of it.
2. Steady decode: `mlx_flash.load` with and without verification, a warm-up generation (it
   verifies what prefill touches), then decode tok/s of a second generation.

  python scripts/checksum_cost.py DIR [--budget 0.5] [--tokens 64] [--prompt TEXT | --prompt-ids 5,9] [--direct]
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from mlx_lm import stream_generate

import mlx_flash.runtime.loader as loader
from mlx_flash import load
from mlx_flash.format.manifest import check_resident, read_manifest
from mlx_flash.offline.calibrate_disk import drop_page_cache
from mlx_flash.runtime.store import NeuronStore

PROMPT = "def quicksort(items):\n    "


def unchecked(manifest):
    """The manifest without block checksums: readers then skip verification."""
    for entry in manifest.layers:
        entry.blocks = None
    manifest.resident.pop("blocks", None)
    return manifest


@contextmanager
def verification(enabled: bool):
    """load() reads manifests with (enabled) or without block checksums."""
    real = loader.read_manifest
    if not enabled:
        loader.read_manifest = lambda root: unchecked(real(root))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the "no block checksums" warning of the baseline
            yield
    finally:
        loader.read_manifest = real


def full_pass(root: Path, verify: bool, direct: bool, chunk: int = 1024) -> dict:
    """Read every bundle byte once; seconds, GB/s and blocks hashed."""
    manifest = read_manifest(root)
    if not verify:
        unchecked(manifest)
    cold = drop_page_cache()
    t0 = time.perf_counter()
    with NeuronStore(root, manifest, direct=direct) as store:
        for layer in range(manifest.n_layers):
            for _ in store.iter_layer(layer, chunk):
                pass
        hashed = store.blocks_checked
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "GB/s": manifest.ffn_bytes / seconds / 1e9,
            "blocks_hashed": hashed, "cold": cold}


def resident_check(root: Path) -> dict:
    """check_resident (read + crc32 of every block) vs a plain read of the resident file."""
    manifest = read_manifest(root)
    path = root / manifest.resident["file"]
    drop_page_cache()
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass
    plain = time.perf_counter() - t0
    drop_page_cache()
    t0 = time.perf_counter()
    checked = check_resident(root, manifest)
    return {"plain_read_s": plain, "checked_s": time.perf_counter() - t0, "checked": checked}


def last_response(model, tokenizer, prompt: str | list[int], tokens: int):
    """The final GenerationResponse of one greedy generation of the prompt."""
    *_, last = stream_generate(model, tokenizer, prompt, max_tokens=tokens)
    return last


def decode_tps(root: Path, verify: bool, budget: float | str | None, prompt: str | list[int],
               tokens: int) -> dict:
    """Decode tok/s of the second generation after a load (the first one warms up)."""
    with verification(verify):
        drop_page_cache()
        model, tokenizer = load(root, budget)
        try:
            warm, steady = (last_response(model, tokenizer, prompt, tokens).generation_tps
                            for _ in range(2))
            return {"warmup_tok/s": warm, "decode_tok/s": steady,
                    "blocks_hashed": model.flash.store.blocks_checked}
        finally:
            model.flash.close()


def budget_arg(text: str) -> float | str | None:
    """--budget: a fraction (0: None, no limit) or a size string for load."""
    try:
        return float(text) or None
    except ValueError:
        return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--budget", type=budget_arg, default=0.5,
                    help="dram_budget for load: a fraction of the model or a size (2GB); 0: no "
                         "limit, every neuron cached, so decode reads nothing")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--prompt-ids", help="token ids instead of --prompt, e.g. 5,9,17")
    ap.add_argument("--direct", action="store_true", help="the first pass with O_DIRECT")
    ap.add_argument("--skip-decode", action="store_true")
    args = ap.parse_args()
    prompt = ([int(t) for t in args.prompt_ids.split(",")] if args.prompt_ids
              else args.prompt)
    out = {"dir": str(args.dir), "root": os.geteuid() == 0}
    out["first_pass"] = {name: full_pass(args.dir, verify, args.direct)
                         for name, verify in (("unchecked", False), ("checked", True))}
    first = out["first_pass"]
    first["overhead"] = first["checked"]["seconds"] / first["unchecked"]["seconds"] - 1
    out["resident"] = resident_check(args.dir)
    if not args.skip_decode:
        out["decode"] = {name: decode_tps(args.dir, verify, args.budget, prompt,
                                                args.tokens)
                         for name, verify in (("unchecked", False), ("checked", True))}
        dec = out["decode"]
        dec["slowdown"] = 1 - dec["checked"]["decode_tok/s"] / dec["unchecked"]["decode_tok/s"]
    print(json.dumps(out, indent=1, default=lambda v: float(v) if np.isscalar(v) else str(v)))


if __name__ == "__main__":
    main()
