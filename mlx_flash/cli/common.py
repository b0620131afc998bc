"""Text generation on a flash model with mlx_lm's own generate loop, plus live statistics."""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

from tqdm import tqdm

from ..format.home import default_models_dir
from ..format.manifest import read_manifest
from ..offline.convert import convert
from ..offline.pull import ALIASES, DEFAULT_MODEL, REGISTRY, pull
from ..offline.sources import open_checkpoint
from ..runtime.config import DTYPES, ORACLE_RULES, SELECTORS
from ..runtime.loader import load, load_dense
from ..runtime.planner import PLANNERS
from ..runtime.stats import RunStats, TokenStats
from ..spec.drafter import drafter_bytes, find_drafter, load_drafter
from ..spec.speculative import SpecSettings, Speculation
from .info import info_bytes


def _progress_bar(desc: str, total: int | None):
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, disable=None)


def default_model_dir(models_dir: str | None = None, name: str | None = None) -> Path:
    """The flash dir of a known model, pulled and converted on first use (with progress)."""

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


def _convert(src, out, dtype, align, force, bits=16, group_size=None, **resident) -> None:
    ckpt = open_checkpoint(src)
    total = sum(info_bytes(ckpt).values())
    with _progress_bar(f"convert {Path(src).name}", total) as bar:
        stats = convert(ckpt, out, dtype=dtype, bits=bits, group_size=group_size, align=align,
                        force=force, **resident,
                        progress=lambda stage, n: (bar.set_postfix_str(stage), bar.update(n)))
    print(f"wrote {out}: resident {stats.resident_bytes / 2**20:.1f} MiB, FFN "
          f"{stats.ffn_bytes / 2**20:.1f} MiB in {stats.n_layers} layers x {stats.n_neurons} "
          f"neurons, bundle {stats.bundle_bytes} B (stride {stats.stride} B)", file=sys.stderr)


def token_line(step: TokenStats) -> str:
    ms = {k: v * 1e3 for k, v in step.seconds.items()}
    return (f"[{step.bytes_read / 2**20:6.2f} MiB in {step.reads:5d} reads | hit "
            f"{step.hit_rate:5.1%} | active {step.neurons_active:6d} new {step.neurons_new:6d} "
            f"cached {step.neurons_cached:6d} | ms pred {ms['predictor']:6.1f} io {ms['io']:6.1f} "
            f"mem {ms['memory']:5.1f} compute {ms['compute']:6.1f}]")


class LiveStats:
    """Prints one stats line per decoded token to stderr (the CLI's --verbose)."""

    def __init__(self, stats: RunStats | None, out=sys.stderr):
        self.stats, self.out, self.t0 = stats, out, time.perf_counter()
        self._seen = 0

    def __call__(self, response) -> None:
        if self.stats is None:
            return
        steps = self.stats.steps
        while self._seen < len(steps) - 1:  # the newest step may still be filling
            step = steps[self._seen]
            kind = "prefill" if step.tokens > 1 else "token"
            print(f"\n{kind:>7} {self._seen:4d} {token_line(step)}", file=self.out, end="")
            self._seen += 1
        self.out.flush()


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that choose and load a model, as `mlx-flash generate` names them."""
    p.add_argument("--model", default=None,
                   help="a flash model dir, a known model name, hf:org/name, an mlx_lm/HF model "
                        "dir or a .gguf file (the last three are converted once into the models "
                        "dir; default: the default model, pulled and converted on first use)")
    p.add_argument("--dram-budget", default=None,
                   help="DRAM budget: bytes, '2GB', '700MiB' or a fraction of the model (0.5)")
    p.add_argument("--window", type=int, default=5, help="tokens whose neurons stay cached")
    p.add_argument("--selector", default="auto", choices=SELECTORS,
                   help="how active neurons are chosen: auto (predictors when the dir has "
                        "them, else the oracle), predictor, oracle, or quant (a 4-bit copy of "
                        "gate/up in DRAM scores the neurons, each token keeps its top --keep)")
    p.add_argument("--rule", default="all", choices=ORACLE_RULES,
                   help="oracle rule (without predictors)")
    p.add_argument("--keep", type=float, default=None,
                   help="fraction kept by --rule top (default 1.0) or --selector quant "
                        "(default 0.5)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="compute dtype (default float32 on CPU)")
    p.add_argument("--threads", type=int, default=8, help="parallel reads")
    p.add_argument("--direct", action=argparse.BooleanOptionalAction, default=None,
                   help="O_DIRECT reads that bypass the page cache (default: on with "
                        "--dram-budget where the model dir's filesystem allows it)")
    p.add_argument("--read-planner", default="cost", choices=PLANNERS,
                   help="cost: merge reads across gaps by the disk's cost model (calibrate-disk)")
    p.add_argument("--pin-hot", type=float, default=0.0,
                   help="fraction of each neuron cache pinned to hot neurons (placed dirs)")
    p.add_argument("--embed-on-flash", action="store_true",
                   help="keep the embedding table on flash (one row read per token)")
    p.add_argument("--resident-bits", type=int, choices=[16, 8, 4], default=None,
                   help="quantize the resident weights to fit a small budget")
    p.add_argument("--max-kv-tokens", type=int, default=2048,
                   help="context length the budget reserves KV cache for")
    p.add_argument("--dense", action="store_true", help="run the dense reference instead")
    p.add_argument("--fast-cpu", action=argparse.BooleanOptionalAction, default=None,
                   help="the C kernels of the fast CPU path (default: on when MLX runs on the "
                        "CPU with 16-bit bundles and no --dtype; --dense: off unless given)")


def add_drafter_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of speculative decoding with the recurrent drafter."""
    p.add_argument("--drafter", nargs="?", const="", default=None, metavar="PATH",
                   help="speculative decoding (greedy only) with a drafter: the model dir's "
                        "(made by `mlx-flash train-drafter`), else the packaged one for the "
                        "model, or PATH (a dir or .safetensors)")
    p.add_argument("--beam-width", type=int, default=1,
                   help="drafter beams per step (1x3 was fastest here, dense and under a "
                        "cap: BENCHMARKS.md, issue 8)")
    p.add_argument("--draft-length", type=int, default=3, help="tokens drafted per beam")
    p.add_argument("--window-policy", default="keep", choices=["keep", "drop"],
                   help="flash: neurons read only for rejected drafts stay in the window "
                        "(keep) or are evicted first (drop)")


