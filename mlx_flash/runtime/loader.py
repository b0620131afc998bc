"""Loading a flash model dir: `load` (FFN on flash) and `load_dense` (the reference).

Both build the mlx_lm model class named by the config and load resident.safetensors into it.
`load` replaces every `layer.mlp` by a FlashFFN (and optionally the embedding table by a
FlashEmbedding); `load_dense` rebuilds the dense MLP weights from the bundles, so it is an
ordinary mlx_lm model for every comparison. Both return (model, tokenizer) like `mlx_lm.load`.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..accel import blocks as accel_blocks
from ..accel import build as accel_build
from ..accel import ffn as accel_ffn
from ..accel import linear as accel_linear
from ..format.arch import ARCHITECTURES, mlp_prefix
from ..format.manifest import RESIDENT, Manifest, read_manifest
from ..format.storage import tensor_sizes
from ..process import return_freed_memory_to_os
from . import disk as runtime_disk
from .cache import NeuronCache
from .embedding import flash_embedding
from .ffn import FlashFFN, FlashRuntime, FlashSettings
from .memory import CODE_PAGES, check_plan, parse_budget, plan_memory, quantizable
from .pinning import pin_hot as pin
from .rows import cache_buffers, split_bundles
from .selectors import _make_selector
from .selectors.quant_copy import selector_bytes
from .stats import current_rss_bytes
from .store import NeuronStore, supports_direct

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


def _model_classes(config: dict):
    from mlx_lm.utils import _get_classes

    return _get_classes(config)


def build_model(manifest: Manifest) -> nn.Module:
    """The mlx_lm model for the manifest's config, weights not loaded."""
    model_class, args_class = _model_classes(manifest.config)
    return model_class(args_class.from_dict(manifest.config))


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
        accelerate(model)
    return model, load_tokenizer(root, manifest)


def accelerate(model: nn.Module) -> int:
    """The fast CPU path's two steps, in order: every linear onto the C kernels, then the
    llama-family blocks onto numpy (no MLX graph per layer). Returns the linears swapped."""
    swapped = accel_linear.accelerate(model)
    accel_blocks.install(model)
    return swapped


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
                        planner=read_planner, cost=runtime_disk.cost_model_for(root) or runtime_disk.FALLBACK)
    compute_dtype = mx.float32 if fast else dtype  # the fast path keeps weights 16-bit
    chooser = _make_selector(selector, store, manifest, oracle_rule, keep, compute_dtype,
                             predictor_recall, fast)
    runtime = FlashRuntime(manifest, store, chooser, settings, compute_dtype)
    if fast:
        runtime.fast = accel_ffn.fast_ffn(manifest.ffn)
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
        runtime.stats.settings["fast_linears"] = accelerate(model)
    model.flash = runtime  # plain attribute (not a Module or array): stats and store
    if pin_hot:

        runtime.stats.settings["pinned"] = pin(model, int(pin_hot * plan.capacity))
    return model, tokenizer


def use_fast_cpu(fast_cpu: bool | None, manifest: Manifest, dtype) -> bool:
    """Whether load() takes the fast CPU path (see its `fast_cpu` argument)."""
    supported = accel_ffn.supports(manifest.ffn)
    if fast_cpu is None and (dtype is not None or not supported):
        return False
    if fast_cpu and not supported:
        raise ValueError(f"fast_cpu needs 16-bit (or 4/8-bit with 16-bit scales) bundles; this "
                         f"dir stores {manifest.ffn.dtype} (convert with --dtype float16)")
    return accel_build.wanted(fast_cpu)


def weight_dtype(fast: bool, dtype: str | mx.Dtype | None, manifest: Manifest) -> mx.Dtype:
    """The dtype resident weights load in: the bundles' 16-bit storage type on the fast CPU
    path (its kernels compute in f32), else the compute dtype."""
    return getattr(mx, manifest.ffn.dtype) if fast else resolve_dtype(dtype, manifest)


def _install_flash_layers(model, manifest, runtime, capacity, weights, dtype) -> None:
    spec = ARCHITECTURES[manifest.config["model_type"]]
    layout = manifest.ffn
    buffers, zeros = cache_buffers(layout, dtype), None
    for i, layer in enumerate(model.layers):
        if runtime.fast is not None:  # numpy buffers (cpu.py)
            buffers = runtime.fast.cache_spec(manifest.layers[i].stride)
            zeros = accel_ffn.numpy_zeros
        cache = NeuronCache(manifest.layers[i].n_neurons, capacity, 0, layout.d_model, dtype,
                            runtime.settings.window, buffers=buffers, zeros=zeros)
        out_bias = weights.pop(f"{mlp_prefix(i)}.{spec.down}.bias", None)
        if out_bias is not None and runtime.fast is not None:
            out_bias = out_bias.astype(mx.float32)
        if zeros is None:
            mx.eval(*cache.buffers.values())  # allocate now: the budget counts them from load
        layer.mlp = FlashFFN(i, runtime, cache, out_bias)
