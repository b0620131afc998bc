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


USERS_CAPS = ("0.5", "0.7", "1.0", "1.3", "none")  # fractions of the GGUF's size (users' regime)


def fraction_caps(text: str, size: int) -> list[int | None]:
    """Comma-separated fractions of `size` bytes (a GGUF's; above 1 allowed) or "none" ->
    bytes (None = no cap), in the order given."""
    caps = []
    for part in (p.strip().lower() for p in text.split(",")):
        if not part:
            continue
        if part in ("none", "inf", "uncapped"):
            caps.append(None)
            continue
        try:
            fraction = float(part.removesuffix("x"))
        except ValueError:
            fraction = -1.0
        if not 0 < fraction < 100:
            raise ValueError(f"cap {part!r}: the users' regime takes fractions of the GGUF's "
                             "size (0.5, 1.3) or 'none'")
        caps.append(int(fraction * size))
    return caps
