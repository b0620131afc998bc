"""Baselines and ablations for the benchmark (mlx_flash.bench); not used by `load`.

- `MmapFFN` / `load_mmap`: what llama.cpp does with a model larger than DRAM. The bundle files
  are memory-mapped and every token computes the dense FFN from them with numpy; the OS pages in
  what the matmuls touch and evicts under memory pressure (a cgroup cap), so a model that does
  not fit is re-read from disk every token by page faults. The rest of the model is resident as
  in `load` (the embedding table, when untied, is memory-mapped too).
- `UnbundledStore` + `write_unbundled`: the "no bundling" ablation. The same FFN stored as
  separate matrices (all gate rows, then all up rows, then all down columns, as most checkpoints
  do), so a run of k adjacent neurons costs one read per matrix instead of one read of k bundles.
"""

from __future__ import annotations

import json
import mmap
import os
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..accel import linear as accel_linear
from ..format.arch import ACTIVATION_FNS
from ..format.manifest import (
    RESIDENT,
    FFNLayout,
    LayerEntry,
    Manifest,
    read_layer_rows,
    read_manifest,
)
from ..format.storage import DTYPE_BYTES, NP_STORAGE, tensor_sizes
from ..runtime.backend import choose_backend
from ..runtime.embedding import embedding_tensors, flash_embedding
from ..runtime.loader import assemble, load_tokenizer, pop_out_bias
from ..runtime.store import DIRECT_ALIGN, NeuronStore