def load_speculation(args: argparse.Namespace, model):
    """A Speculation for --drafter, or None without it."""
    if args.drafter is None:
        return None

    root = model_dir(args)
    drafter = load_drafter(args.drafter or find_drafter(root), root).attach(model, root)
    return Speculation(drafter, SpecSettings(args.beam_width, args.draft_length,
                                             args.window_policy))


def model_dir(args: argparse.Namespace) -> Path:
    """--model, or the default model (pulled and converted on first use)."""
    models_dir = getattr(args, "models_dir", None)
    if args.model:
        return resolve_model(args.model, models_dir)
    return default_model_dir(models_dir)


def resolve_model(spec: str, models_dir: str | None = None) -> Path:
    """--model -> a flash dir: a flash dir as is; a known model name, `hf:org/name`, an mlx_lm /
    HF safetensors dir or a .gguf file converted once (with progress) into the models dir and
    reused from then on."""
    path = Path(spec).expanduser()
    if (path / "manifest.json").is_file():
        return path
    if ALIASES.get(spec, spec) in REGISTRY:
        return default_model_dir(models_dir, spec)
    home = Path(models_dir).expanduser() if models_dir else default_models_dir()
    if spec.startswith("hf:"):
        flash_dir = home / "hf" / spec[3:].replace("/", "--") / "flash"
        if (flash_dir / "manifest.json").is_file():
            return flash_dir
        source = pull(spec, models_dir=home, progress=True)
    elif path.is_dir() or path.suffix == ".gguf" and path.is_file():
        source = path.resolve()
        flash_dir = converted_dir(home, source)
        if (flash_dir / "manifest.json").is_file() and not _source_changed(source, flash_dir):
            return flash_dir
    else:
        raise FileNotFoundError(
            f"--model {spec}: not a flash model dir (no manifest.json), a known model "
            f"({', '.join(sorted([*REGISTRY, *ALIASES]))}), hf:org/name, an mlx_lm/HF model dir "
            "or a .gguf file")
    print(f"First use of {spec}: converting it to a flash model dir in {flash_dir} (once).",
          file=sys.stderr)
    _convert(source, flash_dir, dtype=None, align=64, force=flash_dir.exists())
    return flash_dir


def converted_dir(home: Path, source: Path) -> Path:
    """Where a local source's flash dir lives: <home>/local/<name>-<hash of its path>/flash."""
    tag = hashlib.sha256(str(source).encode()).hexdigest()[:10]
    return home / "local" / f"{source.stem}-{tag}" / "flash"


def _source_changed(source: Path, flash_dir: Path) -> bool:
    """True when a file of the source is newer than the flash dir's manifest (convert again)."""
    made = (flash_dir / "manifest.json").stat().st_mtime
    files = [source] if source.is_file() else [p for p in source.iterdir() if p.is_file()]
    return any(f.stat().st_mtime > made for f in files)


def load_model(args: argparse.Namespace, tokenizer=None):
    """(model, tokenizer) for the flags of `add_model_arguments`; tokenizer: the model dir's,
    when the caller loaded it already (flash only)."""

    path = model_dir(args)
    if args.dense:
        return load_dense(path, dtype=args.dtype, fast_cpu=bool(args.fast_cpu))
    return load(path, tokenizer=tokenizer, **load_options(args, path))


def load_options(args: argparse.Namespace, path: Path) -> dict:
    """`load`'s dram_budget and options for the flags of `add_model_arguments`."""
    return dict(dram_budget=args.dram_budget, window=args.window, selector=args.selector,
                oracle_rule=args.rule, keep=args.keep, dtype=args.dtype, threads=args.threads,
                direct=args.direct, embed_on_flash=args.embed_on_flash or None,
                resident_bits=args.resident_bits, max_kv_tokens=args.max_kv_tokens,
                read_planner=args.read_planner, pin_hot=args.pin_hot, fast_cpu=args.fast_cpu,
                reserve=drafter_reserve(args, path))


def drafter_reserve(args: argparse.Namespace, root: Path) -> int:
    """Bytes the --drafter will take, for the DRAM plan (0 without one)."""
    if getattr(args, "drafter", None) is None:
        return 0

    return drafter_bytes(args.drafter or find_drafter(root),
                         read_manifest(root).config["hidden_size"])
