"""`mlx-flash convert`."""

from __future__ import annotations

import argparse

from ..offline.pull import resolve_source
from .common import _convert


def cmd_convert(args) -> int:
    src = resolve_source(args.src, models_dir=args.models_dir)
    _convert(src, args.out, args.dtype, args.align, args.force, args.bits, args.group_size,
             resident_bits=args.resident_bits, resident_group_size=args.resident_group_size,
             carry=not args.requantize, carry_ffn=args.carry_ffn,
             gate_resident=args.gate_resident, gate_bits=args.gate_bits)
    return 0


def add_arguments(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("convert", help="HF/mlx_lm safetensors dir or .gguf -> flash model dir")
    p.add_argument("src", help="HF/mlx_lm safetensors dir, .gguf file, known model name or "
                               "hf:org/name")
    p.add_argument("out")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="storage dtype (default: the source's FFN dtype; GGUF: float16)")
    p.add_argument("--bits", type=int, choices=[16, 8, 4], default=16,
                   help="FFN bundle precision: 16 (the dtype) or 8/4-bit affine quantization "
                        "(a Q4_K_M GGUF's perplexity: --bits 8 within 1%%, --bits 4 +12%%)")
    p.add_argument("--group-size", type=int, choices=[32, 64, 128], default=None,
                   help="quantization group size along d_model (with --bits 8/4; default 32 "
                        "for a GGUF, whose blocks are 32 wide, else 64)")
    p.add_argument("--resident-bits", type=int, choices=[16, 8, 4], default=None,
                   help="attention, lm_head and embedding matrices: 16 (the dtype) or 8/4-bit, "
                        "stored as mlx_lm stores a quantized model (default: --bits)")
    p.add_argument("--resident-group-size", type=int, choices=[32, 64, 128], default=None,
                   help="their quantization group size (default: --group-size)")
    p.add_argument("--requantize", action="store_true",
                   help="GGUF: re-quantize every resident matrix at --resident-bits; by "
                        "default blocks that are exactly MLX affine (Q8_0, Q5_0, Q4_0) are "
                        "stored as they are, at their own bits, and Q6_K at 8 bits")
    p.add_argument("--carry-ffn", action="store_true",
                   help="copy the FFN's own quantized blocks (a GGUF's Q4_0/Q5_0/Q8_0/Q4_K/Q5_K/"
                        "Q6_K) into the bundles, each part at its own bits (5 and 6 widened to "
                        "8), exactly (format 3; --bits then sets the resident part only). A "
                        "quantized mlx_lm dir is always carried as stored")
    p.add_argument("--gate-resident", action="store_true",
                   help="keep each layer's gate_proj resident (format 4) and only up/down in "
                        "the bundles, for --selector gate (read only the neurons whose "
                        "act(gate x) is large)")
    p.add_argument("--gate-bits", type=int, choices=[16, 8, 4], default=None,
                   help="the resident gate's precision (default: the FFN's own; a carried "
                        "gate as stored)")
    p.add_argument("--align", type=int, default=64, help="bundle stride alignment in bytes")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_convert)
    return p
