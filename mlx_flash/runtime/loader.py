"""Loading a flash model dir: `load` (FFN on flash) and `load_dense` (the reference).

Both build the mlx_lm model class named by the config and load resident.safetensors into it.
`load` replaces every `layer.mlp` by a FlashFFN (and optionally the embedding table by a
FlashEmbedding); `load_dense` rebuilds the dense MLP weights from the bundles, so it is an
ordinary mlx_lm model for every comparison. Both return (model, tokenizer) like `mlx_lm.load`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..accel.blocks import defer_prompt_logits
from ..compute.reference import dequantize_down, unpack_values
from ..format.arch import ARCHITECTURES, mlp_prefix
from ..format.bundles import pack_bits
from ..format.errors import FormatError
from ..format.manifest import (
    MANIFEST,
    QUANT_GROUPS,
    RESIDENT,
    Manifest,
    check_resident,
    down_table_names,
    read_layer_rows,
    read_manifest,
    resident_bits,
    resident_quantization,
)
from ..format.storage import tensor_sizes
from ..process import apply_budget_settings, drop_page_cache, trim_heap
from . import disk as runtime_disk
from .backend import CacheBackend, MlxBackend, choose_backend
from .config import DTYPES, FlashConfig, settings_dict
from .embedding import embedding_tensors, flash_embedding
from .ffn import FlashFFN, FlashRuntime, serialize_calls
from .gate import ResidentGate, pop_gate
from .memory import (
    MemoryPlan,
    check_plan,
    mlx_cache_limit,
    parse_budget,
    plan_memory,
    quantizable,
)
from .pinning import pin_hot as pin
from .rows import DownTable, cache_pieces, split_bundles
from .selectors import make_selector
from .selectors.quant_copy import selector_bytes
from .stats import current_rss_bytes
from .store import NeuronStore, supports_direct
from .tokenizer import FlashTokenizer
from .tokenizer import load_tokenizer as load_flash_tokenizer

# model types mlx_lm runs with another type's module (mlx_lm.utils.MODEL_REMAPPING's, for the
# architectures format/arch.py knows); mlx_lm.utils itself imports transformers
MODEL_REMAPPING = {"mistral": "llama"}


def model_classes(config: dict) -> tuple[type, type]:
    """(Model, ModelArgs) of the mlx_lm module for the config's model_type."""
    model_type = MODEL_REMAPPING.get(config["model_type"], config["model_type"])
    try:
        arch = importlib.import_module(f"mlx_lm.models.{model_type}")
    except ImportError as e:
        raise ValueError(f"model type {model_type} is not supported by this mlx_lm") from e
    return arch.Model, arch.ModelArgs


def build_model(manifest: Manifest) -> nn.Module:
    """The mlx_lm model for the manifest's config, weights not loaded."""
    model_class, args_class = model_classes(manifest.config)
    return model_class(args_class.from_dict(manifest.config))


def quantize_rows_chunked(path: Path, name: str, dtype: mx.Dtype, bits: int, group_size: int,
                          rows_per_chunk: int = 8192) -> tuple[mx.array, mx.array, mx.array]:
    """mx.quantize of one safetensors tensor, reading and quantizing it a block of rows at a
    time into preallocated outputs: the unquantized tensor (272 MB for the default model's
    lm_head in f16) is never in memory whole. Scales and biases come back in `dtype`."""
    entry = tensor_sizes(path)[name]
    table, shape, stored_as = entry.memmap(path), entry.shape, entry.dtype
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
                  bits: int = 16, group_size: int = 64,
                  stored: dict[str, dict] | None = None) -> dict[str, mx.array]:
    """resident.safetensors as a dict in `dtype`, sanitized by the model, without `skip` keys.

    stored: module path -> {"bits", "group_size"} of the matrices the file holds quantized
    (`resident_quantization`): their packed uint32 weights are kept as they are, their scales
    and biases cast to `dtype`, and the modules become nn.QuantizedLinear/QuantizedEmbedding;
    no 16-bit copy is ever made. Otherwise (a 16-bit file) bits 8 or 4 quantizes every
    `quantizable` tensor the mlx_lm way (weight, scales, biases) at load. Tensors are converted
    one at a time so the storage and compute copies of the whole resident part are never in
    memory together.
    """
    weights = mx.load(str(root / RESIDENT))
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    stored = stored or {}
    quantize_now = bits < 16 and not stored
    out = {}
    for name in list(weights):
        tensor = weights.pop(name)
        if name in skip:
            continue
        if quantize_now and quantizable(name, tensor.shape, group_size):
            base = name[: -len(".weight")]
            q = quantize_rows_chunked(root / RESIDENT, name, dtype, bits, group_size)
            out.update(zip([name, f"{base}.scales", f"{base}.biases"], q, strict=True))
        else:
            if tensor.dtype != mx.uint32:  # packed weights stay packed
                tensor = tensor.astype(dtype)
            out[name] = tensor
            mx.eval(tensor)  # materialize now, freeing the storage-dtype copy
    params = stored or {path[: -len(".scales")]: {"bits": bits, "group_size": group_size}
                        for path in out if path.endswith(".scales")}
    if params:
        nn.quantize(model, class_predicate=lambda path, module: params.get(path, False))
    return out


