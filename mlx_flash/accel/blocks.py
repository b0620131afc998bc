"""The fast CPU path's transformer block: norms, RoPE, KV cache and attention in numpy.

With linear.py and ffn.py the matmuls of a decode step run in C, but the rest of each block
(RMSNorm, RoPE, the KV cache update, attention, residual adds) stayed an MLX graph that had to
be evaluated three times per layer to hand the kernels their inputs. Here every MLX evaluation costs
~70 us even for a trivial graph, ~0.4 ms for a layer's small ops: ~30 ms of the default model's
~81 ms decode step (BENCHMARKS.md, issue 11). The same work in numpy on one token is ~40 us.

So for the llama family (mlx_lm's llama, mistral, qwen2, qwen3 blocks: pre-norm RMSNorm, RoPE,
grouped-query attention with optional q/k norms, a gated MLP or a FlashFFN) each block's class
is swapped for a subclass whose `__call__` does the block in numpy and the C kernels. It is
mlx_lm's `TransformerBlock.__call__` / `Attention.__call__` of those files, restated in numpy;
the modules, parameters and attribute paths stay mlx_lm's, so loading, spec/speculative.py's
tree attention and offline/evaluate.py see the same model. Nothing else of the model changes: the
embedding, final norm, lm_head and sampling stay MLX (one evaluation per token).

At decode (one position, batch 1, no q/k norms) the RMSNorms and the attention with its RoPE
and cache write are one C call each (kernels.rms_norm, kernels.decode_attention): the ~25 numpy
calls they replace cost ~2.8 ms of the 0.5B's ~63 ms step once the FFN's weights have streamed
through the caches (issue 20, session 14). Longer inputs (prompts, the drafter's trees) keep
the numpy steps, which the C ones are tested against.

The KV cache is an mlx_lm `KVCache` whose keys and values are numpy arrays (`NumpyKVCache`,
what the model's `make_cache` returns for these layers). Given any other cache (rotating,
quantized) a block runs its MLX code. RoPE is read off the model's own rope module (cos and
sin per position, probed once), and `install` checks the numpy attention against the MLX one
on random input before it swaps anything: a variant it does not reproduce keeps the MLX path.
"""

from __future__ import annotations

import functools
import os
import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import KVCache

from .build import kernels
from .linear import FastLinear, deferred_heads

ENV_CPU_BLOCKS = "MLX_FLASH_CPU_BLOCKS"  # "0": keep the MLX blocks (for comparisons)


ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")

# A swapped block computes at most PIECE prompt positions at once (longer causal inputs with a KV
# cache, e.g. mlx_lm's 2048-position prefill steps, go a PIECE at a time: the same result, the
# FFN and attention temporaries of PIECE positions), and its attention at most SCORES_PER_HEAD
# scores a head at once. runtime/memory.py plans a prompt's DRAM for these.
PIECE = 512
SCORES_PER_HEAD = PIECE * PIECE


