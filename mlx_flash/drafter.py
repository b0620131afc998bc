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
faster than the `mlx[cpu]` wheel's reference BLAS for these matmuls, see predictor.py); the
gradients are checked against finite differences in tests/test_drafter.py.

On disk, in the model dir: `drafter.safetensors` (the weights, matrices as float16, and
`vocab`; header metadata with the format and the config) and `drafter.json` (file size,
sha256, model identity, training report). A file whose checksum, format or shapes disagree is
rejected with the fix. Loaded for drafting where the CPU kernels run, the matrices and head
rows stay float16 (`HalfRows`, 20 MiB for the default model instead of 39 in float32).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .format import (
    FormatError,
    fsync_dir,
    load_checked_safetensors,
    read_manifest,
    sha256_file,
)

DRAFTER = "drafter.safetensors"
FILE_FORMAT = "mlx-flash-drafter"
FILE_VERSION = "1"


# ---------------------------------------------------------------- the model's frozen parts


def head_weight_rows(model_dir: str | Path, ids: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Rows `ids` of the model's output projection (k, d) as `dtype`, read from the dir's
    resident.safetensors (lm_head, or the tied embedding table): whatever form the loaded
    model keeps them in (quantized, fast-path views, on flash), these are the stored values."""
    from .format import RESIDENT
    from .model import tensor_sizes

    path = Path(model_dir) / RESIDENT
    tensors = tensor_sizes(path)
    name = "lm_head.weight" if "lm_head.weight" in tensors else "model.embed_tokens.weight"
    shape, offset, _, stored = tensors[name]
    storage = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}[stored]
    rows = np.memmap(path, mode="r", offset=offset, shape=shape, dtype=storage)[ids]
    if storage is np.uint16:  # bfloat16
        rows = (rows.astype(np.uint32) << 16).view(np.float32)
    return rows.astype(dtype)


def embed_tokens(model: nn.Module, ids: np.ndarray) -> np.ndarray:
    """The model's input embeddings of `ids`: (k,) -> (k, d) float32 (evaluated)."""
    out = model.model.embed_tokens(mx.array(np.asarray(ids, dtype=np.int32)))
    return np.array(out.astype(mx.float32))


def hidden_and_logits(model: nn.Module, inputs: mx.array, cache=None
                      ) -> tuple[mx.array, mx.array]:
    """The transformer stack and the output head apart: inputs (1, L) -> h (1, L, d), logits.

    h is the lm_head's input (after the final norm), what the drafter reads.
    """
    h = model.model(inputs, cache)
    return h, output_head(model)(h)


def output_head(model: nn.Module) -> Callable[[mx.array], mx.array]:
    """The model's lm_head, or its tied embedding table used as one."""
    return model["lm_head"] if "lm_head" in model else model.model.embed_tokens.as_linear


# ---------------------------------------------------------------- the drafter's math (numpy)


def silu(a: np.ndarray) -> np.ndarray:
    return a / (1.0 + np.exp(-a))


def silu_grad(a: np.ndarray) -> np.ndarray:
    sig = 1.0 / (1.0 + np.exp(-a))
    return sig * (1.0 + a * (1.0 - sig))


def param_shapes(d: int, n_res: int) -> dict[str, tuple[int, ...]]:
    """W, U (d, d), b (d,), P (d, 2d), p (d,), and per ResBlock R{i} (2d, 2d), c{i} (2d,)."""
    shapes = {"W": (d, d), "U": (d, d), "b": (d,), "P": (d, 2 * d), "p": (d,)}
    for i in range(n_res):
        shapes.update({f"R{i}": (2 * d, 2 * d), f"c{i}": (2 * d,)})
    return shapes


INIT_GAIN = {"U": 0.5, "R": 0.1}  # a contracting recurrence, ResBlocks near the identity


def init_params(d: int, n_res: int, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Random weights (matrices ~ N(0, 1/fan_in) times INIT_GAIN), zero biases."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(d, n_res).items():
        if len(shape) == 1:
            params[name] = np.zeros(shape, dtype)
        else:
            gain = INIT_GAIN.get(name[0], 1.0)
            params[name] = (rng.standard_normal(shape) * gain / np.sqrt(shape[1])).astype(dtype)
    return params


def n_resblocks(params: dict[str, np.ndarray]) -> int:
    return sum(1 for k in params if k.startswith("R"))


class HalfRows:
    """A matrix kept as float16 rows (half the DRAM) and multiplied by the CPU kernels'
    linear16, which reads the rows once and accumulates in float32. For drafting only: the
    training's backward pass needs float32 matrices."""

    def __init__(self, bits: np.ndarray):
        self.bits = np.ascontiguousarray(bits).view(np.uint16)  # (rows, d) float16 bits

    @classmethod
    def of(cls, w: np.ndarray) -> HalfRows:
        return cls(np.asarray(w, dtype=np.float16))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.bits.shape

    @property
    def nbytes(self) -> int:
        return self.bits.nbytes

    def apply(self, x: np.ndarray) -> np.ndarray:
        """x (B, d) -> x @ W.T (B, rows) float32."""
        from .cpu import kernels

        return kernels().linear16(self.bits, "float16",
                                  np.ascontiguousarray(x, dtype=np.float32))


def keeps_half(half: bool | None = None) -> bool:
    """Whether a loaded drafter keeps its matrices float16: `half`, or where None, whether the
    CPU kernels that multiply them run here. One rule for `load_drafter` and `drafter_bytes`."""
    if half is not None:
        return half
    from .cpu import unavailable_reason

    return unavailable_reason() is None


def matmul_t(x: np.ndarray, w: np.ndarray | HalfRows) -> np.ndarray:
    """x @ w.T, for a float32 matrix or HalfRows."""
    return w.apply(x) if isinstance(w, HalfRows) else x @ w.T


def rnn_step(params: dict, s: np.ndarray | None, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """s: (B, d) or None (first step), e: (B, d) -> (pre-activation a, new state s)."""
    a = matmul_t(e, params["W"]) + params["b"]
    if s is not None:
        a = a + matmul_t(s, params["U"])
    return a, silu(a)


def head_forward(params: dict, s: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, list]:
    """s, h: (B, d) -> z (B, d), the lm_head input; and what the backward pass needs."""
    x = np.concatenate([s, h], axis=1)  # (B, 2d)
    saved = []
    for i in range(n_resblocks(params)):
        r = matmul_t(x, params[f"R{i}"]) + params[f"c{i}"]
        saved.append((x, r))
        x = x + silu(r)
    return matmul_t(x, params["P"]) + params["p"], saved + [x]


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


# ---------------------------------------------------------------- the drafter


@dataclass
class Drafter:
    """Drafter weights plus the model's frozen parts it reads (attached by `attach`)."""

    params: dict[str, np.ndarray]
    vocab: np.ndarray  # (V,) model token ids the drafter can propose
    meta: dict = field(default_factory=dict)
    head: np.ndarray | HalfRows | None = None  # (V, d): lm_head rows `vocab`
    embed: Callable[[np.ndarray], np.ndarray] | None = None  # ids (k,) -> (k, d) float32

    @property
    def d_model(self) -> int:
        return self.params["W"].shape[1]

    @property
    def half(self) -> bool:
        return isinstance(self.params["W"], HalfRows)

    @property
    def nbytes(self) -> int:
        """DRAM held by the weights and the head rows."""
        return sum(v.nbytes for v in self.params.values()) + self.head.nbytes

    def attach(self, model: nn.Module, model_dir: str | Path) -> Drafter:
        """Read the model's frozen head rows (from its dir; float16 for a half drafter) and
        use its embedding table; returns self."""
        if self.half:
            self.head = HalfRows.of(head_weight_rows(model_dir, self.vocab, np.float16))
        else:
            self.head = head_weight_rows(model_dir, self.vocab)
        self.embed = lambda ids: embed_tokens(model, ids)
        return self

    def log_probs(self, s: np.ndarray, h: np.ndarray) -> np.ndarray:
        """s, h: (B, d) -> (B, V) log-probabilities over `vocab`."""
        z, _ = head_forward(self.params, s, h)
        logits = matmul_t(z, self.head)
        logits -= logits.max(1, keepdims=True)
        return logits - np.log(np.exp(logits).sum(1, keepdims=True))

    def beam_search(self, h: np.ndarray, token: int, width: int, length: int) -> np.ndarray:
        """Drafts after `token`: h (d,) -> (beams, length) model token ids, best beam first.

        Plain beam search on the summed log-probabilities; beams <= width (fewer when the
        vocabulary is smaller than the width).
        """
        assert self.head is not None, "attach(model, model_dir) first"
        hh = h.reshape(1, -1).astype(np.float32)
        seqs, scores = np.zeros((1, 0), dtype=np.int64), np.zeros(1)
        s, last = None, np.array([token])
        for _ in range(length):
            _, s = rnn_step(self.params, s, self.embed(last))
            total = scores[:, None] + self.log_probs(s, np.repeat(hh, s.shape[0], 0))
            flat = total.ravel()
            k = min(width, flat.size)
            best = np.argpartition(-flat, k - 1)[:k]
            best = best[np.argsort(-flat[best], kind="stable")]
            beam, col = np.divmod(best, total.shape[1])
            last = self.vocab[col]
            seqs = np.concatenate([seqs[beam], last[:, None]], axis=1)
            s, scores = s[beam], flat[best]
        return seqs


# ---------------------------------------------------------------- save / load


def drafter_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights file, sidecar json) for a model dir or a `.safetensors` file."""
    path = Path(path).expanduser()
    weights = path / DRAFTER if path.is_dir() else path
    return weights, weights.with_suffix(".json")


def drafter_bytes(path: str | Path, d_model: int, half: bool | None = None) -> int:
    """DRAM a drafter holds once loaded and attached, from its file's header: its weights
    and the lm_head rows of its vocabulary, matrices float16 when `half` (None: as
    `load_drafter` decides), biases float32. 0 when there is no file (loading it then fails
    with the reason)."""
    from .model import tensor_sizes

    weights, _ = drafter_paths(path)
    if not weights.exists():
        return 0
    matrix = 2 if keeps_half(half) else 4
    sizes = tensor_sizes(weights)
    held = sum((matrix if len(e.shape) == 2 else 4) * int(np.prod(e.shape))
               for name, e in sizes.items() if name != "vocab")
    vocab = sizes["vocab"].shape[0] if "vocab" in sizes else 0
    return held + matrix * vocab * d_model


def model_identity(flash_dir: Path) -> dict:
    """What ties a drafter to a model: the architecture numbers and the resident file's hash."""
    manifest = read_manifest(flash_dir)
    cfg = manifest.config
    return {"d_model": cfg["hidden_size"], "vocab_size": cfg["vocab_size"],
            "resident_sha256": manifest.resident["sha256"]}


def save_drafter(drafter: Drafter, flash_dir: str | Path, path: str | Path | None = None
                 ) -> Path:
    """Write the drafter (temp file, fsync, rename; then the sidecar). Returns the file."""
    root = Path(flash_dir)
    weights, sidecar = drafter_paths(path or root)
    arrays = {k: mx.array(v.astype(np.float16 if v.ndim == 2 else np.float32))
              for k, v in drafter.params.items()}
    arrays["vocab"] = mx.array(drafter.vocab.astype(np.int32))
    tmp = weights.with_name(".drafter-tmp.safetensors")
    mx.save_safetensors(str(tmp), arrays, metadata={
        "format": FILE_FORMAT, "version": FILE_VERSION, "n_res": str(n_resblocks(drafter.params)),
        "meta": json.dumps(drafter.meta)})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    sidecar.unlink(missing_ok=True)  # no sidecar = no drafter while the file is replaced
    os.replace(tmp, weights)
    entry = {"file": weights.name, "size": weights.stat().st_size,
             "sha256": sha256_file(weights), "format": FILE_FORMAT, "version": FILE_VERSION,
             "model": model_identity(root), **drafter.meta}
    tmp_json = sidecar.with_name(sidecar.name + ".tmp")
    tmp_json.write_text(json.dumps(entry, indent=1))
    os.replace(tmp_json, sidecar)
    fsync_dir(weights.parent)
    return weights


def load_drafter(path: str | Path, flash_dir: str | Path | None = None,
                 half: bool | None = None) -> Drafter:
    """Read and check a drafter: sha256 against its sidecar, format, shapes, and (with
    flash_dir) that it was trained for this model. Raises FormatError naming the file.
    half: keep the matrices float16 (HalfRows; None: where the CPU kernels run), else float32."""
    weights, sidecar = drafter_paths(path)
    fix = f"train one with `mlx-flash train-drafter {flash_dir or weights.parent}`"
    if not sidecar.exists() or not weights.exists():
        raise FormatError(f"no drafter at {weights} (needs it and {sidecar.name}); {fix}")
    try:
        entry = json.loads(sidecar.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{sidecar}: not valid JSON ({e}); {fix}") from e
    arrays, metadata = load_checked_safetensors(weights, entry.get("sha256"), sidecar.name,
                                                FILE_FORMAT, FILE_VERSION, "drafter", fix)
    drafter = _from_arrays(arrays, weights, fix, keeps_half(half))
    drafter.meta = json.loads(metadata.get("meta", "{}"))
    if flash_dir is not None:
        _check_identity(entry.get("model", {}), model_identity(Path(flash_dir)), weights, fix)
    return drafter


def _from_arrays(arrays: dict[str, mx.array], where: Path, fix: str, half: bool) -> Drafter:
    if "W" not in arrays or "vocab" not in arrays:
        raise FormatError(f"{where}: missing tensors W/vocab; {fix}")
    d = arrays["W"].shape[1]
    params = {k: HalfRows.of(np.array(v.astype(mx.float16))) if half and v.ndim == 2
              else np.array(v.astype(mx.float32)) for k, v in arrays.items() if k != "vocab"}
    got = {k: v.shape for k, v in params.items()}
    if got != param_shapes(d, n_resblocks(params)):
        raise FormatError(f"{where}: tensor shapes {got} are not a drafter for d_model {d}; "
                          f"{fix}")
    return Drafter(params, np.array(arrays["vocab"]).astype(np.int64))


def _check_identity(saved: dict, current: dict, where: Path, fix: str) -> None:
    for key in ("d_model", "vocab_size", "resident_sha256"):
        if saved.get(key) != current[key]:
            raise FormatError(f"{where} was trained for another model ({key} "
                              f"{saved.get(key)!r}, this model {current[key]!r}); {fix}")


# ---------------------------------------------------------------- training data


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
                           progress=None, contexts: list[list[int]] | None = None
                           ) -> tuple[np.ndarray, np.ndarray]:
    """`teacher_outputs`, kept in `cache` (.npz) and reused when it holds the same tokens."""
    if cache is not None and cache.exists():
        with np.load(cache) as data:
            if np.array_equal(data["tokens"], tokens):
                return data["hidden"], data["argmax"]
    hidden, argmax = teacher_outputs(model, tokens, progress, contexts)
    if cache is not None:
        save_npz(cache, tokens=tokens, hidden=hidden, argmax=argmax)
    return hidden, argmax


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez under a temporary name, fsynced, then renamed: a crash leaves the old file or
    none, never a truncated one."""
    tmp = path.with_name(path.name + ".tmp.npz")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def teacher_outputs(model: nn.Module, tokens: np.ndarray, progress=None,
                    contexts: list[list[int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One forward pass per sequence: tokens (S, T) -> hidden (S, T, d) f32, argmax (S, T).

    contexts: per sequence, tokens fed before it (a prompt) whose outputs are not kept. The
    linears run in numpy on CPU (big matmuls, see predictor.numpy_linears)."""
    from .predictor import numpy_linears

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


# ---------------------------------------------------------------- training


class Adam:
    """Adam on a dict of numpy arrays (the drafter is small: no need for mlx.optimizers)."""

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
    hidden, argmax = teacher or cached_teacher_outputs(model, tokens, cache, tick, contexts)
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


# ---------------------------------------------------------------- command line


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


def answer_sequences(model: nn.Module, tokenizer, prompts: list[str], seq_len: int,
                     progress=None) -> tuple[np.ndarray, list[list[int]]]:
    """The model's own greedy answers, (n, seq_len): the last PROMPT_TAIL prompt tokens (or
    all of a shorter prompt), then generated ones. Text the model wrote itself agrees with its choices
    everywhere, so every teacher-forced target counts (see make_examples). Also returns each
    row's context: the rest of its prompt, for the teacher pass."""
    from mlx_lm.generate import generate_step

    from .generate import format_prompt

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
    generated token for the whole batch: ~5x the tokens/s of one prompt on a 2-core CPU), and
    the teacher pass on the way: the generating model's hidden state and argmax at every kept
    position, so no second pass is needed. Returns tokens (n, seq_len), hidden (n, seq_len, d)
    f32 and argmax (n, seq_len); argmax[:, i] = tokens[:, i + 1] over the generated part."""
    from mlx_lm.models.cache import make_prompt_cache

    from .generate import format_prompt

    n_new = seq_len - PROMPT_TAIL
    if n_new < 1:
        raise ValueError(f"--seq-len {seq_len} leaves no room for an answer; use > "
                         f"{PROMPT_TAIL + 1}")
    head = output_head(model)
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
        g = mx.argmax(head(h), axis=-1)
        hs, gs = [np.array(h.astype(mx.float32))], [np.array(g)]
        new = [gs[0][:, -1]]
        for step in range(n_new):  # the last step only reads the last token's h and argmax
            h = _padded_forward(model, mx.array(new[-1][:, None]), cache, pad)
            g = mx.argmax(head(h), axis=-1)
            hs.append(np.array(h.astype(mx.float32)))
            gs.append(np.array(g))
            if step < n_new - 1:
                new.append(gs[-1][:, 0])
            if progress is not None:
                progress("teacher", len(ids), 0.0)
        tokens.append(np.concatenate([inputs[:, -PROMPT_TAIL:], np.stack(new, 1)], axis=1))
        hidden.append(np.concatenate(hs, axis=1))
        argmax.append(np.concatenate(gs, axis=1))
    return (np.concatenate(tokens).astype(np.int32), np.concatenate(hidden),
            np.concatenate(argmax).astype(np.int64))


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
    missing = [i for i, key in enumerate(keys) if key not in rows]
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


def make_drafter(flash_dir: str | Path, cfg: DrafterConfig, text: str | Path | None = None,
                 n_tokens: int = 4096, seq_len: int = 256, out: str | Path | None = None,
                 progress=None, teacher_cache: str | Path | None = None, answers: int = 0,
                 answer_batch: int = 16) -> tuple[Path, TrainReport]:
    """Calibration text (or, with `answers`, the model's own greedy answers to that many
    requests made from it, `answer_batch` at a time, their hidden states kept on the way)
    -> teacher pass of the dense model -> drafter saved in the dir. With answers the
    teacher_cache keeps the answers (see cached_answers)."""
    from .model import load_dense
    from .predictor import (
        DEFAULT_DOC_CHARS,
        DEFAULT_TEXT,
        calibration_sequences,
        default_documents,
        read_documents,
    )

    root = Path(flash_dir)
    model, tokenizer = load_dense(root, fast_cpu=True)
    docs = default_documents() if text is None else read_documents(text)
    cache = Path(teacher_cache) if teacher_cache is not None else None
    teacher = None
    if answers:
        t0 = time.perf_counter()
        tokens, *teacher = cached_answers(
            model, tokenizer, answer_prompts(docs, answers), seq_len, cache,
            model_identity(root)["resident_sha256"], answer_batch, progress)
        answer_seconds = time.perf_counter() - t0
    else:
        tokens = calibration_sequences(tokenizer, docs, n_tokens, seq_len)
    drafter, report = train_drafter(model, root, tokens, cfg, progress, cache,
                                    teacher=teacher)
    if answers:  # generation was the teacher pass
        report.teacher_seconds = answer_seconds
        drafter.meta["teacher_seconds"] = round(answer_seconds, 1)
    source = (DEFAULT_TEXT.format(chars=DEFAULT_DOC_CHARS) if text is None
              else str(Path(text).resolve()))
    drafter.meta["text"] = (f"the model's greedy answers to {answers} requests made from: "
                            if answers else "") + source
    return save_drafter(drafter, root, out), report


class _Progress:
    """tqdm bars for the teacher pass and the training steps (the CLI's progress)."""

    def __init__(self, n_tokens: int, steps: int):
        import sys

        from tqdm import tqdm

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


def train_drafter_cli(args) -> int:
    """`mlx-flash train-drafter DIR ...`: trains, saves, prints time and acceptance."""
    cfg = DrafterConfig(length=args.length, n_res=args.resblocks, vocab=args.vocab,
                        steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        hidden_weight=args.hidden_weight, seed=args.seed)
    n_tokens = (args.tokens // args.seq_len) * args.seq_len
    if args.answers:
        n_tokens = args.answers * (args.seq_len - PROMPT_TAIL)  # less what the cache holds
    bars = _Progress(n_tokens, cfg.steps)
    try:
        path, report = make_drafter(args.dir, cfg, args.text, args.tokens, args.seq_len,
                                    args.out, bars, args.teacher_cache, args.answers,
                                    args.answer_batch)
    finally:
        bars.close()
    hold = report.holdout
    print(f"teacher pass {report.teacher_seconds:.0f} s over {report.tokens} tokens, training "
          f"{report.train_seconds:.0f} s ({cfg.steps} steps); vocabulary {cfg.vocab} tokens "
          f"cover {report.vocab_coverage:.1%} of the targets\nheld-out ({hold['positions']} "
          f"positions, teacher forced): top-1 per draft step {hold['top1_per_step']}, mean "
          f"accepted greedy chain {hold['mean_accepted']:.2f} of {cfg.length}\nwrote {path}")
    return 0


def add_arguments(subparsers) -> None:
    """Register `train-drafter` on the CLI's subparsers."""
    from .predictor import add_text_arguments

    p = subparsers.add_parser("train-drafter",
                              help="train the recurrent drafter for speculative decoding")
    p.add_argument("dir", help="flash model dir (the drafter is written into it)")
    add_text_arguments(p)
    p.add_argument("--answers", type=int, default=0,
                   help="train on the model's own greedy answers to this many requests made "
                        "from the calibration text (seq-len tokens each) instead of the text; "
                        "up to 3 per document: explain with an example, explain in prose, "
                        "write new code")
    p.add_argument("--answer-batch", type=int, default=16,
                   help="answers generated together (one forward call per token for all)")
    p.add_argument("--steps", type=int, default=DrafterConfig.steps, help="training steps")
    p.add_argument("--batch-size", type=int, default=DrafterConfig.batch_size)
    p.add_argument("--lr", type=float, default=DrafterConfig.lr)
    p.add_argument("--length", type=int, default=DrafterConfig.length,
                   help="draft steps unrolled in training")
    p.add_argument("--resblocks", type=int, default=DrafterConfig.n_res)
    p.add_argument("--vocab", type=int, default=DrafterConfig.vocab,
                   help="tokens the drafter can propose (most frequent targets, then the "
                        "lowest ids)")
    p.add_argument("--hidden-weight", type=float, default=DrafterConfig.hidden_weight,
                   help="weight of the feature-distillation term (MSE to the model's next "
                        "hidden state; 0: cross-entropy only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write here instead of DIR/drafter.safetensors")
    p.add_argument("--teacher-cache", default=None, metavar="FILE.npz",
                   help="keep the teacher pass here (reused when the tokens match; with "
                        "--answers: the answers, reused per request)")
    p.set_defaults(func=train_drafter_cli)