def load_tokenizer(root: Path, manifest: Manifest) -> FlashTokenizer:
    """The dir's tokenizer (runtime/tokenizer.py: no transformers); the model config's
    eos_token_id(s) end a generation too."""
    eos = manifest.config.get("eos_token_id")
    return load_flash_tokenizer(root, [eos] if isinstance(eos, int) else eos)


def read_layer_dense(root: Path, manifest: Manifest, layer: int, dtype: mx.Dtype
                     ) -> dict[str, mx.array]:
    """One layer's dense MLP weights in mlx_lm naming, rebuilt from its bundle file (format 3:
    `read_layer_packed`)."""
    weights, bias = split_bundles(read_layer_rows(root, manifest, layer), manifest, dtype, layer)
    modules = mlp_modules(manifest, layer)
    out = {f"{m}.weight": weights[i] for i, m in enumerate(modules[:-1])}
    out[f"{modules[-1]}.weight"] = weights[-1].T
    if bias is not None:
        out.update({f"{m}.bias": bias[i] for i, m in enumerate(modules[:-1])})
    return out


def mlp_modules(manifest: Manifest, layer: int) -> list[str]:
    """mlx_lm paths of layer `layer`'s FFN linears, in the layout's part order (down last)."""
    spec, prefix = ARCHITECTURES[manifest.config["model_type"]], mlp_prefix(layer)
    names = [spec.gate, spec.up, spec.down] if manifest.ffn.kind == "gated" \
        else [spec.up, spec.down]  # a plain FFN, or a gate-resident dir's bundles
    return [f"{prefix}.{name}" for name in names]


def dense_gate(weights: dict[str, mx.array], manifest: Manifest, layer: int
               ) -> tuple[dict[str, mx.array], dict[str, dict]]:
    """A gate-resident layer's gate_proj for the dense model, from its resident tensors
    (`pop_gate`): mlx_lm-named weights, and {module: {"bits", "group_size"}} when packed."""
    tensors = pop_gate(weights, manifest, layer)
    if tensors is None:
        return {}, {}
    spec = ARCHITECTURES[manifest.config["model_type"]]
    module, gate = f"{mlp_prefix(layer)}.{spec.gate}", manifest.ffn.gate_resident
    params = {module: {"bits": gate.bits, "group_size": gate.group_size}} if gate.packed else {}
    return {f"{module}.{kind}": a for kind, a in tensors.items()}, params


