"""The users' regime (issue 20): a 4-bit model under caps that are fractions of its GGUF's size,
against llama.cpp on the same GGUF, with perplexity beside speed.

    mlx-flash bench --regime users --model qwen2.5-coder-1.5b-instruct

`--model` is a registry name (its GGUF pulled and converted with `--bits 4` into
`<models dir>/<name>/flash-q4` on first use) or a flash dir. Each cell is a fresh process in a
cgroup v1 memory group capped at the cap (page cache dropped before it; the harness of
`mlx-flash bench`), the same chat-templated prompt, 64 greedy tokens. Contenders: llama.cpp
(llama-cpp-python, use_mmap, 2 threads), mlx-flash 4-bit defaults (with the dir's drafter when
it has one), naive 4-bit streaming and dense mlx_lm where it fits (caps at or above its peak
RSS without a cap). Once per contender, uncapped: perplexity of `perplexity.PPL_TEXT`.
A cell that thrashes stops decoding after --cell-seconds (default 180 s; its rate is then
measured over the tokens it made, shown in the table), so the grid ends in a known time.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..format.home import default_models_dir
from ..format.manifest import describe_parts, read_manifest
from ..offline.convert import convert
from ..offline.evaluate import parse_selectors
from ..offline.pull import ALIASES, REGISTRY, pull
from ..runtime.loader import load_tokenizer
from ..spec.drafter import DRAFTER
from .caps import MIB, USERS_CAPS, cap_label, fraction_caps
from .contenders import Contender, build_contenders, llama_cpp_available
from .harness import Setup, make_setup, private_copy, run_one
from .perplexity import PPL_TEXT, text_ids
from .report import command_line, machine_description, source_stamp
from .users_report import write_users_report

Q4_DIR = "flash-q4"  # <models dir>/<name>/flash-q4: the 4-bit flash dir of a registry model
USERS_CONTENDERS = ("llama.cpp", "flash", "naive", "dense")
USERS_TOKENS = 64
CELL_SECONDS = 180.0
LLAMA_THREADS = 2


def resolve_model(spec: str, models_dir: str | Path | None = None,
                  gguf: str | Path | None = None) -> tuple[Path, Path | None]:
    """--model (a registry name or a flash dir) -> (4-bit flash dir, its GGUF or None).

    A registry name is pulled and converted (`--bits 4`) into <models dir>/<name>/flash-q4 the
    first time; a dir is used as it is, its GGUF the one its manifest names (or `gguf`).
    """
    name = ALIASES.get(spec, spec)
    if name in REGISTRY and not Path(spec).exists():
        root = Path(models_dir).expanduser() if models_dir else default_models_dir()
        flash = root / name / Q4_DIR
        source = pull(name, models_dir=root, progress=True)
        if not (flash / "manifest.json").exists():
            print(f"[bench] converting {source} to {flash} (4-bit, once) ...", file=sys.stderr)
            convert(source, flash, bits=4)
        return flash, Path(gguf) if gguf else source
    flash = Path(spec).expanduser()
    if not (flash / "manifest.json").exists():
        raise FileNotFoundError(f"--model {spec}: neither a known model ({', '.join(REGISTRY)}) "
                                "nor a flash dir (no manifest.json): pass one of those")
    return flash, Path(gguf) if gguf else manifest_gguf(flash)


def manifest_gguf(flash: Path) -> Path | None:
    """The GGUF the flash dir was converted from, if its manifest names one that exists."""
    source = read_manifest(flash).source
    path = Path(source["path"]) if source.get("kind") == "gguf" and source.get("path") else None
    return path if path is not None and path.exists() else None


def users_contenders(names: list[str], flash: Path, gguf: Path | None,
                     llama_ok: str | None, llama_threads: int = 2) -> list[Contender]:
    """The users' regime contenders: the bench's own, llama.cpp on `llama_threads`, the flash
    defaults with the dir's drafter when there is one, dense capped (run where it fits)."""
    contenders = build_contenders(names, (flash / "predictors.safetensors").exists(), 0.3,
                                  gguf, llama_ok)
    for c in contenders:
        if c.kind == "llama_cpp":
            c.options["n_threads"] = llama_threads
            c.label = f"llama.cpp (llama-cpp-python), same GGUF, mmap, {llama_threads} threads"
        elif c.name == "flash" and (flash / DRAFTER).exists():
            c.options["drafter"] = True
            c.label += " + the dir's drafter (speculative, 1x3)"
        elif c.kind == "dense":
            c.capped = True
            c.label = "dense mlx_lm, whole model in DRAM (run at the caps it fits)"
    return contenders


