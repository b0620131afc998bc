"""The DRAM plan: what a budget must hold and how much is left for the neuron caches."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..accel.blocks import PIECE
from ..format.manifest import RESIDENT, Manifest, resident_quantization
from ..format.storage import tensor_sizes
from .backend import CacheBackend
from .config import FlashConfig
from .rows import cache_buffers
from .store import DIRECT_ALIGN, MAX_READ

_SIZE = re.compile(r"^\s*([0-9.]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)


def quantizable(name: str, shape: tuple[int, ...], group_size: int) -> bool:
    """Resident tensors that load-time quantization applies to: 2-D weights of Linear and
    Embedding modules whose rows split into whole groups."""
    return len(shape) == 2 and name.endswith(".weight") and shape[-1] % group_size == 0


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
    scratch: int  # chunks in flight, prefill activations, MLX's cache, load heap, code pages
    caches: int  # all layers' neuron caches
    capacity: int
    n_neurons: int
    per_neuron: int  # bytes one cached neuron costs, summed over the layers
    reserved: int = 0  # what the caller holds besides the model (a drafter)

    @property
    def minimum(self) -> int:
        return (self.runtime + self.resident + self.embedding + self.predictors + self.kv_cache
                + self.scratch + self.reserved)


# Code and data pages first touched after the plan is made (the CPU kernels' library, MLX's
# compute kernels); those touched before are in `runtime` (RSS counts mapped file pages, and
# under a cgroup cap they are page cache charged to it). Measured 10-13 MiB on the 0.5B model
# (RssFile at the plan vs after 16 tokens; /tmp/team/lean-findings.md); was 64 MiB.
CODE_PAGES = 16 << 20
KV_STEP = 256  # positions mlx_lm's KVCache (and accel's NumpyKVCache) grow by
PREFILL_STEP = PIECE  # prompt positions per forward pass of runtime/generate.py's prefill
STEP_TEMPS = 4 << 20  # MLX's buffers of one decode step (logits, per-layer temporaries)
# heap that loading leaves besides the weights and caches (block tables, safetensors headers,
# reader threads): without it the 0.5B's plan was 2 MiB short of its measured peak RSS (anon
# 180 + mapped files 37 MiB under a 215 MiB budget)
LOAD_HEAP = 4 << 20


def kv_bytes(config: dict, tokens: int, itemsize: int) -> int:
    """The KV caches of `tokens` positions as they are held: allocated in KV_STEP steps, and
    while a layer's cache grows its old copy is alive too (one layer at a time)."""
    heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    held = -(-max(tokens, 1) // KV_STEP) * KV_STEP
    return 2 * (config["num_hidden_layers"] + 1) * heads * head_dim * held * itemsize


def prefill_bytes(config: dict, tokens: int, chunk: int) -> int:
    """f32 activations of one prefill pass over `tokens` positions: the hidden state, its
    norm and residual and q/k/v/attention out (8 x d_model per position), the attention
    scores (heads x tokens per position), a streamed chunk's gate/up products (2 x chunk) and
    the last position's logits. The prefill skips the other positions' logits (generate.py):
    a 2048-token chunk's would be 2048 x vocab x 4 bytes (1.2 GB for a 152k vocabulary)."""
    per_position = 8 * config["hidden_size"] + config["num_attention_heads"] * tokens + 2 * chunk
    return 4 * (tokens * per_position + config["vocab_size"])


def mlx_cache_limit(config: FlashConfig, backend: CacheBackend) -> int:
    """MLX's freed-buffer cache under a budget: the converted chunks' buffers and a decode
    step's temporaries, the MLX buffers the plan's scratch counts (the read buffers are not
    MLX's, so they must not be cached twice)."""
    return 2 * config.prefill_chunk * backend.chunk_bytes_per_neuron() + STEP_TEMPS


def resident_bytes(name: str, shape: tuple[int, ...], itemsize: int, bits: int,
                   group_size: int, stored: str = "float16") -> int:
    """DRAM of one resident tensor loaded with weights of `itemsize` bytes: packed uint32
    (`stored`, a quantized dir) as it is on disk, a `quantizable` one at `bits` < 16 as
    load-time quantization makes it, anything else (scales, biases, norms) at `itemsize`."""
    count = int(np.prod(shape))
    if stored == "uint32":
        return count * 4
    if bits < 16 and quantizable(name, shape, group_size):
        return count * bits // 8 + 2 * (count // group_size) * itemsize
    return count * itemsize


def resident_sizes(root: Path, manifest: Manifest, itemsize: int, bits: int,
                   group_size: int) -> dict[str, int]:
    """Tensor name -> DRAM bytes of resident.safetensors once loaded (`resident_bytes`). A
    dir converted with a quantized resident part is loaded as stored (`bits` does not apply);
    a quantized module's scales and biases count under its `.weight`, as when quantized at
    load (so the embedding table's entry is all of it)."""
    stored = resident_quantization(manifest)
    sizes = {k: resident_bytes(k, e.shape, itemsize, 16 if stored else bits, group_size,
                               e.dtype)
             for k, e in tensor_sizes(root / RESIDENT).items()}
    for base in stored:
        for part in ("scales", "biases"):
            sizes[f"{base}.weight"] += sizes.pop(f"{base}.{part}", 0)
    return sizes


def plan_memory(root: Path, manifest: Manifest, budget: int | None, config: FlashConfig,
                backend: CacheBackend, embed_on_flash: bool, runtime_bytes: int,
                resident_bits: int = 16, selector_bytes: int | None = None) -> MemoryPlan:
    """The plan for `config`'s options (KV tokens, resident group size, threads, reserve,
    streamed chunks) on `backend` (the weights' itemsize, the KV itemsize, converted chunks).
    selector_bytes: what the selector holds in DRAM (None: the dir's trained predictors, as
    f32, if any). Each store thread may hold an O_DIRECT buffer; `config.reserve` is what the
    caller holds besides the model (a drafter)."""
    dtype = backend.weight_dtype
    itemsize = dtype.size
    sizes = resident_sizes(root, manifest, itemsize, resident_bits, config.resident_group_size)
    embed = sizes.get("model.embed_tokens.weight", 0)
    resident = sum(sizes.values()) - embed
    n = manifest.layers[0].n_neurons
    per_neuron = sum(parts * width * (4 if dt == mx.uint32 else itemsize)
                     for layer in range(manifest.n_layers)
                     for parts, width, dt in cache_buffers(manifest.layer_layout(layer),
                                                           dtype).values())
    scratch = (stream_scratch(config, backend.chunk_bytes_per_neuron(),
                              max(e.stride for e in manifest.layers), config.threads)
               + prefill_bytes(manifest.config, min(config.max_kv_tokens, PREFILL_STEP),
                               config.prefill_chunk) + STEP_TEMPS + LOAD_HEAP + CODE_PAGES
               + gate_scratch(manifest, min(config.max_kv_tokens, PREFILL_STEP),
                              config.prefill_chunk)
               + (CHURN_SLACK if config.selector == "gate" else 0))
    predictors = selector_bytes or 0
    if selector_bytes is None and manifest.predictors:
        predictors = 4 * sum(int(np.prod(entry.shape)) for entry in
                             tensor_sizes(root / manifest.predictors["file"]).values())
    plan = MemoryPlan(budget, runtime_bytes, resident, 0 if embed_on_flash else embed, predictors,
                      kv_bytes(manifest.config, config.max_kv_tokens,
                               backend.kv_itemsize or itemsize),
                      scratch, 0, n, n, per_neuron, config.reserve)
    if budget is not None:
        plan.capacity = min(n, max(0, (budget - plan.minimum) // plan.per_neuron))
    plan.caches = plan.capacity * plan.per_neuron
    return plan


# Measured, not derived: with the gate selector a 1.5B under a 1066 MiB cap held 20-27 MiB more
# anonymous memory than every-neuron flash on the same dir (from the window's first scattered
# reads on, outside Python's allocations; BENCHMARKS.md, issue 21) and was OOM-killed.
CHURN_SLACK = 48 << 20


def gate_scratch(manifest: Manifest, tokens: int, chunk: int) -> int:
    """A gate-resident dir's act(gate x) for one call: a prompt's (T, chunk) per streamed
    chunk or a decode call's (16, n), f32, three copies at the peak (the product, the
    activation, the mask), plus a chunk's gathered gate rows; else 0."""
    if manifest.ffn.gate is None:
        return 0
    n, d = max(e.n_neurons for e in manifest.layers), manifest.ffn.d_model
    return 3 * 4 * max(tokens * min(chunk, n), 16 * n) + 2 * min(chunk, n) * d


def stream_scratch(config: FlashConfig, chunk_weight_bytes_per_neuron: int, stride: int,
                   threads: int) -> int:
    """Bytes the streamed chunks take while in use: the read-ahead's buffers (one per chunk in
    flight, plus the one being computed), two chunks of weights converted for compute (the
    MLX path; the fast path computes from the raw rows: pass 0 bytes per neuron), and one
    O_DIRECT buffer per thread."""
    chunk = config.prefill_chunk
    return ((config.read_ahead + 1) * chunk * stride
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