class NumpyKVCache(KVCache):
    """mlx_lm's KVCache with numpy float32 keys/values, (B, kv_heads, capacity, head_dim) grown
    by `step` positions; `offset` positions are valid. trim/offset/make_mask are KVCache's."""

    def append_f32(self, keys: np.ndarray, values: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
        """keys/values (B, kv_heads, L, head_dim) -> views of the (B, kv_heads, offset, ·)
        entries after appending them."""
        prev, length = self.offset, keys.shape[2]
        self.reserve(keys.shape, length)
        self.keys[..., prev:prev + length, :] = keys
        self.values[..., prev:prev + length, :] = values
        self.offset = prev + length
        return self.keys[..., :self.offset, :], self.values[..., :self.offset, :]

    def reserve(self, shape: tuple[int, ...], length: int) -> tuple[np.ndarray, np.ndarray]:
        """Room for `length` more positions of keys shaped `shape` (B, kv_heads, ·, head_dim):
        the (B, kv_heads, capacity, head_dim) key and value buffers, grown if they lack it."""
        need = self.offset + length
        if not isinstance(self.keys, np.ndarray) or need > self.keys.shape[2]:  # (or MLX's)
            self.keys, self.values = (self._grown(old, shape, need)
                                      for old in (self.keys, self.values))
        return self.keys, self.values

    def _grown(self, old: np.ndarray | None, shape: tuple[int, ...], need: int) -> np.ndarray:
        size = -(-need // self.step) * self.step
        out = np.zeros((*shape[:2], size, shape[3]), dtype=np.float32)
        if old is not None:
            if isinstance(old, mx.array):  # filled by MLX code (e.g. a restored state)
                old = np.asarray(old.astype(mx.float32))
            out[..., :self.offset, :] = old[..., :self.offset, :]
        return out

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """An MLX attention on this cache (the interface mlx_lm's modules call)."""
        k, v = self.append_f32(_f32(keys), _f32(values))
        return mx.array(k).astype(keys.dtype), mx.array(v).astype(values.dtype)


def _f32(a: mx.array) -> np.ndarray:
    return np.asarray(a.astype(mx.float32))  # evaluates a: numpy needs the values


class RopeTable:
    """A rope module's rotation as numpy: cos/sin per position and frequency, read off the
    module itself (so llama3/yarn/su scalings come with it), and the pairing of dimensions."""

    def __init__(self, rope: nn.Module, head_dim: int):
        self.rope, self.head_dim = rope, head_dim
        dims = int(getattr(rope, "dims", head_dim))
        half = dims // 2
        self.dims, self.traditional = dims, bool(getattr(rope, "traditional", False))
        if self.traditional:  # pairs (0, 1), (2, 3), ...
            self.first, self.second = slice(0, dims, 2), slice(1, dims, 2)
        else:  # pairs (i, i + dims / 2)
            self.first, self.second = slice(0, half), slice(half, dims)
        self.cos = self.sin = np.zeros((0, half), dtype=np.float32)

    def _extend(self, positions: int) -> None:
        size = max(1024, 1 << (positions - 1).bit_length())
        probe = np.zeros((1, 1, size, self.head_dim), dtype=np.float32)
        probe[..., self.first] = 1.0  # rotating (1, 0) at angle a gives (cos a, sin a)
        out = np.asarray(self.rope(mx.array(probe), offset=0))[0, 0]  # evaluates: the table
        self.cos = np.ascontiguousarray(out[:, self.first])
        self.sin = np.ascontiguousarray(out[:, self.second])

    def at(self, position: int) -> tuple[int, bool, np.ndarray, np.ndarray]:
        """The rotation at one position as kernels.decode_attention takes it: (rotated dims,
        traditional pairing, cos (dims / 2,), sin (dims / 2,))."""
        if position >= self.cos.shape[0]:
            self._extend(position + 1)
        return self.dims, self.traditional, self.cos[position], self.sin[position]

    def __call__(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """x: (B, L, heads, head_dim), positions: (L,) -> x rotated to those positions."""
        if positions.size and int(positions.max()) >= self.cos.shape[0]:
            self._extend(int(positions.max()) + 1)
        cos, sin = self.cos[positions, None], self.sin[positions, None]  # (L, 1, dims / 2)
        a, b = x[..., self.first], x[..., self.second]
        out = x.copy()
        out[..., self.first] = a * cos - b * sin
        out[..., self.second] = a * sin + b * cos
        return out


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x: (..., d) f32 -> mlx's rms_norm over the last axis."""
    mean_square = np.einsum("...i,...i->...", x, x)[..., None] * (1.0 / x.shape[-1])
    return x * (mean_square + eps) ** -0.5 * weight  # einsum: half the time of np.mean here


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, mask) -> np.ndarray:
    """Scaled dot-product attention with grouped query heads, f32.

    q: (B, heads, L, D); k, v: (B, kv_heads, S, D); mask: None, "causal" (the L queries are
    the last L positions) or an array broadcastable to (B, heads, L, S), bool (True: attend)
    or additive. Returns (B, heads, L, D). A causal L x S beyond SCORES_PER_HEAD scores a head
    goes a block of queries at a time (each the last positions of the keys up to its own), so
    a long prompt's scores stay what the DRAM plan counts for one PIECE."""
    length, span = q.shape[2], k.shape[2]
    if isinstance(mask, str) and mask == "causal" and length * span > SCORES_PER_HEAD:
        rows = max(1, SCORES_PER_HEAD // span)
        out = np.empty_like(q)
        for start in range(0, length, rows):
            stop = min(length, start + rows)
            keys = span - length + stop  # the block's last query sees keys [0, keys)
            out[:, :, start:stop] = _attend(q[:, :, start:stop], k[:, :, :keys],
                                            v[:, :, :keys], scale, "causal")
        return out
    return _attend(q, k, v, scale, mask)


def _attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, mask) -> np.ndarray:
    """attend's computation for one block of queries: all their scores at once."""
    batch, heads, length, dim = q.shape
    kv_heads, span = k.shape[1], k.shape[2]
    group = q.reshape(batch, kv_heads, heads // kv_heads * length, dim)  # heads of one kv head
    scores = np.matmul(group, k.transpose(0, 1, 3, 2)) * np.float32(scale)
    scores = scores.reshape(batch, heads, length, span)
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"attention mask {mask!r}: only 'causal' is a named mask")
        future = np.triu(np.ones((length, span), dtype=bool), k=span - length + 1)
        scores[..., future] = -np.inf
    elif mask is not None:
        m = np.asarray(mask)
        scores = np.where(m, scores, -np.inf) if m.dtype == bool else scores + m
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    out = np.matmul(scores.reshape(batch, kv_heads, -1, span).astype(np.float32, copy=False), v)
    return out.reshape(batch, heads, length, dim)


class FastBlockState:
    """What a swapped block needs in numpy: norm weights, the fused q/k/v and o_proj weights,
    the rope table and the MLP's entry."""

    def __init__(self, block: nn.Module):
        attn = block.self_attn
        self.attn = attn
        self.n_heads, self.n_kv_heads = attn.n_heads, attn.n_kv_heads
        self.scale = float(attn.scale)
        self.qkv = attn.q_proj.fused
        self.q, self.k, self.v = attn.q_proj.span, attn.k_proj.span, attn.v_proj.span
        self.head_dim = (self.q.stop - self.q.start) // self.n_heads
        self.o_proj = attn.o_proj.fused
        self.norm_in = _norm(block.input_layernorm)
        self.norm_post = _norm(block.post_attention_layernorm)
        self.q_norm = _norm(attn["q_norm"]) if "q_norm" in attn else None
        self.k_norm = _norm(attn["k_norm"]) if "k_norm" in attn else None
        self.rope = RopeTable(attn.rope, self.head_dim)
        self.mlp = _mlp_entry(block.mlp)
        self.kernels = kernels()
        # q | k | v side by side in the fused projection, no q/k norms: decode's attention
        # can go through kernels.decode_attention in one call
        self.one_call = (self.q_norm is None and self.q.start == 0
                         and self.k.start == self.q.stop and self.v.start == self.k.stop
                         and self.n_heads % self.n_kv_heads == 0)

    def forward(self, x: np.ndarray, mask, cache) -> np.ndarray:
        """x: (B, L, d) f32 -> the block's output (B, L, d) f32."""
        batch, length, d = x.shape
        rows = np.ascontiguousarray(x.reshape(-1, d))
        h = rows + self.o_proj.apply(self.attention(self.kernels.rms_norm(rows, *self.norm_in),
                                                    batch, length, mask, cache))
        return (h + self.mlp(self.kernels.rms_norm(h, *self.norm_post))
                ).reshape(batch, length, d)

    def attention(self, h: np.ndarray, batch: int, length: int, mask, cache) -> np.ndarray:
        """h: (B * L, d) normed -> the attention's output before o_proj, (B * L, heads * D)."""
        qkv = self.qkv.apply(h)  # (B * L, (heads + 2 kv_heads) * D)
        offset = 0 if cache is None else cache.offset
        depths = getattr(self.attn.rope, "depths", None)  # speculative.TreeRoPE
        if (batch == 1 and length == 1 and mask is None and depths is None and self.one_call
                and cache is not None and qkv.shape[1] == self.v.stop):  # a decode step
            keys, values = cache.reserve((1, self.n_kv_heads, 1, self.head_dim), 1)
            out = self.kernels.decode_attention(qkv, self.n_heads, self.n_kv_heads,
                                                self.rope.at(offset), keys, values, offset,
                                                self.scale)
            cache.offset = offset + 1
            return out
        positions = offset + (np.arange(length) if depths is None else depths)
        heads = self.n_heads
        if self.q_norm is None and self.k.start == self.q.stop:  # q and k rotated in one go
            qk = self.rope(qkv[:, self.q.start:self.k.stop].reshape(batch, length, -1,
                                                                     self.head_dim), positions)
            q, k = qk[:, :, :heads], qk[:, :, heads:]
        else:
            q, k = (qkv[:, span].reshape(batch, length, -1, self.head_dim)
                    for span in (self.q, self.k))
            if self.q_norm is not None:
                q, k = rms_norm(q, *self.q_norm), rms_norm(k, *self.k_norm)
            q, k = self.rope(q, positions), self.rope(k, positions)
        v = qkv[:, self.v].reshape(batch, length, -1, self.head_dim)
        q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # (B, heads, L, D)
        if cache is not None:
            k, v = cache.append_f32(k, v)
        out = attend(q, k, v, self.scale, mask)  # (B, heads, L, D)
        return np.ascontiguousarray(out.transpose(0, 2, 1, 3).reshape(batch * length, -1))


def _norm(module: nn.Module) -> tuple[np.ndarray, float]:
    return np.asarray(module.weight.astype(mx.float32)), float(module.eps)


def _mlp_entry(mlp: nn.Module):
    """(T, d) f32 -> (T, d) f32 for this MLP: FlashFFN's numpy entry, a fused gated MLP's
    kernels, or (anything else) the module itself through MLX."""
    if hasattr(mlp, "forward_f32"):
        return mlp.forward_f32
    gate, up, down = (getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj"))
    if all(isinstance(m, FastLinear) for m in (gate, up, down)) and gate.fused is up.fused:
        def gated(x: np.ndarray) -> np.ndarray:
            gu = gate.fused.apply(x)
            g = gu[:, gate.span]
            return down.fused.apply(np.ascontiguousarray(g / (1.0 + np.exp(-g)) * gu[:, up.span]))
        return gated
    return lambda x: _f32(mlp(mx.array(x)))


@functools.cache
def _fast_class(cls: type) -> type:
    """The swapped class of an mlx_lm block class: numpy `__call__` when the cache allows."""

    def __call__(self, x: mx.array, mask=None, cache=None):
        if cache is not None and not hasattr(cache, "append_f32"):
            return cls.__call__(self, x, mask, cache)  # a cache kind this path does not keep
        rows = np.asarray(x, dtype=np.float32)
        if cache is None or rows.shape[1] <= PIECE or not (isinstance(mask, str)
                                                           and mask == "causal"):
            return mx.array(self._cpu_block.forward(rows, mask, cache))
        pieces = [self._cpu_block.forward(rows[:, i:i + PIECE], "causal" if
                                          min(PIECE, rows.shape[1] - i) > 1 else None, cache)
                  for i in range(0, rows.shape[1], PIECE)]
        return mx.array(np.concatenate(pieces, axis=1))

    return type(f"Fast{cls.__name__}", (cls,), {"__call__": __call__, "__module__": __name__})


def is_fast(block: nn.Module) -> bool:
    return hasattr(block, "_cpu_block")


def kv_cache_for(block: nn.Module) -> KVCache:
    """A plain trimmable KV cache for this layer: numpy-backed for a swapped block."""
    return NumpyKVCache() if is_fast(block) else KVCache()


def install(model: nn.Module) -> int:
    """Swap the model's llama-family blocks for their numpy versions (see the module doc);
    returns how many. Needs cpu.accelerate's FastLinears for q/k/v (fused) and o_proj."""
    if os.environ.get(ENV_CPU_BLOCKS, "1") == "0":
        return 0
    if getattr(model, "model_type", None) not in ARCHITECTURES or not hasattr(model, "layers"):
        return 0
    states = [(block, FastBlockState(block)) for block in model.layers if _swappable(block)]
    if not states or not _reproduces(*states[0]):
        return 0
    for block, state in states:
        block.__class__ = _fast_class(type(block))
        object.__setattr__(block, "_cpu_block", state)  # not a parameter
    _install_make_cache(model)
    return len(states)


def _swappable(block: nn.Module) -> bool:
    attn = getattr(block, "self_attn", None)
    if attn is None or not all(isinstance(getattr(attn, n, None), FastLinear)
                               for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return False
    norms = [getattr(block, n, None) for n in ("input_layernorm", "post_attention_layernorm")]
    norms += [attn[n] for n in ("q_norm", "k_norm") if n in attn]
    return (attn.q_proj.fused is attn.k_proj.fused is attn.v_proj.fused
            and all(type(n) is nn.RMSNorm for n in norms) and "rope" in attn
            and not getattr(block, "use_sliding", False) and hasattr(block, "mlp"))


def _reproduces(block: nn.Module, state: FastBlockState, tol: float = 1e-3) -> bool:
    """The numpy attention (`state`) against the block's MLX attention: a 3-token causal
    prompt, then one token, on fresh caches. False (and a warning) if they differ."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, state.norm_in[0].shape[0])).astype(np.float32)
    mlx_cache, np_cache = KVCache(), NumpyKVCache()
    want, got = [], []
    for chunk, mask in ((slice(0, 3), "causal"), (slice(3, 4), None)):
        xc = x[:, chunk]
        want.append(_f32(block.self_attn(mx.array(xc), mask, mlx_cache)))
        rows = np.ascontiguousarray(xc.reshape(-1, xc.shape[-1]))
        got.append(state.o_proj.apply(state.attention(rows, 1, xc.shape[1], mask, np_cache))
                   .reshape(want[-1].shape))
    error = max(float(np.max(np.abs(w - g)) / (np.max(np.abs(w)) + 1e-6))
                for w, g in zip(want, got, strict=True))
    if error > tol:
        warnings.warn(f"mlx-flash: the numpy attention differs from {type(block.self_attn)} "
                      f"by {error:.2g} (relative): keeping MLX's blocks", stacklevel=3)
        return False
    return True


def _install_make_cache(model: nn.Module) -> None:
    """`make_cache` (what mlx_lm's make_prompt_cache calls) with NumpyKVCache for swapped
    layers; layers with their own cache kind (sliding windows) keep it."""
    original = getattr(model, "make_cache", None)

    def make_cache() -> list:
        base = original() if original else [KVCache() for _ in model.layers]
        return [NumpyKVCache() if type(c) is KVCache and is_fast(block) else c
                for c, block in zip(base, model.layers, strict=True)]

    object.__setattr__(model, "make_cache", make_cache)


def defer_prompt_logits(model: nn.Module) -> None:
    """Make `model(inputs, cache=...)` over more than one position defer its output head
    (linear.deferred_heads) and go PIECE positions a call: mlx_lm's prefill hands the model
    2048 positions at once and discards their logits. One-position calls (decode) keep the fast
    path. A flash model under a DRAM budget gets this (on the MLX path too, where the logits are
    lazy anyway but a whole step's activations were not): its plan counts one position's logits
    and a PIECE of prompt activations. So does every model on the fast CPU path, whose eager
    head would compute the logits mlx_lm's prefill drops: 7 ms a position for the 1.5B's 4-bit
    152k x 1536 head (285 of a 41-token prompt's ~1.1 s through `mlx_lm.generate`, issue 20
    session 16). Callers that read a multi-position call's logits get MLX's product (exact)."""
    model.__class__ = _deferring_class(type(model))


@functools.cache
def _deferring_class(cls: type) -> type:
    def __call__(self, inputs, *args, **kwargs):
        cache = kwargs.get("cache", args[0] if args else None)
        if cache is None or inputs.shape[-1] <= 1:
            return cls.__call__(self, inputs, *args, **kwargs)
        embeddings = kwargs.get("input_embeddings")
        outs = []
        with deferred_heads():
            for i in range(0, inputs.shape[-1], PIECE):
                if outs:  # the MLX path's graph: one piece's temporaries at a time
                    mx.eval([c.state for c in cache])
                if embeddings is not None:
                    kwargs["input_embeddings"] = embeddings[:, i:i + PIECE]
                outs.append(cls.__call__(self, inputs[..., i:i + PIECE], *args, **kwargs))
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)

    return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})
