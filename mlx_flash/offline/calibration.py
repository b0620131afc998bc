"""Calibration text and activation recording (what predictor training and placement learn from)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tqdm import tqdm

from ..format.arch import ACTIVATION_FNS, ARCHITECTURES
from ..format.manifest import Manifest, read_manifest
from ..format.storage import write_text_atomic
from ..runtime.loader import load_dense

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

    try:
        from pydoc_data.topics import topics  # optional: some distributions strip pydoc_data
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


class _NumpyLinear(nn.Module):
    """A frozen nn.Linear computed by numpy's BLAS (calibration on CPU only, see module doc)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self._w = np.ascontiguousarray(np.array(linear.weight, dtype=np.float32).T)  # (in, out)
        self._b = np.array(linear.bias, dtype=np.float32) if "bias" in linear else None

    def __call__(self, x: mx.array) -> mx.array:
        """x: (..., in) -> (..., out), evaluated (np.array forces it). As one 2-D matmul: numpy
        runs a (B, T, in) @ (in, out) product as B small ones (8x slower at B = 32, T = 1)."""
        a = np.array(x.astype(mx.float32))
        y = (a.reshape(-1, a.shape[-1]) @ self._w).reshape(*a.shape[:-1], -1)
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
    write_text_atomic(CalibrationInfo.path(out), json.dumps(asdict(info), indent=1))
    return info


def load_layer(root: Path, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """One layer's recording: x (N, d) float32 and |h| (N, n) float32, read into memory."""
    x = np.load(x_file(root, layer), mmap_mode="r")
    mag = np.load(mag_file(root, layer), mmap_mode="r")
    return np.array(x, dtype=np.float32), np.array(mag, dtype=np.float32)
