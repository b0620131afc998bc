"""DRAM caps of the benchmark: parsed from fractions, multiples or sizes, and labelled."""

from __future__ import annotations

from pathlib import Path

from ..format.manifest import read_manifest
from ..runtime.memory import parse_budget

MIB = 2**20


def model_bytes(root: Path) -> int:
    """Bytes of the model on flash: resident.safetensors plus every bundle file."""
    manifest = read_manifest(root)
    return manifest.ffn_bytes + manifest.resident["size"]


def parse_cap(value: str, size: int) -> int | None:
    """A cap in bytes from "0.5" (fraction of the model), "1.5x", "700MiB", "2GB" or "none"."""
    text = str(value).strip().lower()
    if text in ("none", "inf", "uncapped"):
        return None
    if text.endswith("x"):
        try:
            return int(float(text[:-1]) * size)
        except ValueError:
            raise ValueError(f"cap {value!r}: '<number>x' means that many times the model "
                             "size, e.g. 1.5x") from None
    cap = parse_budget(text, size)
    if _is_fraction(text) or cap >= 64 * MIB:
        return cap
    raise ValueError(f"cap {value!r} is {cap} bytes, below 64 MiB: give a fraction of the "
                     "model size (0.5), a multiple (1.5x) or a size (700MiB, 2GB)")


def _is_fraction(text: str) -> bool:
    try:
        return 0 < float(text) <= 1
    except ValueError:
        return False


def parse_caps(text: str, size: int) -> list[int | None]:
    """Comma-separated caps -> bytes (None = uncapped), in the order given."""
    return [parse_cap(part, size) for part in text.split(",") if part.strip()]


def cap_label(cap: int | None, size: int) -> str:
    """"none" or "700 MiB (0.50x)": the cap and its fraction of the model's `size` bytes."""
    return "none" if cap is None else f"{cap / MIB:.0f} MiB ({cap / size:.2f}x)"
