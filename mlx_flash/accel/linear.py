"""Fast linears and embeddings: nn.Linear / nn.QuantizedLinear replaced by the C kernels on their
storage-typed weights."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .build import kernels

FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
HEAD_BLOCK = 8192  # output rows a deferred head dequantizes at once when it is evaluated
_DEFER_HEADS = contextvars.ContextVar("mlx_flash_defer_heads", default=False)


def storage_view(a: mx.array) -> tuple[np.ndarray, str]:
    """A 16-bit MLX array as (uint16 numpy array, "float16" | "bfloat16"), zero-copy."""
    if a.dtype == mx.float16:
        return np.asarray(a).view(np.uint16), "float16"
    if a.dtype == mx.bfloat16:
        return np.asarray(a.view(mx.uint16)), "bfloat16"
    raise ValueError(f"expected a float16/bfloat16 array, got {a.dtype}")


def to_f32_rows(x: mx.array) -> np.ndarray:
    """(..., d) MLX array -> contiguous (T, d) float32 numpy array (evaluates x)."""
    flat = np.asarray(x.astype(mx.float32) if x.dtype != mx.float32 else x)
    return np.ascontiguousarray(flat.reshape(-1, x.shape[-1]))


class FastLinear(nn.Module):
    """nn.Linear over a 16-bit weight, computed by `linear16`; output in float32.

    Several FastLinear may share one fused weight (`_FusedWeight`): the first member called
    with an input computes every member's output, the others slice it.
    """

    def __init__(self, fused: _FusedWeight, start: int, stop: int):
        super().__init__()
        self._fused, self._start, self._stop = fused, start, stop  # underscored: no parameters

    def __call__(self, x: mx.array) -> mx.array:
        y = self._fused(x)
        if (self._start, self._stop) != (0, y.shape[-1]):
            y = y[..., self._start:self._stop]
        return y

    @property
    def fused(self) -> _FusedWeight:
        """The weight this linear shares with its fused siblings (blocks.py calls it)."""
        return self._fused

    @property
    def span(self) -> slice:
        """This linear's columns in the fused output."""
        return slice(self._start, self._stop)


class _FusedWeight:
    """The concatenated rows of sibling linears and the last (input, output) pair.

    16-bit weights (zero-copy when there is one member) or MLX affine-quantized ones (4/8 bits,
    scales and biases widened to f32 once)."""

    def __init__(self, linears: list[nn.Module]):
        first = linears[0]
        self.bits = getattr(first, "bits", 16)
        if self.bits == 16:
            views = [storage_view(lin.weight) for lin in linears]
            assert len({dt for _, dt in views}) == 1, "fused linears must share a dtype"
            self.dtype = views[0][1]
            self.weight = _concat([v for v, _ in views])
        else:  # scales / biases stay 16-bit when they are (a quarter of the 4-bit bytes else)
            self.group_size = first.group_size
            self.weight = _concat([np.asarray(lin.weight) for lin in linears])
            self.scales, self.biases = (_concat([_scale_view(getattr(lin, k)) for lin in linears])
                                        for k in ("scales", "biases"))
            self.scale_dtype = _scale_dtype(first.scales)
        has_bias = any("bias" in lin for lin in linears)
        biases = [np.asarray(lin.bias.astype(mx.float32)) if "bias" in lin
                  else np.zeros(lin.weight.shape[0], np.float32) for lin in linears]
        self.bias = np.ascontiguousarray(np.concatenate(biases)) if has_bias else None
        self.rows = self.weight.shape[0]
        self._last: tuple[mx.array, mx.array] | None = None
        self.deferred: Callable[[mx.array], mx.array] | None = None  # set on output heads

    def __call__(self, x: mx.array) -> mx.array:
        if self.deferred is not None and _DEFER_HEADS.get():
            return self.deferred(x)
        if self._last is not None and self._last[0] is x:
            return self._last[1]
        y = self.apply(to_f32_rows(x))
        out = mx.array(y).reshape(*x.shape[:-1], y.shape[1])
        self._last = (x, out)
        return out

    def apply(self, x: np.ndarray) -> np.ndarray:
        """x: (T, d) contiguous f32 -> (T, rows) f32: every member's output, no MLX graph."""
        if self.bits == 16:
            return kernels().linear16(self.weight, self.dtype, x, self.bias)
        return kernels().linear_q(self.weight, self.scales, self.biases, self.bits,
                                  self.group_size, x, self.bias, self.scale_dtype)


