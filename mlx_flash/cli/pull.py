"""`mlx-flash pull`."""

from __future__ import annotations

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
