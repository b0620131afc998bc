"""The model's own answers to requests made from the calibration text (drafter training data)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

from ..format.storage import save_npz
from ..runtime.generate import format_prompt
from ..spec.drafter import output_head
from .calibration import numpy_linears

PROMPT_TAIL = 16  # prompt tokens kept before each self-generated answer


# What a request asks of a calibration document, round by round: the first round explains an
# excerpt and adds an example (code-heavy answers); the second asks for prose only (the kind of
# answer the first round rarely gives); the third for new code. A round is one request per
# document, so n requests take ceil(n / documents) rounds.
REQUEST_ROUNDS = (
    ("Explain this Python {kind} and give a short example:\n\n{excerpt}", 400),
    ("In a few paragraphs of plain prose, with no code, explain the ideas behind this Python "
     "{kind} and when they matter:\n\n{excerpt}", 240),
    ("Write a different short Python program in the spirit of this {kind}, then explain it in "
     "two sentences:\n\n{excerpt}", 240),
)


def answer_prompts(documents: Iterator[str], n: int) -> list[str]:
    """n requests made from calibration documents: each round of REQUEST_ROUNDS makes one per
    document (its excerpt from the document's start), until n are made."""
    docs = []
    for doc in documents:
        docs.append(doc)
        if len(docs) == n:
            break
    if not docs:
        raise ValueError("no calibration documents to make requests from")
    rounds = -(-n // len(docs))
    if rounds > len(REQUEST_ROUNDS):
        raise ValueError(f"{n} requests need {rounds} rounds of the {len(docs)} calibration "
                         f"documents, more than the {len(REQUEST_ROUNDS)} kinds of request; "
                         f"give more text (--text) or ask for at most "
                         f"{len(REQUEST_ROUNDS) * len(docs)} answers")
    prompts = []
    for template, chars in REQUEST_ROUNDS[:rounds]:
        for doc in docs:
            kind = "code" if "def " in doc or "import " in doc else "text"
            prompts.append(template.format(kind=kind, excerpt=doc[:chars]))
    return prompts[:n]


GENERAL_REQUESTS = "requests.txt"  # in offline/data: prose and chat requests, one a line


def general_requests(n: int) -> list[str]:
    """The first n of the packaged general requests (prose, advice, letters, stories on ~120
    everyday topics; no code): what the calibration text's requests rarely ask for."""
    text = resources.files(__package__).joinpath("data", GENERAL_REQUESTS).read_text("utf-8")
    lines = [line for line in text.splitlines() if line.strip()]
    if n > len(lines):
        raise ValueError(f"--general {n}: the package holds {len(lines)} general requests; "
                         f"ask for at most {len(lines)}")
    return lines[:n]


def mixed_prompts(documents: Iterator[str], answers: int, general: int) -> list[str]:
    """`answer_prompts(documents, answers)` and `general_requests(general)`, interleaved evenly
    (so a held-out tail holds both kinds)."""
    doc = answer_prompts(documents, answers) if answers else []
    gen = general_requests(general)
    order = sorted([((i + 0.5) / len(doc), 0, i) for i in range(len(doc))]
                   + [((i + 0.5) / len(gen), 1, i) for i in range(len(gen))])
    return [(doc, gen)[kind][i] for _, kind, i in order]


def answer_sequences(model: nn.Module, tokenizer, prompts: list[str], seq_len: int,
                     progress=None) -> tuple[np.ndarray, list[list[int]]]:
    """The model's own greedy answers, (n, seq_len): the last PROMPT_TAIL prompt tokens (or
    all of a shorter prompt), then generated ones. Text the model wrote itself agrees with its
    choices everywhere, so every teacher-forced target counts (see make_examples). Also returns
    each row's context: the rest of its prompt, for the teacher pass."""

    if seq_len <= PROMPT_TAIL + 1:
        raise ValueError(f"--seq-len {seq_len} leaves no room for an answer; use > "
                         f"{PROMPT_TAIL + 1}")
    out, contexts = [], []
    for prompt in prompts:
        ids = format_prompt(tokenizer, prompt)
        contexts.append(ids[:-PROMPT_TAIL])
        tail = ids[-PROMPT_TAIL:]
        steps = generate_step(mx.array(ids), model, max_tokens=seq_len - len(tail))
        new = [int(t) for t, _ in steps]
        out.append(tail + new)
        if progress is not None:
            progress("teacher", len(new), 0.0)
    return np.asarray(out, dtype=np.int32), contexts


def _padded_forward(model: nn.Module, inputs: mx.array, cache: list, pad: np.ndarray
                    ) -> mx.array:
    """The transformer stack over a left-padded batch: inputs (B, N) -> h (B, N, d).

    Row b's first pad[b] positions are padding: no real position attends to them (each pad
    position attends to itself only, so nothing is NaN). RoPE depends on relative positions
    only, so a padded row computes what it would alone (up to rounding)."""
    inner = model.model
    h = inner.embed_tokens(inputs)
    n, start = inputs.shape[1], cache[0].offset
    q = np.arange(start, start + n)[:, None]
    k = np.arange(start + n)[None]
    allowed = (k <= q)[None] & ((k >= pad[:, None, None]) | (k == q)[None])
    mask = mx.array(allowed[:, None])  # (B, 1, N, start + N)
    for layer, c in zip(inner.layers, cache, strict=True):
        h = layer(h, mask, c)
    return inner.norm(h)


def batched_answers(model: nn.Module, tokenizer, prompts: list[str], seq_len: int,
                    batch: int = 16, progress=None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`answer_sequences` for `batch` prompts at a time (left-padded, one forward call per
    generated token for the whole batch, its linears and tied head in numpy: see
    `head_argmax`, `calibration.numpy_linears`), and
    the teacher pass on the way: the generating model's hidden state and argmax at every kept
    position, so no second pass is needed. Returns tokens (n, seq_len), hidden (n, seq_len, d)
    f32 and argmax (n, seq_len); argmax[:, i] = tokens[:, i + 1] over the generated part."""

    n_new = seq_len - PROMPT_TAIL
    if n_new < 1:
        raise ValueError(f"--seq-len {seq_len} leaves no room for an answer; use > "
                         f"{PROMPT_TAIL + 1}")
    with numpy_linears(model):
        return _batched_answers(model, tokenizer, prompts, n_new, batch, progress)


def head_argmax(model: nn.Module) -> Callable[[mx.array], np.ndarray]:
    """h (B, N, d) -> the model's argmax token (B, N). A tied float embedding table on CPU
    is widened to float32 once and multiplied by numpy (the (d, V) head is most of a batched
    step's flops; MLX's CPU matmul is ~40x slower); else the model's own head."""
    embed = model.model.embed_tokens
    if "lm_head" in model or type(embed) is not nn.Embedding or mx.default_device() != mx.cpu:
        head = output_head(model)  # an nn.Linear lm_head runs in numpy under numpy_linears
        return lambda h: np.array(mx.argmax(head(h), axis=-1))
    w = np.ascontiguousarray(np.array(embed.weight.astype(mx.float32)).T)  # (d, V)

    def argmax(h: mx.array) -> np.ndarray:
        a = np.array(h.astype(mx.float32))
        return np.argmax(a.reshape(-1, a.shape[-1]) @ w, axis=-1).reshape(a.shape[:-1])
    return argmax


def _batched_answers(model: nn.Module, tokenizer, prompts: list[str], n_new: int, batch: int,
                     progress) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`batched_answers` with the linears already in numpy."""
    head = head_argmax(model)
    tokens, hidden, argmax = [], [], []
    for first in range(0, len(prompts), batch):
        ids = [format_prompt(tokenizer, p) for p in prompts[first:first + batch]]
        if min(len(i) for i in ids) <= PROMPT_TAIL:
            raise ValueError(f"prompts need more than {PROMPT_TAIL} tokens")
        width = max(len(i) for i in ids)
        pad = np.array([width - len(i) for i in ids])
        inputs = np.array([[i[0]] * (width - len(i)) + i for i in ids], dtype=np.int32)
        cache = make_prompt_cache(model)
        h = _padded_forward(model, mx.array(inputs), cache, pad)[:, -PROMPT_TAIL:]
        hs, gs = [np.array(h.astype(mx.float32))], [head(h)]
        new = [gs[0][:, -1]]
        for step in range(n_new):  # the last step only reads the last token's h and argmax
            h = _padded_forward(model, mx.array(new[-1][:, None]), cache, pad)
            hs.append(np.array(h.astype(mx.float32)))
            gs.append(head(h))
            if step < n_new - 1:
                new.append(gs[-1][:, 0])
            if progress is not None:
                progress("teacher", len(ids), 0.0)
        tokens.append(np.concatenate([inputs[:, -PROMPT_TAIL:], np.stack(new, 1)], axis=1))
        hidden.append(np.concatenate(hs, axis=1))
        argmax.append(np.concatenate(gs, axis=1))
    return (np.concatenate(tokens).astype(np.int32), np.concatenate(hidden),
            np.concatenate(argmax).astype(np.int64))


def _by_length(todo: list[int], prompts: list[str], block: int) -> list[int]:
    """todo in blocks of `block`, each sorted by prompt length: a batch pads to its longest
    prompt, so batches of alike lengths waste less of the prefill (a run stopped early
    still holds, roughly, a prefix of the requests)."""
    return [i for first in range(0, len(todo), block)
            for i in sorted(todo[first:first + block], key=lambda i: len(prompts[i]))]


def cached_answers(model: nn.Module, tokenizer, prompts: list[str], seq_len: int,
                   cache: Path | None, identity: str, batch: int = 16, progress=None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`batched_answers`, kept row by row in `cache` (.npz, rewritten after every batch): a row
    is reused when its prompt, seq_len and model (`identity`) match, so a later run with
    fewer, the same or more requests generates only the missing answers."""
    keys = [hashlib.sha256(json.dumps([identity, seq_len, p]).encode()).hexdigest()
            for p in prompts]
    rows: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    if cache is not None and cache.exists():
        with np.load(cache) as data:
            if "keys" in data:  # each data[name] reads the whole array: once per name
                arrays = [data[name] for name in ("tokens", "hidden", "argmax")]
                for i, key in enumerate(data["keys"]):
                    rows[str(key)] = tuple(a[i] for a in arrays)
    missing = _by_length([i for i, key in enumerate(keys) if key not in rows], prompts,
                         4 * batch)
    if progress is not None:  # the bar counts what is generated, not what is cached
        progress("teacher-total", len(missing) * (seq_len - PROMPT_TAIL), 0.0)
    for first in range(0, len(missing), batch):
        todo = missing[first:first + batch]
        got = batched_answers(model, tokenizer, [prompts[i] for i in todo], seq_len, batch,
                              progress)
        for j, i in enumerate(todo):
            rows[keys[i]] = tuple(a[j] for a in got)
        if cache is not None:
            names = list(rows)
            save_npz(cache, keys=np.array(names), **{
                name: np.stack([rows[k][col] for k in names])
                for col, name in enumerate(("tokens", "hidden", "argmax"))})
    tokens, hidden, argmax = (np.stack([rows[k][col] for k in keys]) for col in range(3))
    return tokens, hidden, argmax
