"""Sparsity predictors: which FFN neurons a token needs, guessed from the layer's input.

This module makes them for any converted model, in four steps:

1. Calibration (`record_activations`): the dense model runs over calibration text; for every
   layer the FFN input x (d_model) and the true activation magnitudes |h| (n_neurons) of every
   token are streamed into `.npy` memmaps in a calibration dir (never all in RAM).
2. Targets (`target_labels`): which neurons count as "active". ReLU-family FFNs: h > 0.
   SwiGLU/GeGLU are not sparse, so "active" is the smallest set of top-|h| neurons holding a
   fraction of the activation mass sum|h| ("mass:0.9"), or a fixed top fraction ("top:0.3").
3. Predictors (`train_layer`), of two kinds:
   - "linear", the paper's: `sigmoid(x @ A @ B + bias)`, A: (d_model, r), B: (r, n_neurons),
     trained with class-balanced binary cross-entropy and Adam from mlx.optimizers. Right for
     ReLU-family FFNs, where "active" is a half-space of x.
   - "ffn", a low-rank copy of the FFN's own input projections (`fit_lowrank_ffn`), scoring
     |act(gate x) * up x|. For SwiGLU a logit linear in x cannot express |up x| (an even
     function of x); measured on Qwen2.5-0.5B layer 12 at rank 128, the neurons it ranks in
     its top half hold 63% of sum|h| against 70% for this kind (and 87% for the true top
     half). See notes/predictors.md.
4. Thresholds (`calibrate_thresholds`): per layer, on held-out tokens, the highest threshold
   whose prediction keeps `recall` of the target set's activation mass, for a grid of recalls
   (the operating point is chosen at load time).

The result is `predictors.safetensors` in the flash dir plus the manifest's `predictors` entry;
`PredictorSelector` plugs it into the runtime (`load(..., selector="predictor")`).

Speed on CPU: the `mlx[cpu]` wheel links the reference BLAS, measured ~2 GFLOP/s for a
(4096 x 896) @ (896 x 128) matmul here against ~20 with numpy's OpenBLAS. So on CPU the heavy
matmuls of calibration (the dense model's linear layers) and training (the loss gradients) run
in numpy, and Adam from mlx.optimizers applies the updates; on a GPU everything is MLX
(`backend="mlx"`, gradients by `mx.value_and_grad`). Both backends compute the same gradients
(tests/test_predictor.py checks it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from .checkpoint import ARCHITECTURES
from .ffn import Selection
from .format import (
    MANIFEST,
    PREDICTORS,
    FormatError,
    Manifest,
    file_entry,
    fsync_dir,
    load_checked_safetensors,
    read_manifest,
)
from .kernels import ACTIVATION_FNS

DEFAULT_MASS = 0.9  # gated FFNs: neurons holding 90% of sum|h| are the target set
DEFAULT_RECALL = 0.99  # 0.95 cost +16% perplexity on Qwen2.5-0.5B: notes/predictors.md
DEFAULT_RANK = 128
RECALL_GRID = (0.9, 0.95, 0.98, 0.99, 0.995)
FILE_FORMAT = "mlx-flash-predictors"
FILE_VERSION = "1"


# ---------------------------------------------------------------- calibration text

DEFAULT_TEXT = ("Python's own documentation and source, interleaved: the pydoc topics of the "
                "language reference (pydoc_data.topics, sorted by name) and the standard "
                "library's top-level modules (Lib/*.py, sorted by name), first "
                "{chars} characters of each")
DEFAULT_DOC_CHARS = 3000  # ~ one 256-token sequence of each document: many short samples


def default_documents(chars: int = DEFAULT_DOC_CHARS) -> Iterator[str]:
    """Deterministic calibration text that ships with Python itself (no download).

    Yields, alternately, a pydoc topic (prose from the language reference) and a stdlib module's
    source (code), each cut to `chars` characters. The order depends only on the Python version.
    """
    import sysconfig

    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    prose = [topics[k] for k in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = sorted(stdlib.glob("*.py"))
    for i in range(max(len(prose), len(sources))):
        if i < len(prose):
            yield prose[i][:chars]
        if i < len(sources):
            text = sources[i].read_text(encoding="utf-8", errors="replace")
            yield text[:chars]


def read_documents(path: str | Path) -> Iterator[str]:
    """The text of a file, or of every text file under a folder (sorted, recursive).

    Files that are not UTF-8 text are skipped. Raises FileNotFoundError naming the path when it
    does not exist or holds no readable text.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"calibration text {path} does not exist; pass a text file or a "
                                "folder of text files (or omit --text for the built-in default)")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    found = False
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            found = True
            yield text
    if not found:
        raise FileNotFoundError(f"{path} holds no UTF-8 text; pass a text file or a folder of "
                                "text files")


def calibration_sequences(tokenizer, documents: Iterable[str], n_tokens: int,
                          seq_len: int) -> np.ndarray:
    """Token ids cut into sequences: (n_seq, seq_len) int32 with n_seq = n_tokens // seq_len.

    Documents are tokenized in order and concatenated with the EOS token between them; reading
    stops as soon as there are enough tokens. Raises ValueError when the text is too short.
    """
    if seq_len < 2 or n_tokens < seq_len:
        raise ValueError(f"need n_tokens >= seq_len >= 2, got n_tokens={n_tokens}, "
                         f"seq_len={seq_len}")
    n_seq = n_tokens // seq_len
    want = n_seq * seq_len
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in documents:
        ids.extend(tokenizer.encode(doc))
        if eos is not None:
            ids.append(eos)
        if len(ids) >= want:
            break
    if len(ids) < want:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than the "
                         f"{want} asked for; give more text or lower --tokens")
    return np.asarray(ids[:want], dtype=np.int32).reshape(n_seq, seq_len)


# ---------------------------------------------------------------- recording activations


class _NumpyLinear(nn.Module):
    """A frozen nn.Linear computed by numpy's BLAS (calibration on CPU only, see module doc)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self._w = np.ascontiguousarray(np.array(linear.weight, dtype=np.float32).T)  # (in, out)
        self._b = np.array(linear.bias, dtype=np.float32) if "bias" in linear else None

    def __call__(self, x: mx.array) -> mx.array:
        """x: (..., in) -> (..., out), evaluated (np.array forces it)."""
        y = np.array(x.astype(mx.float32)) @ self._w
        if self._b is not None:
            y += self._b
        return mx.array(y).astype(x.dtype)


@contextlib.contextmanager
def numpy_linears(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every nn.Linear of `model` is computed by numpy (CPU only).

    For forward passes over many tokens (calibration, perplexity): the same math, ~10x faster
    matmuls on this CPU (see module doc). On a GPU the model is left alone.
    """
    swapped = _swap_linears(model) if mx.default_device() == mx.cpu else []
    try:
        yield model
    finally:
        for parent, name, linear in swapped:
            setattr(parent, name, linear)


