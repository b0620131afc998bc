"""NeuronStore: reads neuron bundles of one layer from its bundle file.

The only module that touches `ffn/layer_NNN.bin`. A read of a set of neuron ids:
  1. maps the ids to their positions in the file (a placed dir stores neurons in another order,
     `LayerEntry.order`; callers always speak original ids) and sorts them,
  2. plans the spans to read (`planner.py`): adjacent positions coalesce into one span, and with
     the "cost" planner small gaps are crossed when the disk's cost model says one larger read
     is cheaper than several small ones,
  3. splits spans larger than `max_read` so big requests still spread over the threads,
  4. issues the spans as `os.preadv` calls on a private thread pool (the GIL is released in
     the syscall, so the reads run in parallel),
and returns the bundles as one `(len(ids), stride)` uint8 array in the order of the sorted ids.

With `direct=True` the files are opened with O_DIRECT (page cache bypassed, what a cold SSD
gives): each span is widened to 4096-byte boundaries and read into a page-aligned scratch buffer.
With `mode="mmap"` the files are memory-mapped and rows are copied out (the page cache decides
what stays; the benchmark compares the two).

Every block of a bundle file (format/checksums.py, 1 MiB) is checked the first time this store
reads anything in it: the whole block is read once and its crc32 compared, and a bitmap per file
remembers it, so steady-state decode pays nothing (prefill's whole-layer streaming checks most
blocks on the first prompt). A contiguous read (a streamed chunk) checks the blocks wholly
inside it from the rows it read; the others it touches are read whole for their check first,
then the rows as usual (from the page cache just filled, or with O_DIRECT from the disk again:
first touch only). A mismatch raises ChecksumError naming the file and the block before any of
that read is returned, the block left unverified. A dir without block checksums is read
unchecked.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..format.checksums import BlockTable
from ..format.manifest import Manifest
from ..format.storage import NP_STORAGE
from .disk import CostModel
from .planner import DIRECT_ALIGN, PLANNERS, plan_reads, split_spans

MAX_READ = 1 << 20  # bytes per syscall: larger spans are split so they spread over the threads


class StoreReadError(OSError):
    """A short read or an I/O error on a bundle file."""


@dataclass
class IOStats:
    bytes: int = 0  # bytes read from the files (aligned spans and crossed gaps included)
    reads: int = 0  # syscalls (or mmap row runs)
    seconds: float = 0.0  # wall time inside `read`
    neurons: int = 0
    needed: int = 0  # bytes of the neurons asked for (neurons x stride)

    def add(self, other: IOStats) -> None:
        self.bytes += other.bytes
        self.reads += other.reads
        self.seconds += other.seconds
        self.neurons += other.neurons
        self.needed += other.needed

    @property
    def amplification(self) -> float:
        """Bytes read / bytes needed (1.0 when nothing was read)."""
        return self.bytes / self.needed if self.needed else 1.0


class NeuronStore:
    """Parallel reads of neuron bundles from a flash model dir.

    Use as a context manager (or call close()): it owns file descriptors and a thread pool.
    """

    def __init__(self, root: str | Path, manifest: Manifest, *, threads: int = 8,
                 direct: bool = False, mode: str = "pread", max_read: int = MAX_READ,
                 max_gap: int = 0, planner: str = "runs", cost: CostModel | None = None):
        """planner: "neuron", "runs" (crossing gaps of up to max_gap) or "cost" (gaps chosen by
        the disk cost model `cost`, see planner.py)."""
        if mode not in ("pread", "mmap"):
            raise ValueError(f"store mode must be 'pread' or 'mmap', got {mode!r}")
        if planner not in PLANNERS:
            raise ValueError(f"read planner must be one of {PLANNERS}, got {planner!r}")
        if planner == "cost" and cost is None:
            raise ValueError("the 'cost' read planner needs a disk cost model (cost=...)")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if direct and not hasattr(os, "O_DIRECT"):
            raise ValueError("direct=True needs O_DIRECT, which this OS does not have "
                             "(on macOS use direct=False; F_NOCACHE is not wired up yet)")
        self.root, self.manifest = Path(root), manifest
        self.threads, self.direct, self.mode = threads, direct, mode
        self.max_read, self.max_gap = max_read, max_gap
        self.planner, self.cost = planner, cost
        self.orders = [manifest.order(i) for i in range(manifest.n_layers)]
        self.positions = [None if o is None else np.argsort(o).astype(np.int32)
                          for o in self.orders]
        self.paths = [self.root / entry.file for entry in manifest.layers]
        self.strides = [entry.stride for entry in manifest.layers]
        self.sizes = [entry.size for entry in manifest.layers]
        # The block tables first: a damaged one raises before any file is opened.
        self.tables = [BlockTable(p, e.size, e.blocks) if e.blocks else None
                       for p, e in zip(self.paths, manifest.layers, strict=True)]
        flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
        self._fds: list[int] = []
        try:
            for p in self.paths:
                self._fds.append(os.open(p, flags))
        except BaseException:  # e.g. a file that vanished: close the ones already open
            for fd in self._fds:
                os.close(fd)
            raise
        self._maps: list[mmap.mmap | None] = [None] * len(self.paths)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="neuron-read")
        self._lock = threading.Lock()
        self._scratch = threading.local()  # per reading thread: O_DIRECT's aligned buffer
        self.stats = IOStats()
        self.verified = [np.zeros(t.n_blocks if t else 0, dtype=bool) for t in self.tables]
        self._all_verified = [t is None for t in self.tables]
        self.blocks_checked = 0  # blocks read and hashed (each once per store)

    # -- lifecycle

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for m in self._maps:
            if m is not None:
                m.close()
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __enter__(self) -> NeuronStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reads

    def read(self, layer: int, ids: np.ndarray, out: np.ndarray | None = None,
             planned: bool = True) -> tuple[np.ndarray, IOStats]:
        """Bundles of `ids` (original ids, any order, unique) of one layer.

        Returns (rows, stats): rows is (k, stride) uint8 in ascending id order, stats the I/O
        of this call (also added to `self.stats`). out: a reused uint8 buffer of at least
        k * stride bytes to read into (rows is then a view of it); a fresh array otherwise.
        planned=False: the ids fill one contiguous range of the file (a `layer_chunks` piece),
        read as one span whatever the planner (streaming, like `iter_layer`).
        """
        if len(ids) == 0:  # the usual decode step once every active neuron is cached
            return np.empty((0, self.strides[layer]), dtype=np.uint8), IOStats()
        t0 = time.perf_counter()
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        n = self.manifest.layers[layer].n_neurons
        if ids.size and (ids[0] < 0 or ids[-1] >= n):
            raise IndexError(f"neuron ids out of range [0, {n}) for layer {layer}")
        rows = rows_in(out, ids.size, self.strides[layer])
        if self.positions[layer] is None:
            stats = self._read_positions(layer, ids, rows, planned)
        else:
            pos = self.positions[layer][ids]
            by_pos = np.argsort(pos)
            got = np.empty_like(rows)
            stats = self._read_positions(layer, pos[by_pos], got, planned)
            rows[by_pos] = got
        stats.seconds = time.perf_counter() - t0
        with self._lock:
            self.stats.add(stats)
        return rows, stats

    def iter_layer(self, layer: int, chunk: int):
        """Stream a whole layer in file order, `chunk` neurons per step (prefill, the oracle).

        Yields (ids, rows, stats): ids (k,) the original ids of rows (k, stride).
        """
        n, chunk = self.manifest.layers[layer].n_neurons, self.whole_blocks(layer, chunk)
        for start in range(0, n, chunk):
            t0 = time.perf_counter()
            pos = np.arange(start, min(n, start + chunk))
            rows = np.empty((pos.size, self.strides[layer]), dtype=np.uint8)
            stats = self._read_positions(layer, pos, rows, planned=False)  # one span
            stats.seconds = time.perf_counter() - t0
            with self._lock:
                self.stats.add(stats)
            order = self.orders[layer]
            yield (pos if order is None else order[pos]), rows, stats

    def layer_chunks(self, layer: int, chunk: int) -> list[np.ndarray]:
        """A whole layer as pieces of `chunk` neurons in file order, each one contiguous read:
        original ids, ascending within a piece (the order `read` returns rows in)."""
        n, order = self.manifest.layers[layer].n_neurons, self.orders[layer]
        chunk = self.whole_blocks(layer, chunk)
        return [np.arange(s, min(n, s + chunk)) if order is None else np.sort(order[s:s + chunk])
                for s in range(0, n, chunk)]

    def whole_blocks(self, layer: int, chunk: int) -> int:
        """`chunk` neurons rounded down to whole checksum blocks, where the layer's blocks are
        whole bundles (what convert writes): a streamed chunk then verifies its blocks from the
        rows it reads, and no block is read twice. Never more than `chunk` (the DRAM plan
        sized the chunk buffers for it); unchanged without block checksums."""
        table, stride = self.tables[layer], self.strides[layer]
        if table is None or table.block_size % stride:
            return chunk
        per_block = table.block_size // stride
        return chunk // per_block * per_block if chunk >= per_block else chunk

    def plan(self, layer: int, pos: np.ndarray):
        """The spans this store reads for sorted unique file positions (see planner.py)."""
        return plan_reads(pos, self.strides[layer], self.planner, self.cost,
                          threads=self.threads, direct=self.direct, max_read=self.max_read,
                          max_gap=self.max_gap)

    def _read_positions(self, layer: int, pos: np.ndarray, rows: np.ndarray,
                        planned: bool = True) -> IOStats:
        """Read the rows at sorted unique file positions `pos` into rows (k, stride), in that
        order; the stats' seconds are left 0.

        planned=False: pos is one contiguous range, read as such whatever the planner."""
        stride = self.strides[layer]
        if not planned and pos.size and pos[-1] - pos[0] + 1 != pos.size:
            raise ValueError(f"an unplanned read must be one contiguous range of file positions "
                             f"(layer {layer}: {pos.size} neurons over [{pos[0]}, {pos[-1]}])")
        spans = (self.plan(layer, pos).spans if planned or not pos.size
                 else [(int(pos[0]), int(pos[-1]) + 1)])
        spans = split_spans(spans, max(1, self.max_read // stride))
        inner = (self._verify(layer, pos) if not self._all_verified[layer] and pos.size
                 else None)
        if self.mode == "mmap":
            nbytes = self._read_mmap(layer, pos, rows)
        else:
            nbytes = self._read_pread(layer, pos, rows, spans)
        if inner is not None and inner.size:
            self._verify_rows(layer, inner, int(pos[0]) * stride, rows)
        return IOStats(nbytes, len(spans), 0.0, int(pos.size), int(pos.size) * stride)

    def _verify(self, layer: int, pos: np.ndarray) -> np.ndarray:
        """Check the not yet verified blocks the rows at file positions `pos` touch, each read
        whole on the pool, then mark them. Raises ChecksumError (nothing marked) on a mismatch.

        Returns the blocks left for `_verify_rows`: when pos is one contiguous range (prefill's
        streaming), the blocks lying wholly inside it are checked from the rows it reads, so
        they cost no second read; only the two at its edges are read here."""
        table, stride = self.tables[layer], self.strides[layer]
        if table.block_size % stride == 0:  # whole-bundle blocks: each row lies in one block
            blocks = pos // (table.block_size // stride)  # pos is sorted: so are its blocks
            blocks = blocks[np.r_[True, blocks[1:] != blocks[:-1]]]
        else:
            blocks = table.blocks_of(pos.astype(np.int64) * stride, stride)
        todo = blocks[~self.verified[layer][blocks]]
        inner = todo[:0]
        if todo.size and pos[-1] - pos[0] + 1 == pos.size:
            lo, hi = int(pos[0]) * stride, (int(pos[-1]) + 1) * stride
            start = todo * table.block_size
            within = (start >= lo) & (np.minimum(start + table.block_size, table.size) <= hi)
            inner, todo = todo[within], todo[~within]
        if todo.size:
            list(self._pool.map(self._check_block, [(layer, int(b)) for b in todo]))
            self._mark(layer, todo)
        return inner

    def _verify_rows(self, layer: int, blocks: np.ndarray, offset: int, rows: np.ndarray
                     ) -> None:
        """Check `blocks` against the bytes just read into rows (which start at file byte
        `offset`; every block lies inside them), then mark them; ChecksumError on a mismatch."""
        table, flat = self.tables[layer], rows.reshape(-1)

        def check(block: int) -> None:
            start, stop = table.span(block)
            table.check(block, flat[start - offset:stop - offset])

        list(self._pool.map(check, blocks.tolist()))
        self._mark(layer, blocks)

    def _mark(self, layer: int, blocks: np.ndarray) -> None:
        done = self.verified[layer]
        with self._lock:
            done[blocks] = True
            self.blocks_checked += int(blocks.size)
            self._all_verified[layer] = bool(done.all())

    def _check_block(self, job: tuple[int, int]) -> None:
        layer, block = job
        table = self.tables[layer]
        start, stop = table.span(block)
        if self.mode == "mmap":
            table.check(block, self._map(layer, stop)[start:stop])
        else:
            table.check(block, self._read_aligned(layer, start, stop - start))

    def _read_pread(self, layer, pos, rows, spans) -> int:
        """Issue one preadv per span on the pool; rows are filled in place."""
        if sum(e - s for s, e in spans) != pos.size:  # gaps crossed: read, then pick rows
            return self._read_with_gaps(layer, pos, rows, spans)
        # Spans cover exactly the sorted positions: each reads straight into its rows.
        first_row = np.searchsorted(pos, [s for s, _ in spans]).tolist()
        jobs = [(layer, s, e, rows[r:r + (e - s)]) for (s, e), r in zip(spans, first_row,
                                                                         strict=True)]
        return sum(self._pool.map(self._read_span_job, jobs))

    def _read_with_gaps(self, layer, pos, rows, spans) -> int:
        stride = self.strides[layer]
        bufs = [np.empty((e - s, stride), dtype=np.uint8) for s, e in spans]
        jobs = [(layer, s, e, buf) for (s, e), buf in zip(spans, bufs, strict=True)]
        nbytes = sum(self._pool.map(self._read_span_job, jobs))
        for (s, e), buf in zip(spans, bufs, strict=True):
            lo, hi = np.searchsorted(pos, [s, e])
            rows[lo:hi] = buf[pos[lo:hi] - s]
        return nbytes

    def _read_span_job(self, job) -> int:
        layer, start, stop, out = job
        return self._read_span(layer, start, stop, out)

    def _read_span(self, layer: int, start: int, stop: int, out: np.ndarray) -> int:
        """Read neurons [start, stop) into out: (stop - start, stride) uint8. Returns bytes read."""
        stride, fd = self.strides[layer], self._fds[layer]
        offset, length = start * stride, (stop - start) * stride
        if not self.direct:
            self._preadv_exact(fd, out, offset, length, layer)
            return length
        out.reshape(-1)[:] = self._read_aligned(layer, offset, length)
        return self._aligned_span(layer, offset, length)[1]

    def _aligned_span(self, layer: int, offset: int, length: int) -> tuple[int, int]:
        """(start, bytes) of the 4096-aligned span around [offset, offset + length)."""
        lo = offset - offset % DIRECT_ALIGN
        hi = min(-(-(offset + length) // DIRECT_ALIGN) * DIRECT_ALIGN,
                 -(-self.sizes[layer] // DIRECT_ALIGN) * DIRECT_ALIGN)
        return lo, hi - lo

    def _read_aligned(self, layer: int, offset: int, length: int) -> np.ndarray:
        """Bytes [offset, offset + length) of the layer's file, read as the aligned span
        around them into this thread's scratch (valid until its next read): O_DIRECT's way."""
        lo, request = self._aligned_span(layer, offset, length)
        view = self._direct_scratch(request)
        want = min(lo + request, self.sizes[layer]) - lo  # the file's tail is not a full page
        self._preadv_exact(self._fds[layer], view, lo, want, layer, request=request)
        return view[offset - lo:offset - lo + length]

    def _direct_scratch(self, size: int) -> np.ndarray:
        """This thread's page-aligned buffer for O_DIRECT reads, kept between reads (a fresh
        map per read cost a page fault and a zeroed page per 4 KiB read)."""
        held = getattr(self._scratch, "map", None)
        if held is None or len(held) < size:
            if held is not None:
                held.close()
            held = self._scratch.map = mmap.mmap(-1, max(size, self.max_read + 2 * DIRECT_ALIGN))
        return np.frombuffer(held, dtype=np.uint8, count=size)

    def _preadv_exact(self, fd, buf: np.ndarray, offset: int, want: int, layer: int,
                      request: int | None = None) -> None:
        """preadv until `want` bytes are in buf; raise naming file and offset otherwise."""
        mv = memoryview(buf.reshape(-1))[: request or want]
        done = 0
        while done < want:
            try:
                got = os.preadv(fd, [mv[done:]], offset + done)
            except OSError as e:
                raise StoreReadError(e.errno, f"read of {self.paths[layer]} at offset "
                                     f"{offset + done} failed: {e.strerror}") from e
            if got <= 0:
                raise StoreReadError(f"short read of {self.paths[layer]} at offset "
                                     f"{offset + done}: wanted {want - done} more bytes, file "
                                     "ended (truncated bundle file? re-convert the model)")
            done += got

    def _map(self, layer: int, end: int) -> mmap.mmap:
        """The layer's file mapped, its size checked (fstat) to hold bytes [0, end) now.

        Touching a mapping past its file's end is a SIGBUS: a file truncated while loaded
        raises StoreReadError here instead (only a truncation racing this check can fault).
        A mapping made while the file was shorter is made again."""
        size = os.fstat(self._fds[layer]).st_size
        if size < end:
            raise StoreReadError(f"read of {self.paths[layer]} up to offset {end} failed: the "
                                 f"file is {size} bytes, the manifest says {self.sizes[layer]} "
                                 "(truncated bundle file? re-convert the model)")
        with self._lock:
            held = self._maps[layer]
            if held is None or len(held) < end:  # an old map is closed when its views go
                held = self._maps[layer] = mmap.mmap(self._fds[layer], 0, prot=mmap.PROT_READ)
        return held

    def _read_mmap(self, layer: int, ids: np.ndarray, rows: np.ndarray) -> int:
        """Copy the rows at sorted file positions `ids` out of the mapping."""
        stride = self.strides[layer]
        held = self._map(layer, (int(ids[-1]) + 1) * stride if ids.size else 0)
        table = np.frombuffer(held, dtype=np.uint8, count=len(held) // stride * stride)
        np.take(table.reshape(-1, stride), ids, axis=0, out=rows)
        return int(ids.size) * stride


def supports_direct(path: str | Path) -> bool:
    """Whether `path` can be opened with O_DIRECT (tmpfs and some FUSE filesystems refuse)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


