"""Source checkpoints, read one tensor at a time.

A `Checkpoint` is what `convert` reads: an mlx_lm config dict, the tensor names (already in
mlx_lm naming, e.g. `model.layers.0.mlp.gate_proj.weight`) with shapes and dtypes, and one tensor
at a time as a numpy array. bfloat16 has no numpy dtype: such tensors travel as `np.uint16` bit
patterns and carry the dtype name "bfloat16" beside them.

Two readers: `SafetensorsCheckpoint` (an HF / mlx_lm dir of *.safetensors) here, and
`GGUFCheckpoint` (a .gguf file) in `mlx_flash.gguf`. `open_checkpoint` picks by path.
"""

from __future__ import annotations

import json
import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .format import DTYPE_BYTES, FFNLayout


@dataclass(frozen=True)
class TensorInfo:
    name: str  # mlx_lm name
    shape: tuple[int, ...]
    dtype: str  # "float16" | "bfloat16" | "float32"


@dataclass(frozen=True)
class FFNSpec:
    """Where an architecture keeps its FFN and how it computes it."""

    kind: str  # "gated" | "plain"
    activation: str
    up: str  # module name of the input projection (its rows are per neuron)
    down: str  # module name of the output projection (its columns are per neuron)
    gate: str | None = None

    def in_names(self) -> list[str]:
        return [self.gate, self.up] if self.kind == "gated" else [self.up]


_GATED_SILU = FFNSpec("gated", "silu", up="up_proj", down="down_proj", gate="gate_proj")

# mlx_lm model_type -> FFN spec. The dense MLP of each is `model.layers.N.mlp`.
ARCHITECTURES: dict[str, FFNSpec] = {
    "llama": _GATED_SILU,
    "mistral": _GATED_SILU,
    "qwen2": _GATED_SILU,
    "qwen3": _GATED_SILU,
    "gemma3_text": FFNSpec("gated", "gelu_approx", up="up_proj", down="down_proj", gate="gate_proj"),
    "nemotron": FFNSpec("plain", "relu2", up="up_proj", down="down_proj"),
    "starcoder2": FFNSpec("plain", "gelu", up="c_fc", down="c_proj"),
}


def ffn_spec(config: dict, where: str) -> FFNSpec:
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"{where}: architecture {model_type!r} is not supported by mlx-flash (supported: "
            f"{', '.join(sorted(ARCHITECTURES))}); open an issue with the model's config.json"
        )
    return ARCHITECTURES[model_type]


def mlp_prefix(layer: int) -> str:
    return f"model.layers.{layer}.mlp"


class Checkpoint(ABC):
    """A source model, read tensor by tensor (never the whole model in RAM)."""

    path: Path
    kind: str  # "safetensors" | "gguf"
    config: dict

    @abstractmethod
    def tensors(self) -> dict[str, TensorInfo]:
        """All tensors, in mlx_lm naming, that the model needs (sanitized)."""

    @abstractmethod
    def read(self, name: str) -> np.ndarray:
        """One tensor as numpy in its `TensorInfo.dtype` (bfloat16 as uint16 bits)."""

    @abstractmethod
    def write_tokenizer(self, out_dir: Path) -> None:
        """Write tokenizer files (tokenizer.json, tokenizer_config.json, ...) that mlx_lm loads."""

    @abstractmethod
    def files(self) -> list[Path]:
        """The files that make up the source (hashed into the manifest)."""

    def spec(self) -> FFNSpec:
        return ffn_spec(self.config, str(self.path))

    def ffn_names(self, layer: int) -> dict[str, str]:
        """Role -> tensor name for one layer's per-neuron FFN tensors present in the source."""
        spec, prefix, names = self.spec(), mlp_prefix(layer), {}
        tensors = self.tensors()
        roles = {"up": spec.up, "down": spec.down}
        if spec.gate:
            roles["gate"] = spec.gate
        for role, module in roles.items():
            names[role] = f"{prefix}.{module}.weight"
            if role != "down" and f"{prefix}.{module}.bias" in tensors:
                names[f"{role}_bias"] = f"{prefix}.{module}.bias"
        return names

    def is_ffn_tensor(self, name: str) -> bool:
        """True for tensors that go into bundles (every FFN weight and input bias)."""
        parts = name.split(".")
        if len(parts) < 5 or parts[:2] != ["model", "layers"] or parts[3] != "mlp":
            return False
        return name in self.ffn_names(int(parts[2])).values()


# ---------------------------------------------------------------- dtype helpers


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even f32 -> bf16 bit patterns (what MLX and torch do)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + 0x7FFF
    return ((bits + rounding) >> 16).astype(np.uint16)


def to_f32(arr: np.ndarray, dtype: str) -> np.ndarray:
    return bf16_bits_to_f32(arr) if dtype == "bfloat16" else arr.astype(np.float32)


