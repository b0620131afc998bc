"""Speculative decoding with the recurrent drafter: draft a tree, verify it in one forward pass.

One step, for the token y the model chose last and the hidden state h that chose it:

  1. drafts = drafter.beam_search(h, y)        (beams, length) token ids
  2. tree   = token_tree(drafts)               shared prefixes merged; node 0 is y itself
  3. one forward pass of the model over the packed tree, each node seeing its ancestors only
     (`tree_attention`: the cache's mask is the ancestor mask, RoPE positions are depths)
  4. accept the longest path whose every token is the model's argmax at its parent; the
     model's argmax at the path's end is a bonus token, so a step emits 1 + accepted tokens
  5. KV rollback: the accepted path's keys/values move to the front of the new entries and
     the cache is trimmed to them; the rest of the tree is gone

Greedy only: with greedy verification the output is, token for token, what greedy decoding
without the drafter gives (up to float rounding: a batched matmul is not bitwise a matvec, so
an exact tie between two logits could break the other way). Sampling (temp > 0) is refused;
the rule that would keep the target distribution is ReDrafter's/SpecInfer's multi-candidate
rejection sampling, not implemented here.

Positions: mlx_lm's attention applies RoPE with one scalar `cache.offset` for all L tokens of a
call. During verification each attention's `rope` is wrapped so that token i gets position
offset + depth(i): the (1, H, L, D) queries/keys are viewed as L batch rows of one token each,
and `mx.fast.rope` takes a vector of per-row offsets. The mask goes through the caches: mlx_lm
models build their mask with `cache.make_mask(...)`, so the caches are wrapped in views that
return the tree mask. Both need plain `KVCache`s (made here for every layer, also for
sliding-window models: the window is then part of the mask).

With FlashFFN layers, the verification pass is one FlashFFN call of N <= 16 tokens per layer:
the window path reads the union of the N tokens' active neurons once (one window step) and
computes each token with its own neurons. After the step, `window_policy` says what happens to
the neurons that only rejected tokens used: "keep" leaves them in the window like the others,
"drop" marks them expired so they are the first evicted (they were read for nothing either
way; "drop" frees their room for the next step's neurons).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..accel.blocks import kv_cache_for
from ..runtime.ffn import FlashFFN
from ..runtime.generate import GenerationResponse, feed_prompt
from ..runtime.memory import PREFILL_STEP
from .drafter import Drafter, hidden_and_logits

WINDOW_POLICIES = ("keep", "drop")


@dataclass
class TokenTree:
    """Drafts merged into a prefix tree, packed parent-before-child; node 0 is the root."""

    tokens: np.ndarray  # (N,) token of each node (node 0: the last chosen token)
    parents: np.ndarray  # (N,) parent node, -1 for the root
    depths: np.ndarray  # (N,) 0 for the root

    @property
    def size(self) -> int:
        return self.tokens.size

    def ancestors(self) -> np.ndarray:
        """(N, N) bool: [i, j] when node j is node i or one of its ancestors."""
        n = self.size
        anc = np.eye(n, dtype=bool)
        for i in range(1, n):  # parents come first, so their rows are complete
            anc[i] |= anc[self.parents[i]]
        return anc


def token_tree(root: int, drafts: np.ndarray) -> TokenTree:
    """drafts: (beams, length) token ids after `root` -> their prefix tree (shared prefixes
    once). Nodes are numbered breadth first, so parents precede children."""
    index: dict[tuple[int, int], int] = {}
    tokens, parents, depths = [root], [-1], [0]
    for depth in range(drafts.shape[1]):
        for beam in drafts:
            parent = 0
            for d in range(depth):
                parent = index[(parent, int(beam[d]))]
            key = (parent, int(beam[depth]))
            if key not in index:
                index[key] = len(tokens)
                tokens.append(int(beam[depth]))
                parents.append(parent)
                depths.append(depth + 1)
    return TokenTree(np.array(tokens), np.array(parents), np.array(depths))


def accept(tree: TokenTree, argmax: np.ndarray) -> tuple[list[int], int]:
    """Greedy verification: argmax (N,) the model's choice after each node -> (accepted path
    of nodes from the root, the bonus token after its last node)."""
    children: dict[tuple[int, int], int] = {
        (int(p), int(t)): i for i, (p, t) in enumerate(zip(tree.parents, tree.tokens, strict=True)) if i}
    path = [0]
    while (nxt := children.get((path[-1], int(argmax[path[-1]])))) is not None:
        path.append(nxt)
    return path, int(argmax[path[-1]])


class TreeMaskCache:
    """A KVCache seen through a tree: `make_mask` gives the tree's mask, all else is the cache's.

    mlx_lm models call `cache.make_mask(N, ...)` for the attention mask of a call; here it is
    (N, offset + N) bool: every cached position, plus the node's ancestors in the tree (and, for
    sliding-window layers, only keys within `window_size` positions of the query).
    """

    def __init__(self, cache, tree: TokenTree):
        self._cache, self._tree = cache, tree

    def __getattr__(self, name):
        return getattr(self._cache, name)

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        assert n == self._tree.size, "the verification pass feeds exactly the tree"
        offset = self._cache.offset
        past = np.ones((n, offset), dtype=bool)
        mask = np.concatenate([past, self._tree.ancestors()], axis=1)
        if window_size is not None:
            q = offset + self._tree.depths
            k = np.concatenate([np.arange(offset), offset + self._tree.depths])
            mask &= q[:, None] < k[None, :] + window_size
        return mx.array(mask)


class TreeRoPE(nn.Module):
    """Wraps an attention's rope: the L tokens of a call get positions offset + depth."""

    def __init__(self, rope: nn.Module, depths: mx.array):
        super().__init__()
        self._rope, self._depths = rope, depths
        self.depths = np.array(depths)  # cpu_decode.py's numpy blocks read the positions here

    def __call__(self, x: mx.array, offset=0) -> mx.array:
        """x: (1, H, L, D) -> the same with token l rotated to position offset + depths[l]."""
        rows = x.transpose(2, 1, 0, 3)  # (L, H, 1, D): one token per batch row
        out = self._rope(rows, offset=offset + self._depths)  # per-row offsets
        return out.transpose(2, 1, 0, 3)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Each layer's attention module (the one holding `rope`); ValueError if there is none."""
    out = []
    for i, layer in enumerate(model.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or "rope" not in attn:
            raise ValueError(f"layer {i} of this {type(model).__module__} model has no "
                             "self_attn.rope: tree verification cannot place its positions")
        out.append(attn)
    return out


@contextlib.contextmanager
def tree_positions(model: nn.Module, tree: TokenTree) -> Iterator[None]:
    """Inside the block every attention applies RoPE at the tree nodes' depths."""
    depths = mx.array(tree.depths.astype(np.int32))
    attns = attention_modules(model)
    ropes = [attn.rope for attn in attns]
    for attn, rope in zip(attns, ropes, strict=True):
        attn.rope = TreeRoPE(rope, depths)
    try:
        yield
    finally:
        for attn, rope in zip(attns, ropes, strict=True):
            attn.rope = rope


def verify_tree(model: nn.Module, cache: list, tree: TokenTree) -> tuple[mx.array, mx.array]:
    """One forward pass over the packed tree: -> hidden (N, d) and logits (N, vocab)."""
    views = [TreeMaskCache(c, tree) for c in cache]
    with tree_positions(model, tree):
        h, logits = hidden_and_logits(model, mx.array(tree.tokens[None].astype(np.int32)), views)
        mx.eval(h, logits)  # the caller reads the argmax and rewrites the caches next
    return h[0], logits[0]


def rollback(cache: list, start: int, path: list[int]) -> None:
    """Keep the accepted nodes' entries: cache positions start + path -> start.., trim the rest.

    Their keys were rotated at start + depth, and depth is their index along the path, so
    after the move every entry sits at its own position.
    """
    keep = len(path)
    if path != list(range(keep)):
        moved = np.asarray(path, dtype=np.int32) + start
        for c in cache:  # MLX or numpy (cpu_decode.NumpyKVCache) buffers
            idx = moved if isinstance(c.keys, np.ndarray) else mx.array(moved)
            c.keys[..., start:start + keep, :] = c.keys[..., idx, :]
            c.values[..., start:start + keep, :] = c.values[..., idx, :]
    for c in cache:
        c.trim(c.offset - (start + keep))
        assert c.offset == start + keep


def make_cache(model: nn.Module) -> list:
    """A plain, trimmable KVCache per layer (also for sliding-window layers, see module doc);
    numpy-backed for the fast CPU path's blocks."""

    return [kv_cache_for(block) for block in model.layers]


def flash_layers(model: nn.Module) -> list:
    return [layer.mlp for layer in model.layers if isinstance(layer.mlp, FlashFFN)]


def cached_sets(model: nn.Module) -> list[np.ndarray]:
    """Per FlashFFN layer, which neurons are cached now: (n_neurons,) bool."""
    return [ffn.cache.slot_of >= 0 for ffn in flash_layers(model)]


def drop_rejected(model: nn.Module, path: list[int], before: list[np.ndarray]) -> int:
    """Window policy "drop": expire the neurons this step read only for rejected nodes.

    before: `cached_sets` taken before the step (neurons cached then keep their window
    place). Returns how many neurons were expired, summed over the layers."""
    dropped = 0
    for ffn, was_cached in zip(flash_layers(model), before, strict=True):
        ids = ffn.last_ids
        if ids is None or len(ids) <= 1:
            continue
        kept = np.concatenate([ids[i] for i in path])
        rejected = np.setdiff1d(np.concatenate(ids), kept)
        dropped += ffn.cache.expire(rejected[~was_cached[rejected]])
    return dropped


@dataclass
class SpecStep:
    """One verification step."""

    candidates: int  # tree nodes verified (the root included)
    accepted: int  # drafted tokens accepted
    draft_seconds: float
    verify_seconds: float


@dataclass
class SpecStats:
    """What speculative decoding did over a generation (`--stats-json`'s "speculative")."""

    beam_width: int = 0
    draft_length: int = 0
    window_policy: str = "keep"
    steps: list[SpecStep] = field(default_factory=list)

    def totals(self) -> dict:
        n = len(self.steps)
        emitted = sum(1 + s.accepted for s in self.steps)
        return {
            "beam_width": self.beam_width, "draft_length": self.draft_length,
            "window_policy": self.window_policy, "verify_steps": n, "emitted_tokens": emitted,
            "tokens_per_step": emitted / n if n else 0.0,
            "accepted_per_step": (emitted - n) / n if n else 0.0,
            "acceptance_rate": ((emitted - n) / (n * self.draft_length)
                                if n and self.draft_length else 0.0),
            "candidates_per_step": sum(s.candidates for s in self.steps) / n if n else 0.0,
            "draft_seconds": sum(s.draft_seconds for s in self.steps),
            "verify_seconds": sum(s.verify_seconds for s in self.steps),
        }


@dataclass
class SpecSettings:
    beam_width: int = 1  # 1 x 3 was the fastest here, dense and under a cap (BENCHMARKS.md)
    draft_length: int = 3
    window_policy: str = "keep"

    def __post_init__(self):
        if self.beam_width < 1 or self.draft_length < 1:
            raise ValueError(f"beam width and draft length must be >= 1, got "
                             f"{self.beam_width}, {self.draft_length}")
        if self.window_policy not in WINDOW_POLICIES:
            raise ValueError(f"window policy {self.window_policy!r} is not one of "
                             f"{WINDOW_POLICIES}")


@dataclass
class Speculation:
    """What `generate.stream` needs for speculative decoding: the drafter, settings, stats."""

    drafter: Drafter
    settings: SpecSettings = field(default_factory=SpecSettings)
    stats: SpecStats | None = None

    def __post_init__(self):
        if self.stats is None:
            self.stats = SpecStats(self.settings.beam_width, self.settings.draft_length,
                                   self.settings.window_policy)

    def stream(self, model: nn.Module, tokenizer, prompt: list[int], max_tokens: int,
               temp: float = 0.0) -> Iterator:
        if temp != 0.0:
            raise ValueError(f"speculative decoding with the drafter is greedy only: got temp "
                             f"{temp}; use --temp 0 or drop --drafter")
        return stream_speculative(model, tokenizer, prompt, self.drafter, max_tokens,
                                  self.settings, self.stats)


def check_tree_fits(model: nn.Module, settings: SpecSettings) -> None:
    """The largest tree must take FlashFFN's window path (max_sparse_tokens), not prefill's."""
    rt = getattr(model, "flash", None)
    biggest = 1 + settings.beam_width * settings.draft_length
    if rt is not None and biggest > rt.config.max_sparse_tokens:
        raise ValueError(f"beam width {settings.beam_width} x draft length "
                         f"{settings.draft_length} gives trees of up to {biggest} tokens, more "
                         f"than the {rt.config.max_sparse_tokens} a FlashFFN call computes "
                         "sparsely; lower --beam-width or --draft-length")


def prefill(model: nn.Module, cache: list, prompt: list[int]) -> tuple[np.ndarray, int]:
    """The prompt as runtime/generate.py feeds it (all but the last token through the
    transformer stack, `feed_prompt`; then the last alone) -> the last hidden state (d,) and
    the model's greedy next token."""
    last = feed_prompt(model.model, mx.array(prompt), cache, PREFILL_STEP)
    h, logits = hidden_and_logits(model, last[None], cache)
    return np.array(h[0, -1].astype(mx.float32)), int(mx.argmax(logits[0, -1]).item())


def speculative_tokens(model: nn.Module, drafter: Drafter, prompt: list[int],
                       settings: SpecSettings, stats: SpecStats | None = None
                       ) -> Iterator[int]:
    """Greedy tokens of `model` after `prompt`, verified a tree of drafts at a time (endless:
    the caller stops). Flash models' per-call stats mark each verification's emitted tokens."""
    check_tree_fits(model, settings)
    cache = make_cache(model)
    h, token = prefill(model, cache, prompt)
    flash = getattr(model, "flash", None)
    while True:
        yield token
        t0 = time.perf_counter()
        tree = token_tree(token, drafter.beam_search(h, token, settings.beam_width,
                                                     settings.draft_length))
        t1 = time.perf_counter()
        start, drop = cache[0].offset, flash is not None and settings.window_policy == "drop"
        before = cached_sets(model) if drop else None
        hidden, logits = verify_tree(model, cache, tree)
        path, bonus = accept(tree, np.array(mx.argmax(logits, axis=-1)))
        rollback(cache, start, path)
        if flash is not None:
            flash.stats.current.emitted = len(path)
        if drop:
            drop_rejected(model, path, before)
        if stats is not None:
            stats.steps.append(SpecStep(tree.size, len(path) - 1, t1 - t0,
                                        time.perf_counter() - t1))
        yield from (int(t) for t in tree.tokens[path[1:]])
        h, token = np.array(hidden[path[-1]].astype(mx.float32)), bonus


def stream_speculative(model: nn.Module, tokenizer, prompt: list[int], drafter: Drafter,
                       max_tokens: int, settings: SpecSettings,
                       stats: SpecStats | None = None) -> Iterator:
    """`mlx_lm.stream_generate`'s responses (GenerationResponse), greedy, with the drafter."""

    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    tic, prompt_tps, n, token = time.perf_counter(), 0.0, 0, None

    def response(text: str, count: int, reason: str | None = None) -> GenerationResponse:
        return GenerationResponse(text, token, None, False, len(prompt), prompt_tps, count,
                                  count / max(time.perf_counter() - tic, 1e-9),
                                  mx.get_peak_memory() / 1e9, reason)

    # The same stop rules as mlx_lm.stream_generate: EOS is not emitted, and the
    # max_tokens-th token comes with the final response.
    for n, token in enumerate(speculative_tokens(model, drafter, prompt, settings, stats)):
        if n == 0:
            prompt_tps = len(prompt) / (time.perf_counter() - tic)
            tic = time.perf_counter()
        if token in tokenizer.eos_token_ids:
            break
        detokenizer.add_token(token)
        if n + 1 == max_tokens:
            break
        yield response(detokenizer.last_segment, n + 1)
    detokenizer.finalize()
    yield response(detokenizer.last_segment, n + 1,
                   "stop" if token in tokenizer.eos_token_ids else "length")
