"""The `mlx-flash` command: the parser and the dispatch; each subcommand lives in its own module
of this package (`cli/pull.py`, `cli/generate.py`, ...) and registers its own flags."""

from __future__ import annotations

import argparse
import sys

from . import calibrate_disk as cli_calibrate_disk
from . import chat as cli_chat
from . import convert as cli_convert
from . import eval as cli_eval
from . import generate as cli_generate
from . import info as cli_info
from . import place as cli_place
from . import pull as cli_pull
from . import train_drafter as cli_train_drafter
from . import train_predictors as cli_train_predictors
from .bench import run_bench

# The subcommands in the order `--help` lists them; each module registers its own parser.
COMMANDS = (cli_pull, cli_convert, cli_info, cli_generate, cli_calibrate_disk, cli_train_predictors,
            cli_place, cli_train_drafter, cli_eval, cli_chat)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx-flash", description="Run language models larger than your memory with MLX: "
        "FFN weights stay on flash, each token reads the neurons it needs.")
    parser.add_argument("--models-dir", default=None,
                        help="where pulled models live (default $MLX_FLASH_HOME/models or "
                             "~/.cache/mlx_flash/models)")
    sub = parser.add_subparsers(dest="command", required=True)

    for command in COMMANDS:
        command.add_arguments(sub)
    p = sub.add_parser("bench", help="benchmark under DRAM caps (mlx_flash.bench; "
                                     "--help for its flags)", add_help=False)
    p.set_defaults(func=lambda args: run_bench([]))
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
