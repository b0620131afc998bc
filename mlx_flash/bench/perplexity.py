"""Perplexity of a contender on one fixed text (the users' regime: quality beside speed).

Every contender scores the same token ids (the text tokenized once by the model's tokenizer):
MLX models by a chunked forward pass with a KV cache, llama.cpp from its own logits
(`Llama(..., logits_all=True)`, `eval`). The negative log-likelihood of token i+1 given
tokens 0..i is taken in float64 from float32 logits, the same way for both.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

# A fixed text written for this benchmark (prose and code, as a coder model meets them), so
# every run and every contender scores the same ~600 tokens; `PPL_TOKENS` of them are used.
PPL_TEXT = '''\
Notes on a small inventory service

The service keeps a count of every item in a warehouse and answers three questions: how many
of an item are on the shelves, which items are running low, and what changed since yesterday.
It started as a single script that read a spreadsheet every morning. When the warehouse grew,
the script became too slow and too fragile, so we rewrote it as a small module with tests.

The core is a dictionary from item names to counts. Adding stock and taking stock are the only
ways to change it, and both refuse negative amounts, because a negative delivery is almost
always a typing mistake rather than a real event.

    from dataclasses import dataclass, field


    @dataclass
    class Inventory:
        counts: dict[str, int] = field(default_factory=dict)
        history: list[tuple[str, int]] = field(default_factory=list)

        def add(self, item: str, amount: int) -> None:
            if amount <= 0:
                raise ValueError(f"amount must be positive, got {amount}")
            self.counts[item] = self.counts.get(item, 0) + amount
            self.history.append((item, amount))

        def take(self, item: str, amount: int) -> None:
            have = self.counts.get(item, 0)
            if amount <= 0 or amount > have:
                raise ValueError(f"cannot take {amount} of {item}: {have} left")
            self.counts[item] = have - amount
            self.history.append((item, -amount))

        def low(self, threshold: int = 5) -> list[str]:
            return sorted(name for name, n in self.counts.items() if n < threshold)

Keeping the history as a list of changes, instead of copying the whole dictionary every day,
means the report of what changed is a single pass over the list. It also means we can rebuild
the counts from scratch if we ever doubt them, which happened twice during the first month.

The tests are short. One adds ten boxes of screws, takes three, and checks that seven remain.
Another tries to take more than there is and expects an error that names the item. A third
fills the inventory with random deliveries and withdrawals, then replays the history into a new
inventory and checks that both agree. That last test found a bug on the first day: a withdrawal
of the last item left a zero in the dictionary, and the low-stock report listed items that the
warehouse no longer carried at all. We now remove an item when its count reaches zero.

What we would do differently: store the history in a database from the start, give every change
a timestamp and the name of the person who made it, and write the report as a query. The
dictionary was the right first step, because it let us learn what the warehouse needed before
we chose how to store it.
'''

PPL_TOKENS = 512
CHUNK = 128


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """logits (T, V) predicting targets (T,) -> (T,) float64 negative log-likelihoods."""
    z = np.asarray(logits, dtype=np.float64)
    top = z.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
    return log_norm - z[np.arange(len(targets)), np.asarray(targets)]


def perplexity(nll: np.ndarray) -> float:
    """exp(mean NLL) of (T,) negative log-likelihoods."""
    return math.exp(float(np.mean(nll)))


def mlx_nll(model, ids: list[int], chunk: int = CHUNK) -> np.ndarray:
    """(len(ids) - 1,) NLL of ids[1:] under an mlx_lm-style model, `chunk` tokens per forward
    pass through one KV cache (bounded logits memory: chunk x vocab float32)."""
    if len(ids) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {len(ids)}")
    cache, out = make_prompt_cache(model), []
    for start in range(0, len(ids) - 1, chunk):
        piece = ids[start:min(start + chunk, len(ids) - 1)]
        logits = model(mx.array(piece)[None], cache=cache)[0].astype(mx.float32)  # (k, V)
        targets = np.asarray(ids[start + 1:start + 1 + len(piece)])
        out.append(token_nll(np.array(logits), targets))
    return np.concatenate(out)


def llama_nll(llm, ids: list[int]) -> np.ndarray:
    """(len(ids) - 1,) NLL of ids[1:] from llama.cpp's own logits; `llm` was made with
    logits_all=True and n_ctx >= len(ids)."""
    llm.reset()
    llm.eval(ids)
    scores = np.asarray(llm.scores)[:len(ids) - 1]  # (T - 1, V): row i predicts ids[i + 1]
    return token_nll(scores, np.asarray(ids[1:]))


def text_ids(tokenizer, text: str = PPL_TEXT, tokens: int = PPL_TOKENS) -> list[int]:
    """The first `tokens` ids of `text` (no chat template, no special tokens added)."""
    ids = list(tokenizer.encode(text, add_special_tokens=False))[:tokens]
    if len(ids) < 2:
        raise ValueError(f"the perplexity text tokenizes to {len(ids)} tokens: need 2 or more")
    return ids