def read_layer_packed(root: Path, manifest: Manifest, layer: int, dtype: mx.Dtype,
                      down: DownTable | None) -> tuple[dict[str, mx.array], dict[str, dict]]:
    """A format-3 layer's MLP as the quantized mlx_lm checkpoint it was carried from: each
    packed part's `.weight` (uint32), `.scales`, `.biases` rebuilt exactly (down's columns
    packed back along the neurons, its table transposed), 16-bit parts - and a down in groups
    MLX cannot pack (a GGUF's Q6_K) - as dense weights; and the module path -> {"bits",
    "group_size"} of the packed ones (for nn.quantize)."""
    layout = manifest.layer_layout(layer)
    pieces = cache_pieces(read_layer_rows(root, manifest, layer), layout, dtype)
    out, params = {}, {}
    modules = mlp_modules(manifest, layer)
    for name, module in zip(layout.matrix_names, modules, strict=True):
        quant = layout.part_quant(name)
        if not quant.packed:
            w = pieces[f"{name}.w"][0]
            out[f"{module}.weight"] = w.T if name == "down" else w
            continue
        if quant.axis == "neurons" and quant.group_size not in QUANT_GROUPS:  # Q6_K's 16
            ids = np.arange(manifest.layers[layer].n_neurons)
            out[f"{module}.weight"] = dequantize_down(pieces[f"{name}.q"][0], quant.bits,
                                                      down.group_of(ids), down.scales,
                                                      down.biases).T  # MLX packs no 16s
            continue
        params[module] = {"bits": quant.bits, "group_size": quant.group_size}
        if quant.axis == "neurons":
            values = np.array(unpack_values(pieces[f"{name}.q"][0], quant.bits), np.uint8)
            out[f"{module}.weight"] = mx.array(pack_bits(values.T, quant.bits))
            out[f"{module}.scales"], out[f"{module}.biases"] = down.scales.T, down.biases.T
        else:
            for kind in ("q", "scales", "biases"):
                out[f"{module}.{'weight' if kind == 'q' else kind}"] = pieces[f"{name}.{kind}"][0]
    for i, module in enumerate(modules[:-1]):
        if "bias" in pieces:
            out[f"{module}.bias"] = pieces["bias"][i, :, 0]
    return out, params


def pop_down_table(weights: dict[str, mx.array], manifest: Manifest, layer: int
                   ) -> DownTable | None:
    """Take layer `layer`'s down table (format 3) out of the resident weights, if it has one."""
    group = manifest.layer_layout(layer).down_table_group
    if not group:
        return None
    names = down_table_names(layer)
    if any(name not in weights for name in names):
        raise FormatError(f"{MANIFEST}: layer {layer} stores down along the neurons but "
                          f"{RESIDENT} has no {names[0]}; the dir is damaged - re-convert it")
    scales, biases = (weights.pop(name) for name in names)
    return DownTable(scales, biases, group)


def pop_out_bias(weights: dict[str, mx.array], manifest: Manifest, layer: int
                 ) -> mx.array | None:
    """Take layer `layer`'s down-projection bias (d,) out of the resident weights, if any:
    the module that replaces `layer.mlp` adds it."""
    spec = ARCHITECTURES[manifest.config["model_type"]]
    return weights.pop(f"{mlp_prefix(layer)}.{spec.down}.bias", None)


Install = Callable[[nn.Module, dict[str, mx.array]], None]


def assemble(root: Path, manifest: Manifest, backend: CacheBackend, install: Install,
             skip: tuple[str, ...] = (), bits: int = 16, group_size: int = 64
             ) -> tuple[nn.Module, int]:
    """The skeleton every loader shares (load, load_dense, bench's load_mmap).

    Builds the mlx_lm model, loads resident.safetensors without `skip` in the backend's weight
    dtype (`bits` < 16: quantized at load; a dir converted with a quantized resident part
    loads its packed matrices as they are whatever `bits` says, see load_resident), lets
    `install(model, weights)` put the loader's FFN in (it takes its weights out of the dict or
    adds them), loads the weights and puts the rest of the model on the backend. Returns (model, linears the backend swapped).
    """
    model = build_model(manifest)
    check_resident(root, manifest)  # its block checksums (a dir without them: one warning)
    weights = load_resident(root, model, backend.weight_dtype, skip, bits, group_size,
                            resident_quantization(manifest))
    install(model, weights)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:  # a config that does not describe these weights
        raise FormatError(f"{root / MANIFEST}: the weights in {root / manifest.resident['file']} "
                          f"do not fit the model its config describes ({e}); the manifest was "
                          "edited or damaged: re-convert the model") from e
    mx.eval(model.parameters())  # load now, as mlx_lm.load does by default
    model.eval()
    del weights  # the model holds them now; the fast path's fused copies replace some of them
    swapped = backend.accelerate(model)
    mx.clear_cache()  # the replaced arrays' buffers go back to the heap, not MLX's buffer cache
    trim_heap()  # and the heap gives them back (small ones sit below glibc's mmap threshold)
    return model, swapped


