"""The `mlx-flash` command: pull, convert, info, generate (flags as in mlx_lm.generate)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_PROMPT = "Write a Python function that checks whether a number is prime."


def _progress_bar(desc: str, total: int | None):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, disable=None)


# ---------------------------------------------------------------- default model


def default_model_dir(models_dir: str | None = None, name: str | None = None) -> Path:
    """The flash dir of a known model, pulled and converted on first use (with progress)."""
    from .pull import ALIASES, DEFAULT_MODEL, default_models_dir, pull

    name = ALIASES.get(name, name) if name else DEFAULT_MODEL
    home = Path(models_dir).expanduser() if models_dir else default_models_dir()
    flash_dir = home / name / "flash"
    if (flash_dir / "manifest.json").exists():
        return flash_dir
    print(f"First use of {name}: fetching it into {home / name} and converting it to a flash "
          "model dir (once).", file=sys.stderr)
    source = pull(name, models_dir=home, progress=True)
    _convert(source, flash_dir, dtype=None, align=64, force=False)
    return flash_dir


def _convert(src, out, dtype, align, force, bits=16, group_size=64) -> None:
    from .checkpoint import open_checkpoint
    from .convert import convert

    ckpt = open_checkpoint(src)
    total = sum(info_bytes(ckpt).values())
    with _progress_bar(f"convert {Path(src).name}", total) as bar:
        stats = convert(ckpt, out, dtype=dtype, bits=bits, group_size=group_size, align=align,
                        force=force,
                        progress=lambda stage, n: (bar.set_postfix_str(stage), bar.update(n)))
    print(f"wrote {out}: resident {stats.resident_bytes / 2**20:.1f} MiB, FFN "
          f"{stats.ffn_bytes / 2**20:.1f} MiB in {stats.n_layers} layers x {stats.n_neurons} "
          f"neurons, bundle {stats.bundle_bytes} B (stride {stats.stride} B)", file=sys.stderr)


def info_bytes(ckpt) -> dict[str, int]:
    """Approximate bytes each convert stage writes (for the progress bar's total)."""
    import numpy as np

    ffn = sum(int(np.prod(i.shape)) * 2 for n, i in ckpt.tensors().items() if ckpt.is_ffn_tensor(n))
    res = sum(int(np.prod(i.shape)) * 2 for n, i in ckpt.tensors().items()
              if not ckpt.is_ffn_tensor(n))
    return {"ffn": ffn, "resident": res}


# ---------------------------------------------------------------- commands


def cmd_pull(args) -> int:
    from .pull import pull

    path = pull(args.name, models_dir=args.models_dir, progress=True, force=args.force)
    print(path)
    if args.convert:
        out = default_model_dir(args.models_dir, args.name) if not args.force else None
        if out is None:
            out = path.parent / "flash"
            _convert(path, out, dtype=None, align=64, force=True)
        print(out)
    return 0


def cmd_convert(args) -> int:
    from .pull import resolve_source

    src = resolve_source(args.src, models_dir=args.models_dir)
    _convert(src, args.out, args.dtype, args.align, args.force, args.bits, args.group_size)
    return 0


def cmd_info(args) -> int:
    from .format import read_manifest, verify_checksums

    manifest = read_manifest(args.dir)
    if args.verify:
        verify_checksums(args.dir, manifest)
    cfg, ffn = manifest.config, manifest.ffn
    pred = manifest.predictors["size"] if manifest.predictors else 0
    rows = [
        ("format version", manifest.format_version),
        ("architecture", f"{cfg.get('model_type')}: {cfg.get('num_hidden_layers')} layers, "
                         f"d_model {cfg.get('hidden_size')}, {manifest.layers[0].n_neurons} FFN "
                         f"neurons/layer, vocab {cfg.get('vocab_size')}"),
        ("source", f"{manifest.source.get('kind')} {manifest.source.get('path')}"),
        ("resident", f"{manifest.resident['size'] / 2**20:.1f} MiB"),
        ("ffn (flash)", f"{manifest.ffn_bytes / 2**20:.1f} MiB"),
        ("predictors", f"{pred / 2**20:.1f} MiB" if pred else "none (oracle fallback)"),
        ("bundle", f"{ffn.kind} {ffn.activation}, {ffn.dtype}"
                   + (f", {ffn.bits}-bit groups of {ffn.group_size}, " if ffn.quantized else ", ")
                   + " | ".join(f"{p.name}[{p.count}]" for p in ffn.parts)
                   + f" = {ffn.bundle_bytes} B, stride {manifest.layers[0].stride} B"),
        ("placement", _placement_line(manifest)),
        ("checksums", "verified" if args.verify else "not checked (pass --verify)"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _placement_line(manifest) -> str:
    placed = manifest.placement
    if not placed:
        return "neuron id order (not placed; `mlx-flash place` reorders by co-activation)"
    return (f"{placed['method']} order from {placed['calibration']} (top {placed['keep']:.0%}, "
            f"{placed['train_tokens']} tokens); hot-neuron lists for pinning")


def cmd_generate(args) -> int:
    from .generate import LiveStats, format_prompt, generate_text, load_model, load_speculation

    model, tokenizer = load_model(args)
    stats = None if args.dense else model.flash.stats
    spec = load_speculation(args, model)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    ids = format_prompt(tokenizer, prompt, args.system_prompt,
                        use_chat_template=not args.ignore_chat_template)
    live = LiveStats(stats) if args.verbose else None
    result = generate_text(model, tokenizer, ids, args.max_tokens, args.temp, args.top_p,
                           args.seed, on_token=_printer(live), speculative=spec)
    print()
    print("=" * 10, file=sys.stderr)
    print(f"Prompt: {result.prompt_tokens} tokens, {result.prompt_tps:.3f} tokens-per-sec\n"
          f"Generation: {result.generation_tokens} tokens, {result.generation_tps:.3f} "
          f"tokens-per-sec\nPeak RSS: {result.peak_rss_bytes / 2**30:.3f} GB", file=sys.stderr)
    if spec is not None:
        t = spec.stats.totals()
        print(f"Speculative: {t['tokens_per_step']:.2f} tokens per verification step "
              f"({t['verify_steps']} steps, {t['candidates_per_step']:.1f} candidates each), "
              f"acceptance {t['acceptance_rate']:.1%} of {t['draft_length']} drafted, draft "
              f"{t['draft_seconds']:.2f} s, verify {t['verify_seconds']:.2f} s", file=sys.stderr)
        if stats is not None:
            stats.speculative = t
    if stats is not None:
        totals = stats.totals()
        print(f"Flash: {totals['bytes_read_per_token'] / 2**20:.2f} MiB read/token, "
              f"{totals['reads_per_token']:.0f} reads/token, hit rate {totals['hit_rate']:.1%}, "
              f"cache capacity {stats.settings['capacity']} neurons/layer", file=sys.stderr)
        truncated = sum(s.truncated for s in stats.decode_steps())
        if truncated:
            print(f"warning: {truncated / max(1, totals['decode_tokens']):.0f} active neurons per "
                  "token did not fit the neuron caches and were read again for every token "
                  "(exact but slow): raise --dram-budget, lower --keep, or use a smaller "
                  "--window", file=sys.stderr)
        if args.stats_json:
            stats.write_json(args.stats_json)
        model.flash.close()
    return 0


def cmd_calibrate_disk(args) -> int:
    from tqdm import tqdm

    from . import disk
    from .format import MANIFEST, read_manifest

    where = Path(args.dir).expanduser()
    files = None
    if (where / MANIFEST).exists():  # a flash model dir: read its own bundle files
        files = [where / e.file for e in read_manifest(where).layers]
    with tqdm(total=disk.points(), desc="calibrate-disk", unit="point", file=sys.stderr,
              disable=None) as bar:
        model = disk.calibrate(where, files, args.seconds, args.scratch_mib * 2**20,
                               progress=lambda what: (bar.set_postfix_str(what), bar.update()))
    dest = disk.save(model, disk.model_path(where))
    print(f"device {model.device}: {model.latency() * 1e6:.0f} us per 4 KiB read, "
          f"{model.bandwidth() / 1e9:.2f} GB/s for 1 MiB reads (8 threads, O_DIRECT); "
          f"page cache {'dropped' if model.extra['page_cache_dropped'] else 'NOT dropped (not root)'}"
          f"\nwrote {dest}")
    return 0


def run_bench(argv: list[str]) -> int:
    """Run scripts/benchmark.py (it lives in the source checkout, beside the package)."""
    import importlib.util

    script = Path(__file__).resolve().parent.parent / "scripts" / "benchmark.py"
    if not script.exists():
        raise FileNotFoundError(f"{script} not found: `mlx-flash bench` runs the benchmark "
                                "script of a source checkout (pip install -e .)")
    spec = importlib.util.spec_from_file_location("mlx_flash_benchmark", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module.main(argv)


def _printer(live):
    def on_token(response) -> None:
        print(response.text, end="", flush=True)
        if live is not None:
            live(response)

    return on_token


# ---------------------------------------------------------------- argument parsing


def build_parser() -> argparse.ArgumentParser:
    from .generate import add_drafter_arguments, add_model_arguments

    parser = argparse.ArgumentParser(prog="mlx-flash", description=__doc__)
    parser.add_argument("--models-dir", default=None,
                        help="where pulled models live (default $MLX_FLASH_HOME/models or "
                             "~/.cache/mlx_flash/models)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pull", help="fetch a known model (default: the default model)")
    p.add_argument("name", nargs="?", default="default")
    p.add_argument("--force", action="store_true", help="download again even if present")
    p.add_argument("--convert", action="store_true", help="also convert it to a flash dir")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("convert", help="HF/mlx_lm safetensors dir or .gguf -> flash model dir")
    p.add_argument("src", help="HF/mlx_lm safetensors dir, .gguf file, known model name or "
                               "hf:org/name")
    p.add_argument("out")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="storage dtype (default: the source's FFN dtype; GGUF: float16)")
    p.add_argument("--bits", type=int, choices=[16, 8, 4], default=16,
                   help="FFN bundle precision: 16 (the dtype) or 8/4-bit affine quantization")
    p.add_argument("--group-size", type=int, choices=[32, 64, 128], default=64,
                   help="quantization group size along d_model (with --bits 8/4)")
    p.add_argument("--align", type=int, default=64, help="bundle stride alignment in bytes")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", help="describe a flash model dir")
    p.add_argument("dir")
    p.add_argument("--verify", action="store_true", help="also check every file's sha256")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="generate text (flags as in mlx_lm.generate)")
    add_model_arguments(p)
    p.add_argument("--prompt", "-p", default=DEFAULT_PROMPT, help="prompt, or - for stdin")
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--ignore-chat-template", action="store_true")
    p.add_argument("--max-tokens", "-m", type=int, default=100)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--verbose", action="store_true", help="live per-token flash stats")
    p.add_argument("--stats-json", default=None, help="write per-token stats to this file")
    add_drafter_arguments(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("calibrate-disk", help="measure the disk's read cost (once per device; "
                                              "the read planner and the benchmark use it)")
    p.add_argument("dir", nargs="?", default=str(Path.home()),
                   help="a directory on the disk to measure (a flash model dir: its bundle files "
                        "are read; else a temporary scratch file is written there)")
    p.add_argument("--seconds", type=float, default=0.5, help="seconds per measured point")
    p.add_argument("--scratch-mib", type=int, default=512, help="size of the scratch file")
    p.set_defaults(func=cmd_calibrate_disk)

    p = sub.add_parser("bench", help="benchmark under DRAM caps (scripts/benchmark.py; "
                                     "--help for its flags)", add_help=False)
    p.set_defaults(func=lambda args: run_bench([]))

    from . import chat, drafter, evaluate, placement, predictor

    predictor.add_arguments(sub)
    placement.add_arguments(sub)
    drafter.add_arguments(sub)
    evaluate.add_arguments(sub)
    chat.add_arguments(sub)
    try:
        from . import server
    except ImportError as e:  # the serve extra is not installed
        p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs the serve extra)")
        p.set_defaults(func=lambda args, e=e: _missing_extra("serve", e))
    else:
        server.add_arguments(sub)
    return parser


def _missing_extra(extra: str, error: ImportError) -> int:
    print(f"mlx-flash {extra}: {error}; install it with: pip install 'mlx-flash[{extra}]'",
          file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # every flag after `bench` belongs to the benchmark script
        return run_bench(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as e:
        print(f"mlx-flash {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
