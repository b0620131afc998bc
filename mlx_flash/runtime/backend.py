"""CacheBackend: where the neuron caches live and what computes over them, chosen once at load.

- `MlxBackend`: MLX arrays in the compute dtype and `compute.gpu`'s kernels (Metal/CUDA on a
  GPU, the MLX reference on the CPU). The reference path.
- `CpuBackend`: the fast CPU path. numpy buffers holding the raw bundles (16-bit) or their
  unpacked parts (4/8-bit), edited in place, and accel/'s C kernels; weights stay in their
  16-bit storage type, compute is f32.

FlashFFN, pinning, the selectors' scoring, the DRAM plan and the loaders ask the backend;
nothing else branches on the path. Per layer and token FlashFFN makes one backend call per
step (write the new rows, compute over the cache, compute a streamed chunk).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..accel import blocks as accel_blocks
from ..accel import build as accel_build
from ..accel import ffn as accel_ffn
from ..accel import linear as accel_linear
from ..compute.gpu import apply_window_update, compute_ffn
from ..compute.reference import ffn_over_parts, ffn_over_qrows
from ..format.manifest import Manifest
from .cache import NeuronCache
from .config import resolve_dtype
from .rows import cache_buffers, cache_rows, split_bundles
from .selectors.predictor import FastLayerPredictor, LayerPredictor

Arrays = dict[str, object]  # name -> np.ndarray | mx.array | None, the backend's own kind


class CacheBackend:
    """The interface; see the module doc. weight_dtype: what the resident weights and the
    neuron caches are kept in (the DRAM plan's itemsize)."""

    name = "base"
    kv_itemsize: int | None = None  # bytes per KV element when not the weight dtype's
    ffn: accel_ffn.BundleFFN | accel_ffn.QuantBundleFFN | None = None  # CpuBackend's kernels

    def __init__(self, manifest: Manifest, weight_dtype: mx.Dtype):
        self.manifest, self.layout, self.weight_dtype = manifest, manifest.ffn, weight_dtype

    @property
    def compute_dtype(self) -> mx.Dtype:
        """What FlashFFN's input is cast to, and what the embedding rows come out in."""
        raise NotImplementedError

    def chunk_bytes_per_neuron(self) -> int:
        """Bytes a streamed chunk's converted weights take per neuron (the DRAM plan counts
        two chunks of them)."""
        raise NotImplementedError

    def new_cache(self, layer: int, capacity: int, window: int) -> NeuronCache:
        """Layer `layer`'s neuron cache, its buffers allocated now (the plan counts them)."""
        raise NotImplementedError

    def out_bias(self, bias: mx.array | None) -> mx.array | None:
        """The down projection's bias as FlashFFN adds it to the backend's output."""
        return bias

    def write_rows(self, cache: NeuronCache, dst: np.ndarray, src: np.ndarray,
                   slots: np.ndarray, rows: np.ndarray) -> None:
        """A window update: rows of slots `src` move into holes `dst`, then the raw bundle
        rows (k, stride) uint8 go into `slots` (k,)."""
        raise NotImplementedError

    def compute_input(self, x: mx.array) -> object:
        """x (T, d) evaluated -> what `over_rows` takes (made once for several chunks)."""
        return x

    def over_cache(self, cache: NeuronCache, x: mx.array, mask: np.ndarray | None) -> mx.array:
        """The FFN over the cache's live rows: x (T, d), mask (T, n) 0/1 or None -> (T, d)."""
        raise NotImplementedError

    def over_rows(self, rows: np.ndarray, xin: object, mask: np.ndarray | None,
                  cache: NeuronCache, ids: np.ndarray) -> mx.array:
        """The FFN over raw bundle rows (k, stride) of cache's layer read from flash, neurons
        `ids` (k,); xin from `compute_input`, mask (T, k) or None -> (T, d)."""
        raise NotImplementedError

    def predictor_scorer(self, layer: LayerPredictor):
        """What scores x (T, d) f32 -> (T, n) for a trained predictor (`.scores(x)`)."""
        return layer

    def quantized_rows(self, arrays: dict[str, np.ndarray | None]) -> Arrays:
        """Affine-quantized rows (q uint32, scales/biases f32, optional bias) as this backend
        keeps them (the quantized-copy selector)."""
        raise NotImplementedError

    def quantized_matmul(self, rows: Arrays, x: np.ndarray, bits: int,
                         group_size: int) -> np.ndarray:
        """x (T, d) f32 times `quantized_rows` (+ their bias) -> (T, rows) f32 numpy."""
        raise NotImplementedError

    def accelerate(self, model: nn.Module) -> int:
        """Put the rest of a loaded model on this backend; returns the linears swapped."""
        return 0


class MlxBackend(CacheBackend):
    """MLX arrays in the compute dtype (= weight_dtype), `compute.gpu`'s kernels."""

    name = "mlx"

    @property
    def compute_dtype(self) -> mx.Dtype:
        return self.weight_dtype

    def chunk_bytes_per_neuron(self) -> int:
        return self.layout.elements * self.weight_dtype.size

    def new_cache(self, layer: int, capacity: int, window: int) -> NeuronCache:
        layout = self.manifest.layer_layout(layer)
        cache = NeuronCache(self.manifest.layers[layer].n_neurons, capacity, 0,
                            layout.d_model, self.weight_dtype, window,
                            buffers=cache_buffers(layout, self.weight_dtype))
        cache.layer = layer
        mx.eval(*cache.buffers.values())  # allocate now: the budget counts them from load
        return cache

    def write_rows(self, cache: NeuronCache, dst: np.ndarray, src: np.ndarray,
                   slots: np.ndarray, rows: np.ndarray) -> None:
        if not dst.size and not slots.size:  # the usual decode step once warm: nothing moves
            return
        new = cache_rows(rows, self.manifest, self.weight_dtype, cache.layer)
        dst, src, slots = (mx.array(a.astype(np.int32)) for a in (dst, src, slots))
        updated = {name: apply_window_update(buffer, dst, src, slots, new[name])
                   for name, buffer in cache.buffers.items()}
        mx.eval(*updated.values())  # time the row moves here, not in the next compute
        cache.buffers.update(updated)  # only once every buffer's update has run

    def over_cache(self, cache: NeuronCache, x: mx.array, mask: np.ndarray | None) -> mx.array:
        mask = None if mask is None else mx.array(mask)
        layout = self.manifest.layer_layout(cache.layer)
        b = cache.buffers
        if layout.per_part:
            down = cache.down
            group_of = down.group_of(cache.neuron_of[:cache.n]) if down is not None else None
            return ffn_over_parts(x, b, cache.n, layout, group_of,
                                  None if down is None else (down.scales, down.biases), mask,
                                  cache.bias)
        if layout.quantized:
            return ffn_over_qrows(x, b["q"], b["scales"], b["biases"], cache.n, layout,
                                  mask, cache.bias)
        return compute_ffn(x, cache.weights, cache.n, layout.activation, mask, cache.bias)

    def over_rows(self, rows: np.ndarray, xin: mx.array, mask: np.ndarray | None,
                  cache: NeuronCache, ids: np.ndarray) -> mx.array:
        weights, bias = split_bundles(rows, self.manifest, self.weight_dtype, cache.layer, ids,
                                      cache.down)
        return compute_ffn(xin, weights, weights.shape[1], self.layout.activation,
                           None if mask is None else mx.array(mask), bias)

    def quantized_rows(self, arrays: dict[str, np.ndarray | None]) -> Arrays:
        return {k: None if a is None else mx.array(a) for k, a in arrays.items()}

    def quantized_matmul(self, rows: Arrays, x: np.ndarray, bits: int,
                         group_size: int) -> np.ndarray:
        out = mx.quantized_matmul(mx.array(x), rows["q"], rows["scales"], rows["biases"],
                                  transpose=True, group_size=group_size, bits=bits)
        if rows["bias"] is not None:
            out = out + rows["bias"]
        return np.asarray(out)  # evaluates: the ids are needed now


class CpuBackend(CacheBackend):
    """The fast CPU path: numpy cache buffers, accel/'s kernels, f32 compute (weight_dtype is
    the bundles' 16-bit storage type)."""

    name = "cpu"
    kv_itemsize = 4  # the fast linears give f32 keys and values

    def __init__(self, manifest: Manifest, weight_dtype: mx.Dtype):
        super().__init__(manifest, weight_dtype)
        self.ffn = accel_ffn.fast_ffn(self.layout)  # BundleFFN, QuantBundleFFN, PartsBundleFFN
        self.ffns = [accel_ffn.fast_ffn(manifest.layer_layout(i)) if manifest.per_part
                     else self.ffn for i in range(manifest.n_layers)]  # format 3: per layer

    @property
    def compute_dtype(self) -> mx.Dtype:
        return mx.float32

    def chunk_bytes_per_neuron(self) -> int:
        return 0  # the kernels compute streamed chunks from the rows as read

    def new_cache(self, layer: int, capacity: int, window: int) -> NeuronCache:
        entry = self.manifest.layers[layer]
        cache = NeuronCache(entry.n_neurons, capacity, 0, self.layout.d_model, self.weight_dtype,
                            window, buffers=self.ffns[layer].cache_spec(entry.stride),
                            zeros=accel_ffn.numpy_zeros)
        cache.layer = layer
        return cache

    def out_bias(self, bias: mx.array | None) -> mx.array | None:
        return None if bias is None else bias.astype(mx.float32)

    def write_rows(self, cache: NeuronCache, dst: np.ndarray, src: np.ndarray,
                   slots: np.ndarray, rows: np.ndarray) -> None:
        self.ffns[cache.layer].update(cache.buffers, dst, src, slots, rows)  # in place

    def compute_input(self, x: mx.array) -> np.ndarray:
        return accel_linear.to_f32_rows(x)

    def over_cache(self, cache: NeuronCache, x: mx.array, mask: np.ndarray | None) -> mx.array:
        return mx.array(self.ffns[cache.layer].over_cache(cache, accel_linear.to_f32_rows(x),
                                                          mask))

    def over_rows(self, rows: np.ndarray, xin: np.ndarray, mask: np.ndarray | None,
                  cache: NeuronCache, ids: np.ndarray) -> mx.array:
        ffn = self.ffns[cache.layer]
        if isinstance(ffn, accel_ffn.PartsBundleFFN):
            return mx.array(ffn.over_rows(rows, xin, mask, ids, cache.down))
        return mx.array(ffn.over_rows(rows, xin, mask))

    def predictor_scorer(self, layer: LayerPredictor) -> FastLayerPredictor:
        fast = FastLayerPredictor(layer)
        layer.A = layer.B = None  # the f16 copies replace the f32 arrays (the plan counts f32)
        return fast

    def quantized_rows(self, arrays: dict[str, np.ndarray | None]) -> Arrays:
        return dict(arrays)

    def quantized_matmul(self, rows: Arrays, x: np.ndarray, bits: int,
                         group_size: int) -> np.ndarray:
        return accel_build.kernels().linear_q(rows["q"], rows["scales"], rows["biases"], bits,
                                              group_size, x, rows["bias"], exact=True)

    def accelerate(self, model: nn.Module) -> int:
        """Every linear onto the C kernels, then the llama-family blocks onto numpy (no MLX
        graph per layer), in that order."""
        swapped = accel_linear.accelerate(model)
        accel_blocks.install(model)
        return swapped


def uses_cpu_kernels(fast_cpu: bool | None, manifest: Manifest,
                     dtype: str | mx.Dtype | None) -> bool:
    """Whether a `fast_cpu` option (see FlashConfig) takes the fast CPU path for this dir."""
    supported = all(accel_ffn.supports(manifest.layer_layout(i))
                    for i in range(manifest.n_layers))
    if fast_cpu is None and (dtype is not None or not supported):
        return False
    if fast_cpu and manifest.per_part and not supported:
        raise ValueError("fast_cpu computes format-3 bundles (parts at their own precision) "
                         "whose gate/up share 4 or 8 bits and whose down is 4/8-bit; this dir "
                         "has others (e.g. 3- or 6-bit parts of an mlx_lm mixed recipe): load "
                         "without fast_cpu (the MLX path computes them)")
    if fast_cpu and not supported:
        raise ValueError(f"fast_cpu needs 16-bit (or 4/8-bit with 16-bit scales) bundles; this "
                         f"dir stores {manifest.ffn.dtype} (convert with --dtype float16)")
    return accel_build.wanted(fast_cpu)


def choose_backend(fast_cpu: bool | None, manifest: Manifest,
                   dtype: str | mx.Dtype | None) -> CacheBackend:
    """The backend for these options: CpuBackend with weights in the bundles' 16-bit storage
    type, else MlxBackend in the compute dtype `dtype` resolves to."""
    if uses_cpu_kernels(fast_cpu, manifest, dtype):
        return CpuBackend(manifest, getattr(mx, manifest.ffn.dtype))
    return MlxBackend(manifest, resolve_dtype(dtype, manifest.ffn.dtype))