def load_dense(path: str | Path, dtype: str | mx.Dtype | None = None,
               fast_cpu: bool | None = False):
    """The ordinary mlx_lm model rebuilt from a flash dir (resident + every bundle).

    Returns (model, tokenizer). Needs the whole model in memory: it is the reference.
    fast_cpu: keep the 16-bit weights as stored and compute every linear with accel/'s kernels
    (`load`'s fast path, for a dense comparison on CPU); None: as `load` decides.
    """
    root = Path(path)
    manifest = read_manifest(root)
    backend = choose_backend(fast_cpu, manifest, dtype)

    def dense_ffn(model: nn.Module, weights: dict[str, mx.array]) -> None:
        packed = {}
        for layer in range(manifest.n_layers):
            gate_weights, gate_params = dense_gate(weights, manifest, layer)
            weights.update(gate_weights)
            packed.update(gate_params)
            down = pop_down_table(weights, manifest, layer)
            if manifest.layer_layout(layer).per_part:  # as the mlx_lm checkpoint was
                layer_weights, params = read_layer_packed(root, manifest, layer,
                                                          backend.weight_dtype, down)
                packed.update(params)
            else:
                layer_weights = read_layer_dense(root, manifest, layer, backend.weight_dtype)
            weights.update(layer_weights)
        if packed:
            nn.quantize(model, class_predicate=lambda path, module: packed.get(path, False))

    model, _ = assemble(root, manifest, backend, dense_ffn)
    drop_page_cache(root / RESIDENT)
    return model, load_tokenizer(root, manifest)


def load(path: str | Path, dram_budget: str | float | int | None = None, *,
         config: FlashConfig | None = None, tokenizer: FlashTokenizer | None = None,
         **options):
    """Load a flash model dir for generation with `mlx_lm.generate` / `stream_generate`.

    dram_budget: bytes, a size string ("2GB"), a fraction of the model's size, or None
    (no limit: every neuron may be cached). It covers the process's baseline, resident weights,
    KV cache (reserved for max_kv_tokens) and the neuron caches. options: the fields of
    `FlashConfig` (window, selector, oracle_rule, keep, dtype, fast_cpu, ...; documented
    there), or `config=FlashConfig(...)`, whose fields any options given too replace. An
    unknown option raises TypeError, a bad value ValueError.

    Process-wide settings (process.py): under a budget `load` limits MLX's buffer cache (undone
    by `model.flash.close()`) and fixes glibc's mmap threshold; the fast CPU path's kernels
    set OMP_WAIT_POLICY=PASSIVE and put numpy's BLAS on one thread.

    Thread safety: one loaded model may be called from several threads. Each call of the
    model (or of model.model) holds `model.flash.lock` for its whole forward pass, so the
    threads take turns token by token and each generation gets the tokens it would get alone
    (with compute_on="active", the default; "cached" computes over whatever the window holds).
    Calling single layers directly bypasses the lock. A failed read (StoreReadError
    naming the file and the offset) leaves the model as correct as before: the layer's cached
    neurons are forgotten and read again when next needed.

    tokenizer: this dir's tokenizer when the caller already loaded it (`load_tokenizer`), so
    that it is not held twice.

    Returns (model, tokenizer); the FlashRuntime with its stats is `model.flash`.
    """
    config = FlashConfig.from_options(config, **options)
    root = Path(path)
    manifest = read_manifest(root)
    budget = parse_budget(dram_budget, manifest.ffn_bytes + manifest.resident["size"])
    direct = config.direct
    if direct is None:
        direct = budget is not None and supports_direct(root / manifest.layers[0].file)
    if tokenizer is None:
        check_before_tokenizer(root, manifest, budget, config)
        tokenizer = load_tokenizer(root, manifest)
    fit = fit_budget(root, manifest, budget, config, current_rss_bytes())
    restore = None
    if budget is not None:  # MLX's freed-buffer cache: only what the plan's scratch counts
        restore = apply_budget_settings(mlx_cache_limit(config, fit.backend))
    runtime = build_runtime(root, manifest, config, fit, direct, restore)
    try:
        model, swapped = assemble(
            root, manifest, fit.backend, lambda m, w: _install_flash(m, w, root, runtime, fit),
            embedding_tensors(manifest) if fit.embed_on_flash else (), fit.resident_bits,
            config.resident_group_size)
    except BaseException:
        runtime.close()
        raise
    drop_page_cache(root / RESIDENT)  # copied into MLX arrays: its page cache would count
    runtime.stats.settings = settings_dict(
        config, dtype=str(fit.backend.weight_dtype), direct=direct,
        embed_on_flash=fit.embed_on_flash, resident_bits=fit.resident_bits,
        capacity=fit.plan.capacity, backend=fit.backend.name,
        fast_cpu=fit.backend.name == "cpu", fast_linears=swapped, pinned=0)
    model.flash = runtime  # plain attribute (not a Module or array): stats and store
    serialize_calls(model, runtime.lock)
    if budget is not None or swapped:  # the plan counts one position's logits, a PIECE of
        defer_prompt_logits(model)    # a prompt's; the fast head would compute mlx_lm's drops
    if config.pin_hot:
        try:
            runtime.stats.settings["pinned"] = pin(model, int(config.pin_hot * fit.plan.capacity))
        except BaseException:
            runtime.close()
            raise
    return model, tokenizer


