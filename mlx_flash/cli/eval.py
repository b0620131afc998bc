"""`mlx-flash eval`."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict

from ..format.storage import write_text_atomic
from ..offline.evaluate import (
    PROMPT_SET,
    EvalConfig,
    evaluate_selectors,
    format_report,
    format_sweep,
    parse_selectors,
    sweep,
)
from ..runtime.config import DTYPES, ORACLE_RULES, SELECTORS


def eval_cli(args) -> int:
    """`mlx-flash eval DIR --text-file F [--json OUT]`: one report per --selector entry."""

    spec = ",".join(args.selector or ["auto"])  # repeated flags add entries, as commas do
    runs = parse_selectors(spec, args.keep)
    unknown = sorted({name for name, _ in runs} - set(SELECTORS))
    if unknown:
        raise ValueError(f"--selector {spec!r}: unknown {', '.join(unknown)}; the "
                         f"selectors are {', '.join(SELECTORS)}")
    prompt_file = str(PROMPT_SET) if args.prompt_set else args.prompt_file
    cfg = EvalConfig(ppl_tokens=args.ppl_tokens, prompts=args.prompts,
                     prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
                     selector=runs[0][0], rule=args.rule, keep=runs[0][1],
                     recall=args.recall, window=args.window, dram_budget=args.dram_budget,
                     dtype=args.dtype, prompt_file=prompt_file,
                     prefix_tokens=args.prefix_tokens,
                     continuation_tokens=args.continuation_tokens, refresh=args.refresh)
    started = time.perf_counter()

    def progress(stage: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {stage}", file=sys.stderr)

    if args.sweep:
        dense, points = sweep(args.dir, args.text_file, args.ppl_tokens, progress=progress)
        print(format_sweep(dense, points))
        result = {"dense_ppl": dense, "points": [asdict(p) for p in points]}
    else:
        reports = evaluate_selectors(args.dir, args.text_file, cfg, runs, progress)
        print("\n\n".join(format_report(r) for r in reports))
        result = (reports[0].to_dict() if len(reports) == 1
                  else {"reports": [r.to_dict() for r in reports]})
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
    p.add_argument("--prompt-file", default=None,
                   help='greedy prompts from this JSONL file ({"kind", "text", "chat"} a line) '
                        "instead of cut from the text")
    p.add_argument("--prompt-set", action="store_true",
                   help=f"greedy prompts from the packaged set ({PROMPT_SET.name}: code, prose "
                        "and chat)")
    p.add_argument("--prefix-tokens", type=int, default=EvalConfig.prefix_tokens,
                   help="prefix perplexity: tokens fed as the prompt (never scored)")
    p.add_argument("--continuation-tokens", type=int, default=EvalConfig.continuation_tokens,
                   help="prefix perplexity: tokens scored after the prefix")
    p.add_argument("--max-tokens", "-m", type=int, default=EvalConfig.max_tokens,
                   help="N greedy tokens per prompt")
    p.add_argument("--selector", action="append",
                   help=f"one of {', '.join(SELECTORS)} (default auto), or several with "
                        "optional keeps, each a report: sequence:0.5,sequence:0.3,quant; "
                        "repeating the flag adds entries")
    p.add_argument("--rule", default="all", choices=ORACLE_RULES,
                   help="oracle rule")
    p.add_argument("--keep", type=float, default=None,
                   help="fraction kept by the oracle's top rule (1.0), --selector quant "
                        "(0.5) or sequence (0.7)")
    p.add_argument("--refresh", type=int, default=0,
                   help="--selector sequence: choose the set again every N decoded tokens "
                        "(0: never)")
    p.add_argument("--recall", type=float, default=None,
                   help="predictors' operating point: one of the recalls they were calibrated "
                        "for (default: the one they were trained with)")
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--dram-budget", default=None)
    p.add_argument("--dtype", default=None, choices=list(DTYPES))
    p.set_defaults(func=eval_cli)
