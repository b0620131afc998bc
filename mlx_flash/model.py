"""Loading a flash model dir: `load` (FFN on flash) and `load_dense` (the reference).

Both build the mlx_lm model class named by the config and load resident.safetensors into it.
`load` replaces every `layer.mlp` by a FlashFFN (and optionally the embedding table by a
FlashEmbedding); `load_dense` rebuilds the dense MLP weights from the bundles, so it is an
ordinary mlx_lm model for every comparison. Both return (model, tokenizer) like `mlx_lm.load`.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import cpu, disk
from .cache import NeuronCache
from .checkpoint import ARCHITECTURES, mlp_prefix
from .ffn import (
    FlashFFN,
    FlashRuntime,
    FlashSettings,
    OracleSelector,
    cache_buffers,
    split_bundles,
)
from .format import RESIDENT, Manifest, read_manifest
from .stats import current_rss_bytes
from .store import DIRECT_ALIGN, MAX_READ, NeuronStore, supports_direct

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def default_dtype(manifest: Manifest) -> mx.Dtype:
    """f32 on CPU (f16/bf16 compute is slow there), the storage dtype on a GPU."""
    if mx.default_device() == mx.cpu:
        return mx.float32
    return DTYPES[manifest.ffn.dtype]


def resolve_dtype(dtype: str | mx.Dtype | None, manifest: Manifest) -> mx.Dtype:
    if dtype is None:
        return default_dtype(manifest)
    if isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


# ---------------------------------------------------------------- shared building


def _model_classes(config: dict):
    from mlx_lm.utils import _get_classes

    return _get_classes(config)


def build_model(manifest: Manifest) -> nn.Module:
    """The mlx_lm model for the manifest's config, weights not loaded."""
    model_class, args_class = _model_classes(manifest.config)
    return model_class(args_class.from_dict(manifest.config))


def quantizable(name: str, shape: tuple[int, ...], group_size: int) -> bool:
    """Resident tensors that load-time quantization applies to: 2-D weights of Linear and
    Embedding modules whose rows split into whole groups."""
    return len(shape) == 2 and name.endswith(".weight") and shape[-1] % group_size == 0


