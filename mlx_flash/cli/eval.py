"""`mlx-flash eval`."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict

from ..format.storage import write_text_atomic
from ..offline.evaluate import EvalConfig, evaluate, format_report, format_sweep, sweep
from ..runtime.config import DTYPES, ORACLE_RULES, SELECTORS


def eval_cli(args) -> int:
    """`mlx-flash eval DIR --text-file F [--json OUT]`."""

    cfg = EvalConfig(ppl_tokens=args.ppl_tokens, prompts=args.prompts,
                     prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
                     selector=args.selector, rule=args.rule, keep=args.keep,
                     recall=args.recall, window=args.window, dram_budget=args.dram_budget, dtype=args.dtype)
    started = time.perf_counter()

    def progress(stage: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {stage}", file=sys.stderr)

    if args.sweep:
        dense, points = sweep(args.dir, args.text_file, args.ppl_tokens, progress=progress)
        print(format_sweep(dense, points))
        result = {"dense_ppl": dense, "points": [asdict(p) for p in points]}
    else:
        report = evaluate(args.dir, args.text_file, cfg, progress)
        print(format_report(report))
        result = report.to_dict()
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=1))
    return 0


def add_arguments(subparsers) -> None:
    """Register `eval` on the CLI's subparsers."""
    p = subparsers.add_parser("eval", help="fidelity and cost of flash vs the dense model")
    p.add_argument("dir", help="flash model dir")
    p.add_argument("--text-file", required=True, help="any UTF-8 text file")
    p.add_argument("--json", default=None, help="write the full report here")
    p.add_argument("--sweep", action="store_true",
                   help="only perplexity vs the predictors' operating points (dense model "
                        "with masked FFNs, no flash; with the oracle at equal neuron counts)")
    p.add_argument("--ppl-tokens", type=int, default=EvalConfig.ppl_tokens)
    p.add_argument("--prompts", type=int, default=EvalConfig.prompts,
                   help="M prompts cut from the text for greedy agreement")
    p.add_argument("--prompt-tokens", type=int, default=EvalConfig.prompt_tokens)
    p.add_argument("--max-tokens", "-m", type=int, default=EvalConfig.max_tokens,
                   help="N greedy tokens per prompt")
    p.add_argument("--selector", default="auto", choices=SELECTORS)
    p.add_argument("--rule", default="all", choices=ORACLE_RULES,
                   help="oracle rule")
    p.add_argument("--keep", type=float, default=None,
                   help="fraction kept by the oracle's top rule (1.0) or --selector quant (0.5)")
    p.add_argument("--recall", type=float, default=None,
                   help="predictors' operating point: one of the recalls they were calibrated "
                        "for (default: the one they were trained with)")
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--dram-budget", default=None)
    p.add_argument("--dtype", default=None, choices=list(DTYPES))
    p.set_defaults(func=eval_cli)
