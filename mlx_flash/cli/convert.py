"""`mlx-flash convert`."""

from __future__ import annotations

import argparse

from ..offline.pull import resolve_source
from .common import _convert


def cmd_convert(args) -> int:
    src = resolve_source(args.src, models_dir=args.models_dir)
    _convert(src, args.out, args.dtype, args.align, args.force, args.bits, args.group_size)
    return 0


def add_arguments(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("convert", help="HF/mlx_lm safetensors dir or .gguf -> flash model dir")
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
    return p