def _swap_linears(module: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Replace nn.Linear children (recursively); returns (parent, name, original) to undo."""
    swapped = []
    for name, child in module.children().items():
        if isinstance(child, nn.Linear):
            setattr(module, name, _NumpyLinear(child))
            swapped.append((module, name, child))
        elif isinstance(child, nn.Module):
            swapped += _swap_linears(child)
        elif isinstance(child, list):
            for item in child:
                if isinstance(item, nn.Module):
                    swapped += _swap_linears(item)
    return swapped


Sink = Callable[[int, np.ndarray, np.ndarray], "np.ndarray | None"]


class ActivationRecorder(nn.Module):
    """Stands in for a dense `layer.mlp`: the same output, and it hands (x, |h|) to a sink.

    sink(layer, x, mag): x (T, d_model) float32, mag (T, n_neurons) float32 = |h|, h the
    input of the down projection. A sink may return a (T, n_neurons) bool mask: the layer then
    uses only those neurons (a sparse FFN without flash, for fidelity sweeps).
    """

    def __init__(self, layer: int, mlp: nn.Module, model_type: str, activation: str,
                 sink: Sink):
        super().__init__()
        spec = ARCHITECTURES[model_type]
        self._layer, self._sink, self._act = layer, sink, ACTIVATION_FNS[activation]
        self._gate = getattr(mlp, spec.gate) if spec.kind == "gated" else None
        self._up, self._down = getattr(mlp, spec.up), getattr(mlp, spec.down)

    def __call__(self, x: mx.array) -> mx.array:
        """x: (B, L, d) -> (B, L, d)."""
        if self._gate is not None:
            h = self._act(self._gate(x)) * self._up(x)
        else:
            h = self._act(self._up(x))
        d = x.shape[-1]
        mag = np.abs(np.array(h.astype(mx.float32))).reshape(-1, h.shape[-1])  # evaluates h
        keep = self._sink(self._layer, np.array(x.astype(mx.float32)).reshape(-1, d), mag)
        if keep is not None:
            h = h * mx.array(keep.reshape(h.shape)).astype(h.dtype)
        return self._down(h)


@contextlib.contextmanager
def recording(model: nn.Module, manifest: Manifest, sink: Sink) -> Iterator[nn.Module]:
    """Inside the block every dense `layer.mlp` is an ActivationRecorder feeding `sink`."""
    model_type, originals = manifest.config["model_type"], []
    for i, layer in enumerate(model.layers):
        originals.append(layer.mlp)
        layer.mlp = ActivationRecorder(i, layer.mlp, model_type, manifest.ffn.activation, sink)
    try:
        yield model
    finally:
        for layer, mlp in zip(model.layers, originals, strict=True):
            layer.mlp = mlp


def forward_hidden(model: nn.Module, tokens: np.ndarray) -> mx.array:
    """Run the transformer stack (no lm_head) over one sequence: tokens (L,) -> (1, L, d)."""
    out = model.model(mx.array(tokens[None]))
    mx.eval(out)  # run now: the recorders have seen every layer when this returns
    return out


@dataclass
class CalibrationInfo:
    """What a calibration dir holds (calibration.json)."""

    n_tokens: int
    seq_len: int
    n_layers: int
    d_model: int
    n_neurons: list[int]
    model_sha256: str  # sha256 of the model's resident.safetensors (from the manifest)
    tokens_sha256: str  # sha256 of the token ids: the same text gives the same recording
    text: str  # where the text came from
    relu_family: bool
    seconds: float = 0.0

    @staticmethod
    def path(root: Path) -> Path:
        return Path(root) / "calibration.json"


def x_file(root: Path, layer: int) -> Path:
    return Path(root) / f"x_{layer:03d}.npy"


def mag_file(root: Path, layer: int) -> Path:
    return Path(root) / f"mag_{layer:03d}.npy"


def tokens_digest(tokens: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype=np.int32).tobytes()).hexdigest()


def find_recording(root: Path, manifest: Manifest, tokens: np.ndarray) -> CalibrationInfo | None:
    """The calibration dir's info if it recorded these tokens on this model, else None."""
    path = CalibrationInfo.path(root)
    if not path.exists():
        return None
    try:
        info = CalibrationInfo(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError):
        return None
    same = (info.model_sha256 == manifest.resident["sha256"]
            and info.tokens_sha256 == tokens_digest(tokens)
            and all(x_file(root, i).exists() and mag_file(root, i).exists()
                    for i in range(info.n_layers)))
    return info if same else None


class _RecordingWriter:
    """The memmapped .npy files of a recording; `row` is where the next sequence goes."""

    F16_MAX = float(np.finfo(np.float16).max)

    def __init__(self, out: Path, manifest: Manifest, n_total: int):
        d = manifest.ffn.d_model
        # np.lib.format.open_memmap writes a real .npy header: np.load reads the files back
        # without a side file for shapes, and pages go to disk as they fill, not to RAM.
        self.xs = [np.lib.format.open_memmap(x_file(out, i), "w+", np.float32, (n_total, d))
                   for i in range(manifest.n_layers)]
        self.mags = [np.lib.format.open_memmap(mag_file(out, i), "w+", np.float16,
                                               (n_total, entry.n_neurons))
                     for i, entry in enumerate(manifest.layers)]
        self.row = 0

    def write(self, layer: int, x: np.ndarray, mag: np.ndarray) -> None:
        """x: (L, d), mag: (L, n) for the tokens starting at `row`."""
        self.xs[layer][self.row:self.row + len(x)] = x
        self.mags[layer][self.row:self.row + len(x)] = np.minimum(mag, self.F16_MAX)

    def close(self) -> None:
        for arr in (*self.xs, *self.mags):
            arr.flush()
        self.xs, self.mags = [], []


def record_activations(flash_dir: str | Path, out_dir: str | Path, tokens: np.ndarray,
                       text: str = "", progress: bool = False) -> CalibrationInfo:
    """Run the dense model over `tokens` and stream every layer's (x, |h|) to `out_dir`.

    tokens: (n_seq, seq_len) int32. Writes x_NNN.npy (N, d_model) float32 and mag_NNN.npy
    (N, n_neurons) float16 (|h| clipped to the float16 range: magnitudes only rank neurons and
    weigh their mass) with N = n_seq * seq_len, row t = token t in sequence order, then
    calibration.json (last, so a dir without it is an unfinished recording).
    """
    from tqdm import tqdm

    from .model import load_dense

    root, out = Path(flash_dir), Path(out_dir)
    manifest = read_manifest(root)
    out.mkdir(parents=True, exist_ok=True)
    CalibrationInfo.path(out).unlink(missing_ok=True)
    n_seq, seq_len = tokens.shape
    n_total, d = n_seq * seq_len, manifest.ffn.d_model
    model, _ = load_dense(root, dtype="float32")
    writer = _RecordingWriter(out, manifest, n_total)
    t0 = time.perf_counter()
    with numpy_linears(model), recording(model, manifest, writer.write), \
            tqdm(total=n_total, desc="calibration", unit="tok", disable=not progress,
                 file=sys.stderr) as bar:
        for s in range(n_seq):
            writer.row = s * seq_len
            forward_hidden(model, tokens[s])
            bar.update(seq_len)
    writer.close()
    info = CalibrationInfo(n_total, seq_len, manifest.n_layers, d,
                           [e.n_neurons for e in manifest.layers], manifest.resident["sha256"],
                           tokens_digest(tokens), text, manifest.ffn.relu_family,
                           time.perf_counter() - t0)
    CalibrationInfo.path(out).write_text(json.dumps(asdict(info), indent=1))
    return info


def load_layer(root: Path, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """One layer's recording: x (N, d) float32 and |h| (N, n) float32, read into memory."""
    x = np.load(x_file(root, layer), mmap_mode="r")
    mag = np.load(mag_file(root, layer), mmap_mode="r")
    return np.array(x, dtype=np.float32), np.array(mag, dtype=np.float32)


# ---------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """Which neurons a token needs: "relu" (h > 0), "mass" (top-|h| set holding `value` of
    sum|h|) or "top" (the `value` fraction of neurons with the largest |h|)."""

    kind: str
    value: float = 1.0

    def __post_init__(self):
        if self.kind not in ("relu", "mass", "top"):
            raise ValueError(f"target kind must be 'relu', 'mass' or 'top', got {self.kind!r}")
        if not 0.0 < self.value <= 1.0:
            raise ValueError(f"target {self.kind}:{self.value} must be a fraction in (0, 1]")

    def __str__(self) -> str:
        return "relu" if self.kind == "relu" else f"{self.kind}:{self.value:g}"


def parse_target(text: str, relu_family: bool) -> Target:
    """"auto", "relu", "mass:0.9", "top:0.3" or a bare fraction (= mass) -> Target."""
    text = str(text).strip().lower()
    if text == "auto":
        return Target("relu") if relu_family else Target("mass", DEFAULT_MASS)
    if text == "relu":
        if not relu_family:
            raise ValueError("target 'relu' (active = h > 0) needs a ReLU-family FFN; this "
                             "model's FFN is gated/smooth: use mass:F or top:F (e.g. mass:0.9)")
        return Target("relu")
    kind, _, value = text.rpartition(":")
    try:
        return Target(kind or "mass", float(value))
    except ValueError as e:
        raise ValueError(f"target {text!r} is not understood ({e}); use auto, relu, mass:F or "
                         "top:F with F in (0, 1]") from e


def target_labels(mag: np.ndarray, target: Target) -> np.ndarray:
    """mag: (T, n) |h| -> (T, n) bool, the neurons each token needs."""
    if target.kind == "relu":
        return mag > 0  # relu / relu^2 are >= 0, so |h| > 0 is h > 0
    n = mag.shape[1]
    order = np.argsort(-mag, axis=1)  # (T, n), largest first
    if target.kind == "top":
        k = np.full(len(mag), max(1, math.ceil(target.value * n)))
    else:
        csum = np.cumsum(np.take_along_axis(mag, order, axis=1), axis=1, dtype=np.float64)
        need = target.value * csum[:, -1:]
        k = np.minimum((csum < need).sum(axis=1) + 1, n)  # smallest k with csum[k-1] >= need
    labels = np.zeros(mag.shape, dtype=bool)
    np.put_along_axis(labels, order, np.arange(n)[None, :] < k[:, None], axis=1)
    return labels


# ---------------------------------------------------------------- the predictor

KINDS = ("linear", "ffn")


def np_activation(name: str, z: np.ndarray) -> np.ndarray:
    """The FFN activations in numpy, for scores (exact gelu is taken as its tanh form)."""
    if name == "silu":
        return z * (0.5 * (1.0 + np.tanh(0.5 * z)))  # z * sigmoid(z), no overflow
    if name in ("gelu", "gelu_approx"):
        return 0.5 * z * (1.0 + np.tanh(0.7978845608 * (z + 0.044715 * z**3)))
    if name == "relu":
        return np.maximum(z, 0)
    if name == "relu2":
        return np.square(np.maximum(z, 0))
    raise ValueError(f"unknown activation {name!r}")


@dataclass
class LayerPredictor:
    """One layer's predictor; a neuron is predicted when its score is above tau.

    kind "linear" (the paper's): score = x @ A @ B + bias, a logit (sigmoid(score) > sigmoid(tau)
    is score > tau). A: (d, r), B: (r, n), bias: (n,).
    kind "ffn" (low-rank FFN): the FFN's own input projections at rank r, pre_j = x @ A[j] @ B[j]
    + bias[j], and score = |act(pre_0) * pre_1| (gated) or |act(pre_0)| (plain): an estimate
    of |h|. A: (m, d, r), B: (m, r, n), bias: (m, n), m = 2 gated, 1 plain.
    All float32 in memory.
    """

    A: np.ndarray
    B: np.ndarray
    bias: np.ndarray
    tau: float = 0.0  # the threshold in use
    kind: str = "linear"
    activation: str = "silu"  # used by kind "ffn"
    taus: dict[float, float] = field(default_factory=dict)  # recall -> threshold

    @property
    def rank(self) -> int:
        return self.A.shape[-1]

    def scores(self, x: np.ndarray) -> np.ndarray:
        """x: (T, d) float32 -> (T, n) float32, higher = more likely needed."""
        if self.kind == "linear":
            return _lowrank(x, self.A, self.B) + self.bias
        return self.combine([_lowrank(x, a, b) + c
                             for a, b, c in zip(self.A, self.B, self.bias, strict=True)])

    def combine(self, pre: list[np.ndarray]) -> np.ndarray:
        """Kind "ffn": the low-rank projections (with bias) -> |act(pre_0) * pre_1|."""
        act = np_activation(self.activation, pre[0])
        return np.abs(act * pre[1] if len(pre) == 2 else act)

    def select(self, x: np.ndarray) -> list[np.ndarray]:
        """x: (T, d) -> per token the ids with score > tau, highest score first."""
        return [ids_above(z, self.tau) for z in self.scores(x)]


SMALL_BATCH = 16  # tokens up to which `_lowrank` stays off the BLAS


def _lowrank(x: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """x @ a @ b. x: (T, d), a: (d, r), b: (r, n) -> (T, n).

    Decode-sized inputs go through np.einsum's own loops, not the BLAS: a multithreaded
    OpenBLAS call between two MLX evaluations made its threads fight MLX's for the cores
    (measured on the default model, 2 cores: predictor 136 ms/token with the BLAS, 29 with
    OPENBLAS_NUM_THREADS=1; einsum needs no setting). Large batches (calibration) use the BLAS.
    """
    if len(x) > SMALL_BATCH:
        return (x @ a) @ b
    return np.einsum("tr,rn->tn", np.einsum("td,dr->tr", x, a), b)


def ids_above(z: np.ndarray, tau: float) -> np.ndarray:
    """z: (n,) -> ids with z > tau, in decreasing z (to 1/65535 of the kept scores' range).

    The order only decides which neurons a full cache drops first, so scores are bucketed
    into uint16 keys, which numpy sorts by radix: measured 2x faster than sorting the floats
    for the default model's ~4700 kept neurons.
    """
    ids = np.flatnonzero(z > tau)
    if ids.size < 2:
        return ids
    kept = z[ids]
    top, span = kept.max(), float(kept.max() - kept.min())
    key = ((top - kept) * (65535.0 / span if span > 0 else 0.0)).astype(np.uint16)
    return ids[np.argsort(key, kind="stable")]


@dataclass
class Predictors:
    """All layers' predictors plus what they were made for (the manifest entry's extras)."""

    layers: list[LayerPredictor]
    meta: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(p.A.nbytes + p.B.nbytes + p.bias.nbytes for p in self.layers)

    def use_recall(self, recall: float, where: str = PREDICTORS) -> None:
        """Switch every layer to its threshold for `recall` (one of the calibrated ones)."""
        have = sorted(self.layers[0].taus) if self.layers else []
        match = [r for r in have if abs(r - float(recall)) < 1e-9]
        if not match:
            raise ValueError(f"{where} has thresholds for recalls {have}, not {recall}; pick "
                             "one of those or retrain with `mlx-flash train-predictors "
                             f"--recall {recall}`")
        for p in self.layers:
            p.tau = p.taus[match[0]]
        self.meta["recall_in_use"] = match[0]


# ---------------------------------------------------------------- training


@dataclass
class TrainConfig:
    """How predictors are made. ranks: per-layer overrides of `rank`.

    kind: "linear" (sigmoid(x A B + b), class-balanced BCE with Adam: the paper's predictor,
    the default for ReLU-family FFNs whose "active" is a half-space of x), "ffn" (low-rank FFN
    fit to the layer's weights, the default for gated/smooth FFNs), or "auto".
    """

    rank: int = DEFAULT_RANK
    ranks: dict[int, int] = field(default_factory=dict)
    target: str = "auto"
    recall: float = DEFAULT_RECALL  # the default operating point
    recall_grid: tuple[float, ...] = RECALL_GRID  # thresholds also stored for these
    kind: str = "auto"
    epochs: int = 10
    batch_size: int = 256
    lr: float = 3e-3
    holdout: float = 0.2  # last fraction of the calibration sequences, for thresholds
    seed: int = 0
    backend: str = "auto"  # "numpy" (CPU default) or "mlx" (GPU default)
    store_dtype: str = "float16"

    def __post_init__(self):
        if self.rank < 1 or any(r < 1 for r in self.ranks.values()):
            raise ValueError(f"ranks must be >= 1, got rank={self.rank}, ranks={self.ranks}")
        if not all(0.0 < r <= 1.0 for r in (self.recall, *self.recall_grid)):
            raise ValueError(f"recalls must be in (0, 1], got {self.recall}, "
                             f"{self.recall_grid}")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout must be in (0, 1), got {self.holdout}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs, batch_size and lr must be positive")
        if self.kind not in ("auto", *KINDS):
            raise ValueError(f"kind must be 'auto', 'linear' or 'ffn', got {self.kind!r}")
        if self.backend not in ("auto", "numpy", "mlx"):
            raise ValueError(f"backend must be 'auto', 'numpy' or 'mlx', got {self.backend!r}")
        if self.store_dtype not in ("float16", "float32"):
            raise ValueError(f"store_dtype must be float16 or float32, got {self.store_dtype!r}")

    def rank_of(self, layer: int) -> int:
        return self.ranks.get(layer, self.rank)

    @property
    def recalls(self) -> list[float]:
        return sorted({float(self.recall), *map(float, self.recall_grid)})

    def resolved_kind(self, relu_family: bool) -> str:
        if self.kind != "auto":
            return self.kind
        return "linear" if relu_family else "ffn"

    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        return "numpy" if mx.default_device() == mx.cpu else "mlx"


@dataclass
class LayerReport:
    """Held-out quality of one layer's predictor (means over tokens)."""

    layer: int
    rank: int
    tau: float
    recall: float  # mass of the target set that is predicted / the target set's mass
    mass_kept: float  # mass predicted / all mass sum|h|
    precision: float  # predicted neurons that are in the target set
    predicted: float  # fraction of neurons predicted per token
    target_size: float  # fraction of neurons in the target set per token
    loss: float  # last epoch's training loss (kind "linear")
    seconds: float


def class_weights(labels: np.ndarray) -> tuple[float, float]:
    """Balanced BCE weights (w_pos, w_neg): both classes weigh half of the loss."""
    p = float(np.clip(labels.mean(), 1e-6, 1 - 1e-6))
    return 0.5 / p, 0.5 / (1.0 - p)


def balanced_bce_numpy(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray,
                       w_pos: float, w_neg: float) -> tuple[float, dict[str, np.ndarray]]:
    """Loss and gradients of the class-balanced BCE, by hand (numpy BLAS).

    x: (b, d), y: (b, n) bool; params A (d, r), B (r, n), bias (n,).
    loss = mean(w * (softplus(z) - y z)), z = x A B + bias, w = w_pos where y else w_neg.
    """
    A, B, bias = params["A"], params["B"], params["bias"]
    hidden = x @ A  # (b, r)
    z = hidden @ B + bias  # (b, n)
    w = np.where(y, np.float32(w_pos), np.float32(w_neg))
    loss = float(np.mean(w * (np.logaddexp(0, z) - y * z)))
    sigmoid = 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow for large |z|
    g = w * (sigmoid - y) / np.float32(z.size)  # dloss/dz, (b, n)
    grads = {"A": x.T @ (g @ B.T), "B": hidden.T @ g, "bias": g.sum(axis=0)}
    return loss, grads


def balanced_bce_mlx(params: dict[str, mx.array], x: mx.array, y: mx.array, w_pos: float,
                     w_neg: float) -> mx.array:
    """The same loss in MLX (differentiated by mx.value_and_grad); y: (b, n) float 0/1."""
    z = x @ params["A"] @ params["B"] + params["bias"]
    w = mx.where(y > 0, w_pos, w_neg)
    return mx.mean(w * nn.losses.binary_cross_entropy(z, y, with_logits=True,
                                                      reduction="none"))


def _init_params(d: int, n: int, rank: int, labels: np.ndarray, w_pos: float, w_neg: float,
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random A, B; bias = each neuron's best constant logit under the balanced loss."""
    rate = labels.mean(axis=0)  # (n,)
    prob = np.clip(w_pos * rate / (w_pos * rate + w_neg * (1 - rate)), 1e-4, 1 - 1e-4)
    return {"A": (rng.standard_normal((d, rank)) / math.sqrt(d)).astype(np.float32),
            "B": (rng.standard_normal((rank, n)) * 0.1 / math.sqrt(rank)).astype(np.float32),
            "bias": np.log(prob / (1 - prob)).astype(np.float32)}


def _fit(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, cfg: TrainConfig,
         rng: np.random.Generator) -> tuple[dict[str, np.ndarray], float]:
    """Adam (mlx.optimizers) over minibatches; returns the params and the last epoch's loss."""
    w_pos, w_neg = class_weights(y)
    steps_per_epoch = -(-len(x) // cfg.batch_size)
    schedule = optim.cosine_decay(cfg.lr, cfg.epochs * steps_per_epoch, cfg.lr * 0.05)
    opt = optim.Adam(learning_rate=schedule)
    backend = cfg.resolved_backend()
    state = {k: mx.array(v) for k, v in params.items()}
    loss_and_grad = mx.value_and_grad(balanced_bce_mlx)
    epoch_loss = 0.0
    for _ in range(cfg.epochs):
        order, losses = rng.permutation(len(x)), []
        for start in range(0, len(x), cfg.batch_size):
            rows = np.sort(order[start:start + cfg.batch_size])
            if backend == "numpy":
                loss, grads = balanced_bce_numpy(params, x[rows], y[rows], w_pos, w_neg)
                grads = {k: mx.array(v) for k, v in grads.items()}
            else:
                loss, grads = loss_and_grad(state, mx.array(x[rows]),
                                            mx.array(y[rows].astype(np.float32)), w_pos, w_neg)
            state = opt.apply_gradients(grads, state)
            mx.eval(state, opt.state)  # one step at a time: keeps the graph from growing
            if backend == "numpy":
                params = {k: np.array(v) for k, v in state.items()}
            losses.append(float(loss))
        epoch_loss = float(np.mean(losses))
    return {k: np.array(v) for k, v in state.items()}, epoch_loss


def _fold_normalization(params: dict[str, np.ndarray], mean: np.ndarray,
                        std: np.ndarray) -> LayerPredictor:
    """Training saw (x - mean) / std; fold that into A and bias so the predictor reads raw x."""
    A = params["A"] / std[:, None]
    bias = params["bias"] - (mean @ A) @ params["B"]
    return LayerPredictor(A.astype(np.float32), params["B"].astype(np.float32),
                          bias.astype(np.float32))


def _round_to_storage(pred: LayerPredictor, dtype: str) -> LayerPredictor:
    """What the predictor will be after a save and load (thresholds are fit on this)."""
    def cast(a: np.ndarray) -> np.ndarray:
        if dtype == "float32":
            return a
        low = a.astype(np.float16)
        return low.astype(np.float32) if np.isfinite(low).all() else a

    return LayerPredictor(cast(pred.A), cast(pred.B), pred.bias, pred.tau, pred.kind,
                          pred.activation, dict(pred.taus))


def split_rows(n_rows: int, holdout: float) -> int:
    """Rows [0, split) train, [split, n_rows) are held out (the last sequences)."""
    split = int(round(n_rows * (1 - holdout)))
    if split < 1 or split >= n_rows:
        raise ValueError(f"{n_rows} calibration tokens cannot be split for holdout {holdout}; "
                         "record more tokens")
    return split


def train_linear(x: np.ndarray, labels: np.ndarray, rank: int, cfg: TrainConfig,
                 seed: int = 0) -> tuple[LayerPredictor, float]:
    """The paper's predictor: sigmoid(x A B + bias), class-balanced BCE, Adam.

    x: (N, d) training inputs, labels: (N, n) bool. Inputs are standardized for training and
    the standardization folded into A and bias. Returns the predictor (tau unset) and the last
    epoch's loss.
    """
    rng = np.random.default_rng(seed)
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    x_train = ((x - mean) / std).astype(np.float32)
    w_pos, w_neg = class_weights(labels)
    params = _init_params(x.shape[1], labels.shape[1], rank, labels, w_pos, w_neg, rng)
    params, loss = _fit(params, x_train, labels, cfg, rng)
    return _fold_normalization(params, mean, std), loss


def fit_lowrank_ffn(x: np.ndarray, weights: np.ndarray, biases: np.ndarray | None,
                    activation: str, rank: int) -> LayerPredictor:
    """The FFN's input projections at rank r, best for the inputs the layer really sees.

    x: (N, d) calibration inputs; weights: (P, n, d) the layer's rows (gate, up, down or up,
    down); biases: (P - 1, n) or None. For each input projection W this is reduced-rank
    regression: with S the covariance of x, the rank-r map minimizing E|x W^T - x A B|^2 is
    A = S^-1/2 U_r, B = U_r^T S^1/2 W^T with U_r the top left singular vectors of S^1/2 W^T;
    the bias makes it exact at the mean input. No gradient steps: the weights say what the
    neurons compute, and a few thousand tokens are enough for a (d, d) covariance but not to
    learn (d, n) maps. U_r comes from the (d, d) Gram matrix (eigh), not an SVD of (d, n):
    ~1 s per layer instead of ~15 for the default model.
    """
    d = x.shape[1]
    rank = min(rank, d, weights.shape[1])
    mean = x.mean(axis=0, dtype=np.float64)
    xc = (x - mean).astype(np.float32)
    cov = (xc.T @ xc).astype(np.float64) / len(x)  # (d, d)
    eigval, eigvec = np.linalg.eigh(cov)
    eigval = np.maximum(eigval, eigval.max() * 1e-8)
    half = ((eigvec * np.sqrt(eigval)) @ eigvec.T).astype(np.float32)
    inv_half = (eigvec / np.sqrt(eigval)) @ eigvec.T
    As, Bs, cs = [], [], []
    for j, w in enumerate(weights[:-1]):
        m = half @ w.T  # (d, n) float32: the projection in whitened coordinates
        _, u = np.linalg.eigh((m @ m.T).astype(np.float64))  # ascending eigenvalues
        u = u[:, ::-1][:, :rank]  # (d, r) top left singular vectors of m
        a, b = inv_half @ u, u.T.astype(np.float32) @ m  # (d, r), (r, n)
        c = mean @ w.T - (mean @ a) @ b + (biases[j] if biases is not None else 0.0)
        As.append(a)
        Bs.append(b)
        cs.append(c)
    return LayerPredictor(np.stack(As).astype(np.float32), np.stack(Bs).astype(np.float32),
                          np.stack(cs).astype(np.float32), kind="ffn", activation=activation)


def mass_recall(scores: np.ndarray, tau: float, labels: np.ndarray,
                mag: np.ndarray) -> float:
    """Mean over tokens of (target mass predicted) / (target mass). All (T, n)."""
    target_mass = np.where(labels, mag, 0).sum(axis=1)
    hit = np.where(labels & (scores > tau), mag, 0).sum(axis=1)
    ok = target_mass > 0
    return float(np.mean(hit[ok] / target_mass[ok])) if ok.any() else 1.0


def calibrate_thresholds(scores: np.ndarray, labels: np.ndarray, mag: np.ndarray,
                         recalls: list[float]) -> dict[float, float]:
    """Per recall, the highest threshold whose predictions keep that share of the target mass.

    scores, labels, mag: (T, n) held-out tokens; recall is `mass_recall` (mean over tokens).
    Exact, in one sort: recall(tau) is a sum of per-neuron weights w = mag / (T * target
    mass of its token) over the target neurons with score > tau, so sorting all scores once
    gives it for every tau.
    """
    target = np.where(labels, mag, 0).astype(np.float64)  # (T, n)
    target_mass = target.sum(axis=1)
    ok = target_mass > 0
    weights = (target[ok] / target_mass[ok, None] / ok.sum()).ravel()
    flat = scores[ok].ravel().astype(np.float32)
    order = np.argsort(-flat, kind="stable")
    ranked, cum = flat[order], np.cumsum(weights[order])
    out = {}
    for recall in recalls:
        i = int(np.searchsorted(cum, recall - 1e-9))  # first prefix reaching the recall
        if i >= len(ranked):
            out[recall] = float(ranked[-1]) - 1.0 if len(ranked) else 0.0
        else:  # keep every score >= ranked[i]: the threshold is the float just below it
            out[recall] = float(np.nextafter(ranked[i], np.float32(-np.inf)))
    return out


def layer_report(layer: int, pred: LayerPredictor, x: np.ndarray, labels: np.ndarray,
                 mag: np.ndarray, loss: float = float("nan"), seconds: float = 0.0
                 ) -> LayerReport:
    """Held-out metrics of one layer. x: (T, d); labels, mag: (T, n)."""
    z = pred.scores(x)
    predicted = z > pred.tau
    total = mag.sum(axis=1)
    ok = total > 0
    kept = np.where(predicted, mag, 0).sum(axis=1)
    hits = (predicted & labels).sum()
    return LayerReport(layer, pred.rank, pred.tau, mass_recall(z, pred.tau, labels, mag),
                       float(np.mean(kept[ok] / total[ok])) if ok.any() else 1.0,
                       float(hits / max(1, predicted.sum())), float(predicted.mean()),
                       float(labels.mean()), loss, seconds)


def train_layer(x: np.ndarray, mag: np.ndarray, target: Target, rank: int, cfg: TrainConfig,
                layer: int = 0, kind: str = "linear", weights: np.ndarray | None = None,
                biases: np.ndarray | None = None, activation: str = "silu"
                ) -> tuple[LayerPredictor, LayerReport]:
    """Make one layer's predictor and set its threshold.

    x: (N, d) FFN inputs, mag: (N, n) |h|, rows in sequence order; the last `cfg.holdout` of
    the rows are held out for the threshold and the report. Kind "ffn" needs the layer's
    weights (P, n, d) and biases (P - 1, n) or None.
    """
    t0 = time.perf_counter()
    split = split_rows(len(x), cfg.holdout)
    labels = target_labels(mag, target)
    loss = float("nan")
    if kind == "linear":
        pred, loss = train_linear(x[:split], labels[:split], rank, cfg, cfg.seed + layer)
    elif weights is None:
        raise ValueError("kind 'ffn' needs the layer's weights")
    else:
        pred = fit_lowrank_ffn(x[:split], weights, biases, activation, rank)
    pred = _round_to_storage(pred, cfg.store_dtype)
    pred.taus = calibrate_thresholds(pred.scores(x[split:]), labels[split:], mag[split:],
                                     cfg.recalls)
    pred.tau = pred.taus[cfg.recall]
    report = layer_report(layer, pred, x[split:], labels[split:], mag[split:], loss,
                          time.perf_counter() - t0)
    return pred, report


def layer_weights(root: Path, manifest: Manifest, layer: int
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """One layer's FFN rows from its bundle file: weights (P, n, d), biases (P - 1, n)."""
    from .ffn import split_bundles

    entry = manifest.layers[layer]
    raw = np.fromfile(root / entry.file, dtype=np.uint8).reshape(entry.n_neurons, entry.stride)
    weights, biases = split_bundles(manifest.to_original(layer, raw), manifest, mx.float32)
    return np.array(weights), None if biases is None else np.array(biases)


def train_predictors(calibration_dir: str | Path, cfg: TrainConfig,
                     flash_dir: str | Path | None = None, progress: bool = False
                     ) -> tuple[Predictors, list[LayerReport]]:
    """Make every layer's predictor from a recording made by `record_activations`.

    flash_dir (the recorded model) is needed by kind "ffn", which reads the FFN weights.
    """
    from tqdm import tqdm

    root = Path(calibration_dir)
    info = CalibrationInfo(**json.loads(CalibrationInfo.path(root).read_text()))
    target = parse_target(cfg.target, info.relu_family)
    kind = cfg.resolved_kind(info.relu_family)
    manifest = read_manifest(flash_dir) if flash_dir is not None else None
    if kind == "ffn" and manifest is None:
        raise ValueError("predictor kind 'ffn' is fit to the FFN weights: pass flash_dir")
    layers, reports = [], []
    bar = tqdm(range(info.n_layers), desc="train predictors", unit="layer",
               disable=not progress, file=sys.stderr)
    for layer in bar:
        x, mag = load_layer(root, layer)
        weights, biases = layer_weights(Path(flash_dir), manifest, layer) if kind == "ffn" \
            else (None, None)
        activation = manifest.ffn.activation if manifest else "silu"
        pred, report = train_layer(x, mag, target, cfg.rank_of(layer), cfg, layer, kind,
                                   weights, biases, activation)
        layers.append(pred)
        reports.append(report)
        bar.set_postfix_str(f"L{layer} recall {report.recall:.3f} predicted "
                            f"{report.predicted:.0%}")
    meta = {"kind": kind, "target": str(target), "recall": cfg.recall,
            "recalls": cfg.recalls, "ranks": [p.rank for p in layers], "rank": cfg.rank,
            "calibration_tokens": info.n_tokens, "holdout": cfg.holdout,
            "calibration_text": info.text,
            "heldout_recall": [round(r.recall, 4) for r in reports],
            "heldout_predicted": [round(r.predicted, 4) for r in reports]}
    if kind == "linear":
        meta["epochs"] = cfg.epochs
    return Predictors(layers, meta), reports


# ---------------------------------------------------------------- save / load


def _storage(a: np.ndarray, dtype: str) -> mx.array:
    if dtype == "float16" and np.isfinite(a.astype(np.float16)).all():
        return mx.array(a.astype(np.float16))
    return mx.array(a.astype(np.float32))


def _write_manifest(root: Path, manifest: Manifest) -> None:
    """manifest.json replaced atomically: temp file, fsync, rename, fsync the dir."""
    path, tmp = root / MANIFEST, root / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(root)


def expected_shapes(kind: str, manifest: Manifest, layer: int, rank: int) -> dict:
    """The array shapes one layer's predictor must have for this model."""
    d, n = manifest.ffn.d_model, manifest.layers[layer].n_neurons
    if kind == "linear":
        return {"A": (d, rank), "B": (rank, n), "bias": (n,)}
    m = 2 if manifest.ffn.kind == "gated" else 1
    return {"A": (m, d, rank), "B": (m, rank, n), "bias": (m, n)}


def check_predictors(predictors: Predictors, manifest: Manifest, where: str) -> None:
    """Shapes must fit the model: one predictor per layer, of a known kind, sized for it."""
    fix = "retrain them with `mlx-flash train-predictors DIR`"
    if len(predictors.layers) != manifest.n_layers:
        raise FormatError(f"{where}: predictors for {len(predictors.layers)} layers but the "
                          f"model has {manifest.n_layers}; {fix}")
    for i, pred in enumerate(predictors.layers):
        if pred.kind not in KINDS:
            raise FormatError(f"{where}: unknown predictor kind {pred.kind!r}; {fix}")
        want = expected_shapes(pred.kind, manifest, i, pred.rank)
        got = {"A": pred.A.shape, "B": pred.B.shape, "bias": pred.bias.shape}
        if pred.rank < 1 or want != got:
            raise FormatError(f"{where}: layer {i} predictor shapes {got} do not fit the model "
                              f"(d_model {manifest.ffn.d_model}, "
                              f"{manifest.layers[i].n_neurons} neurons, {manifest.ffn.kind} "
                              f"FFN: want {want} for kind {pred.kind!r}); {fix}")


def save_predictors(flash_dir: str | Path, predictors: Predictors,
                    store_dtype: str = "float16") -> dict:
    """Write predictors.safetensors and the manifest's `predictors` entry; returns the entry.

    Crash-safe order: the file is written under a temp name and fsynced; the old manifest entry
    (if any) is dropped, the file renamed into place, then the new entry written. At every step
    the dir reads as valid (with the old predictors, none, or the new ones).
    """
    root = Path(flash_dir)
    manifest = read_manifest(root)
    check_predictors(predictors, manifest, str(root / PREDICTORS))
    recalls = [float(r) for r in predictors.meta.get("recalls", [])]
    if not recalls or any(set(p.taus) != set(recalls) for p in predictors.layers):
        raise ValueError("every layer needs a threshold for each of predictors.meta['recalls']")
    arrays = {}
    for i, p in enumerate(predictors.layers):
        arrays[f"layers.{i}.A"] = _storage(p.A, store_dtype)
        arrays[f"layers.{i}.B"] = _storage(p.B, store_dtype)
        arrays[f"layers.{i}.bias"] = mx.array(p.bias.astype(np.float32))
        arrays[f"layers.{i}.tau"] = mx.array([p.taus[r] for r in recalls], dtype=mx.float32)
    tmp = root / ".predictors-tmp.safetensors"  # mx appends .safetensors to other names
    kinds = {p.kind for p in predictors.layers}
    if len(kinds) != 1:
        raise ValueError(f"all layers' predictors must be of one kind, got {sorted(kinds)}")
    mx.save_safetensors(str(tmp), arrays, metadata={
        "format": FILE_FORMAT, "version": FILE_VERSION, "kind": kinds.pop(),
        "recalls": json.dumps(recalls),
        "n_layers": str(len(predictors.layers)), "meta": json.dumps(predictors.meta)})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    if manifest.predictors:
        manifest.predictors = None
        _write_manifest(root, manifest)
    os.replace(tmp, root / PREDICTORS)
    fsync_dir(root)
    entry = {**file_entry(root, PREDICTORS), **predictors.meta,
             "format": FILE_FORMAT, "version": FILE_VERSION}
    manifest.predictors = entry
    _write_manifest(root, manifest)
    return entry


def load_predictors(flash_dir: str | Path, manifest: Manifest | None = None,
                    recall: float | None = None) -> Predictors:
    """Read and check predictors.safetensors against the manifest (sha256, format, shapes).

    recall: the operating point, one of the file's recalls (None: the default it was trained
    with). Raises FormatError naming the file, with the fix, when it is missing, corrupted, or
    made for another model; ValueError for a recall it has no thresholds for.
    """
    root = Path(flash_dir)
    manifest = manifest or read_manifest(root)
    path = root / PREDICTORS
    fix = f"retrain them with `mlx-flash train-predictors {root}`"
    if not manifest.predictors:
        raise FormatError(f"{root / MANIFEST} lists no predictors; {fix} (or use the oracle "
                          "selector)")
    entry = manifest.predictors
    path = root / entry.get("file", PREDICTORS)
    arrays, metadata = load_checked_safetensors(path, entry.get("sha256"), MANIFEST,
                                                FILE_FORMAT, FILE_VERSION, "predictors", fix)
    try:
        recalls = [float(r) for r in json.loads(metadata.get("recalls", "[]"))]
        meta = json.loads(metadata.get("meta", "{}"))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise FormatError(f"{path}: unreadable header metadata ({e}); {fix}") from e
    layers = []
    for i in range(manifest.n_layers):
        keys = [f"layers.{i}.{k}" for k in ("A", "B", "bias", "tau")]
        if any(k not in arrays for k in keys):
            raise FormatError(f"{path}: layer {i} is missing (want {keys}); {fix}")
        A, B, bias, tau = (np.array(arrays[k].astype(mx.float32)) for k in keys)
        if tau.shape != (len(recalls),) or not recalls:
            raise FormatError(f"{path}: layer {i} has thresholds of shape {tau.shape} for "
                              f"recalls {recalls}; {fix}")
        taus = dict(zip(recalls, map(float, tau), strict=True))
        layers.append(LayerPredictor(A, B, bias, 0.0, metadata.get("kind", "linear"),
                                     manifest.ffn.activation, taus))
    predictors = Predictors(layers, meta)
    check_predictors(predictors, manifest, str(path))
    predictors.use_recall(meta.get("recall", recalls[0]) if recall is None else recall,
                          str(path))
    return predictors


# ---------------------------------------------------------------- the selector


class PredictorSelector:
    """The runtime's selector from trained predictors: ids = score > tau, best first.

    Runs in numpy: per layer and token (d + n) * r multiply-adds for kind "linear", twice
    that for a gated "ffn" (1.5 M at r=128 for the default model, ~11% of its dense FFN), off
    the BLAS for decode-sized inputs (see `_lowrank`). Weights are float32 in memory: twice
    the size of predictors.safetensors.
    """

    def __init__(self, predictors: Predictors, fast_cpu: bool = False):
        self.predictors = predictors
        self.fast = [FastLayerPredictor(p) for p in predictors.layers] if fast_cpu else None
        if self.fast:  # the f16 copies replace the f32 arrays (the DRAM plan counts f32)
            for p in predictors.layers:
                p.A = p.B = None

    @classmethod
    def from_dir(cls, flash_dir: str | Path, manifest: Manifest | None = None,
                 recall: float | None = None, fast_cpu: bool = False) -> PredictorSelector:
        return cls(load_predictors(flash_dir, manifest, recall), fast_cpu)

    def select(self, layer: int, x: mx.array) -> Selection:
        """x: (T, d) evaluated, compute dtype -> each token's predicted ids, best first."""
        # x is evaluated: np.array only copies it (and casts when the compute dtype is not f32)
        xs = np.array(x if x.dtype == mx.float32 else x.astype(mx.float32))
        if self.fast is not None:
            fast = self.fast[layer]
            return Selection([ids_above(z, fast.layer.tau) for z in fast.scores(xs)])
        return Selection(self.predictors.layers[layer].select(xs))


class FastLayerPredictor:
    """A LayerPredictor on the fast CPU path: A and B as f16 rows (A^T (r, d), B^T (n, r)) for
    `linear16`, half the bytes of the f32 arrays that decode would otherwise stream per token
    (measured: the f32 predictor was 15.7% of a fast decode step, BENCHMARKS.md)."""

    def __init__(self, layer: LayerPredictor):
        from . import cpu

        self.layer, self.kernels = layer, cpu.kernels()
        a = layer.A if layer.kind == "ffn" else layer.A[None]
        b = layer.B if layer.kind == "ffn" else layer.B[None]
        self.a = [np.ascontiguousarray(m.T).astype(np.float16).view(np.uint16) for m in a]
        self.b = [np.ascontiguousarray(m.T).astype(np.float16).view(np.uint16) for m in b]
        self.bias = layer.bias if layer.kind == "ffn" else layer.bias[None]

    def scores(self, x: np.ndarray) -> np.ndarray:
        k = self.kernels
        pre = [k.linear16(b, "float16", k.linear16(a, "float16", x)) + c
               for a, b, c in zip(self.a, self.b, self.bias, strict=True)]
        return pre[0] if self.layer.kind == "linear" else self.layer.combine(pre)


# ---------------------------------------------------------------- command line


def parse_layer_ranks(items: list[str]) -> dict[int, int]:
    """["0=256", "23=256"] -> {0: 256, 23: 256}."""
    out = {}
    for item in items:
        layer, sep, rank = item.partition("=")
        if not sep or not layer.strip().isdigit() or not rank.strip().isdigit():
            raise ValueError(f"--layer-rank {item!r}: expected LAYER=RANK, e.g. 0=256")
        out[int(layer)] = int(rank)
    return out


@dataclass
class TrainSummary:
    calibration_seconds: float
    training_seconds: float
    reused_recording: bool
    entry: dict
    reports: list[LayerReport]


def make_predictors(flash_dir: str | Path, cfg: TrainConfig, text: str | Path | None = None,
                    n_tokens: int = 4096, seq_len: int = 256,
                    calibration_dir: str | Path | None = None,
                    progress: bool = False) -> TrainSummary:
    """Calibrate (or reuse a recording), train, save: the whole `train-predictors` step.

    calibration_dir: where the activations go; reused when it already holds a recording of
    the same model and tokens. None: a temp dir under $TMPDIR, removed afterwards.
    """
    from .model import load_tokenizer

    root = Path(flash_dir)
    manifest = read_manifest(root)
    parse_target(cfg.target, manifest.ffn.relu_family)  # fail before the slow part
    for layer in cfg.ranks:
        if not 0 <= layer < manifest.n_layers:
            raise ValueError(f"--layer-rank for layer {layer}: the model has layers "
                             f"0..{manifest.n_layers - 1}")
    tokenizer = load_tokenizer(root, manifest)
    if text is None:
        docs, description = default_documents(), DEFAULT_TEXT.format(chars=DEFAULT_DOC_CHARS)
    else:
        docs, description = read_documents(text), str(Path(text).resolve())
    tokens = calibration_sequences(tokenizer, docs, n_tokens, seq_len)
    temp = calibration_dir is None
    calib = Path(tempfile.mkdtemp(prefix="mlx-flash-calib-")) if temp else Path(calibration_dir)
    try:
        info = None if temp else find_recording(calib, manifest, tokens)
        reused = info is not None
        if info is None:
            info = record_activations(root, calib, tokens, description, progress)
        t0 = time.perf_counter()
        predictors, reports = train_predictors(calib, cfg, root, progress)
        train_seconds = time.perf_counter() - t0
        predictors.meta.update(calibration_seconds=round(info.seconds, 1),
                               training_seconds=round(train_seconds, 1))
        entry = save_predictors(root, predictors, cfg.store_dtype)
    finally:
        if temp:
            shutil.rmtree(calib, ignore_errors=True)
    return TrainSummary(0.0 if reused else info.seconds, train_seconds, reused, entry, reports)


def train_predictors_cli(args) -> int:
    """`mlx-flash train-predictors DIR ...`: prints a per-layer table and the totals."""
    cfg = TrainConfig(rank=args.rank, ranks=parse_layer_ranks(args.layer_rank),
                      target=args.target, recall=args.recall, kind=args.kind,
                      epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, holdout=args.holdout,
                      seed=args.seed)
    summary = make_predictors(args.dir, cfg, args.text, args.tokens, args.seq_len,
                              args.calibration_dir, progress=True)
    print(f"{'layer':>5} {'rank':>5} {'recall':>7} {'mass':>6} {'prec':>6} {'pred':>6} "
          f"{'target':>6}")
    for r in summary.reports:
        print(f"{r.layer:>5} {r.rank:>5} {r.recall:>7.3f} {r.mass_kept:>6.3f} "
              f"{r.precision:>6.3f} {r.predicted:>6.1%} {r.target_size:>6.1%}")
    mean = np.mean([r.predicted for r in summary.reports])
    recall = np.mean([r.recall for r in summary.reports])
    where = "reused recording" if summary.reused_recording else \
        f"calibration {summary.calibration_seconds:.0f} s"
    print(f"target {summary.entry['target']}: held-out recall {recall:.3f}, {mean:.1%} of "
          f"neurons predicted per token; {where}, training {summary.training_seconds:.0f} s; "
          f"wrote {Path(args.dir) / PREDICTORS} ({summary.entry['size'] / 2**20:.1f} MiB)")
    return 0


def add_text_arguments(p) -> None:
    """--text, --tokens, --seq-len: the calibration text (train-predictors, train-drafter)."""
    p.add_argument("--text", default=None,
                   help="calibration text: a file or a folder of text files (default: Python's "
                        "pydoc topics and stdlib sources, nothing downloaded)")
    p.add_argument("--tokens", type=int, default=4096, help="calibration tokens in all")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence")


def add_arguments(subparsers) -> None:
    """Register `train-predictors` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "train-predictors", help="calibrate and train the sparsity predictors of a flash dir")
    p.add_argument("dir", help="flash model dir (predictors are written into it)")
    add_text_arguments(p)
    p.add_argument("--rank", type=int, default=DEFAULT_RANK, help="predictor rank r")
    p.add_argument("--layer-rank", action="append", default=[], metavar="LAYER=RANK",
                   help="rank for one layer (repeatable), e.g. --layer-rank 0=256")
    p.add_argument("--target", default="auto",
                   help="active neurons: auto (relu for ReLU-family FFNs, else mass:"
                        f"{DEFAULT_MASS}), relu, mass:F (top-|h| set with F of sum|h|), "
                        "top:F (top F fraction)")
    p.add_argument("--recall", type=float, default=DEFAULT_RECALL,
                   help="default operating point: per-layer thresholds keep this fraction of "
                        "the target mass on held-out tokens (thresholds for "
                        f"{', '.join(map(str, RECALL_GRID))} are stored too; pick one at load "
                        "time with predictor_recall / --recall)")
    p.add_argument("--kind", default="auto", choices=["auto", *KINDS],
                   help="linear: sigmoid(x A B + b) trained with balanced BCE (default for "
                        "ReLU-family FFNs); ffn: low-rank FFN fit to the weights, score "
                        "|act(gate) * up| (default for gated/smooth FFNs)")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs,
                   help="training epochs (kind linear)")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--holdout", type=float, default=TrainConfig.holdout,
                   help="fraction of calibration sequences held out for thresholds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calibration-dir", default=None,
                   help="keep the recorded activations here (reused when the model and text "
                        "match); default: a temp dir, removed afterwards")
    p.set_defaults(func=train_predictors_cli)