def quantize_rows_chunked(path: Path, name: str, dtype: mx.Dtype, bits: int, group_size: int,
                          rows_per_chunk: int = 8192) -> tuple[mx.array, mx.array, mx.array]:
    """mx.quantize of one safetensors tensor, reading and quantizing it a block of rows at a
    time into preallocated outputs: the unquantized tensor (272 MB for the default model's
    lm_head in f16) is never in memory whole. Scales and biases come back in `dtype`."""
    shape, offset, _, stored_as = tensor_sizes(path)[name]
    storage = {"float16": np.uint16, "bfloat16": np.uint16, "float32": np.float32}[stored_as]
    table = np.memmap(path, mode="r", dtype=storage, offset=offset, shape=shape)
    rows, cols = shape
    q = mx.zeros((rows, cols * bits // 32), dtype=mx.uint32)
    scales = mx.zeros((rows, cols // group_size), dtype=dtype)
    biases = mx.zeros_like(scales)
    for start in range(0, rows, rows_per_chunk):
        stop = min(rows, start + rows_per_chunk)
        block = mx.array(np.ascontiguousarray(table[start:stop]))
        if stored_as != "float32":
            block = block.view(DTYPES[stored_as])
        wq, s, b = mx.quantize(block.astype(dtype), group_size=group_size, bits=bits)
        q[start:stop], scales[start:stop], biases[start:stop] = wq, s, b
        mx.eval(q, scales, biases)  # write this block now so only one block is alive
    del table
    return q, scales, biases


def load_resident(root: Path, model: nn.Module, dtype: mx.Dtype, skip: tuple[str, ...] = (),
                  bits: int = 16, group_size: int = 64) -> dict[str, mx.array]:
    """resident.safetensors as a dict in `dtype`, sanitized by the model, without `skip` keys.

    bits 8 or 4 quantizes every `quantizable` tensor the mlx_lm way (weight, scales, biases)
    and turns the matching modules of `model` into their quantized versions. Tensors are
    converted one at a time so the storage and compute copies of the whole resident part are
    never in memory together.
    """
    weights = mx.load(str(root / RESIDENT))
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    out = {}
    for name in list(weights):
        tensor = weights.pop(name)
        if name in skip:
            continue
        if bits < 16 and quantizable(name, tensor.shape, group_size):
            base = name[: -len(".weight")]
            q = quantize_rows_chunked(root / RESIDENT, name, dtype, bits, group_size)
            out.update(zip([name, f"{base}.scales", f"{base}.biases"], q, strict=True))
        else:
            tensor = tensor.astype(dtype)
            out[name] = tensor
            mx.eval(tensor)  # materialize now, freeing the storage-dtype copy
    if bits < 16:
        nn.quantize(model, group_size=group_size, bits=bits,
                    class_predicate=lambda path, module: f"{path}.scales" in out)
    return out


def load_tokenizer(root: Path, manifest: Manifest):
    from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

    eos = manifest.config.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else eos
    return mlx_load_tokenizer(root, eos_token_ids=eos)


def read_layer_dense(root: Path, manifest: Manifest, layer: int, dtype: mx.Dtype
                     ) -> dict[str, mx.array]:
    """One layer's dense MLP weights in mlx_lm naming, rebuilt from its bundle file."""
    entry = manifest.layers[layer]
    raw = np.fromfile(root / entry.file, dtype=np.uint8)
    if raw.size != entry.size:
        raise ValueError(f"{root / entry.file}: {raw.size} bytes, manifest says {entry.size}")
    rows = manifest.to_original(layer, raw.reshape(entry.n_neurons, entry.stride))
    weights, bias = split_bundles(rows, manifest, dtype)
    spec, prefix = ARCHITECTURES[manifest.config["model_type"]], mlp_prefix(layer)
    ins = [spec.gate, spec.up] if spec.kind == "gated" else [spec.up]
    out = {f"{prefix}.{name}.weight": weights[i] for i, name in enumerate(ins)}
    out[f"{prefix}.{spec.down}.weight"] = weights[-1].T
    if bias is not None:
        out.update({f"{prefix}.{name}.bias": bias[i] for i, name in enumerate(ins)})
    return out


def load_dense(path: str | Path, dtype: str | mx.Dtype | None = None,
               fast_cpu: bool | None = False):
    """The ordinary mlx_lm model rebuilt from a flash dir (resident + every bundle).

    Returns (model, tokenizer). Needs the whole model in memory: it is the reference.
    fast_cpu: keep the 16-bit weights as stored and compute every linear with cpu.py's kernels
    (`load`'s fast path, for a dense comparison on CPU); None: as `load` decides.
    """
    root = Path(path)
    manifest = read_manifest(root)
    fast = use_fast_cpu(fast_cpu, manifest, dtype)
    dtype = weight_dtype(fast, dtype, manifest)
    model = build_model(manifest)
    weights = load_resident(root, model, dtype)
    for layer in range(manifest.n_layers):
        weights.update(read_layer_dense(root, manifest, layer, dtype))
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())  # load now, as mlx_lm.load does by default
    model.eval()
    if fast:
        cpu.accelerate(model)
    return model, load_tokenizer(root, manifest)


# ---------------------------------------------------------------- the DRAM budget


_SIZE = re.compile(r"^\s*([0-9.]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


def parse_budget(value: str | float | int | None, model_bytes: int) -> int | None:
    """Bytes from "4GB", "512MiB", 3_000_000_000, or a fraction of the model's size (0.5)."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return int(value * model_bytes) if 0 < value <= 1 else int(value)
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"dram_budget {value!r} is not a size: use bytes, '4GB', '512MiB' or a "
                         "fraction of the model size like 0.5")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    if unit == "" and 0 < number <= 1:
        return int(number * model_bytes)
    if unit not in _UNITS:
        raise ValueError(f"dram_budget {value!r}: unknown unit {unit!r}")
    return int(number * _UNITS[unit])


@dataclass
class MemoryPlan:
    """Where the DRAM budget goes, in bytes; capacity is neurons cached per layer."""

    budget: int | None
    runtime: int  # the process before any weight is loaded (Python, MLX, tokenizer)
    resident: int  # attention, norms, lm_head (and embeddings unless on flash)
    embedding: int  # the embedding table, 0 when it stays on flash
    predictors: int  # the low-rank predictors, held as float32
    kv_cache: int  # reserved for max_kv_tokens
    scratch: int  # prefill / oracle chunks in flight, and the page cache the code needs
    caches: int  # all layers' neuron caches
    capacity: int
    n_neurons: int
    per_neuron: int  # bytes one cached neuron costs, summed over the layers
    reserved: int = 0  # what the caller holds besides the model (a drafter)

    @property
    def minimum(self) -> int:
        return (self.runtime + self.resident + self.embedding + self.predictors + self.kv_cache
                + self.scratch + self.reserved)


class TensorEntry(NamedTuple):
    shape: tuple[int, ...]
    offset: int  # of the data, from the start of the file
    nbytes: int
    dtype: str  # "float16" | "bfloat16" | "float32"


_ST_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}


def tensor_sizes(path: Path) -> dict[str, TensorEntry]:
    """name -> TensorEntry from a safetensors header, without loading the data."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: TensorEntry(tuple(v["shape"]), 8 + n + v["data_offsets"][0],
                           v["data_offsets"][1] - v["data_offsets"][0],
                           _ST_NAMES.get(v["dtype"], v["dtype"]))
            for k, v in header.items()}


CODE_PAGES = 64 << 20  # libmlx, Python and numpy code must stay in the page cache under a cgroup


def return_freed_memory_to_os() -> None:
    """Make glibc give large freed buffers back to the OS (Linux only; no-op elsewhere).

    glibc raises its mmap threshold each time a large block is freed, so the store's 5-25 MB
    read buffers end up in the heap and stay there after free: ~120 MB of RSS that no budget
    planned for. A fixed threshold keeps every block over 1 MiB in its own mapping.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc (musl): nothing to tune


def kv_bytes(config: dict, tokens: int, itemsize: int) -> int:
    heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * heads * head_dim * tokens * itemsize


def resident_bytes(name: str, shape: tuple[int, ...], itemsize: int, bits: int,
                   group_size: int) -> int:
    count = int(np.prod(shape))
    if bits < 16 and quantizable(name, shape, group_size):
        return count * bits // 8 + 2 * (count // group_size) * itemsize
    return count * itemsize


def plan_memory(root: Path, manifest: Manifest, budget: int | None, dtype: mx.Dtype,
                settings: FlashSettings, embed_on_flash: bool, max_kv_tokens: int,
                runtime_bytes: int, resident_bits: int = 16,
                resident_group_size: int = 64, kv_itemsize: int | None = None,
                selector_bytes: int | None = None, threads: int = 8,
                reserved: int = 0, fast: bool = False) -> MemoryPlan:
    """kv_itemsize: bytes per KV element when it is not the compute dtype's. selector_bytes:
    what the selector holds in DRAM (None: the dir's trained predictors, as f32, if any).
    threads: the store's reading threads (each may hold an O_DIRECT buffer). reserved: bytes
    the caller holds besides the model (a drafter). fast: the fast CPU path computes streamed
    chunks from their raw rows (no converted copies)."""
    itemsize = dtype.size
    sizes = {k: resident_bytes(k, shape, itemsize, resident_bits, resident_group_size)
             for k, (shape, *_) in tensor_sizes(root / RESIDENT).items()}
    embed = sizes.get("model.embed_tokens.weight", 0)
    resident = sum(sizes.values()) - embed
    layout, n = manifest.ffn, manifest.layers[0].n_neurons
    per_neuron = sum(parts * width * (4 if dt == mx.uint32 else itemsize)
                     for parts, width, dt in cache_buffers(layout, dtype).values())
    scratch = stream_scratch(settings, 0 if fast else layout.elements * itemsize,
                             max(e.stride for e in manifest.layers), threads) + CODE_PAGES
    predictors = selector_bytes or 0
    if selector_bytes is None and manifest.predictors:
        predictors = 4 * sum(int(np.prod(entry.shape)) for entry in
                             tensor_sizes(root / manifest.predictors["file"]).values())
    plan = MemoryPlan(budget, runtime_bytes, resident, 0 if embed_on_flash else embed, predictors,
                      kv_bytes(manifest.config, max_kv_tokens, kv_itemsize or itemsize),
                      scratch, 0, n, n,
                      per_neuron * manifest.n_layers, reserved)
    if budget is not None:
        plan.capacity = min(n, max(0, (budget - plan.minimum) // plan.per_neuron))
    plan.caches = plan.capacity * plan.per_neuron
    return plan


def stream_scratch(settings: FlashSettings, chunk_weight_bytes_per_neuron: int, stride: int,
                   threads: int) -> int:
    """Bytes the streamed chunks take while in use: the read-ahead's buffers (one per chunk in
    flight, plus the one being computed), two chunks of weights converted for compute (the
    MLX path; the fast path computes from the raw rows: pass 0 bytes per neuron), and one
    O_DIRECT buffer per thread."""
    chunk = settings.prefill_chunk
    return ((settings.read_ahead + 1) * chunk * stride
            + 2 * chunk * chunk_weight_bytes_per_neuron
            + threads * (MAX_READ + 2 * DIRECT_ALIGN))


def check_plan(plan: MemoryPlan, min_capacity: int, embed_on_flash: bool,
               dtype: mx.Dtype, resident_bits: int = 16) -> None:
    if plan.budget is None or plan.capacity >= min_capacity:
        return
    need = plan.minimum + min_capacity * plan.per_neuron
    hint = "" if embed_on_flash or not plan.embedding else (
        " or keep the embedding table on flash (embed_on_flash=True, --embed-on-flash)")
    breakdown = ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in asdict(plan).items()
                          if k in ("runtime", "resident", "embedding", "predictors", "kv_cache",
                                   "scratch", "reserved"))
    if plan.reserved:
        hint += f", or hold less beside the model (a drafter: {plan.reserved / 2**20:.0f} MiB)"
    dtype_hint = "" if dtype.size <= 2 else ", use bf16 compute (--dtype bfloat16)"
    if resident_bits > 4:
        dtype_hint += f", quantize the resident part (--resident-bits {resident_bits // 2})"
    raise ValueError(
        f"dram_budget {plan.budget / 2**20:.0f} MiB is too small: the resident part alone needs "
        f"{plan.minimum / 2**20:.0f} MiB ({breakdown}) and the neuron caches at least "
        f"{min_capacity} neurons per layer, {need / 2**20:.0f} MiB in all. Raise the budget to "
        f"at least that{dtype_hint}, lower max_kv_tokens{hint}.")


# ---------------------------------------------------------------- embeddings on flash


class FlashEmbedding(nn.Module):
    """An embedding table left in resident.safetensors: one row read per token."""

    def __init__(self, path: Path, offset: int, shape: tuple[int, int], storage: str,
                 dtype: mx.Dtype):
        super().__init__()
        self._path, self._offset, self._shape = path, offset, shape
        self._storage, self._dtype = storage, dtype
        self._table = np.memmap(path, mode="r", offset=offset, shape=shape,
                                dtype={"float16": np.float16, "bfloat16": np.uint16,
                                       "float32": np.float32}[storage])

    def __call__(self, ids: mx.array) -> mx.array:
        from .ffn import to_mx

        rows = self._table[np.array(ids).reshape(-1)]  # np.array evaluates the ids: needed now
        return to_mx(rows, self._storage, self._dtype).reshape(*ids.shape, self._shape[1])

    def as_linear(self, x: mx.array) -> mx.array:
        raise ValueError("this model ties lm_head to the embedding table, which then must stay "
                         "resident: load with embed_on_flash=False")


def flash_embedding(root: Path, dtype: mx.Dtype) -> FlashEmbedding:
    """The embedding table left in resident.safetensors, read (or paged in) row by row."""
    shape, offset, _, storage = tensor_sizes(root / RESIDENT)["model.embed_tokens.weight"]
    return FlashEmbedding(root / RESIDENT, offset, shape, storage, dtype)


# ---------------------------------------------------------------- load


def load(path: str | Path, dram_budget: str | float | int | None = None, *, window: int = 5,
         selector: str = "oracle", oracle_rule: str = "all", keep: float | None = None,
         dtype: str | mx.Dtype | None = None, threads: int = 8, direct: bool | None = None,
         store_mode: str = "pread", embed_on_flash: bool | None = None,
         max_kv_tokens: int = 2048, compute_on: str = "active", max_sparse_tokens: int = 16,
         min_capacity: int | None = None, naive: bool = False,
         resident_bits: int | None = None, resident_group_size: int = 64,
         fast_cpu: bool | None = None, predictor_recall: float | None = None,
         read_planner: str = "cost", pin_hot: float = 0.0, read_ahead: int = 3,
         reserve: int = 0):
    """Load a flash model dir for generation with `mlx_lm.generate` / `stream_generate`.

    dram_budget: bytes, a size string ("2GB"), a fraction of the model's size, or None
    (no limit: every neuron may be cached). It covers the process's baseline, resident weights,
    KV cache (reserved for max_kv_tokens) and the neuron caches. window: tokens whose neurons
    stay cached. resident_bits: 16 keeps attention and lm_head in the compute dtype, 8 or 4
    quantizes them at load (mlx_lm's way); None picks 16, or 8 when the budget needs it.
    fast_cpu: the C kernels of cpu.py for the FFN and the 16-bit linears, weights kept in
    their 16-bit storage type, f32 compute; None = on when MLX runs on the CPU, the bundles are
    16-bit, no `dtype` is asked for and the kernels build (else MLX's kernels, the reference).
    selector: "oracle" (true activations; rule "all", "nonzero" or "top" with
    `keep`, default 1.0), "predictor" (the dir's trained predictors; predictor_recall picks one
    of their calibrated operating points, None = their default), "quant" (a 4-bit copy of the
    FFN's gate/up in DRAM scores every neuron, each token keeps its top `keep`, default 0.5) or
    "auto" (predictor when the dir has them, else oracle). read_planner: "cost" (spans chosen
    by this disk's cost model, see planner.py), "runs" or "neuron". direct: O_DIRECT reads
    that bypass the page cache; None = on under a budget where the dir's filesystem allows
    O_DIRECT (under a budget the streamed bytes cannot stay cached: the page cache only
    churns, and on Linux its copies and reclaim cost more CPU than the reads, BENCHMARKS.md
    issue 8). pin_hot: fraction of each neuron cache given to the layer's most often active
    neurons for the whole run (needs a placed dir; 0: none).
    read_ahead: streamed chunks in flight on a background reader (the one computed next
    included); 0 reads each chunk when it is needed. reserve: bytes of the budget the caller
    will hold besides the model (a drafter: `drafter.drafter_bytes`).
    naive: the paper's baseline, every layer's whole FFN
    streamed from flash every token (no cache, no selection). Returns (model, tokenizer); the FlashRuntime with its
    stats is `model.flash`.
    """
    root = Path(path)
    manifest = read_manifest(root)
    settings = FlashSettings(window=window, compute_on=compute_on,
                             max_sparse_tokens=max_sparse_tokens, naive=naive,
                             read_ahead=read_ahead)
    model_bytes = manifest.ffn_bytes + manifest.resident["size"]
    budget = parse_budget(dram_budget, model_bytes)
    if direct is None:
        direct = budget is not None and supports_direct(root / manifest.layers[0].file)
    tokenizer = load_tokenizer(root, manifest)
    runtime_bytes = current_rss_bytes()
    tied = manifest.config.get("tie_word_embeddings", True) and "lm_head.weight" not in \
        tensor_sizes(root / RESIDENT)
    if embed_on_flash and tied:
        raise ValueError(f"{root}: embed_on_flash needs an untied lm_head; this model ties it "
                         "to the embedding table")
    needed = max(1, int(0.05 * manifest.layers[0].n_neurons)) if min_capacity is None \
        else min_capacity

    fast = use_fast_cpu(fast_cpu, manifest, dtype)
    kv_itemsize = 4 if fast else None  # the fast linears give f32 keys and values

    held = None  # the selector's DRAM: the dir's predictors (counted by plan_memory) or...
    if selector == "quant":
        from .quant_selector import selector_bytes

        held = selector_bytes(manifest)

    def planned(dtype, on_flash, rbits):
        return plan_memory(root, manifest, budget, dtype, settings, on_flash, max_kv_tokens,
                           runtime_bytes, rbits, resident_group_size, kv_itemsize, held, threads,
                           reserve, fast)

    # Without explicit choices, fit the budget: full caches first, then the embedding table
    # on flash (untied models), then bf16 compute instead of f32 on CPU, then 8-bit resident.
    # The fast CPU path keeps weights in their 16-bit storage type and computes in f32.
    dtypes = [weight_dtype(fast, dtype, manifest)]
    if dtype is None and dtypes[0] == mx.float32:
        dtypes.append(mx.bfloat16)
    flash_choices = [bool(embed_on_flash)] if embed_on_flash is not None or tied else [False,
                                                                                       True]
    rbits_choices = [resident_bits] if resident_bits is not None else [16, 8]
    for rbits, dtype_choice in ((r, d) for r in rbits_choices for d in dtypes):
        for on_flash in flash_choices:
            plan = planned(dtype_choice, on_flash, rbits)
            if budget is None or plan.capacity >= plan.n_neurons:
                break
        if budget is None or plan.capacity >= needed:
            break
    dtype, embed_on_flash, resident_bits = dtype_choice, on_flash, rbits
    check_plan(plan, needed, embed_on_flash, dtype, resident_bits)
    if budget is not None:
        # MLX keeps freed buffers for reuse; under a budget that cache is RSS we did not plan.
        mx.set_cache_limit(plan.scratch - CODE_PAGES)
        return_freed_memory_to_os()

    store = NeuronStore(root, manifest, threads=threads, direct=direct, mode=store_mode,
                        planner=read_planner, cost=disk.cost_model_for(root) or disk.FALLBACK)
    compute_dtype = mx.float32 if fast else dtype  # the fast path keeps weights 16-bit
    chooser = _make_selector(selector, store, manifest, oracle_rule, keep, compute_dtype,
                             predictor_recall, fast)
    runtime = FlashRuntime(manifest, store, chooser, settings, compute_dtype)
    if fast:
        runtime.fast = cpu.fast_ffn(manifest.ffn)
    runtime.stats.memory = asdict(plan)
    runtime.stats.settings = {"window": window, "selector": selector, "rule": oracle_rule,
                              "keep": keep, "dtype": str(dtype), "threads": threads,
                              "direct": direct, "store_mode": store_mode,
                              "embed_on_flash": bool(embed_on_flash), "compute_on": compute_on,
                              "capacity": plan.capacity, "naive": naive,
                              "resident_bits": resident_bits, "read_planner": read_planner,
                              "pinned": 0, "fast_cpu": fast}
    model = build_model(manifest)
    skip = ("model.embed_tokens.weight",) if embed_on_flash else ()
    weights = load_resident(root, model, dtype, skip, resident_bits, resident_group_size)
    _install_flash_layers(model, manifest, runtime, plan.capacity, weights, dtype)
    if embed_on_flash:
        model.model.embed_tokens = flash_embedding(root, mx.float32 if fast else dtype)
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    if fast:
        runtime.stats.settings["fast_linears"] = cpu.accelerate(model)
    model.flash = runtime  # plain attribute (not a Module or array): stats and store
    if pin_hot:
        from .placement import pin_hot as pin

        runtime.stats.settings["pinned"] = pin(model, int(pin_hot * plan.capacity))
    return model, tokenizer


def use_fast_cpu(fast_cpu: bool | None, manifest: Manifest, dtype) -> bool:
    """Whether load() takes the fast CPU path (see its `fast_cpu` argument)."""
    supported = cpu.supports(manifest.ffn)
    if fast_cpu is None and (dtype is not None or not supported):
        return False
    if fast_cpu and not supported:
        raise ValueError(f"fast_cpu needs 16-bit (or 4/8-bit with 16-bit scales) bundles; this "
                         f"dir stores {manifest.ffn.dtype} (convert with --dtype float16)")
    return cpu.wanted(fast_cpu)


def weight_dtype(fast: bool, dtype: str | mx.Dtype | None, manifest: Manifest) -> mx.Dtype:
    """The dtype resident weights load in: the bundles' 16-bit storage type on the fast CPU
    path (its kernels compute in f32), else the compute dtype."""
    return getattr(mx, manifest.ffn.dtype) if fast else resolve_dtype(dtype, manifest)


def _make_selector(name, store, manifest, rule, keep, dtype, predictor_recall=None,
                   fast_cpu=False):
    """"predictor": the dir's trained predictors at `predictor_recall` (None: their default);
    "oracle": true activations (`rule`, `keep`); "quant": a 4-bit copy of gate/up keeps each
    token's top `keep` (quant_selector.py); "auto": predictor when the dir has them."""
    if name == "auto":
        name = "predictor" if manifest.predictors else "oracle"
    if name == "predictor":
        from .predictor import PredictorSelector

        return PredictorSelector.from_dir(store.root, manifest, predictor_recall, fast_cpu)
    if name == "oracle":
        return OracleSelector(store, manifest, rule=rule, keep=1.0 if keep is None else keep,
                              dtype=dtype)
    if name == "quant":
        from .quant_selector import DEFAULT_KEEP, QuantCopySelector

        return QuantCopySelector(store, manifest, DEFAULT_KEEP if keep is None else keep,
                                 fast_cpu)
    raise ValueError(f"selector {name!r} is not known; use 'auto', 'predictor', 'oracle' or "
                     "'quant'")


def _install_flash_layers(model, manifest, runtime, capacity, weights, dtype) -> None:
    spec = ARCHITECTURES[manifest.config["model_type"]]
    layout = manifest.ffn
    buffers, zeros = cache_buffers(layout, dtype), None
    for i, layer in enumerate(model.layers):
        if runtime.fast is not None:  # numpy buffers (cpu.py)
            buffers = runtime.fast.cache_spec(manifest.layers[i].stride)
            zeros = cpu.numpy_zeros
        cache = NeuronCache(manifest.layers[i].n_neurons, capacity, 0, layout.d_model, dtype,
                            runtime.settings.window, buffers=buffers, zeros=zeros)
        out_bias = weights.pop(f"{mlp_prefix(i)}.{spec.down}.bias", None)
        if out_bias is not None and runtime.fast is not None:
            out_bias = out_bias.astype(mx.float32)
        if zeros is None:
            mx.eval(*cache.buffers.values())  # allocate now: the budget counts them from load
        layer.mlp = FlashFFN(i, runtime, cache, out_bias)
