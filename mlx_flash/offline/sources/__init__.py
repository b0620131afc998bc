"""Source checkpoints: HF / mlx_lm safetensors and GGUF."""

from __future__ import annotations

from pathlib import Path

from .base import Checkpoint
from .gguf import GGUFCheckpoint
from .safetensors import SafetensorsCheckpoint


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a source: a .gguf file or an HF/mlx_lm safetensors dir."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass an HF/mlx_lm safetensors dir or a "
                                ".gguf file (or run `mlx-flash pull` for the default model)")
    if path.is_file() and path.suffix == ".gguf":

        return GGUFCheckpoint(path)
    if path.is_dir() and any(path.glob("*.safetensors")):
        return SafetensorsCheckpoint(path)
    raise ValueError(f"{path} is neither a .gguf file nor a dir of *.safetensors with a "
                     "config.json; pass one of those")