def cast(arr: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Cast between storage dtypes; bfloat16 is uint16 bits on both sides."""
    if src == dst:
        return arr
    if dst == "bfloat16":
        return f32_to_bf16_bits(to_f32(arr, src))
    return to_f32(arr, src).astype(np.dtype(dst))


# ---------------------------------------------------------------- safetensors dir

_ST_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}
_NP_STORAGE = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}


class SafetensorsCheckpoint(Checkpoint):
    """An HF or mlx_lm model dir: config.json, *.safetensors, tokenizer files.

    Reads the safetensors headers itself and each tensor by offset, so bf16 needs no torch and
    only one tensor is in memory at a time.
    """

    kind = "safetensors"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        config_path = self.path / "config.json"
        if not config_path.exists():
            raise ValueError(f"{self.path}: no config.json; a safetensors source must be an HF "
                             "or mlx_lm model dir (config.json + *.safetensors + tokenizer files)")
        self.config = json.loads(config_path.read_text())
        self.spec()  # reject unsupported architectures before any work
        if self.config.get("quantization"):
            raise ValueError(f"{config_path}: quantized mlx_lm checkpoints are not supported as "
                             "a source yet; convert from the 16-bit model or a GGUF file")
        self._index = self._read_headers()

    def _read_headers(self) -> dict[str, tuple[Path, int, int, TensorInfo]]:
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{self.path}: no *.safetensors files found")
        index = {}
        for file in files:
            with open(file, "rb") as f:
                raw = f.read(8)
                if len(raw) != 8:
                    raise ValueError(f"{file}: truncated safetensors file")
                (header_len,) = struct.unpack("<Q", raw)
                try:
                    header = json.loads(f.read(header_len))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{file}: corrupt safetensors header ({e})") from e
            base = 8 + header_len
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                if meta["dtype"] not in _ST_DTYPES:
                    raise ValueError(f"{file}: tensor {name} has dtype {meta['dtype']}; only "
                                     "F16/BF16/F32 sources are supported")
                start, end = meta["data_offsets"]
                info = TensorInfo(name, tuple(meta["shape"]), _ST_DTYPES[meta["dtype"]])
                index[name] = (file, base + start, end - start, info)
        return self._sanitize(index)

    def _sanitize(self, index: dict) -> dict:
        """Drop what mlx_lm's sanitize drops (rotary caches, tied lm_head)."""
        out = {k: v for k, v in index.items() if "rotary_emb.inv_freq" not in k}
        if self.config.get("tie_word_embeddings", True) and "model.embed_tokens.weight" in out:
            out.pop("lm_head.weight", None)
        return out

    def tensors(self) -> dict[str, TensorInfo]:
        return {name: entry[3] for name, entry in self._index.items()}

    def read(self, name: str) -> np.ndarray:
        file, offset, nbytes, info = self._index[name]
        count = int(np.prod(info.shape)) if info.shape else 1
        if nbytes != count * DTYPE_BYTES[info.dtype]:
            raise ValueError(f"{file}: tensor {name} has {nbytes} bytes for shape {info.shape}")
        arr = np.fromfile(file, dtype=_NP_STORAGE[info.dtype], count=count, offset=offset)
        if arr.size != count:
            raise ValueError(f"{file}: truncated while reading tensor {name}")
        return arr.reshape(info.shape)

    def write_tokenizer(self, out_dir: Path) -> None:
        import shutil

        names = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json",
                 "added_tokens.json", "chat_template.jinja"]
        for name in names:
            if (self.path / name).exists():
                shutil.copy2(self.path / name, out_dir / name)

    def files(self) -> list[Path]:
        return sorted({entry[0] for entry in self._index.values()} | {self.path / "config.json"})


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a source: a .gguf file or an HF/mlx_lm safetensors dir."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass an HF/mlx_lm safetensors dir or a "
                                ".gguf file (or run `mlx-flash pull` for the default model)")
    if path.is_file() and path.suffix == ".gguf":
        from .gguf import GGUFCheckpoint

        return GGUFCheckpoint(path)
    if path.is_dir() and any(path.glob("*.safetensors")):
        return SafetensorsCheckpoint(path)
    raise ValueError(f"{path} is neither a .gguf file nor a dir of *.safetensors with a "
                     "config.json; pass one of those")


def layout_for(checkpoint: Checkpoint, dtype: str, bits: int = 16,
               group_size: int = 64) -> FFNLayout:
    """The bundle layout for a checkpoint stored in `dtype` (and `bits` per FFN weight)."""
    spec = checkpoint.spec()
    names = checkpoint.ffn_names(0)
    has_bias = any(role.endswith("_bias") for role in names)
    return FFNLayout(kind=spec.kind, activation=spec.activation,
                     d_model=int(checkpoint.config["hidden_size"]), dtype=dtype,
                     has_bias=has_bias, bits=bits, group_size=group_size)
