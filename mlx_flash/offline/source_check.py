"""Does a source's config describe its tensors? Checked by `convert` before it writes anything.

A config.json edited by hand or shipped with the wrong model would give a flash dir that does
not load (or loads and computes garbage). The counts are checked by key (num_hidden_layers,
intermediate_size, hidden_size, vocab_size), then every tensor's shape against the mlx_lm model
the config builds (attention heads, head_dim, ...). Each mismatch is a ValueError naming the
key or tensor, both values and the config file.
"""

from __future__ import annotations

from pathlib import Path

from mlx.utils import tree_flatten

from ..runtime.loader import model_classes
from .sources.base import Checkpoint, TensorInfo

EMBED = "model.embed_tokens.weight"


def config_file(ckpt: Checkpoint) -> Path:
    """Where the config came from: the dir's config.json, else the source file (GGUF)."""
    path = Path(ckpt.path) / "config.json"
    return path if path.is_file() else Path(ckpt.path)


def check_config(ckpt: Checkpoint) -> None:
    """Raise ValueError when the config disagrees with the source's tensors."""
    where, infos = config_file(ckpt), ckpt.tensors()
    counts = _tensor_counts(ckpt, infos)
    for key, (found, what) in counts.items():
        value = ckpt.config.get(key)
        if value is not None and value != found:
            raise ValueError(f"{where}: {key} is {value} but the tensors have {found} ({what}); "
                             "the config does not belong to these weights - fix it or download "
                             "the model again")
    _check_model_shapes(ckpt, infos, where)


def _tensor_counts(ckpt: Checkpoint, infos: dict[str, TensorInfo]) -> dict[str, tuple]:
    """config key -> (the value the tensors imply, where that value was seen)."""
    layers = {int(n.split(".")[2]) for n in infos if n.startswith("model.layers.")
              and n.split(".")[2].isdigit()}
    out: dict[str, tuple] = {}
    if layers:
        out["num_hidden_layers"] = (max(layers) + 1, f"model.layers.0 to {max(layers)}")
    want = ckpt.config.get("intermediate_size")
    for layer in sorted(layers):  # the first layer that disagrees with the config, else layer 0
        up = ckpt.ffn_names(layer).get("up")
        if up in infos and ("intermediate_size" not in out or infos[up].shape[0] != want):
            out["intermediate_size"] = (infos[up].shape[0], f"{up} rows")
            if infos[up].shape[0] != want:
                break
    if EMBED in infos and len(infos[EMBED].shape) == 2:
        rows, cols = infos[EMBED].shape
        out["vocab_size"] = (rows, f"{EMBED} rows")
        out["hidden_size"] = (cols, f"{EMBED} columns")
    return out


def _check_model_shapes(ckpt: Checkpoint, infos: dict[str, TensorInfo], where: Path) -> None:
    """Each tensor has the shape the mlx_lm model built from the config gives it (lazily: no
    weight is allocated)."""

    model_class, args_class = model_classes(ckpt.config)
    model = model_class(args_class.from_dict(ckpt.config))
    for name, param in tree_flatten(model.parameters()):
        info = infos.get(name)
        if info is not None and tuple(info.shape) != tuple(param.shape):
            raise ValueError(f"{where}: tensor {name} is {tuple(info.shape)} in the source but "
                             f"the config makes it {tuple(param.shape)}; the config does not "
                             "belong to these weights - fix it or download the model again")
