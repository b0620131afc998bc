"""mlx-flash: run language models larger than your memory with MLX.

    from mlx_flash import load          # instead of: from mlx_lm import load
    from mlx_lm import generate
    model, tokenizer = load("path/to/flash-model", dram_budget="1GB")
    print(generate(model, tokenizer, prompt="hello", max_tokens=50))

`load`'s options are the fields of `FlashConfig` (also accepted whole: `config=`).
"""

from .process import defer_mlx_lm_init

defer_mlx_lm_init()  # before anything imports mlx_lm: the generate path never needs transformers

from .runtime.config import FlashConfig  # noqa: E402
from .runtime.loader import load, load_dense  # noqa: E402

__all__ = ["FlashConfig", "load", "load_dense"]  # the converter: mlx_flash.offline.convert.convert
__version__ = "0.1.0"