@dataclass
class Fit:
    """What `load` resolved to fit the budget: the plan and the choices it was made for."""

    plan: MemoryPlan
    backend: CacheBackend  # its weight dtype is the one chosen
    embed_on_flash: bool
    resident_bits: int


def fit_budget(root: Path, manifest: Manifest, budget: int | None, config: FlashConfig,
               runtime_bytes: int) -> Fit:
    """The DRAM plan for `config` under `budget`; raises ValueError when it cannot fit.

    Without explicit choices, fit the budget: full caches first, then the embedding table on
    flash (untied models), then bf16 compute instead of f32 on CPU, then 8-bit resident. The
    fast CPU path keeps weights in their 16-bit storage type and computes in f32.
    """
    first = choose_backend(config.fast_cpu, manifest, config.dtype)
    backends = [first]
    if config.dtype is None and first.weight_dtype == mx.float32:
        backends.append(MlxBackend(manifest, mx.bfloat16))
    flash_choices = _embedding_choices(root, manifest, config.embed_on_flash)
    rbits_choices = resident_bits_choices(root, manifest, config.resident_bits)
    # the selector's DRAM: the dir's predictors (counted by plan_memory) or the quantized copy
    held = selector_bytes(manifest) if config.selector == "quant" else None
    needed = min_capacity(manifest, config)
    for rbits, backend in product(rbits_choices, backends):
        for on_flash in flash_choices:
            plan = plan_memory(root, manifest, budget, config, backend, on_flash, runtime_bytes,
                               rbits, held)
            if budget is None or plan.capacity >= plan.n_neurons:
                break
        if budget is None or plan.capacity >= needed:
            break
    check_plan(plan, needed, on_flash, backend.weight_dtype, rbits)
    return Fit(plan, backend, on_flash, rbits)


def resident_bits_choices(root: Path, manifest: Manifest, asked: int | None) -> list[int]:
    """The resident_bits the fit may try: [16, 8] (or the one asked) for a 16-bit resident
    part; for one converted quantized, only the bits it was converted with. Asking a quantized
    dir for other bits (16 included) raises ValueError: its 16-bit values are gone, and
    dequantizing would cost the DRAM the conversion saved without any accuracy back."""
    stored, group = resident_bits(manifest)
    if stored == 16:
        return [asked] if asked is not None else [16, 8]
    if asked is not None and asked != stored:
        raise ValueError(f"{root}: resident_bits={asked}, but this dir's resident part was "
                         f"converted to {stored} bits (groups of {group}); load it without "
                         "resident_bits (--resident-bits), or re-convert the model with "
                         f"`mlx-flash convert --resident-bits {asked}`")
    return [stored]


TOKENIZER_RSS = 4  # RSS a loaded tokenizer keeps per byte of tokenizer.json (Qwen2.5: 47 MiB, 11 MB)


def check_before_tokenizer(root: Path, manifest: Manifest, budget: int | None,
                           config: FlashConfig, estimate: int | None = None) -> None:
    """Refuse a budget the plan cannot fit before the tokenizer is loaded (ValueError with the
    breakdown): parsing tokenizer.json peaks ~120 MiB above the process (Qwen2.5), which a
    cap far below the plan would kill. `estimate`: the tokenizer's RSS once loaded (default
    from the file's size, on the low side); the plan made after it is loaded is the one that
    counts."""
    if budget is None:
        return
    path = root / "tokenizer.json"
    if estimate is None:
        estimate = TOKENIZER_RSS * path.stat().st_size if path.exists() else 0
    try:
        fit_budget(root, manifest, budget, config, current_rss_bytes() + estimate)
    except ValueError as e:
        raise ValueError(f"{e} (checked before loading the tokenizer, its RSS estimated at "
                         f"{estimate / 2**20:.0f} MiB: the exact minimum may be a few MiB more)"
                         ) from None


