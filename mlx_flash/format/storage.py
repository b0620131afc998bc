"""Storage helpers shared by every reader and writer of a flash dir: dtype tables, bf16 bits, safetensors headers, atomic writes, checksums."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import FormatError


class TensorEntry(NamedTuple):
    shape: tuple[int, ...]
    offset: int  # of the data, from the start of the file
    nbytes: int
    dtype: str  # "float16" | "bfloat16" | "float32"


_ST_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}


def tensor_sizes(path: Path) -> dict[str, TensorEntry]:
    """name -> TensorEntry from a safetensors header, without loading the data."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: TensorEntry(tuple(v["shape"]), 8 + n + v["data_offsets"][0],
                           v["data_offsets"][1] - v["data_offsets"][0],
                           _ST_NAMES.get(v["dtype"], v["dtype"]))
            for k, v in header.items()}


NP_STORAGE = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32,
              "uint32": np.uint32}


def storage_to_f32(a: np.ndarray, dtype: str) -> np.ndarray:
    """uint16 bits of float16/bfloat16 values -> float32."""
    if dtype == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.view(np.float16).astype(np.float32)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even f32 -> bf16 bit patterns (what MLX and torch do)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + 0x7FFF
    return ((bits + rounding) >> 16).astype(np.uint16)


def to_f32(arr: np.ndarray, dtype: str) -> np.ndarray:
    return bf16_bits_to_f32(arr) if dtype == "bfloat16" else arr.astype(np.float32)


def cast(arr: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Cast between storage dtypes; bfloat16 is uint16 bits on both sides."""
    if src == dst:
        return arr
    if dst == "bfloat16":
        return f32_to_bf16_bits(to_f32(arr, src))
    return to_f32(arr, src).astype(np.dtype(dst))


_ST_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}


_NP_STORAGE = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez under a temporary name, fsynced, then renamed: a crash leaves the old file or
    none, never a truncated one."""
    tmp = path.with_name(path.name + ".tmp.npz")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checked_safetensors(path: Path, sha256: str | None, listed_in: str, file_format: str,
                             version: str, what: str, fix: str) -> tuple[dict, dict]:
    """(arrays, metadata) of a side file (predictors, drafter) after its checks: the sha256
    that `listed_in` records, a readable header, and its format/version metadata. Raises
    FormatError naming the file, with `fix`."""
    import mlx.core as mx

    if sha256_file(path) != sha256:
        raise FormatError(f"{path}: checksum mismatch with {listed_in}, the file is corrupted "
                          f"or was replaced; {fix}")
    try:
        arrays, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
    except Exception as e:  # MLX raises RuntimeError/ValueError for a bad header
        raise FormatError(f"{path}: not a readable safetensors file ({e}); {fix}") from e
    if metadata.get("format") != file_format or metadata.get("version") != version:
        raise FormatError(f"{path}: not an mlx-flash {what} file of version {version} "
                          f"(format {metadata.get('format')!r}, version "
                          f"{metadata.get('version')!r}); {fix}")
    return arrays, metadata


ST_DTYPE = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