def extra_flash_contenders(spec: str | None, contenders: list[Contender]) -> list[Contender]:
    """--flash-dirs NAME=DIR[@SELECTOR[:KEEP]],...: the flash contender's options on other dirs
    (conversions of the same GGUF at other bits), labelled with what each dir stores, with
    another selector where one is named (e.g. a gate-resident dir's gate:0.5)."""
    if not spec:
        return []
    base = next((c for c in contenders if c.name == "flash"), None)
    if base is None:
        raise ValueError("--flash-dirs needs the flash contender (add it to --contenders)")
    out = []
    for item in (part.strip() for part in spec.split(",") if part.strip()):
        name, sep, rest = item.partition("=")
        path, _, selector = rest.partition("@")
        if not sep or not name or not (Path(path) / "manifest.json").exists():
            raise ValueError(f"--flash-dirs {item!r}: expected NAME=DIR[@SELECTOR[:KEEP]] with "
                             "a flash dir (manifest.json) at DIR")
        options = {k: v for k, v in base.options.items() if k != "drafter"}
        what = "mlx-flash defaults"
        if selector:
            chosen, keep = parse_selectors(selector)[0]
            options = {k: v for k, v in options.items() if k not in ("oracle_rule", "keep")}
            options.update(selector=chosen, **({} if keep is None else {"keep": keep}))
            what = f"mlx-flash, selector {selector},"
        out.append(Contender(name, "flash", f"{what} on {path} ({dir_precision(Path(path))})",
                             dict(options, model_dir=path)))
    return out


def dir_precision(flash: Path) -> str:
    """'FFN 4-bit g32, resident 8/4-bit' style summary of what a flash dir stores."""
    manifest = read_manifest(flash)
    ffn = manifest.ffn
    ffn_text = (f"FFN {describe_parts(manifest)}" if ffn.per_part else
                f"FFN {ffn.bits}-bit g{ffn.group_size}" if ffn.quantized else f"FFN {ffn.dtype}")
    gate = ffn.gate_resident
    if gate is not None:
        ffn_text += f" (up/down; gate resident {gate.bits}-bit)"
    quant = manifest.resident.get("quantization")
    if not quant:
        return f"{ffn_text}, resident 16-bit"
    bits = sorted({m["bits"] for m in quant["modules"].values()}, reverse=True)
    return f"{ffn_text}, resident {'/'.join(map(str, bits))}-bit"


def dense_misfit(cap: int | None, uncapped: dict | None) -> str | None:
    """Why dense does not run at `cap`: its peak RSS without a cap is above it (None: run)."""
    if cap is None or uncapped is None or uncapped.get("status") != "ok":
        return None
    need = uncapped.get("peak_rss_bytes") or 0
    if need > cap:
        return f"does not fit: its peak RSS without a cap was {need / MIB:.0f} MiB"
    return None


def cell_order(caps: list[int | None]) -> list[int | None]:
    """No cap first (dense's footprint is known before the capped cells), then largest first."""
    return ([None] if None in caps else []) + sorted((c for c in caps if c is not None),
                                                     reverse=True)