def check_budget_early(path: str | Path, dram_budget: str | float | int | None = None, *,
                       tokenizer_rss: int | None = None, config: FlashConfig | None = None,
                       **options) -> None:
    """`check_before_tokenizer` for a caller that loads the tokenizer itself before `load`
    (`mlx-flash generate` sizes the KV cache from the prompt, then keeps only a decoding
    table: tokenizer_rss)."""
    config = FlashConfig.from_options(config, **options)
    root = Path(path)
    manifest = read_manifest(root)
    check_before_tokenizer(root, manifest,
                           parse_budget(dram_budget, manifest.ffn_bytes + manifest.resident["size"]),
                           config, tokenizer_rss)


def min_capacity(manifest: Manifest, config: FlashConfig) -> int:
    """Neurons per layer the caches must hold at least (config.min_capacity, default 5%)."""
    if config.min_capacity is not None:
        return config.min_capacity
    return max(1, int(0.05 * manifest.layers[0].n_neurons))


def min_budget(path: str | Path, *, config: FlashConfig | None = None, **options) -> int:
    """The smallest dram_budget `load(path, ..., **options)` accepts in this process now:
    the plan's minimum (its `runtime` is this process's RSS with the tokenizer loaded, as
    load measures it) plus the caches' least capacity. With options that leave the fit no
    choice (dtype, resident_bits, embed_on_flash) it is the budget's exact threshold."""
    config = FlashConfig.from_options(config, **options)
    root = Path(path)
    manifest = read_manifest(root)
    tokenizer = load_tokenizer(root, manifest)  # noqa: F841  (held while RSS is measured)
    plan = fit_budget(root, manifest, None, config, current_rss_bytes()).plan
    return plan.minimum + min_capacity(manifest, config) * plan.per_neuron


def _embedding_choices(root: Path, manifest: Manifest, embed_on_flash: bool | None
                       ) -> list[bool]:
    """The embed_on_flash values the fit may try, in order (a tied table stays resident)."""
    tied = manifest.config.get("tie_word_embeddings", True) and "lm_head.weight" not in \
        tensor_sizes(root / RESIDENT)
    if embed_on_flash and tied:
        raise ValueError(f"{root}: embed_on_flash needs an untied lm_head; this model ties it "
                         "to the embedding table")
    return [bool(embed_on_flash)] if embed_on_flash is not None or tied else [False, True]


def build_runtime(root: Path, manifest: Manifest, config: FlashConfig, fit: Fit, direct: bool,
                  restore: Callable[[], None] | None) -> FlashRuntime:
    """The store, the selector and the FlashRuntime that every FlashFFN layer shares."""
    try:
        store = NeuronStore(root, manifest, threads=config.threads, direct=direct,
                            mode=config.store_mode, planner=config.read_planner,
                            cost=runtime_disk.cost_model_for(root) or runtime_disk.FALLBACK)
    except BaseException:  # e.g. a damaged cost model or block table: undo the settings
        if restore is not None:
            restore()
        raise
    try:
        gate = ResidentGate(manifest, fit.backend) if manifest.ffn.gate is not None else None
        selector = make_selector(config, store, manifest, fit.backend, gate)
        runtime = FlashRuntime(manifest, store, selector, config, fit.backend, restore, gate)
    except BaseException:
        store.close()
        if restore is not None:
            restore()
        raise
    runtime.stats.memory = asdict(fit.plan)
    return runtime


def _install_flash(model: nn.Module, weights: dict[str, mx.array], root: Path,
                   runtime: FlashRuntime, fit: Fit) -> None:
    """load()'s FFN part: every `layer.mlp` a FlashFFN over a cache of the plan's capacity
    (the down bias taken from `weights`), and the embedding table on flash if chosen."""
    backend, manifest = runtime.backend, runtime.manifest
    for i, layer in enumerate(model.layers):
        cache = backend.new_cache(i, fit.plan.capacity, runtime.config.window)
        cache.down = pop_down_table(weights, manifest, i)
        gate = pop_gate(weights, manifest, i)
        if gate is not None:
            runtime.gate.add(i, gate)
        out_bias = backend.out_bias(pop_out_bias(weights, manifest, i))
        layer.mlp = FlashFFN(i, runtime, cache, out_bias)
    if fit.embed_on_flash:
        model.model.embed_tokens = flash_embedding(root, manifest, backend.compute_dtype)
