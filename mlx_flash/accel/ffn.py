"""The FFN over raw bundles on the fast CPU path (16-bit and quantized)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..format.bundles import unpack_bundles, unpack_pieces
from ..format.manifest import FFNLayout
from ..format.storage import to_f32
from .build import kernels
from .kernels import DT_CODES, TableSegments


def window_update_numpy(buffer: np.ndarray, dst: np.ndarray, src: np.ndarray,
                        slots: np.ndarray, rows: np.ndarray) -> None:
    """`compute.reference.window_update` in place on a numpy buffer: swap-delete, then append-insert."""
    if dst.size:
        buffer[:, dst] = buffer[:, src]
    if slots.size:
        buffer[:, slots] = rows


def unchanged(dst: np.ndarray, slots: np.ndarray) -> bool:
    """A window update that moves and writes nothing (every decode step once the cache holds
    every active neuron: unpacking its empty rows cost ~0.3 ms a layer)."""
    return not dst.size and not slots.size


def update_buffers(buffers: dict[str, np.ndarray], dst: np.ndarray, src: np.ndarray,
                   slots: np.ndarray, new: dict[str, np.ndarray]) -> None:
    """`window_update_numpy` of every buffer, its new rows new[name]."""
    for name, buffer in buffers.items():
        window_update_numpy(buffer, dst, src, slots, new[name])


class BundleFFN:
    """The fast path's FFN over 16-bit bundles. The cache buffer is (capacity, stride) bytes,
    each slot a bundle exactly as read from flash (gate | up | down | biases, see
    format/manifest.py): the window update moves whole bundles and the kernel reads each neuron
    from one place."""

    def __init__(self, layout: FFNLayout):
        self.d, self.parts = layout.d_model, len(layout.matrix_names)
        self.dtype, self.activation = layout.dtype, layout.activation
        self.bias_offsets = [p.offset for p in layout.parts if p.name.endswith("_bias")]

    def cache_spec(self, stride: int) -> dict[str, tuple[int, int, mx.Dtype]]:
        """NeuronCache buffers (name -> (parts, width, dtype)) for bundles of `stride` bytes."""
        return {"bundles": (1, stride, mx.uint8)}

    def update(self, buffers: dict[str, np.ndarray], dst: np.ndarray, src: np.ndarray,
               slots: np.ndarray, rows: np.ndarray) -> None:
        """A window update in place (see `window_update_numpy`); rows: the new neurons'
        bundles (k, stride) for `slots`."""
        if not unchanged(dst, slots):
            window_update_numpy(buffers["bundles"], dst, src, slots, rows[None])

    def over_cache(self, cache, x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        return self.over_rows(cache.buffers["bundles"][0], x, mask, cache.n)

    def over_rows(self, bundles: np.ndarray, x: np.ndarray, mask: np.ndarray | None = None,
                  n: int | None = None) -> np.ndarray:
        """bundles: (k, stride) uint8; x: (T, d) f32 -> (T, d) f32 over bundles [0, n or k)."""
        n = bundles.shape[0] if n is None else n
        elems = bundles.view(np.uint16)
        in_bias = None
        if self.bias_offsets and n:
            in_bias = to_f32(elems[:n, self.bias_offsets], self.dtype).T
        return kernels().ffn16(elems, (self.d, elems.shape[1]), self.parts, n, self.d,
                               self.dtype, x, self.activation, mask, in_bias)


class QuantBundleFFN:
    """The fast path's FFN over 4/8-bit bundles: the cache keeps the unpacked parts as numpy
    buffers like the MLX path's ("q" uint32, "scales"/"biases" 16-bit, "bias" f32) and `ffnq`
    decodes the rows in registers."""

    def __init__(self, layout: FFNLayout):
        self.layout = layout
        self.dtype, self.activation = layout.dtype, layout.activation
        self.bits, self.group_size = layout.bits, layout.group_size

    def cache_spec(self, stride: int) -> dict[str, tuple[int, int, mx.Dtype]]:
        layout = self.layout
        parts, groups = len(layout.matrix_names), layout.d_model // layout.group_size
        spec = {"q": (parts, layout.d_model * layout.bits // 32, mx.uint32),
                "scales": (parts, groups, mx.uint16), "biases": (parts, groups, mx.uint16)}
        if layout.bias_names:
            spec["bias"] = (len(layout.bias_names), 1, mx.float32)
        return spec

    def _unpack(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        parts = unpack_bundles(rows, self.layout)
        out = {k: np.ascontiguousarray(parts[k]).view(np.uint16 if k != "q" else np.uint32)
               for k in ("q", "scales", "biases")}
        if "bias" in parts:
            out["bias"] = to_f32(parts["bias"], self.dtype)[:, :, None]
        return out

    def update(self, buffers: dict[str, np.ndarray], dst: np.ndarray, src: np.ndarray,
               slots: np.ndarray, rows: np.ndarray) -> None:
        if not unchanged(dst, slots):
            update_buffers(buffers, dst, src, slots, self._unpack(rows))

    def over_cache(self, cache, x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        return self._ffn(cache.buffers, cache.n, x, mask)

    def over_rows(self, rows: np.ndarray, x: np.ndarray, mask: np.ndarray | None = None,
                  n: int | None = None) -> np.ndarray:
        return self._ffn(self._unpack(rows), rows.shape[0] if n is None else n, x, mask)

    def _ffn(self, b: dict[str, np.ndarray], n: int, x: np.ndarray,
             mask: np.ndarray | None) -> np.ndarray:
        in_bias = np.ascontiguousarray(b["bias"][:, :, 0]) if "bias" in b else None
        return kernels().ffnq(b["q"], b["scales"], b["biases"], self.dtype, n, self.bits,
                              self.group_size, x, self.activation, mask, in_bias)


class PartsBundleFFN:
    """The fast path's FFN over a format-3 layer (`ffnp`): the cache keeps each bundle piece in
    its own numpy buffer ("gate.q", "gate.scales", ..., "down.q"; 16-bit floats as uint16 bits,
    "bias" f32), and the down columns are decoded with the layer's table (`cache.down`, a
    rows.DownTable)."""

    def __init__(self, layout: FFNLayout):
        self.layout, self.dtype, self.activation = layout, layout.dtype, layout.activation
        names = layout.matrix_names
        self.first = layout.part_quant(names[0])
        self.bits_down = layout.part_quant(names[-1]).bits
        self._segments: tuple[np.ndarray, TableSegments] | None = None  # see _table_segments
        self._views: tuple[dict, dict[str, np.ndarray]] | None = None  # see _rows

    def cache_spec(self, stride: int) -> dict[str, tuple[int, int, mx.Dtype]]:
        layout = self.layout
        spec = {name: (1, count, mx.uint32 if storage == "uint32" else mx.uint16)
                for name, storage, count in layout.segments() if name not in layout.bias_names}
        if layout.bias_names:
            spec["bias"] = (len(layout.bias_names), 1, mx.float32)
        return spec

    def _unpack(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        pieces = unpack_pieces(rows, self.layout)
        out = {k: v.view(np.uint32 if v.dtype == np.uint32 else np.uint16)[None]
               for k, v in pieces.items() if k not in self.layout.bias_names}
        if self.layout.bias_names:
            out["bias"] = np.stack([to_f32(pieces[b], self.dtype)
                                    for b in self.layout.bias_names])
        return out

    def update(self, buffers: dict[str, np.ndarray], dst: np.ndarray, src: np.ndarray,
               slots: np.ndarray, rows: np.ndarray) -> None:
        if not unchanged(dst, slots):
            update_buffers(buffers, dst, src, slots, self._unpack(rows))

    def over_cache(self, cache, x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        return self._ffn(cache.buffers, cache.n, cache.neuron_of[:cache.n], cache.down, x, mask,
                         cached=True)

    def over_rows(self, rows: np.ndarray, x: np.ndarray, mask: np.ndarray | None, ids: np.ndarray,
                  down) -> np.ndarray:
        return self._ffn(self._unpack(rows), len(rows), ids, down, x, mask)

    def _ffn(self, b: dict[str, np.ndarray], n: int, ids: np.ndarray, down, x: np.ndarray,
             mask: np.ndarray | None, cached: bool = False) -> np.ndarray:
        rows = self._rows(b) if cached else {k: v[0] for k, v in b.items() if k != "bias"}
        in_bias = np.ascontiguousarray(b["bias"][:, :, 0]) if "bias" in b else None
        if down.host is None:
            down.host = host_table(down.scales, down.biases)
        scales, biases, zero = down.host
        segments = self._table_segments(ids, down.group_size) if cached else \
            TableSegments(np.asarray(ids) // down.group_size)
        return kernels().ffnp(rows, (scales, biases), segments, self.dtype, n,
                              self.first.bits, self.first.group_size, self.bits_down, x,
                              self.activation, mask, in_bias, table_zero=zero)

    def _rows(self, b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The cache buffers' (capacity, width) views, the same objects every call (so the
        kernels' address cache knows them; new views each call cost ~20 us apiece there)."""
        kept = self._views
        buffers = [(k, v) for k, v in b.items() if k != "bias"]
        if kept is None or kept[0] is not b or len(kept[1]) != len(buffers) or any(
                k not in kept[1] or kept[1][k].base is not v for k, v in buffers):
            kept = self._views = (b, {k: v[0] for k, v in buffers})
        return kept[1]

    def _table_segments(self, ids: np.ndarray, group_size: int) -> TableSegments:
        """The cache's slots in table-row order, kept while its neurons (ids, the slots'
        neuron ids) stay as they were: once every neuron is cached they never change."""
        kept = self._segments
        if kept is None or not np.array_equal(kept[0], ids):
            kept = self._segments = (np.array(ids), TableSegments(np.asarray(ids) // group_size))
        return kept[1]


def table_bits(a: mx.array) -> np.ndarray:
    """A 16-bit MLX table -> a zero-copy numpy uint16 view of its bits."""
    return np.asarray(a.view(mx.uint16))


def host_table(scales: mx.array, biases: mx.array) -> tuple[np.ndarray, np.ndarray | None, float]:
    """A down table as ffnp takes it: (scales bits, biases bits or None, zero). A symmetric
    table (`table_zero_point`) drops its biases: ffnp then never reads them."""
    zero = table_zero_point(scales, biases)
    return table_bits(scales), None if zero is not None else table_bits(biases), zero or 0.0


def table_zero_point(scales: mx.array, biases: mx.array) -> float | None:
    """z where biases == -z * scales exactly in every entry (a symmetric format carried along
    the neurons: a GGUF's Q6_K down has z = 32), else None. scales, biases (groups, d)."""
    s = np.asarray(scales.astype(mx.float32))
    b = np.asarray(biases.astype(mx.float32))
    at = np.flatnonzero(s)
    if not at.size or not np.isfinite(s).all():
        return None
    zero = float(-b.flat[at[0]] / s.flat[at[0]])
    return zero if np.array_equal(b, np.float32(-zero) * s) else None


def fast_ffn(layout: FFNLayout) -> BundleFFN | QuantBundleFFN | PartsBundleFFN:
    """The fast path's FFN for this bundle layout."""
    if not supports(layout):
        raise ValueError(f"the fast CPU FFN needs 16-bit storage (format 3: 4/8-bit gate and up "
                         f"along d_model, a 4/8-bit down along the neurons), got {layout}")
    if layout.per_part:
        return PartsBundleFFN(layout)
    return QuantBundleFFN(layout) if layout.quantized else BundleFFN(layout)


def supports(layout: FFNLayout) -> bool:
    """16-bit bundles, 4/8-bit ones with 16-bit scales, or format-3 ones whose gate/up rows
    share 4 or 8 bits along d_model and whose down is 4/8-bit along the neurons."""
    if layout.dtype not in DT_CODES:
        return False
    if not layout.per_part:
        return True
    names = layout.matrix_names
    ins = {layout.part_quant(m) for m in names[:-1]}
    down = layout.part_quant(names[-1])
    (first,) = ins if len(ins) == 1 else (None,)
    return (first is not None and first.bits in (4, 8) and first.axis == "d_model"
            and down.bits in (4, 8) and down.axis == "neurons")


_NP_DTYPES = {mx.uint8: np.uint8, mx.uint16: np.uint16, mx.uint32: np.uint32,
              mx.float32: np.float32}


def numpy_zeros(shape: tuple[int, ...], dtype: mx.Dtype) -> np.ndarray:
    """A zeroed numpy cache buffer, its pages touched now (the budget counts them from load)."""
    buffer = np.zeros(shape, dtype=_NP_DTYPES[dtype])
    buffer.fill(0)
    return buffer
