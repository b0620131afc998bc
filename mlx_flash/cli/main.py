"""The `mlx-flash` command: pull, convert, info, generate (flags as in mlx_lm.generate)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import chat as cli_chat
from . import eval as cli_eval
from . import place as cli_place
from . import train_drafter as cli_train_drafter
from . import train_predictors as cli_train_predictors
from .bench import run_bench
from .calibrate_disk import cmd_calibrate_disk
from .common import add_drafter_arguments, add_model_arguments
from .convert import cmd_convert
from .generate import cmd_generate
from .info import cmd_info
from .pull import cmd_pull

DEFAULT_PROMPT = "Write a Python function that checks whether a number is prime."


def build_parser() -> argparse.ArgumentParser:
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


    cli_train_predictors.add_arguments(sub)
    cli_place.add_arguments(sub)
    cli_train_drafter.add_arguments(sub)
    cli_eval.add_arguments(sub)
    cli_chat.add_arguments(sub)
    try:  # optional dependency: the serve extra (starlette, uvicorn, pydantic)
        from . import serve as cli_serve
    except ImportError as e:  # the serve extra is not installed
        p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs the serve extra)")
        p.set_defaults(func=lambda args, e=e: _missing_extra("serve", e))
    else:
        cli_serve.add_arguments(sub)
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
