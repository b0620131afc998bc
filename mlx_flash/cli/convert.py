"""`mlx-flash convert`."""

from __future__ import annotations

from ..offline.pull import resolve_source
from .common import _convert


def cmd_convert(args) -> int:
    src = resolve_source(args.src, models_dir=args.models_dir)
    _convert(src, args.out, args.dtype, args.align, args.force, args.bits, args.group_size)
    return 0