def rows_in(out: np.ndarray | None, k: int, stride: int) -> np.ndarray:
    """A (k, stride) uint8 array: a view of the start of `out`, or a fresh one if out is None."""
    if out is None:
        return np.empty((k, stride), dtype=np.uint8)
    if out.dtype != np.uint8 or not out.flags.c_contiguous or out.size < k * stride:
        raise ValueError(f"read buffer must be C-contiguous uint8 of at least {k * stride} "
                         f"bytes, got {out.dtype} {out.shape}")
    return out.reshape(-1)[: k * stride].reshape(k, stride)


def bundles_as(rows: np.ndarray, manifest: Manifest) -> np.ndarray:
    """View raw rows (k, stride) uint8 as (k, stride / itemsize) of the storage dtype.

    bfloat16 comes back as uint16 bits (numpy has no bfloat16).
    """
    return rows.view(NP_STORAGE[manifest.ffn.dtype])


class ReadAhead:
    """Reads the chunks the runtime expects to need next on a background thread, so the disk
    works while the previous chunk is computed (at most `depth` chunks in flight or waiting).

    The runtime announces chunks in the order it will ask for them (`expect`) and then asks
    (`read`). A read of an announced chunk waits for its background read; the chunks announced
    before it were wrong guesses: they are dropped and their bytes counted in `wasted` (they
    were read all the same). A read nobody announced drops every announced chunk and is issued
    directly. The runtime announces the chunk it reads next too, so `depth` counts it.

    Chunks are read into `depth + 1` preallocated buffers of `chunk` neurons, reused: fresh
    buffers cost a page fault per 4 KiB, which on a 2-core machine streaming ~550 MB per token
    was more system time than the reads. So the rows `read` returns stay valid only until the
    next `read`. Used from one thread (the runtime's); only the reads run on the reader.
    """

    def __init__(self, store: NeuronStore, depth: int, chunk: int):
        if depth < 1:
            raise ValueError(f"read-ahead depth must be >= 1, got {depth}")
        self.store, self.depth, self.chunk = store, depth, chunk
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead")
        self._queue: deque[tuple[int, np.ndarray, np.ndarray, Future]] = deque()
        size = chunk * max(store.strides)
        self._free = [np.ones(size, dtype=np.uint8) for _ in range(depth + 1)]  # pages touched
        self._lent: np.ndarray | None = None  # the buffer of the rows last returned
        self.wasted = IOStats()  # announced, read, not asked for (see take_wasted)

    def expect(self, layer: int, ids: np.ndarray, planned: bool = True) -> None:
        """Start reading `ids` of `layer` unless already announced or `depth` are in flight
        (`planned` as in `NeuronStore.read`)."""
        if (len(self._queue) >= self.depth or ids.size > self.chunk
                or any(q_layer == layer and np.array_equal(q_ids, ids)
                       for q_layer, q_ids, _, _ in self._queue)):
            return
        buf = self._free.pop()
        self._queue.append((layer, ids, buf,
                            self._pool.submit(self.store.read, layer, ids, buf, planned)))

    def read(self, layer: int, ids: np.ndarray, planned: bool = True
             ) -> tuple[np.ndarray, IOStats]:
        """Like `NeuronStore.read`; stats.seconds is the time this call waited."""
        self._give_back()
        match = next((i for i, (q_layer, q_ids, _, _) in enumerate(self._queue)
                      if q_layer == layer and np.array_equal(q_ids, ids)), None)
        if match is None:  # the run left the announced order: none of it is to be trusted
            self.clear()
            return self.store.read(layer, ids, planned=planned)
        for _ in range(match):  # announced before this one and skipped: wrong guesses
            self._drop(self._queue.popleft())
        _, _, self._lent, future = self._queue.popleft()
        t0 = time.perf_counter()
        try:
            rows, stats = future.result()
        except BaseException:  # the caller gets the error; no guess read beside it is kept
            self._give_back()
            self.clear()
            raise
        stats.seconds = time.perf_counter() - t0
        return rows, stats

    def take_wasted(self) -> IOStats:
        """The wasted reads counted since the last call."""
        out, self.wasted = self.wasted, IOStats()
        return out

    def clear(self) -> None:
        """Drop every announced chunk (their bytes count as wasted)."""
        while self._queue:
            self._drop(self._queue.popleft())

    def close(self) -> None:
        self.clear()
        self._pool.shutdown(wait=True)

    def _give_back(self) -> None:
        if self._lent is not None:
            self._free.append(self._lent)
            self._lent = None

    def _drop(self, entry: tuple[int, np.ndarray, np.ndarray, Future]) -> None:
        """Forget an announced chunk; its buffer is free once its read has ended."""
        *_, buf, future = entry
        if future.cancel():
            self._free.append(buf)
            return
        try:
            self.wasted.add(future.result()[1])  # running: wait, its buffer is being written
        except Exception:  # OSError, ChecksumError...: the buffer must come back all the same
            pass  # a wrong guess that failed: the read that is wanted reports its own errors
        self._free.append(buf)