class FastEmbedding(nn.Module):
    """nn.Embedding over a 16-bit table that returns f32 rows; `as_linear` (a tied lm_head)
    runs on `linear16`."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.weight = embedding.weight  # a parameter still: the model's weights stay loadable
        self._head: _FusedWeight | None = None

    def __call__(self, ids: mx.array) -> mx.array:
        return self.weight[ids].astype(mx.float32)

    def as_linear(self, x: mx.array) -> mx.array:
        if self._head is None:
            self._head = _FusedWeight([self])
            self._head.deferred = _mlx_product(self)
        return self._head(x)


@contextlib.contextmanager
def deferred_heads(on: bool = True) -> Iterator[None]:
    """Inside (when `on`), an output head (lm_head, a tied embedding table used as one) returns
    MLX's lazy product instead of computing it: for calls whose logits the caller may never
    evaluate. mlx_lm's prefill steps discard theirs (positions x vocab floats: 1.2 GB for 2048
    positions of a 152k vocabulary, beyond any DRAM plan); evaluated, they come from MLX's kernels
    (exact, slower), HEAD_BLOCK output rows dequantized at a time."""
    token = _DEFER_HEADS.set(on)
    try:
        yield
    finally:
        _DEFER_HEADS.reset(token)


def _mlx_product(module: nn.Module) -> Callable[[mx.array], mx.array]:
    """x (..., d) -> module's x @ W.T (+ bias), f32, as a lazy MLX graph over the module's own
    arrays (no copy), HEAD_BLOCK output rows at a time."""
    weight, quantized = module.weight, isinstance(module, nn.QuantizedLinear)
    bias = module["bias"] if "bias" in module else None

    def rows(start: int, stop: int) -> mx.array:
        if quantized:
            return mx.dequantize(weight[start:stop], module.scales[start:stop],
                                 module.biases[start:stop], module.group_size,
                                 module.bits).astype(mx.float32)
        return weight[start:stop].astype(mx.float32)

    def product(x: mx.array) -> mx.array:
        x = x.astype(mx.float32)
        y = mx.concatenate([x @ rows(r, min(r + HEAD_BLOCK, weight.shape[0])).T
                            for r in range(0, weight.shape[0], HEAD_BLOCK)], axis=-1)
        return y if bias is None else y + bias.astype(mx.float32)

    return product


def _scale_dtype(a: mx.array) -> str:
    return str(a.dtype).split(".")[-1] if a.dtype in (mx.float16, mx.bfloat16) else "float32"


def _scale_view(a: mx.array) -> np.ndarray:
    """Quantization scales / biases as linear_q takes them: 16-bit storage or f32."""
    if a.dtype in (mx.float16, mx.bfloat16):
        return storage_view(a)[0]
    return np.asarray(a.astype(mx.float32))


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    """One contiguous array of the members' rows (a copy: the MLX arrays can then go)."""
    return np.ascontiguousarray(arrays[0]) if len(arrays) == 1 else np.concatenate(arrays)


def _is_fast_linear(module) -> bool:
    """16-bit nn.Linear, or 4/8-bit affine nn.QuantizedLinear with groups of 8k <= 128."""
    if type(module) is nn.Linear:
        return module.weight.dtype in (mx.float16, mx.bfloat16)
    return (type(module) is nn.QuantizedLinear and module.bits in (4, 8)
            and getattr(module, "mode", "affine") == "affine" and module.group_size % 8 == 0
            and module.group_size <= 128)


def accelerate(model: nn.Module) -> int:
    """Swap every 16-bit `nn.Linear` of `model` for a FastLinear, fusing q/k/v and gate/up.

    16-bit embedding tables become FastEmbedding (f32 rows out, fast tied lm_head), and
    llama-family blocks run in numpy (cpu_decode.install). Returns how many linears were
    swapped. f32 linears stay MLX's.
    """
    swapped = 0
    # parents only: a list of every module would keep each replaced linear's arrays alive
    # until the end, doubling the fused weights' memory at the peak (88 MiB for the 1.5B)
    parents = [m for _, m in model.named_modules()
               if any(isinstance(c, nn.Module) for c in m.children().values())]
    for parent in parents:
        for name, child in parent.children().items():
            if type(child) is nn.Embedding and child.weight.dtype in (mx.float16, mx.bfloat16):
                setattr(parent, name, FastEmbedding(child))
        children = {k: v for k, v in parent.children().items() if _is_fast_linear(v)}
        for group in FUSED_SIBLINGS:
            members = [name for name in group if name in children]
            if len(members) > 1 and len({_fusion_key(children[m]) for m in members}) == 1:
                fused = _FusedWeight([children.pop(m) for m in members])
                start = 0
                for name in members:
                    rows = parent[name].weight.shape[0]
                    setattr(parent, name, FastLinear(fused, start, start + rows))
                    start += rows
                    swapped += 1
        for name, linear in children.items():
            fused = _FusedWeight([linear])
            if name == "lm_head" and _zero_copy(linear):
                fused.deferred = _mlx_product(linear)  # the arrays `fused` views: no copy
            setattr(parent, name, FastLinear(fused, 0, fused.rows))
            swapped += 1
    mx.clear_cache()  # the replaced MLX weights: give their memory back now

    return swapped


def _zero_copy(linear: nn.Module) -> bool:
    """Whether a lone linear's _FusedWeight views its arrays (16-bit scales, if quantized):
    then keeping the module for a deferred product costs no memory."""
    return getattr(linear, "bits", 16) == 16 or linear.scales.dtype in (mx.float16, mx.bfloat16)


def _fusion_key(linear: nn.Module) -> tuple:
    """Linears fuse when these agree: input width, dtype, quantization."""
    scales = getattr(linear, "scales", None)
    return (linear.weight.shape[1], linear.weight.dtype, getattr(linear, "bits", 16),
            getattr(linear, "group_size", 0), None if scales is None else scales.dtype)
