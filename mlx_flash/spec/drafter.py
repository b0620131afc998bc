"""The recurrent drafter at run time: its forward pass, file and loading."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..accel.build import kernels, unavailable_reason
from ..format.errors import FormatError
from ..format.manifest import RESIDENT, read_manifest, resident_rows
from ..format.storage import (
    atomic_write,
    load_checked_safetensors,
    sha256_file,
    tensor_sizes,
    write_text_atomic,
)

DRAFTER = "drafter.safetensors"


FILE_FORMAT = "mlx-flash-drafter"


FILE_VERSION = "1"


PACKAGED = "data"  # in mlx_flash/spec: drafters shipped for the registry's models, NAME.safetensors + NAME.json


def head_weight_rows(model_dir: str | Path, ids: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Rows `ids` of the model's output projection (k, d) as `dtype`, read from the dir's
    resident.safetensors (lm_head, or the tied embedding table): whatever form the loaded
    model keeps them in (quantized, fast-path views, on flash), these are the stored values."""
    path = Path(model_dir) / RESIDENT
    tensors = tensor_sizes(path)
    name = "lm_head.weight" if "lm_head.weight" in tensors else "model.embed_tokens.weight"
    rows = resident_rows(model_dir, read_manifest(model_dir), name, ids)  # quantized: dequantized
    return rows.astype(dtype, copy=False)


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


def silu(a: np.ndarray) -> np.ndarray:
    return a / (1.0 + np.exp(-a))


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
        return kernels().linear16(self.bits, "float16",
                                  np.ascontiguousarray(x, dtype=np.float32))


def keeps_half(half: bool | None = None) -> bool:
    """Whether a loaded drafter keeps its matrices float16: `half`, or where None, whether the
    CPU kernels that multiply them run here. One rule for `load_drafter` and `drafter_bytes`."""
    if half is not None:
        return half
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
    """What ties a drafter to a model: the architecture numbers, the hash of the source the
    dir was converted from (the same on any machine that converts the same file, e.g. the
    GGUF `pull` verifies) and the resident file's hash (for drafters saved before the source
    hash was recorded)."""
    manifest = read_manifest(flash_dir)
    cfg = manifest.config
    return {"d_model": cfg["hidden_size"], "vocab_size": cfg["vocab_size"],
            "source_sha256": manifest.source.get("sha256"),
            "resident_sha256": manifest.resident["sha256"]}


def identity_mismatch(saved: dict, current: dict) -> str | None:
    """The first identity key on which a drafter's `saved` model and `current` differ, or
    None: d_model and vocab_size, then the source hash where both record one, else the
    resident file's hash."""
    both = saved.get("source_sha256") and current.get("source_sha256")
    for key in ("d_model", "vocab_size", "source_sha256" if both else "resident_sha256"):
        if saved.get(key) != current.get(key):
            return key
    return None


def packaged_drafters() -> list[Path]:
    """The drafters shipped with the package (weights files that have a sidecar), sorted."""
    folder = resources.files(__package__).joinpath(PACKAGED)
    if not folder.is_dir():
        return []
    return sorted(Path(str(f)) for f in folder.iterdir()
                  if f.name.endswith(".safetensors") and drafter_paths(Path(str(f)))[1].exists())


def find_drafter(flash_dir: str | Path) -> Path:
    """What `--drafter` without a PATH uses: the model dir's own drafter if it has one, else
    the packaged drafter trained for this model (`identity_mismatch` None), else the dir
    (loading it then fails with the fix)."""
    root = Path(flash_dir)
    if any(p.exists() for p in drafter_paths(root)):
        return root
    current = model_identity(root)
    for weights in packaged_drafters():
        try:
            saved = json.loads(drafter_paths(weights)[1].read_text()).get("model", {})
        except (OSError, json.JSONDecodeError):
            continue  # a broken packaged sidecar is not this model's drafter
        if identity_mismatch(saved, current) is None:
            return weights
    return root


def save_drafter(drafter: Drafter, flash_dir: str | Path, path: str | Path | None = None
                 ) -> Path:
    """Write the drafter, then its sidecar, each atomically; no sidecar while the weights are
    replaced (no sidecar = no drafter). Returns the weights file."""
    root = Path(flash_dir)
    weights, sidecar = drafter_paths(path or root)
    arrays = {k: mx.array(v.astype(np.float16 if v.ndim == 2 else np.float32))
              for k, v in drafter.params.items()}
    arrays["vocab"] = mx.array(drafter.vocab.astype(np.int32))
    with atomic_write(weights) as tmp:
        mx.save_safetensors(str(tmp), arrays, metadata={
            "format": FILE_FORMAT, "version": FILE_VERSION,
            "n_res": str(n_resblocks(drafter.params)), "meta": json.dumps(drafter.meta)})
        sidecar.unlink(missing_ok=True)
    entry = {"file": weights.name, "size": weights.stat().st_size,
             "sha256": sha256_file(weights), "format": FILE_FORMAT, "version": FILE_VERSION,
             "model": model_identity(root), **drafter.meta}
    write_text_atomic(sidecar, json.dumps(entry, indent=1))
    return weights


def load_drafter(path: str | Path, flash_dir: str | Path | None = None,
                 half: bool | None = None) -> Drafter:
    """Read and check a drafter: sha256 against its sidecar, format, shapes, and (with
    flash_dir) that it was trained for this model. Raises FormatError naming the file.
    half: keep the matrices float16 (HalfRows; None: where the CPU kernels run), else float32."""
    weights, sidecar = drafter_paths(path)
    fix = f"train one with `mlx-flash train-drafter {flash_dir or weights.parent}`"
    if not sidecar.exists() or not weights.exists():
        shipped = ", ".join(p.stem for p in packaged_drafters()) or "none"
        raise FormatError(f"no drafter at {weights} (needs it and {sidecar.name}), and no "
                          f"packaged drafter was trained for this model (packaged: {shipped}); "
                          f"{fix} (README: speculative decoding)")
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
    key = identity_mismatch(saved, current)
    if key is not None:
        raise FormatError(f"{where} was trained for another model ({key} "
                          f"{saved.get(key)!r}, this model {current.get(key)!r}); {fix}")
