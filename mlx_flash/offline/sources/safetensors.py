"""HF / mlx_lm safetensors checkpoints as a source."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from ...format.storage import DTYPE_BYTES, NP_STORAGE, tensor_sizes
from .base import Checkpoint, TensorInfo


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
            for name, entry in tensor_sizes(file).items():
                if entry.dtype not in DTYPE_BYTES:
                    raise ValueError(f"{file}: tensor {name} has dtype {entry.dtype}; only "
                                     "F16/BF16/F32 sources are supported")
                if name in index:
                    raise ValueError(f"{file}: tensor {name} is also in {index[name][0]}; a "
                                     "tensor may be in one shard only - remove the stray "
                                     "*.safetensors file or download the model again")
                info = TensorInfo(name, entry.shape, entry.dtype)
                index[name] = (file, entry.offset, entry.nbytes, info)
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
        arr = np.fromfile(file, dtype=NP_STORAGE[info.dtype], count=count, offset=offset)
        if arr.size != count:
            raise ValueError(f"{file}: truncated while reading tensor {name}")
        return arr.reshape(info.shape)

    def write_tokenizer(self, out_dir: Path) -> None:
        names = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json",
                 "added_tokens.json", "chat_template.jinja"]
        for name in names:
            if (self.path / name).exists():
                shutil.copy2(self.path / name, out_dir / name)

    def files(self) -> list[Path]:
        return sorted({entry[0] for entry in self._index.values()} | {self.path / "config.json"})
