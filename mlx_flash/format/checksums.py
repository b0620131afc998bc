"""Per-block checksums of a flash dir's files: what lets a reader catch a damaged file when it
reads it, not only `mlx-flash info DIR --verify` (whole-file sha256).

Each layer entry of the manifest and its resident entry carry `blocks = {"algo": "crc32",
"block_size": B, "sums": <base64 of little-endian uint32>}`: the zlib.crc32 of each B-byte block
of the file (the last one shorter). The store checks a layer's blocks as it reads them,
`load_dense` and the loaders every block they read, the resident file whole at load. Small side
files (predictors, drafter) are checked whole by their sha256 at load. Dirs written before
blocks existed load with a warning; `mlx-flash info DIR --verify --write-checksums` adds them.

Why crc32 over ~1 MiB blocks: zlib.crc32 hashes ~6.5 GB/s on one core here (xxh3_64 ~27,
crc32c ~15, sha256 ~2), faster than the disk it guards, from the standard library; the store
verifies a block once per process (the first read touching it) so decode pays nothing after the
first pass, and 1 MiB is the store's largest read (`MAX_READ`), so the table stays small (4
bytes per MiB). A layer file's blocks are whole bundles (`bundle_block_size`: the most that fit
1 MiB) so that the store's streamed chunks, snapped to whole blocks, verify from the rows they
read; 64 KiB blocks were measured slower (per-block Python work). A crc catches damage, not tampering: `--verify`'s sha256 stays the full check.
"""

from __future__ import annotations

import base64
import hashlib
import zlib
from pathlib import Path

import numpy as np

from .errors import FormatError

ALGO = "crc32"


BLOCK_SIZE = 1 << 20


def bundle_block_size(stride: int, target: int = BLOCK_SIZE) -> int:
    """The block size of a layer file: the most whole bundles that fit `target` bytes (at least
    one). Blocks of whole bundles let a streamed chunk of whole blocks (`NeuronStore`'s chunks
    are snapped to them) be verified from the rows it reads, with no block read twice."""
    return stride * max(1, target // stride)


FIX = "re-convert the model (`mlx-flash convert`, or re-pull it with `mlx-flash pull`)"


class ChecksumError(FormatError):
    """A block of a flash dir's file does not match the checksum its manifest records."""


def block_sum(data) -> int:
    """crc32 of one block (any bytes-like object)."""
    return zlib.crc32(data)


def blocks_entry(sums: np.ndarray, block_size: int) -> dict:
    """The manifest's `blocks` value for (n_blocks,) crc32 sums."""
    raw = np.asarray(sums, dtype="<u4").tobytes()
    return {"algo": ALGO, "block_size": block_size,
            "sums": base64.b64encode(raw).decode("ascii")}


def file_checks(path: Path, block_size: int = BLOCK_SIZE) -> tuple[str, dict]:
    """(sha256 hex, blocks entry) of a file, in one pass over it."""
    digest, sums = hashlib.sha256(), []
    with open(path, "rb") as f:
        while block := f.read(block_size):
            digest.update(block)
            sums.append(block_sum(block))
    return digest.hexdigest(), blocks_entry(np.array(sums, dtype=np.uint32), block_size)


class BlockTable:
    """A file's block sums, parsed: `check` one block, `span` its byte range."""

    def __init__(self, path: Path, size: int, entry: dict):
        """entry: the manifest's `blocks` value; size: the file's size the manifest records."""
        self.path, self.size = Path(path), size
        try:
            if entry.get("algo") != ALGO:
                raise ValueError(f"algo {entry.get('algo')!r} is not {ALGO!r}")
            self.block_size = int(entry["block_size"])
            raw = base64.b64decode(entry["sums"], validate=True)
            if self.block_size <= 0 or len(raw) % 4:
                raise ValueError("bad block size or sums length")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise FormatError(f"{path}: unreadable block checksums in the manifest ({e}); "
                              "rewrite them with `mlx-flash info DIR --verify "
                              f"--write-checksums`, or {FIX}") from e
        self.sums = np.frombuffer(raw, dtype="<u4")
        if self.sums.size != -(-size // self.block_size):
            raise FormatError(f"{path}: {self.sums.size} block checksums for {size} bytes in "
                              f"blocks of {self.block_size}; {FIX}")

    @property
    def n_blocks(self) -> int:
        return int(self.sums.size)

    def span(self, block: int) -> tuple[int, int]:
        """[start, stop) bytes of `block`."""
        start = block * self.block_size
        return start, min(start + self.block_size, self.size)

    def blocks_of(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Sorted unique blocks that the byte ranges [s, s + length) touch, starts (k,)."""
        starts = np.asarray(starts, dtype=np.int64)
        first, last = starts // self.block_size, (starts + length - 1) // self.block_size
        if np.all(last - first <= 1):
            return np.unique(np.concatenate([first, last]))
        return np.unique(np.concatenate([np.arange(a, b + 1) for a, b in zip(first, last,
                                                                             strict=True)]))

    def check(self, block: int, data) -> None:
        """Raise ChecksumError naming the file, the block's byte range and the fix unless
        `data` (the block's bytes) matches."""
        start, stop = self.span(block)
        if len(memoryview(data).cast("B")) != stop - start or block_sum(data) != self.sums[block]:
            raise ChecksumError(f"{self.path}: checksum mismatch in block {block} (bytes "
                                f"{start}-{stop}), the file is corrupted; {FIX}")


def check_file(path: Path, size: int, entry: dict | None) -> bool:
    """Check a whole file against its block sums (read once, block by block). Returns False,
    checking nothing, when there are no sums (an old dir); raises ChecksumError on damage."""
    if not entry:
        return False
    table = BlockTable(path, size, entry)
    with open(path, "rb") as f:
        for block in range(table.n_blocks):
            table.check(block, f.read(table.block_size))
    return True


def unverified_message(root: Path) -> str:
    """The warning for a flash dir without block checksums."""
    return (f"{root}: the manifest has no block checksums (made by an older mlx-flash), so "
            "damage is not caught when a file is read; add them with `mlx-flash info "
            f"{root} --verify --write-checksums`")
