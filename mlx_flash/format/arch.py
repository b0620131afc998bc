"""The architecture table: FFN specs by model_type, and the activations (MLX function, numpy
function, kernel code) in one place."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np


def relu2(x: mx.array) -> mx.array:
    return mx.square(nn.relu(x))


ACTIVATION_FNS = {
    "silu": nn.silu,
    "gelu": nn.gelu,
    "gelu_approx": nn.gelu_approx,
    "relu": nn.relu,
    "relu2": relu2,
    "identity": lambda x: x,  # a gate-resident dir's bundles: h = (up x) * act(gate x) as mask
}


# The kernels' ACT template constant; the order matches `flash_act` in both kernel sources.
ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_approx": 2, "relu": 3, "relu2": 4,
                    "identity": 5}


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
    if name == "identity":
        return z
    raise ValueError(f"unknown activation {name!r}")


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
    "gemma3_text": FFNSpec("gated", "gelu_approx", up="up_proj", down="down_proj",
                           gate="gate_proj"),
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


ACTIVATIONS = tuple(ACTIVATION_CODES)


RELU_FAMILY = ("relu", "relu2")
