"""HF / mlx_lm safetensors checkpoints as a source, 16-bit or quantized by mlx_lm.

A quantized mlx_lm dir (config.json "quantization": bits, group_size, mode, and per-module
overrides - mixed recipes - or False for a module left unquantized) stores each quantized
module as `<module>.weight` packed uint32, `.scales`, `.biases`. Such a module is listed here
with its logical (rows, cols) shape and the scales' dtype; `read` dequantizes it, and
`quantization_for` / `read_quantized` give its exact integers, scales and biases, which
convert carries as they are.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from ...format.manifest import QUANT_BITS, QUANT_GROUPS, dequantize_rows
from ...format.storage import DTYPE_BYTES, NP_STORAGE, cast, tensor_sizes, to_f32
from .base import Checkpoint, TensorInfo

QUANT_KEYS = ("bits", "group_size", "mode")  # a module's entry in config "quantization"


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
        self._quant = self.config.get("quantization") or None
        if self._quant is None and self.config.get("quantization_config"):
            raise ValueError(f"{config_path}: quantization_config "
                             f"{str(self.config['quantization_config'])[:60]!r} is not an mlx_lm "
                             "quantization; convert from the 16-bit model, an mlx_lm quantized "
                             "dir or a GGUF file")
        if self._quant is not None and not isinstance(self._quant, dict):
            raise ValueError(f"{config_path}: quantization must be an object (bits, group_size)")
        self._packed: dict[str, dict] = {}  # module -> {"bits", "group_size"} stored packed
        self._scales: dict[str, tuple] = {}  # module -> index entries of its scales, biases
        self._packed_shapes: dict[str, tuple] = {}  # packed weight -> its stored uint32 shape
        self._index = self._read_headers()

    def _read_headers(self) -> dict[str, tuple[Path, int, int, TensorInfo]]:
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{self.path}: no *.safetensors files found")
        index = {}
        for file in files:
            for name, entry in tensor_sizes(file).items():
                if entry.dtype == "uint32" and self._quant is not None:
                    index[name] = (file, entry.offset, entry.nbytes, None)  # resolved below
                    self._packed_shapes[name] = entry.shape
                    continue
                if entry.dtype not in DTYPE_BYTES:
                    raise ValueError(f"{file}: tensor {name} has dtype {entry.dtype}; only "
                                     "F16/BF16/F32 sources (or an mlx_lm quantized dir) are "
                                     "supported")
                if name in index:
                    raise ValueError(f"{file}: tensor {name} is also in {index[name][0]}; a "
                                     "tensor may be in one shard only - remove the stray "
                                     "*.safetensors file or download the model again")
                info = TensorInfo(name, entry.shape, entry.dtype)
                index[name] = (file, entry.offset, entry.nbytes, info)
        if self._quant is not None:
            index = self._resolve_packed(index)
        return self._sanitize(index)

    def _params(self, module: str) -> dict | None:
        """config "quantization"'s entry for `module`: its own, else the defaults; None when
        the checkpoint left it unquantized (False)."""
        entry = self._quant.get(module, self._quant)
        if entry is False:
            return None
        if not isinstance(entry, dict):
            raise ValueError(f"{self.path / 'config.json'}: quantization entry of {module} is "
                             f"{entry!r}, not an object with bits and group_size")
        return {k: entry.get(k, self._quant.get(k)) for k in QUANT_KEYS}

    def _resolve_packed(self, index: dict) -> dict:
        """Each packed `<module>.weight` (uint32) -> its logical (rows, cols) TensorInfo in its
        scales' dtype, after checking it is MLX affine mlx-flash can carry exactly; its scales
        and biases leave the tensor list. Raises ValueError naming the tensor otherwise."""
        config = self.path / "config.json"
        for name in [n for n, e in index.items() if e[3] is None]:
            module = name[: -len(".weight")] if name.endswith(".weight") else None
            params = self._params(module) if module else None
            scales, biases = (index.get(f"{module}.{k}") for k in ("scales", "biases"))
            if params is None or scales is None or biases is None:
                raise ValueError(f"{index[name][0]}: tensor {name} is packed uint32 but "
                                 f"{config} gives no quantization for it (or its scales and "
                                 "biases are missing); the checkpoint is damaged")
            if params["mode"] not in (None, "affine") or params["bits"] not in QUANT_BITS \
                    or params["group_size"] not in QUANT_GROUPS:
                raise ValueError(f"{index[name][0]}: tensor {name} is quantized {params}; "
                                 f"mlx-flash carries MLX affine only, bits {QUANT_BITS}, groups "
                                 f"{QUANT_GROUPS} - convert from the 16-bit model instead")
            rows, groups = scales[3].shape
            packed_cols = self._packed_shapes[name][1]
            cols = groups * params["group_size"]
            if packed_cols * 32 != cols * params["bits"] or biases[3].shape != (rows, groups):
                raise ValueError(f"{index[name][0]}: tensor {name} ({rows}, {packed_cols}) "
                                 f"with scales {scales[3].shape} is not {params['bits']}-bit "
                                 f"MLX affine in groups of {params['group_size']}; the "
                                 "checkpoint is damaged")
            file, offset, nbytes, _ = index[name]
            index[name] = (file, offset, nbytes, TensorInfo(name, (rows, cols), scales[3].dtype))
            self._packed[module] = {"bits": params["bits"], "group_size": params["group_size"]}
            for kind in ("scales", "biases"):
                del index[f"{module}.{kind}"]
            self._scales[module] = (scales, biases)
        return index

    def _sanitize(self, index: dict) -> dict:
        """Drop what mlx_lm's sanitize drops (rotary caches, tied lm_head)."""
        out = {k: v for k, v in index.items() if "rotary_emb.inv_freq" not in k}
        if self.config.get("tie_word_embeddings", True) and "model.embed_tokens.weight" in out:
            out.pop("lm_head.weight", None)
        return out

    def tensors(self) -> dict[str, TensorInfo]:
        return {name: entry[3] for name, entry in self._index.items()}

    @property
    def carries_ffn(self) -> bool:
        """A quantized mlx_lm dir: its FFN blocks are carried into the bundles as stored."""
        return self._quant is not None

    def default_quantization(self) -> dict:
        """config "quantization"'s top-level bits and group_size."""
        return {"bits": self._quant.get("bits"), "group_size": self._quant.get("group_size")}

    def quantization_for(self, name: str) -> dict | None:
        """{"bits", "group_size"} of a module the checkpoint stores quantized, else None."""
        return self._packed.get(name[: -len(".weight")]) if name.endswith(".weight") else None

    def read_quantized(self, name: str, bits: int, group_size: int
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The stored integers (r, c) uint8, scales and biases (r, c / group) float32 of a
        quantized module, when asked at its own bits and group size; else None."""
        if self.quantization_for(name) != {"bits": bits, "group_size": group_size}:
            return None
        packed = self._raw(name, "uint32").reshape(self._packed_shapes[name])
        rows = len(packed)
        ones = np.ones((rows, packed.shape[1] * 32 // bits // 32), np.float32)
        q = dequantize_rows(packed, ones, np.zeros_like(ones), bits, 32).astype(np.uint8)
        scales, biases = (to_f32(self._raw(e, e[3].dtype).reshape(e[3].shape), e[3].dtype)
                          for e in self._scales[name[: -len(".weight")]])
        return q, scales, biases

    def _raw(self, tensor: str | tuple, dtype: str) -> np.ndarray:
        """A tensor's bytes (its name, or its index entry) as a flat `dtype` array."""
        file, offset, nbytes = (self._index[tensor] if isinstance(tensor, str) else tensor)[:3]
        count = nbytes // NP_STORAGE[dtype].itemsize
        arr = np.fromfile(file, dtype=NP_STORAGE[dtype], count=count, offset=offset)
        if arr.size != count:
            name = tensor if isinstance(tensor, str) else tensor[3].name
            raise ValueError(f"{file}: truncated while reading tensor {name}")
        return arr

    def read(self, name: str) -> np.ndarray:
        params = self.quantization_for(name)
        if params is not None:  # dequantized, in the scales' dtype
            q, scales, biases = self.read_quantized(name, **params)
            rows = len(q)
            w = q.reshape(rows, scales.shape[1], -1) * scales[..., None] + biases[..., None]
            return cast(w.reshape(rows, -1), "float32", self._index[name][3].dtype)
        file, offset, nbytes, info = self._index[name]
        count = int(np.prod(info.shape)) if info.shape else 1
        if nbytes != count * DTYPE_BYTES[info.dtype]:
            raise ValueError(f"{file}: tensor {name} has {nbytes} bytes for shape {info.shape}")
        return self._raw(name, info.dtype).reshape(info.shape)

    def write_tokenizer(self, out_dir: Path) -> None:
        names = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json",
                 "added_tokens.json", "chat_template.jinja"]
        for name in names:
            if (self.path / name).exists():
                shutil.copy2(self.path / name, out_dir / name)

    def files(self) -> list[Path]:
        return sorted({entry[0] for entry in self._index.values()} | {self.path / "config.json"})
