"""Source checkpoints, read one tensor at a time.

A `Checkpoint` is what `convert` reads: an mlx_lm config dict, the tensor names (already in
mlx_lm naming, e.g. `model.layers.0.mlp.gate_proj.weight`) with shapes and dtypes, and one tensor
at a time as a numpy array. bfloat16 has no numpy dtype: such tensors travel as `np.uint16` bit
patterns and carry the dtype name "bfloat16" beside them.

Two readers: `SafetensorsCheckpoint` (an HF / mlx_lm dir of *.safetensors, `safetensors.py`)
and `GGUFCheckpoint` (a .gguf file, `gguf.py`). `open_checkpoint` picks by path.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...format.arch import FFNSpec, ffn_spec, mlp_prefix
from ...format.manifest import FFNLayout


@dataclass(frozen=True)
class TensorInfo:
    name: str  # mlx_lm name
    shape: tuple[int, ...]
    dtype: str  # "float16" | "bfloat16" | "float32"


class Checkpoint(ABC):
    """A source model, read tensor by tensor (never the whole model in RAM)."""

    path: Path
    kind: str  # "safetensors" | "gguf"
    group_size = 64  # what convert quantizes in groups of unless told
    carries_ffn = False  # True: the FFN matrices are stored quantized and convert copies them
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

    def quantization_for(self, name: str) -> dict | None:
        """{"bits", "group_size"} at which the source's own blocks of matrix `name` are
        exactly MLX affine (see `read_quantized`), or None: unquantized sources."""
        return None

    def ffn_quantization(self, name: str) -> dict | None:
        """{"bits", "group_size"} at which FFN matrix `name`'s own blocks are exactly affine
        along its rows (`read_quantized`), for carrying into format-3 bundles; None: not."""
        return self.quantization_for(name)

    def read_quantized(self, name: str, bits: int, group_size: int
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Matrix `name` (r, c) as the source stores it when that is exactly MLX affine at
        `bits`/`group_size`: (q (r, c) integers in [0, 2**bits), scales, biases (r, c /
        group_size) float32, w = scales * q + biases); None when it is not."""
        return None

    def is_ffn_tensor(self, name: str) -> bool:
        """True for tensors that go into bundles (every FFN weight and input bias)."""
        parts = name.split(".")
        if len(parts) < 5 or parts[:2] != ["model", "layers"] or parts[3] != "mlp":
            return False
        return name in self.ffn_names(int(parts[2])).values()


def layout_for(checkpoint: Checkpoint, dtype: str, bits: int = 16,
               group_size: int = 64) -> FFNLayout:
    """The bundle layout for a checkpoint stored in `dtype` (and `bits` per FFN weight)."""
    spec = checkpoint.spec()
    names = checkpoint.ffn_names(0)
    has_bias = any(role.endswith("_bias") for role in names)
    return FFNLayout(kind=spec.kind, activation=spec.activation,
                     d_model=int(checkpoint.config["hidden_size"]), dtype=dtype,
                     has_bias=has_bias, bits=bits, group_size=group_size)
