"""`mlx-flash pull`."""

from __future__ import annotations

import argparse

from ..offline.pull import pull
from .common import _convert, default_model_dir


def cmd_pull(args) -> int:
    path = pull(args.name, models_dir=args.models_dir, progress=True, force=args.force)
    print(path)
    if args.convert:
        out = default_model_dir(args.models_dir, args.name) if not args.force else None
        if out is None:
            out = path.parent / "flash"
            _convert(path, out, dtype=None, align=64, force=True)
        print(out)
    return 0


def add_arguments(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("pull", help="fetch a known model (default: the default model)")
    p.add_argument("name", nargs="?", default="default")
    p.add_argument("--force", action="store_true", help="download again even if present")
    p.add_argument("--convert", action="store_true", help="also convert it to a flash dir")
    p.set_defaults(func=cmd_pull)
    return p
