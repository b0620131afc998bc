"""The recurrent drafter (ReDrafter, arXiv 2403.09919): a small head that guesses the next tokens.

For the model's last hidden state h (after the final norm, the lm_head's input) and the token y
the model just chose, the drafter unrolls a one-layer RNN over the tokens it drafts:

    s_1 = silu(W e(y) + b)              e: the model's own (frozen) embedding table
    s_k = silu(U s_{k-1} + W e(t_k) + b)
    x_k = [s_k, h]                      (2d,)
    x_k = x_k + silu(R_i x_k + c_i)     ResBlocks, i = 1..n_res
    logits_k = (P x_k + p) @ E_V^T      E_V: rows `vocab` of the model's frozen lm_head

so its only weights are W, U (d x d), the ResBlocks (2d x 2d) and P (d x 2d): 6.4 M parameters
for the default model. The vocabulary projection is restricted to `vocab`, a subset of the
model's tokens (the tokens the model predicted on the calibration text, then the lowest ids,
which byte-level BPE vocabularies give to their most frequent merges): drafting a token outside
it is impossible, which costs acceptance and never exactness (verification decides).

Training (`train_drafter`) is distillation from the model's own greedy predictions, teacher
forced: one forward pass of the dense model over calibration text gives, at every position i,
the hidden state h_i and the model's argmax g_i; the drafter learns to predict g_{i+k} from h_i
after reading g_i..g_{i+k-1}. Both the forward and the backward pass are numpy (OpenBLAS is ~30x
faster than the `mlx[cpu]` wheel's reference BLAS for these matmuls, see train_predictors.py);
the gradients are checked against finite differences in tests/test_drafter.py.

On disk, in the model dir: `drafter.safetensors` (the weights, matrices as float16, and
`vocab`; header metadata with the format and the config) and `drafter.json` (file size,
sha256, model identity, training report). A file whose checksum, format or shapes disagree is
rejected with the fix. Loaded for drafting where the CPU kernels run, the matrices and head
rows stay float16 (`HalfRows`, 20 MiB for the default model instead of 39 in float32).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tqdm import tqdm

from ..format.storage import save_npz
from ..runtime.loader import load_dense
from ..spec.drafter import (
    Drafter,
    head_forward,
    hidden_and_logits,
    init_params,
    model_identity,
    n_resblocks,
    rnn_step,
    save_drafter,
)
from .answers import cached_answers, mixed_prompts
from .calibration import (
    DEFAULT_DOC_CHARS,
    DEFAULT_TEXT,
    calibration_sequences,
    default_documents,
    numpy_linears,
    read_documents,
)


def silu_grad(a: np.ndarray) -> np.ndarray:
    sig = 1.0 / (1.0 + np.exp(-a))
    return sig * (1.0 + a * (1.0 - sig))


def head_backward(params: dict, saved: list, dz: np.ndarray, grads: dict) -> np.ndarray:
    """Accumulate the head's gradients for dz (B, d); returns d loss / d s (B, d)."""
    x = saved[-1]
    grads["P"] += dz.T @ x
    grads["p"] += dz.sum(0)
    dx = dz @ params["P"]
    for i in reversed(range(n_resblocks(params))):
        x_in, r = saved[i]
        dr = dx * silu_grad(r)
        grads[f"R{i}"] += dr.T @ x_in
        grads[f"c{i}"] += dr.sum(0)
        dx = dx + dr @ params[f"R{i}"]
    return dx[:, : params["W"].shape[0]]


