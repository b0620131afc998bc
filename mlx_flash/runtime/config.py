"""FlashConfig: every option of `load()`, checked once, in one place.

`load(path, dram_budget, **options)` builds a FlashConfig from its keyword options (or takes
`config=FlashConfig(...)`); the runtime keeps it as `FlashRuntime.config`, and the stats'
`settings` are derived from it plus what the loader resolved (see `settings_dict`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from numbers import Integral
from typing import Any

import mlx.core as mx

from .planner import PLANNERS

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


SELECTORS = ("auto", "predictor", "oracle", "quant", "sequence", "gate")


ORACLE_RULES = ("all", "nonzero", "top")


STORE_MODES = ("pread", "mmap")


COMPUTE_ON = ("active", "cached")


RESIDENT_BITS = (None, 4, 8, 16)


@dataclass
class FlashConfig:
    """The options of `load()` (defaults are `load`'s).

    window: tokens whose active neurons stay cached.
    selector: "oracle" (true activations; `oracle_rule` "all", "nonzero" or "top" with `keep`,
    default 1.0), "predictor" (the dir's trained predictors; `predictor_recall` picks one of
    their calibrated operating points, None = their default), "quant" (a 4-bit copy of the
    FFN's gate/up in DRAM scores every neuron, each token keeps its top `keep`, default 0.5)
    "sequence" (GRIFFIN: each layer's top `keep` neurons, default 0.7, chosen from the prompt's
    true activations and used for every decoded token; `sequence_refresh` N > 0 chooses again
    every N decoded tokens from the recent tokens too, 0 = never), "gate" (a gate-resident dir's
    resident gate: each token keeps its top `keep` by |act(gate x)|, default 0.5; CATS) or
    "auto" (predictor when the dir has them, else oracle).
    dtype: the compute dtype ("float16", "bfloat16", "float32" or an mx.Dtype); None = f32 on
    CPU (bf16 when a budget needs it), the storage dtype on a GPU.
    threads: the store's parallel reads. direct: O_DIRECT reads that bypass the page cache;
    None = on under a budget where the dir's filesystem allows O_DIRECT (under a budget the
    streamed bytes cannot stay cached: the page cache only churns, and on Linux its copies and
    reclaim cost more CPU than the reads, BENCHMARKS.md issue 8). store_mode: "pread" or "mmap".
    embed_on_flash: the embedding table read row by row from flash (untied models); None =
    only when the budget needs it.
    max_kv_tokens: the context length the budget reserves KV cache for.
    compute_on: "active" (each token's own neurons) or "cached" (every cached row).
    max_sparse_tokens: calls with more tokens (a prompt) stream the layer's whole FFN.
    prefill_chunk: neurons per read when a layer is streamed.
    min_capacity: the fewest cached neurons per layer a budget may leave (None: 5%).
    naive: the paper's baseline, every layer's whole FFN streamed from flash every token (no
    cache, no selection).
    resident_bits: 16 keeps attention and lm_head in the compute dtype, 8 or 4 quantizes them
    at load (mlx_lm's way, groups of `resident_group_size`); None picks 16, or 8 when the
    budget needs it.
    fast_cpu: the C kernels of accel/ for the FFN and the 16-bit linears, weights kept in their
    16-bit storage type, f32 compute; None = on when MLX runs on the CPU, the bundles are
    16-bit, no `dtype` is asked for and the kernels build (else MLX's kernels, the reference).
    read_planner: "cost" (spans chosen by this disk's cost model, see planner.py), "runs" or
    "neuron".
    pin_hot: fraction of each neuron cache given to the layer's most often active neurons for
    the whole run (needs a placed dir; 0: none).
    read_ahead: streamed chunks in flight on a background reader (the one computed next
    included); 0 reads each chunk when it is needed.
    reserve: bytes of the budget the caller will hold besides the model (a drafter:
    `drafter.drafter_bytes`).
    """

    window: int = 5
    selector: str = "oracle"
    oracle_rule: str = "all"
    keep: float | None = None
    dtype: str | mx.Dtype | None = None
    threads: int = 8
    direct: bool | None = None
    store_mode: str = "pread"
    embed_on_flash: bool | None = None
    max_kv_tokens: int = 2048
    compute_on: str = "active"
    max_sparse_tokens: int = 16
    prefill_chunk: int = 1024
    min_capacity: int | None = None
    naive: bool = False
    resident_bits: int | None = None
    resident_group_size: int = 64
    fast_cpu: bool | None = None
    predictor_recall: float | None = None
    sequence_refresh: int = 0
    read_planner: str = "cost"
    pin_hot: float = 0.0
    read_ahead: int = 3
    reserve: int = 0

    def __post_init__(self) -> None:
        _one_of("selector", self.selector, SELECTORS)
        _one_of("oracle_rule", self.oracle_rule, ORACLE_RULES)
        _one_of("store_mode", self.store_mode, STORE_MODES)
        _one_of("compute_on", self.compute_on, COMPUTE_ON)
        _one_of("read_planner", self.read_planner, PLANNERS)
        _one_of("resident_bits", self.resident_bits, RESIDENT_BITS)
        if not (self.dtype is None or isinstance(self.dtype, mx.Dtype) or self.dtype in DTYPES):
            raise ValueError(f"dtype must be None, an mx.Dtype or one of {tuple(DTYPES)}, got "
                             f"{self.dtype!r}")
        for name in ("window", "threads", "max_sparse_tokens", "prefill_chunk",
                     "resident_group_size"):
            _at_least(name, getattr(self, name), 1)
        for name in ("max_kv_tokens", "read_ahead", "reserve", "sequence_refresh"):
            _at_least(name, getattr(self, name), 0)
        if self.min_capacity is not None:
            _at_least("min_capacity", self.min_capacity, 1)
        if self.keep is not None:
            check_fraction("keep", self.keep)
        if self.predictor_recall is not None:
            check_fraction("predictor_recall", self.predictor_recall)
        if not 0.0 <= self.pin_hot < 1.0:
            raise ValueError(f"pin_hot must be in [0, 1) (a fraction of each neuron cache), "
                             f"got {self.pin_hot}")

    @classmethod
    def from_options(cls, config: FlashConfig | None = None, **options: Any) -> FlashConfig:
        """`config` (default: the defaults) with `options` replaced; an unknown option name
        raises TypeError listing the known ones."""
        known = option_names()
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise TypeError(f"unknown load() option{'s' if len(unknown) > 1 else ''} "
                            f"{', '.join(unknown)}; the options are: {', '.join(known)}")
        return replace(config, **options) if config is not None else cls(**options)


def option_names() -> tuple[str, ...]:
    """Every option `load()` takes besides path and dram_budget, in FlashConfig order."""
    return tuple(f.name for f in fields(FlashConfig))


def settings_dict(config: FlashConfig, **resolved: Any) -> dict[str, Any]:
    """The stats' `settings`: every option of `config` (oracle_rule named "rule", the
    --stats-json key), overridden by what the loader resolved (dtype, direct, capacity...)."""
    out = {f.name: getattr(config, f.name) for f in fields(config)}
    out["rule"] = out.pop("oracle_rule")
    out.update(resolved)
    return out


def check_fraction(name: str, value: float) -> None:
    """value must be in (0, 1]: a ValueError naming the option otherwise."""
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")


def default_dtype(storage: str) -> mx.Dtype:
    """f32 on CPU (f16/bf16 compute is slow there), the storage dtype on a GPU."""
    if mx.default_device() == mx.cpu:
        return mx.float32
    return DTYPES[storage]


def resolve_dtype(dtype: str | mx.Dtype | None, storage: str) -> mx.Dtype:
    """The compute dtype for a `dtype` option and the bundles' storage dtype name."""
    if dtype is None:
        return default_dtype(storage)
    if isinstance(dtype, mx.Dtype):
        return dtype
    _one_of("dtype", dtype, tuple(DTYPES))
    return DTYPES[dtype]


def _one_of(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got "
                         f"{value!r}")


def _at_least(name: str, value: int, low: int) -> None:
    if not isinstance(value, Integral) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