class MmapFFN(nn.Module):
    """The dense FFN of one layer computed straight from its memory-mapped bundle file.

    The file is an `(n_neurons, stride)` numpy memmap; gate/up/down are strided column ranges
    of it (`table[:, part.offset:part.offset + d]`), so the weights are never loaded: each call
    walks the table in `chunk`-neuron blocks and the page faults bring in what the OS evicted.
    A block is copied out of the map and computed in `dtype` with MLX (the compute dtype of
    the rest of the model), one block alive at a time, as llama.cpp dequantizes per block.
    Measured on a 2-core box: numpy's f16->f32 conversion and OpenBLAS's threaded gemv were 3x
    and up to 100x slower than MLX here, which would have made the baseline a strawman.
    """

    def __init__(self, path: Path, entry: LayerEntry, layout: FFNLayout,
                 out_bias: mx.array | None = None, chunk: int = 1024,
                 dtype: mx.Dtype = mx.float32, fast=None):
        """fast: the fast CPU path's FFN (cpu.fast_ffn): blocks are then computed by its
        kernel straight from the mapped pages, no copy."""
        super().__init__()
        itemsize = DTYPE_BYTES[layout.dtype]
        # Underscored attributes are not parameters: nothing here is loaded or saved as weights.
        self._table = np.memmap(path, dtype=NP_STORAGE[layout.dtype], mode="r",
                                shape=(entry.n_neurons, entry.stride // itemsize))
        self._layout, self._chunk, self._out_bias = layout, chunk, out_bias
        self._dtype, self._fast = dtype, fast
        self._bytes = np.memmap(path, dtype=np.uint8, mode="r",
                                shape=(entry.n_neurons, entry.stride)) if fast else None
        self.seconds = 0.0  # wall time inside this module (page faults and compute together)

    def _block(self, start: int) -> mx.array:
        """Neurons [start, start + chunk) as (k, elements) in the compute dtype.

        Copying the rows out of the map is what faults their pages in.
        """
        rows = mx.array(self._table[start:start + self._chunk, :self._layout.elements])
        if self._layout.dtype == "bfloat16":
            rows = rows.view(mx.bfloat16)
        return rows.astype(self._dtype)

    def _columns(self, block: mx.array, name: str) -> mx.array:
        part = self._layout.part(name)
        return block[:, part.offset:part.offset + part.count]  # (k, count)

    def dense(self, x: mx.array) -> mx.array:
        """x: (T, d) -> (T, d) float32, the FFN without its output bias (f32 accumulation)."""
        if self._fast is not None:
            x32, y = accel_linear.to_f32_rows(x), None
            for start in range(0, self._bytes.shape[0], self._chunk):
                part = self._fast.over_rows(np.asarray(self._bytes[start:start + self._chunk]),
                                            x32)
                y = part if y is None else y + part
            return mx.array(y)
        layout, act = self._layout, ACTIVATION_FNS[self._layout.activation]
        ins = ["gate", "up"] if layout.kind == "gated" else ["up"]
        names = {p.name for p in layout.parts}
        y = mx.zeros(x.shape, dtype=mx.float32)
        for start in range(0, self._table.shape[0], self._chunk):
            block = self._block(start)
            pre = [x @ self._columns(block, n).T for n in ins]  # each (T, k)
            pre = [p + self._columns(block, f"{n}_bias")[:, 0] if f"{n}_bias" in names else p
                   for p, n in zip(pre, ins, strict=True)]
            h = act(pre[0]) * pre[1] if layout.kind == "gated" else act(pre[0])
            y = y + (h @ self._columns(block, "down")).astype(mx.float32)  # (T, d)
            mx.eval(y)  # bound memory: one block of weights alive at a time
        return y

    def __call__(self, x: mx.array) -> mx.array:
        """x: (B, L, d) -> (B, L, d)."""
        mx.eval(x)  # attention's pending work is not the FFN's: finish it before the clock
        t0 = time.perf_counter()
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = self.dense(x2 if self._fast else x2.astype(self._dtype)).astype(x.dtype)
        if self._out_bias is not None:
            y = y + self._out_bias
        self.seconds += time.perf_counter() - t0
        return y.reshape(shape)


def load_mmap(path: str | Path, dtype: str | mx.Dtype | None = None, chunk: int = 1024,
              fast_cpu: bool | None = False):
    """The mmap baseline: resident weights in DRAM, FFNs (and an untied embedding) mmap'd.

    Returns (model, tokenizer); every `layer.mlp` is an `MmapFFN`. fast_cpu as in `load`
    (None: on when MLX runs on the CPU): the C kernels compute on the mapped pages.
    """
    root = Path(path)
    manifest = read_manifest(root)
    if manifest.per_part:
        raise ValueError(f"{root}: the mmap baseline does not read format-3 bundles (parts at "
                         "their own precision, a quantized mlx_lm source) yet")
    backend = choose_backend(fast_cpu, manifest, dtype)
    untied = "lm_head.weight" in tensor_sizes(root / RESIDENT)

    def mmap_ffn(model: nn.Module, weights: dict[str, mx.array]) -> None:
        for i, layer in enumerate(model.layers):
            entry = manifest.layers[i]
            layer.mlp = MmapFFN(root / entry.file, entry, manifest.ffn,
                                pop_out_bias(weights, manifest, i), chunk, backend.weight_dtype,
                                backend.ffn)
        if untied:  # memory-mapped rows
            model.model.embed_tokens = flash_embedding(root, manifest, backend.compute_dtype)

    skip = embedding_tensors(manifest) if untied else ()
    model, _ = assemble(root, manifest, backend, mmap_ffn, skip)
    return model, load_tokenizer(root, manifest)


UNBUNDLED_MANIFEST = "unbundled.json"


def segments(layout: FFNLayout, stride: int) -> list[tuple[int, int]]:
    """Byte ranges [lo, hi) of a bundle that unbundled storage keeps as separate matrices.

    One per weight part (gate, up, down), plus the rest of the bundle (bias entries and
    padding) when there is any.
    """
    itemsize = DTYPE_BYTES[layout.dtype]
    parts = [p for p in layout.parts if not p.name.endswith("_bias")]
    out = [(p.offset * itemsize, (p.offset + p.count) * itemsize) for p in parts]
    if out[-1][1] < stride:
        out.append((out[-1][1], stride))
    return out


def region_offsets(n_neurons: int, segs: list[tuple[int, int]]) -> list[int]:
    """File offset of each segment's matrix, every one starting on a 4096-byte boundary."""
    offsets, pos = [], 0
    for lo, hi in segs:
        offsets.append(pos)
        pos += -(-(n_neurons * (hi - lo)) // DIRECT_ALIGN) * DIRECT_ALIGN
    return offsets + [pos]  # the last entry is the file size


def write_unbundled(root: str | Path, out: str | Path) -> Path:
    """Write every layer of a flash dir again as separate matrices under `out` (once).

    Returns `out`. Skips the work when `out` already holds a copy of this model (same manifest
    checksums).
    """
    root, out = Path(root), Path(out)
    manifest = read_manifest(root)
    stamp = {"layers": [e.sha256 for e in manifest.layers]}
    marker = out / UNBUNDLED_MANIFEST
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return out
    out.mkdir(parents=True, exist_ok=True)
    for i, entry in enumerate(manifest.layers):
        rows = read_layer_rows(root, manifest, i, file_order=True)  # the store maps ids
        segs = segments(manifest.ffn, entry.stride)
        offsets = region_offsets(entry.n_neurons, segs)
        with open(out / f"layer_{i:03d}.bin", "wb") as f:
            for (lo, hi), offset in zip(segs, offsets, strict=False):
                f.seek(offset)
                f.write(np.ascontiguousarray(rows[:, lo:hi]).tobytes())
            f.truncate(offsets[-1])
    marker.write_text(json.dumps(stamp))
    return out


class UnbundledStore(NeuronStore):
    """A NeuronStore over `write_unbundled` files: one read per matrix per run of neurons.

    Returns the same bundles as NeuronStore (rows reassembled in memory), so it can replace the
    store of a loaded model. `reads` counts every syscall (a run costs len(segments) reads).
    """

    def __init__(self, root: str | Path, manifest: Manifest, unbundled: str | Path, **kwargs):
        super().__init__(root, manifest, **kwargs)
        if self.mode != "pread":
            raise ValueError("UnbundledStore supports mode='pread' only")
        flags = os.O_RDONLY | (os.O_DIRECT if self.direct else 0)
        self._ufds = [os.open(Path(unbundled) / f"layer_{i:03d}.bin", flags)
                      for i in range(len(self.paths))]
        self._segs = [segments(manifest.ffn, s) for s in self.strides]
        self._offsets = [region_offsets(e.n_neurons, g) for e, g in zip(manifest.layers,
                                                                         self._segs, strict=True)]

    def close(self) -> None:
        super().close()
        for fd in self._ufds:
            os.close(fd)
        self._ufds = []

    def read(self, layer: int, ids: np.ndarray, out: np.ndarray | None = None,
             planned: bool = True):
        rows, stats = super().read(layer, ids, out, planned)
        extra = stats.reads * (len(self._segs[layer]) - 1)
        stats.reads += extra
        with self._lock:
            self.stats.reads += extra
        return rows, stats

    def _read_span(self, layer: int, start: int, stop: int, out: np.ndarray) -> int:
        """Neurons [start, stop) into out (k, stride) uint8, one read per segment."""
        total, k = 0, stop - start
        for (lo, hi), base in zip(self._segs[layer], self._offsets[layer], strict=False):
            width = hi - lo
            offset, length = base + start * width, k * width
            a_lo = offset - offset % DIRECT_ALIGN if self.direct else offset
            a_hi = -(-(offset + length) // DIRECT_ALIGN) * DIRECT_ALIGN if self.direct \
                else offset + length
            scratch = mmap.mmap(-1, a_hi - a_lo)  # page aligned, as O_DIRECT needs
            try:
                view = np.frombuffer(scratch, dtype=np.uint8)
                self._pread_all(self._ufds[layer], view, a_lo, layer)
                out[:, lo:hi] = view[offset - a_lo:offset - a_lo + length].reshape(k, width)
                del view
            finally:
                scratch.close()
            total += a_hi - a_lo
        return total

    def _pread_all(self, fd: int, buf: np.ndarray, offset: int, layer: int) -> None:
        mv, done = memoryview(buf), 0
        while done < buf.size:
            got = os.preadv(fd, [mv[done:]], offset + done)
            if got <= 0:
                raise OSError(f"short read of the unbundled copy of layer {layer} at offset "
                              f"{offset + done}: delete the unbundled dir and run again")
            done += got


def use_unbundled(model, root: str | Path, unbundled: str | Path) -> None:
    """Swap a loaded flash model's store for an UnbundledStore over `unbundled`."""
    runtime = model.flash
    old = runtime.store
    new = UnbundledStore(root, runtime.manifest, unbundled, threads=old.threads,
                         direct=old.direct, max_read=old.max_read, max_gap=old.max_gap)
    runtime.store = new
    if getattr(runtime.selector, "store", None) is old:
        runtime.selector.store = new
    old.close()
