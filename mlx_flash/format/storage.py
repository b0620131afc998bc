"""Storage helpers shared by every reader and writer of a flash dir: the storage dtype tables,
float32 from stored values, the safetensors header, atomic writes and checksums."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from .checksums import ChecksumError
from .errors import FormatError

# Every dtype a flash dir stores, by name, as numpy reads it. numpy has no bfloat16: its values
# travel as uint16 bit patterns with the name "bfloat16" beside them. "uint32": the packed words
# of quantized bundles.
NP_STORAGE: dict[str, np.dtype] = {"float16": np.dtype(np.float16),
                                   "bfloat16": np.dtype(np.uint16),
                                   "float32": np.dtype(np.float32),
                                   "uint32": np.dtype(np.uint32)}


# The dtypes weights are stored in, and their sizes in bytes.
DTYPE_BYTES = {name: NP_STORAGE[name].itemsize for name in ("float16", "bfloat16", "float32")}


# safetensors' dtype codes of what a flash dir stores ("uint32": quantized resident weights)
ST_CODES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "uint32": "U32"}


ST_NAMES = {code: name for name, code in ST_CODES.items()}


def to_f32(arr: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values of storage dtype `dtype` -> float32, any shape.

    arr: in NP_STORAGE[dtype] (bfloat16 as uint16 bits), or the bits of float16 values as uint16.
    """
    if dtype == "bfloat16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    if arr.dtype.kind == "u":  # raw bits of 16/32-bit floats
        arr = arr.view(NP_STORAGE[dtype])
    return arr.astype(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even f32 -> bf16 bit patterns (what MLX and torch do)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + 0x7FFF
    return ((bits + rounding) >> 16).astype(np.uint16)


def cast(arr: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Cast between storage dtypes; bfloat16 is uint16 bits on both sides."""
    if src == dst:
        return arr
    if dst == "bfloat16":
        return f32_to_bf16_bits(to_f32(arr, src))
    return to_f32(arr, src).astype(NP_STORAGE[dst])


class TensorEntry(NamedTuple):
    """One tensor of a safetensors file, from its header."""

    shape: tuple[int, ...]
    offset: int  # of the data, from the start of the file
    nbytes: int
    dtype: str  # a storage dtype name ("float16" | "bfloat16" | "float32"), else the code ("I32")

    def memmap(self, path: Path) -> np.memmap:
        """The tensor in the file at `path`, memory-mapped read-only in NP_STORAGE[dtype]."""
        return np.memmap(path, mode="r", dtype=NP_STORAGE[self.dtype], offset=self.offset,
                         shape=self.shape)


# Bytes per element of every dtype code safetensors defines.
ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


MAX_ST_HEADER = 100 << 20  # safetensors' own limit on the header's JSON


def tensor_sizes(path: Path) -> dict[str, TensorEntry]:
    """name -> TensorEntry from a safetensors header, without loading the data.

    Raises FormatError naming the file when the header is truncated, absurdly long, not JSON,
    or lies: an entry that is not {dtype, shape, data_offsets} of the right types, or whose
    bytes are not shape x dtype size, or lie outside the file.
    """
    with open(path, "rb") as f:
        raw = f.read(8)
        size = os.fstat(f.fileno()).st_size
        (n,) = struct.unpack("<Q", raw) if len(raw) == 8 else (-1,)
        if not 0 <= n <= size - 8:
            raise FormatError(f"{path}: truncated safetensors file (header of {n} bytes, file "
                              f"of {size}); the file is incomplete or not safetensors")
        if n > MAX_ST_HEADER:
            raise FormatError(f"{path}: safetensors header of {n} bytes (over {MAX_ST_HEADER}): "
                              "the file is corrupt or not safetensors")
        blob = f.read(n)
    try:
        header = json.loads(blob)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise FormatError(f"{path}: corrupt safetensors header (a JSON "
                          f"{type(header).__name__}, not an object)")
    header.pop("__metadata__", None)
    return {name: _tensor_entry(path, name, value, 8 + n, size) for name, value in header.items()}


def _tensor_entry(path: Path, name: str, value, data_start: int, size: int) -> TensorEntry:
    """One header entry, checked (see `tensor_sizes`)."""
    def bad(why: str) -> FormatError:
        return FormatError(f"{path}: corrupt safetensors header: tensor {name!r} {why}; the "
                           "file is damaged or was not written by a safetensors writer")

    if not isinstance(value, dict):
        raise bad(f"is a {type(value).__name__}, not an object")
    dtype, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if dtype not in ST_ITEMSIZE:
        raise bad(f"has dtype {dtype!r}, not one of {', '.join(ST_ITEMSIZE)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad(f"has shape {shape!r}, not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets)):
        raise bad(f"has data_offsets {offsets!r}, not [begin, end] integers")
    begin, end = offsets
    nbytes = ST_ITEMSIZE[dtype] * int(np.prod(shape, dtype=np.int64))
    if end - begin != nbytes:
        raise bad(f"spans {end - begin} bytes, but shape {shape} of {dtype} needs {nbytes}")
    if data_start + end > size:
        raise bad(f"ends at byte {data_start + end}, past the end of the file ({size} bytes)")
    return TensorEntry(tuple(shape), data_start + begin, nbytes, ST_NAMES.get(dtype, dtype))


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """A temp path beside `path` to write the new file at, all or nothing.

    On a clean exit of the block the file is fsynced, renamed onto `path` and the directory
    fsynced: a crash leaves the old file or the new one, never a torn one. On an exception the
    temp file is removed and `path` is left as it was. The temp name is hidden and keeps
    `path`'s suffix (np.savez and mx.save_safetensors append theirs to other names).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Path.write_text, atomically (`atomic_write`)."""
    with atomic_write(Path(path)) as tmp:
        tmp.write_text(text)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez, atomically (`atomic_write`)."""
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


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
    that `listed_in` records (ChecksumError), a readable header, and its format/version
    metadata. Raises FormatError naming the file, with `fix`."""

    if sha256_file(path) != sha256:
        raise ChecksumError(f"{path}: checksum mismatch with {listed_in}, the file is "
                            f"corrupted or was replaced; {fix}")
    try:
        arrays, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
    except Exception as e:  # MLX raises RuntimeError/ValueError for a bad header
        raise FormatError(f"{path}: not a readable safetensors file ({e}); {fix}") from e
    if metadata.get("format") != file_format or metadata.get("version") != version:
        raise FormatError(f"{path}: not an mlx-flash {what} file of version {version} "
                          f"(format {metadata.get('format')!r}, version "
                          f"{metadata.get('version')!r}); {fix}")
    return arrays, metadata