def softmax_xent(logits: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray, int]:
    """Summed cross-entropy over rows with a target >= 0 (-1: ignored), and d loss/d logits."""
    valid = targets >= 0
    shifted = logits - logits.max(1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(1, keepdims=True)
    rows = np.nonzero(valid)[0]
    loss = -float(np.log(probs[rows, targets[rows]] + 1e-30).sum())
    probs[rows, targets[rows]] -= 1.0
    probs[~valid] = 0.0
    return loss, probs, rows.size


def loss_and_grads(params: dict, head: np.ndarray, h: np.ndarray, emb: np.ndarray,
                   targets: np.ndarray, next_hidden: np.ndarray | None = None,
                   hidden_weight: float = 0.0) -> tuple[float, dict[str, np.ndarray]]:
    """Loss of an unrolled draft and its gradients (BPTT).

    Loss = mean cross-entropy of the drafted tokens + hidden_weight * mean squared error of
    the drafter's lm_head input z_k against the model's own next hidden state (feature
    distillation, as EAGLE does: d numbers of supervision per position instead of one label).
    head: (V, d) frozen projection rows; h: (B, d); emb: (B, L, d) embeddings of the tokens
    read at each step; targets: (B, L) indices into the V rows (-1: no loss); next_hidden:
    (B, L, d) the model's hidden state at the drafted positions.
    """
    grads = {k: np.zeros_like(v) for k, v in params.items()}
    steps, s, total, count, mse = [], None, 0.0, 0, 0.0
    regress = next_hidden is not None and hidden_weight > 0
    mse_scale = 2 * hidden_weight / (emb.shape[0] * emb.shape[1] * h.shape[1])
    for k in range(emb.shape[1]):
        a, s_new = rnn_step(params, s, emb[:, k])
        z, saved = head_forward(params, s_new, h)
        loss, dlogits, n = softmax_xent(z @ head.T, targets[:, k])
        diff = (z - next_hidden[:, k]) * (targets[:, k, None] >= 0) if regress else 0.0 * z
        mse += float((diff * diff).sum()) * mse_scale / 2
        steps.append((s, a, saved, dlogits, diff * mse_scale))
        total, count, s = total + loss, count + n, s_new
    scale = 1.0 / max(1, count)
    ds_next = None
    for k in reversed(range(emb.shape[1])):
        s_prev, a, saved, dlogits, dz_mse = steps[k]
        ds = head_backward(params, saved, (dlogits @ head) * scale + dz_mse, grads)
        if ds_next is not None:
            ds = ds + ds_next
        da = ds * silu_grad(a)
        grads["W"] += da.T @ emb[:, k]
        grads["b"] += da.sum(0)
        if s_prev is not None:
            grads["U"] += da.T @ s_prev
        ds_next = da @ params["U"]
    return total * scale + mse, grads


@dataclass
class DrafterConfig:
    """Training settings of `train_drafter`."""

    length: int = 4  # draft steps unrolled in training (the draft length it is made for)
    n_res: int = 1  # ResBlocks
    vocab: int = 4096  # size of the drafter's vocabulary subset (capped at the model's)
    steps: int = 300
    batch_size: int = 128
    lr: float = 1e-3
    holdout: float = 0.1  # last fraction of the sequences, for the acceptance report
    hidden_weight: float = 1.0  # feature distillation: MSE to the model's next hidden state
    seed: int = 0

    def __post_init__(self):
        for name in ("length", "vocab", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"drafter {name} must be >= 1, got {getattr(self, name)}")
        if self.n_res < 0 or not 0.0 < self.holdout < 1.0:
            raise ValueError(f"need n_res >= 0 and 0 < holdout < 1, got {self.n_res}, "
                             f"{self.holdout}")


def cached_teacher_outputs(model: nn.Module, tokens: np.ndarray, cache: Path | None,
                           identity: str, progress=None,
                           contexts: list[list[int]] | None = None
                           ) -> tuple[np.ndarray, np.ndarray]:
    """`teacher_outputs`, kept in `cache` (.npz) and reused when it holds the same tokens of
    the same model (`identity`: its resident file's sha256), as `answers.cached_answers`."""
    if cache is not None and cache.exists():
        with np.load(cache) as data:
            if ("identity" in data and str(data["identity"]) == identity
                    and np.array_equal(data["tokens"], tokens)):
                return data["hidden"], data["argmax"]
    hidden, argmax = teacher_outputs(model, tokens, progress, contexts)
    if cache is not None:
        save_npz(cache, tokens=tokens, hidden=hidden, argmax=argmax, identity=np.array(identity))
    return hidden, argmax


def teacher_outputs(model: nn.Module, tokens: np.ndarray, progress=None,
                    contexts: list[list[int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One forward pass per sequence: tokens (S, T) -> hidden (S, T, d) f32, argmax (S, T).

    contexts: per sequence, tokens fed before it (a prompt) whose outputs are not kept. The
    linears run in numpy on CPU (big matmuls, see predictor.numpy_linears)."""

    hs, gs = [], []
    with numpy_linears(model):
        for i, row in enumerate(tokens):
            full = np.concatenate([np.asarray(contexts[i] if contexts else [], np.int32), row])
            h, logits = hidden_and_logits(model, mx.array(full[None]))
            h, logits = h[0, -row.size:], logits[0, -row.size:]
            hs.append(np.array(h.astype(mx.float32)))  # evaluates: one sequence at a time
            gs.append(np.array(mx.argmax(logits, axis=-1)).astype(np.int64))
            if progress is not None:
                progress(row.size)
    return np.stack(hs), np.stack(gs)


def choose_vocab(targets: np.ndarray, vocab_size: int, size: int) -> np.ndarray:
    """The drafter's tokens: the most frequent targets, then the lowest ids; (V,) sorted."""
    size = min(size, vocab_size)
    counts = np.bincount(targets[targets >= 0], minlength=vocab_size)
    seen = np.argsort(-counts, kind="stable")[: min(size, int((counts > 0).sum()))]
    rest = np.setdiff1d(np.arange(vocab_size), seen)[: size - seen.size]
    return np.sort(np.concatenate([seen, rest]))


def make_examples(hidden: np.ndarray, argmax: np.ndarray, length: int,
                  tokens: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Teacher-forced drafts: h_i (N, d), tokens read g_i..g_{i+L-1} (N, L), targets
    g_{i+1}..g_{i+L} (N, L) and the hidden states h_{i+1}..h_{i+L} (N, L, d), for every
    position i of every sequence with L tokens after it.

    With the text `tokens` (S, T), a target counts (else -1) only while the text agrees with
    the model's own choices (x_{i+j} = g_{i+j-1} for j <= k): g_{i+k} was computed after the
    text's tokens, and is the model's continuation of its own draft only where they agree.
    """
    S, T, _ = hidden.shape
    if T <= length:
        raise ValueError(f"calibration sequences of {T} tokens are too short for drafts of "
                         f"{length}; raise --seq-len")
    idx = np.arange(T - length)
    offs = idx[:, None] + np.arange(length + 1)[None]  # (T - L, L + 1)
    h = hidden[:, idx].reshape(-1, hidden.shape[2])
    windows = argmax[:, offs].reshape(-1, length + 1)
    nxt = hidden[:, offs[:, 1:]].reshape(-1, length, hidden.shape[2])
    targets = windows[:, 1:].copy()
    if tokens is not None:
        agree = tokens[:, offs[:, 1:]].reshape(-1, length) == windows[:, :-1]
        targets[np.cumprod(agree, axis=1) == 0] = -1
    return h, windows[:, :-1], targets, nxt


class Adam:
    """Adam on a dict of numpy arrays. Not mlx.optimizers' Adam (which predictor training uses):
    the drafter's weights and gradients live in numpy because its matmuls run there (OpenBLAS,
    ~30x faster than the mlx[cpu] wheel's BLAS), and a step through MLX would copy them both."""

    def __init__(self, params: dict[str, np.ndarray], lr: float, betas=(0.9, 0.999),
                 eps: float = 1e-8):
        self.lr, self.betas, self.eps, self.t = lr, betas, eps, 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def update(self, params: dict, grads: dict, lr: float | None = None) -> None:
        self.t += 1
        b1, b2 = self.betas
        step = (lr or self.lr) * np.sqrt(1 - b2**self.t) / (1 - b1**self.t)
        for k, g in grads.items():
            self.m[k] = b1 * self.m[k] + (1 - b1) * g
            self.v[k] = b2 * self.v[k] + (1 - b2) * g * g
            params[k] -= (step * self.m[k] / (np.sqrt(self.v[k]) + self.eps)).astype(
                params[k].dtype)


def to_subset(tokens: np.ndarray, vocab: np.ndarray) -> np.ndarray:
    """Model token ids -> indices into `vocab` (-1 where the token is not in it)."""
    pos = np.searchsorted(vocab, tokens)
    pos = np.minimum(pos, vocab.size - 1)
    return np.where(vocab[pos] == tokens, pos, -1)


def fit(drafter: Drafter, h: np.ndarray, read: np.ndarray, targets: np.ndarray,
        next_hidden: np.ndarray, cfg: DrafterConfig, on_step=None) -> list[float]:
    """Adam on random batches for cfg.steps steps (cosine-decayed lr); returns the losses.

    The hidden-state term is weighted relative to the targets' mean square."""
    rng = np.random.default_rng(cfg.seed)
    opt = Adam(drafter.params, cfg.lr)
    sub = to_subset(targets, drafter.vocab)
    weight = cfg.hidden_weight / float(np.mean(next_hidden[:4096] ** 2))
    losses = []
    for step in range(cfg.steps):
        rows = rng.choice(h.shape[0], size=min(cfg.batch_size, h.shape[0]), replace=False)
        emb = drafter.embed(read[rows].ravel()).reshape(rows.size, read.shape[1], -1)
        loss, grads = loss_and_grads(drafter.params, drafter.head, h[rows], emb, sub[rows],
                                     next_hidden[rows], weight)
        opt.update(drafter.params, grads, cfg.lr * 0.5 * (1 + np.cos(np.pi * step / cfg.steps)))
        losses.append(loss)
        if on_step is not None:
            on_step(step, loss)
    return losses


def chain_acceptance(drafter: Drafter, h: np.ndarray, read: np.ndarray, targets: np.ndarray,
                     batch: int = 512) -> dict:
    """Greedy drafts on held-out positions whose every target counts (see make_examples):
    per-step top-1 accuracy and the mean accepted length of a greedy chain (the drafts before
    the first miss)."""
    full = (targets >= 0).all(axis=1)
    h, read, targets = h[full], read[full], targets[full]
    L = read.shape[1]
    hits = np.zeros((0, L), dtype=bool)
    for start in range(0, h.shape[0], batch):
        sl = slice(start, start + batch)
        s, tok, out = None, read[sl, 0], []
        for k in range(L):
            _, s = rnn_step(drafter.params, s, drafter.embed(tok))
            tok = drafter.vocab[np.argmax(drafter.log_probs(s, h[sl]), axis=1)]
            out.append(tok == targets[sl, k])
        hits = np.concatenate([hits, np.stack(out, 1)])
    accepted = np.cumprod(hits, axis=1).sum(1)
    return {"top1_per_step": [round(float(x), 4) for x in hits.mean(0)],
            "mean_accepted": round(float(accepted.mean()), 4), "positions": int(h.shape[0])}


@dataclass
class TrainReport:
    teacher_seconds: float
    train_seconds: float
    tokens: int
    vocab_coverage: float  # fraction of the targets the drafter's vocabulary holds
    holdout: dict
    losses: list[float] = field(default_factory=list)


def train_drafter(model: nn.Module, model_dir: str | Path, tokens: np.ndarray,
                  cfg: DrafterConfig, progress: Callable[[str, int, float], None] | None = None,
                  teacher_cache: str | Path | None = None,
                  contexts: list[list[int]] | None = None,
                  teacher: tuple[np.ndarray, np.ndarray] | None = None
                  ) -> tuple[Drafter, TrainReport]:
    """Distil a drafter from `model` (loaded from `model_dir`) on calibration tokens (S, T).
    progress(stage, n, value); teacher_cache: an .npz keeping the teacher pass for the next
    run on the same tokens; contexts: prompts fed before each sequence (teacher_outputs);
    teacher: (hidden, argmax) of the tokens already computed (no teacher pass)."""
    t0 = time.perf_counter()
    tick = (lambda n: progress("teacher", n, 0.0)) if progress else None
    cache = Path(teacher_cache) if teacher_cache is not None else None
    hidden, argmax = teacher or cached_teacher_outputs(
        model, tokens, cache, model_identity(Path(model_dir))["resident_sha256"], tick, contexts)
    t1 = time.perf_counter()
    n_hold = max(1, int(round(cfg.holdout * tokens.shape[0])))
    if n_hold >= tokens.shape[0]:
        raise ValueError(f"{tokens.shape[0]} calibration sequences cannot hold out "
                         f"{cfg.holdout:.0%}; give more text (--tokens)")
    train = make_examples(hidden[:-n_hold], argmax[:-n_hold], cfg.length, tokens[:-n_hold])
    hold = make_examples(hidden[-n_hold:], argmax[-n_hold:], cfg.length, tokens[-n_hold:])
    d, vocab_size = hidden.shape[2], int(model.args.vocab_size)
    vocab = choose_vocab(train[2], vocab_size, cfg.vocab)
    drafter = Drafter(init_params(d, cfg.n_res, cfg.seed), vocab).attach(model, model_dir)
    step_cb = (lambda i, loss: progress("train", 1, loss)) if progress else None
    losses = fit(drafter, *train, cfg, step_cb)
    report = TrainReport(t1 - t0, time.perf_counter() - t1, int(tokens.size),
                         float((to_subset(train[2][train[2] >= 0], vocab) >= 0).mean()),
                         chain_acceptance(drafter, *hold[:3]), losses)
    drafter.meta = {"config": asdict(cfg), "teacher_seconds": round(report.teacher_seconds, 1),
                    "train_seconds": round(report.train_seconds, 1), "tokens": report.tokens,
                    "vocab_coverage": round(report.vocab_coverage, 4),
                    "holdout": report.holdout, "final_loss": round(float(np.mean(losses[-20:])), 4)}
    return drafter, report


def make_drafter(flash_dir: str | Path, cfg: DrafterConfig, text: str | Path | None = None,
                 n_tokens: int = 4096, seq_len: int = 256, out: str | Path | None = None,
                 progress=None, teacher_cache: str | Path | None = None, answers: int = 0,
                 answer_batch: int = 16, general: int = 0) -> tuple[Path, TrainReport]:
    """Calibration text (or, with `answers` / `general`, the model's own greedy answers to
    that many requests made from it / of the packaged general ones (`answers.mixed_prompts`),
    `answer_batch` at a time, their hidden states kept on the way) -> teacher pass of the
    dense model -> drafter saved in the dir. With answers the teacher_cache keeps the
    answers (see cached_answers)."""

    root = Path(flash_dir)
    # float32 on CPU: the teacher's linears run as numpy matmuls (numpy_linears), and MLX's
    # float16 CPU ops around them are ~2x slower than float32 ones
    model, tokenizer = load_dense(root, dtype=mx.float32 if mx.default_device() == mx.cpu
                                  else None)
    docs = default_documents() if text is None else read_documents(text)
    cache = Path(teacher_cache) if teacher_cache is not None else None
    teacher = None
    if answers or general:
        t0 = time.perf_counter()
        tokens, *teacher = cached_answers(
            model, tokenizer, mixed_prompts(docs, answers, general), seq_len, cache,
            model_identity(root)["resident_sha256"], answer_batch, progress)
        answer_seconds = time.perf_counter() - t0
    else:
        tokens = calibration_sequences(tokenizer, docs, n_tokens, seq_len)
    drafter, report = train_drafter(model, root, tokens, cfg, progress, cache,
                                    teacher=teacher)
    if answers or general:  # generation was the teacher pass
        report.teacher_seconds = answer_seconds
        drafter.meta["teacher_seconds"] = round(answer_seconds, 1)
    source = (DEFAULT_TEXT.format(chars=DEFAULT_DOC_CHARS) if text is None
              else str(Path(text).resolve()))
    drafter.meta["text"] = (f"the model's greedy answers to {answers} requests made from: "
                            if answers or general else "") + source + (
        f"; and to {general} of the packaged general requests" if general else "")
    return save_drafter(drafter, root, out), report


class _Progress:
    """tqdm bars for the teacher pass and the training steps (the CLI's progress)."""

    def __init__(self, n_tokens: int, steps: int):
        self.teacher = tqdm(total=n_tokens, desc="teacher pass", unit="tok", file=sys.stderr)
        self.train = tqdm(total=steps, desc="training", unit="step", file=sys.stderr)

    def __call__(self, stage: str, n: int, loss: float) -> None:
        if stage == "teacher-total":  # answers found in the cache are not generated
            self.teacher.total = n
            self.teacher.refresh()
            return
        bar = self.teacher if stage == "teacher" else self.train
        bar.update(n)
        if stage == "train":
            bar.set_postfix_str(f"loss {loss:.3f}")

    def close(self) -> None:
        self.teacher.close()
        self.train.close()
