"""The `mlx-flash` command: the parser and the dispatch; each subcommand lives in its own module
of this package (`cli/pull.py`, `cli/generate.py`, ...) and registers its own flags.

Only the module of the command being run is imported (`--help` imports them all): the others'
dependencies (training, evaluation, mlx_lm's generate and transformers) would be RSS and
start-up time that `generate`, `chat` and `serve` pay for nothing.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# The subcommands in the order `--help` lists them -> the module that registers its parser.
COMMANDS = {"pull": "pull", "convert": "convert", "info": "info", "generate": "generate",
            "calibrate-disk": "calibrate_disk", "train-predictors": "train_predictors",
            "place": "place", "train-drafter": "train_drafter", "eval": "eval", "chat": "chat"}


def command_module(command: str):
    """The cli module of `command` (imported on first use: the module doc)."""
    return importlib.import_module(f"{__package__}.{COMMANDS[command]}")


def run_bench(argv: list[str]) -> int:
    """`mlx-flash bench` (cli/bench.py, imported only for it)."""
    return importlib.import_module(f"{__package__}.bench").run_bench(argv)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand, or only of `command` (and bench, serve) when given."""
    parser = argparse.ArgumentParser(
        prog="mlx-flash", description="Run language models larger than your memory with MLX: "
        "FFN weights stay on flash, each token reads the neurons it needs.")
    parser.add_argument("--models-dir", default=None,
                        help="where pulled models live (default $MLX_FLASH_HOME/models or "
                             "~/.cache/mlx_flash/models)")
    sub = parser.add_subparsers(dest="command", required=True)

    known = command in COMMANDS or command == "serve"
    for name in COMMANDS if not known else [c for c in COMMANDS if c == command]:
        command_module(name).add_arguments(sub)
    p = sub.add_parser("bench", help="benchmark under DRAM caps (mlx_flash.bench; "
                                     "--help for its flags)", add_help=False)
    p.set_defaults(func=lambda args: run_bench([]))
    if known and command != "serve":
        return parser
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
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as e:
        print(f"mlx-flash {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
