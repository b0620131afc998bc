"""Tiny random models of every supported architecture, written as HF-style safetensors dirs.

`make_source(dir, arch)` writes config.json, model.safetensors (random weights from the mlx_lm
model class itself, so names and shapes are exactly what mlx_lm expects) and a word-level
tokenizer that mlx_lm's `load_tokenizer` accepts.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

VOCAB = 256
BASE = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, rms_norm_eps=1e-5, rope_theta=10000.0,
            tie_word_embeddings=False, max_position_embeddings=512, eos_token_id=1)
EXTRA = {
    "llama": {},
    "qwen2": {},
    "mistral": {},
    "qwen3": {"head_dim": 16},
    "gemma3_text": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8,
                    "sliding_window_pattern": 2},
    "nemotron": {"hidden_act": "relu2", "norm_eps": 1e-5, "partial_rotary_factor": 0.5,
                 "mlp_bias": True, "attention_bias": False},
    "starcoder2": {"norm_epsilon": 1e-5, "use_bias": True},
}
ARCHS = tuple(EXTRA)
WORDS = [f"w{i}" for i in range(VOCAB - 3)]


def tiny_config(arch: str, **overrides) -> dict:
    return dict(BASE, model_type=arch, **EXTRA[arch], **overrides)


def random_weights(config: dict, seed: int = 0, scale: float = 0.2) -> dict[str, np.ndarray]:
    """Random f32 weights with the names and shapes of the mlx_lm model for `config`."""
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    rng = np.random.default_rng(seed)
    out = {}
    for name, value in tree_flatten(model.parameters()):
        if name.endswith("norm.weight") and config["model_type"] == "gemma3_text":
            out[name] = rng.normal(0, 0.1, value.shape).astype(np.float32)  # gemma adds 1
        elif name.endswith("norm.weight"):
            out[name] = (1 + rng.normal(0, 0.1, value.shape)).astype(np.float32)
        else:
            out[name] = rng.normal(0, scale, value.shape).astype(np.float32)
    return out


def write_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, "<s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "eos_token": "</s>",
        "bos_token": "<s>", "model_max_length": 512}))


def make_source(out: Path, arch: str, seed: int = 0, dtype: str = "float32",
                **overrides) -> Path:
    """An HF-style model dir for a tiny random `arch` model; returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_config(arch, **overrides)
    weights = random_weights(config, seed)
    arrays = {k: mx.array(v).astype(getattr(mx, dtype)) for k, v in weights.items()}
    mx.save_safetensors(str(out / "model.safetensors"), arrays, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config))
    write_tokenizer(out)
    return out
