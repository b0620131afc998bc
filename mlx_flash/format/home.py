"""Where mlx-flash keeps its files ($MLX_FLASH_HOME, else ~/.cache/mlx_flash) and where its
kernel sources are."""

from __future__ import annotations

import os
from pathlib import Path

ENV_HOME = "MLX_FLASH_HOME"
ENV_KERNEL_DIR = "MLX_FLASH_KERNEL_DIR"  # where the .metal / .cu / .c sources are, if moved
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # mlx_flash/


def home() -> Path:
    """$MLX_FLASH_HOME, else ~/.cache/mlx_flash."""
    env = os.environ.get(ENV_HOME)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mlx_flash"


def default_models_dir() -> Path:
    """Where pulled models live unless told otherwise (not created here)."""
    return home() / "models"


def kernel_dir(probe: str = "sparse_ffn.metal") -> Path:
    """The directory holding the kernel sources (`probe` is a file it must have).

    `MLX_FLASH_KERNEL_DIR` if set; else `mlx_flash/kernel_sources` (where a wheel puts them);
    else the repository's top-level `kernels/`.
    """
    if os.environ.get(ENV_KERNEL_DIR):
        return Path(os.environ[ENV_KERNEL_DIR])
    candidates = (PACKAGE_DIR / "kernel_sources", PACKAGE_DIR.parent / "kernels")
    for candidate in candidates:
        if (candidate / probe).is_file():
            return candidate
    raise FileNotFoundError(f"kernel sources not found in {candidates[0]} or {candidates[1]}; "
                            f"set {ENV_KERNEL_DIR} to their directory")
