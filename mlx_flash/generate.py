"""Text generation on a flash model with mlx_lm's own generate loop, plus live statistics."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .stats import RunStats, TokenStats, peak_rss_bytes


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    peak_rss_bytes: int


def format_prompt(tokenizer, prompt: str, system: str | None = None,
                  use_chat_template: bool = True) -> list[int]:
    """Token ids of the prompt, through the chat template when the tokenizer has one."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else [])
        messages.append({"role": "user", "content": prompt})
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return tokenizer.encode(prompt)


def stream(model, tokenizer, prompt_ids: list[int], max_tokens: int, temp: float = 0.0,
           top_p: float = 1.0, seed: int | None = None, speculative=None) -> Iterator:
    """mlx_lm.stream_generate with a sampler for temp/top_p; yields its responses.

    speculative: a `Speculation` (drafter, settings, stats): greedy speculative decoding."""
    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    if speculative is not None:
        yield from speculative.stream(model, tokenizer, prompt_ids, max_tokens, temp)
        return
    if seed is not None:
        mx.random.seed(seed)
    sampler = make_sampler(temp=temp, top_p=top_p)
    yield from stream_generate(model, tokenizer, prompt_ids, max_tokens=max_tokens,
                               sampler=sampler)


def generate_text(model, tokenizer, prompt_ids: list[int], max_tokens: int, temp: float = 0.0,
                  top_p: float = 1.0, seed: int | None = None, on_token=None,
                  speculative=None) -> GenerationResult:
    """Generate and collect the text; `on_token(response)` is called per token."""
    text, last = "", None
    for response in stream(model, tokenizer, prompt_ids, max_tokens, temp, top_p, seed,
                           speculative):
        text += response.text
        last = response
        if on_token is not None:
            on_token(response)
    if last is None:
        return GenerationResult("", len(prompt_ids), 0, 0.0, 0.0, peak_rss_bytes())
    return GenerationResult(text, last.prompt_tokens, last.generation_tokens, last.prompt_tps,
                            last.generation_tps, peak_rss_bytes())


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


# ---------------------------------------------------------------- model flags and loading (CLI)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that choose and load a model, as `mlx-flash generate` names them."""
    p.add_argument("--model", default=None, help="flash model dir (default: the default model, "
                                                 "pulled and converted on first use)")
    p.add_argument("--dram-budget", default=None,
                   help="DRAM budget: bytes, '2GB', '700MiB' or a fraction of the model (0.5)")
    p.add_argument("--window", type=int, default=5, help="tokens whose neurons stay cached")
    p.add_argument("--selector", default="auto",
                   help="how active neurons are chosen: auto (predictors when the dir has "
                        "them, else the oracle), predictor, oracle, or quant (a 4-bit copy of "
                        "gate/up in DRAM scores the neurons, each token keeps its top --keep)")
    p.add_argument("--rule", default="all", choices=["all", "nonzero", "top"],
                   help="oracle rule (without predictors)")
    p.add_argument("--keep", type=float, default=None,
                   help="fraction kept by --rule top (default 1.0) or --selector quant "
                        "(default 0.5)")
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                   help="compute dtype (default float32 on CPU)")
    p.add_argument("--threads", type=int, default=8, help="parallel reads")
    p.add_argument("--direct", action=argparse.BooleanOptionalAction, default=None,
                   help="O_DIRECT reads that bypass the page cache (default: on with "
                        "--dram-budget where the model dir's filesystem allows it)")
    p.add_argument("--read-planner", default="cost", choices=["cost", "runs", "neuron"],
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
                        "(made by `mlx-flash train-drafter`) or PATH (a dir or .safetensors)")
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
    from .drafter import load_drafter
    from .speculative import SpecSettings, Speculation

    root = model_dir(args)
    drafter = load_drafter(args.drafter or root, root).attach(model, root)
    return Speculation(drafter, SpecSettings(args.beam_width, args.draft_length,
                                             args.window_policy))


def model_dir(args: argparse.Namespace) -> Path:
    """--model, or the default model (pulled and converted on first use)."""
    if args.model:
        return Path(args.model).expanduser()
    from .__main__ import default_model_dir

    return default_model_dir(getattr(args, "models_dir", None))


def load_model(args: argparse.Namespace):
    """(model, tokenizer) for the flags of `add_model_arguments`."""
    from .model import load, load_dense

    path = model_dir(args)
    if args.dense:
        return load_dense(path, dtype=args.dtype, fast_cpu=bool(args.fast_cpu))
    return load(path, dram_budget=args.dram_budget, window=args.window, selector=args.selector,
                oracle_rule=args.rule, keep=args.keep, dtype=args.dtype, threads=args.threads,
                direct=args.direct, embed_on_flash=args.embed_on_flash or None,
                resident_bits=args.resident_bits, max_kv_tokens=args.max_kv_tokens,
                read_planner=args.read_planner, pin_hot=args.pin_hot, fast_cpu=args.fast_cpu,
                reserve=drafter_reserve(args, path))


def drafter_reserve(args: argparse.Namespace, root: Path) -> int:
    """Bytes the --drafter will take, for the DRAM plan (0 without one)."""
    if getattr(args, "drafter", None) is None:
        return 0
    from .drafter import drafter_bytes
    from .format import read_manifest

    return drafter_bytes(args.drafter or root, read_manifest(root).config["hidden_size"])