def run_grid(setup: Setup, contenders: list[Contender], caps: list[int | None]) -> list[dict]:
    """Every contender at every cap (dense only where it fits); progress on stderr."""
    rows = []
    for c in contenders:
        uncapped = None
        for cap in cell_order(caps):
            misfit = dense_misfit(cap, uncapped) if c.kind == "dense" else None
            if misfit:
                rows.append(skipped_row(c, cap, setup.size, misfit))
                continue
            rows.append(run_logged(setup, c, cap, "generate"))
            if cap is None:
                uncapped = rows[-1]
    return rows


def skipped_row(c: Contender, cap: int | None, size: int, why: str) -> dict:
    """A row for a cell that was not run."""
    return {"name": c.name, "label": c.label, "kind": c.kind, "cap_bytes": cap,
            "cap_fraction": None if cap is None else cap / size, "io_mode": "-",
            "task": "generate", "status": "skipped", "error": why}


def run_logged(setup: Setup, c: Contender, cap: int | None, task: str) -> dict:
    """run_one with a progress line on stderr."""
    print(f"[bench] {c.name} {task} @ {cap_label(cap, setup.size)} ...", file=sys.stderr,
          end="", flush=True)
    row = run_one(setup, c, cap, task)
    value = f"ppl {row['ppl']:.3f}" if row.get("ppl") else f"{row.get('decode_tps') or 0:.2f} tok/s"
    print(f" {row['status']} {value} ({row.get('wall_s', 0):.0f} s)", file=sys.stderr)
    return row


def run_users(args: argparse.Namespace) -> int:
    """The users' regime from parsed `mlx-flash bench` flags; writes the report under --out."""
    flash, gguf = resolve_model(args.model, args.models_dir, args.gguf)
    if args.copy_to:
        flash, gguf = private_copy(flash, gguf, Path(args.copy_to))
    if gguf is None:
        raise FileNotFoundError(f"{flash}: its manifest names no GGUF that exists; the users' "
                                "regime sizes its caps by the GGUF: pass --gguf")
    size = gguf.stat().st_size
    caps = fraction_caps(args.caps or ",".join(USERS_CAPS), size)
    args.model, args.tokens = str(flash), args.tokens or USERS_TOKENS
    setup = make_setup(args, size)
    setup.record_ids, setup.max_decode_s = False, args.cell_seconds or None
    if args.ppl_tokens:
        setup.ppl_ids = text_ids(load_tokenizer(flash, read_manifest(flash)), PPL_TEXT,
                                 args.ppl_tokens)
    names = [n.strip() for n in (args.contenders or ",".join(USERS_CONTENDERS)).split(",")
             if n.strip()]
    threads = getattr(args, "compute_threads", None)
    if threads:  # the workers inherit it: the C kernels' OpenMP team size
        os.environ["OMP_NUM_THREADS"] = str(threads)
    contenders = users_contenders(names, flash, gguf, llama_cpp_available(),
                                  threads or LLAMA_THREADS)
    contenders += extra_flash_contenders(args.flash_dirs, contenders)
    for c in contenders:  # as `mlx-flash generate` plans: KV for the prompt and the tokens
        if c.kind == "flash":
            c.options.setdefault("max_kv_tokens", len(setup.prompt_ids) + setup.tokens + 1)
    stamp = source_stamp()
    rows = run_grid(setup, contenders, caps)
    ppl = [run_logged(setup, c, None, "ppl") for c in contenders] if args.ppl_tokens else []
    report = {"regime": "users", "command": command_line(), "machine": machine_description(flash),
              "model": str(flash), "model_name": flash.parent.name if flash.name == Q4_DIR
              else flash.name, "gguf": str(gguf), "gguf_bytes": size, "code": stamp,
              "caps": caps, "cgroup": setup.cgroup_parent is not None,
              "compute_threads": threads,
              "tokens": args.tokens, "cell_seconds": setup.max_decode_s, "prompt": args.prompt,
              "prompt_ids": setup.prompt_ids, "ppl_text_tokens": len(setup.ppl_ids or []), "runs": rows, "perplexity": ppl}
    write_users_report(report, Path(args.out))
    return 0

