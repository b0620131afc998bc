"""Source checkpoint -> flash model dir (format v1, see `format/manifest.py`).

Streams tensor by tensor: the resident part is written by a streaming safetensors writer (the
header is known up front from the source's shapes), and each layer's FFN is bundled from its
three tensors only, so peak memory is about one layer's FFN, not the model.

Everything is written into a hidden temp dir beside OUT, fsynced, and renamed into place at the
end: an interrupted or failed convert never leaves a dir that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..format.bundles import Carried, pack_bits, pack_bundles
from ..format.checksums import bundle_block_size, file_checks
from ..format.errors import FormatError
from ..format.manifest import (
    FFN_DIR,
    FORMAT_VERSION,
    GATE_BITS,
    GATE_RESIDENT_VERSION,
    MANIFEST,
    PART_QUANT_VERSION,
    QUANT_GROUPS,
    RESIDENT,
    FFNLayout,
    GateResident,
    LayerEntry,
    Manifest,
    PartQuant,
    down_table_names,
    file_entry,
    gate_names,
    layer_file_name,
    read_manifest,
    round_up,
)
from ..format.storage import (
    DTYPE_BYTES,
    NP_STORAGE,
    ST_CODES,
    atomic_write,
    cast,
    fsync_dir,
    fsync_file,
    sha256_file,
    to_f32,
    write_text_atomic,
)
from ..runtime.memory import quantizable
from .source_check import check_config
from .sources import open_checkpoint
from .sources.base import Checkpoint, TensorInfo, layout_for

Progress = Callable[[str, int], None]  # (stage description, bytes done) -> None


@dataclass
class ConvertStats:
    out: Path
    resident_bytes: int
    ffn_bytes: int
    n_layers: int
    n_neurons: int
    bundle_bytes: int
    stride: int


def write_safetensors(path: Path, infos: list[TensorInfo], arrays: Iterable[np.ndarray],
                      metadata: dict | None = None) -> None:
    """Write a safetensors file one tensor at a time.

    infos gives names, shapes and dtypes up front (for the header); arrays yields the tensors in
    the same order. Only one tensor is held at a time.
    """
    header, offset = {}, 0
    for info in infos:
        nbytes = int(np.prod(info.shape, dtype=np.int64)) * NP_STORAGE[info.dtype].itemsize
        header[info.name] = {"dtype": ST_CODES[info.dtype], "shape": list(info.shape),
                             "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for info, arr in zip(infos, arrays, strict=True):
            if tuple(arr.shape) != tuple(info.shape):
                raise ValueError(f"{path}: tensor {info.name} has shape {arr.shape}, "
                                 f"expected {info.shape}")
            f.write(np.ascontiguousarray(arr).tobytes())


def bundle_rows(parts: dict[str, np.ndarray], layout: FFNLayout, start: int, stop: int,
                stride_elems: int) -> np.ndarray:
    """Bundles of neurons [start, stop) as one (stop - start, stride_elems) array.

    parts: role -> tensor in the storage dtype; "gate"/"up" are (n, d), "down" is (d, n),
    "*_bias" are (n,). Elements past the bundle up to the stride stay zero.
    """
    out = np.zeros((stop - start, stride_elems), dtype=parts["down"].dtype)
    for part in layout.parts:
        src = parts[part.name]
        if part.name == "down":
            block = src[:, start:stop].T
        elif part.name.endswith("_bias"):
            block = src[start:stop, None]
        else:
            block = src[start:stop]
        out[:, part.offset:part.offset + part.count] = block
    return out


def write_layer(path: Path, parts: dict[str, np.ndarray], layout: FFNLayout, stride: int,
                chunk: int = 1024) -> int:
    """Write one layer's bundle file; returns its size in bytes."""
    down = parts["down"]
    n = (down.q if isinstance(down, Carried) else down).shape[1]
    itemsize = DTYPE_BYTES[layout.dtype]
    if stride % itemsize:
        raise ValueError(f"stride {stride} is not a multiple of the dtype size {itemsize}")
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            if layout.quantized:
                rows = pack_bundles(parts, layout, start, stop, stride)
            else:
                rows = bundle_rows(parts, layout, start, stop, stride // itemsize)
            f.write(rows.tobytes())
    return n * stride


def read_layer_parts(ckpt: Checkpoint, layer: int, dtype: str, d_model: int,
                     layout: FFNLayout | None = None) -> dict[str, np.ndarray | Carried]:
    """One layer's per-neuron FFN tensors, cast to the storage dtype and shape-checked; with
    a format-3 `layout` (a checkpoint whose FFN is carried), each part it stores packed comes
    as the checkpoint's own `Carried` blocks."""
    infos, parts = ckpt.tensors(), {}
    for role, name in ckpt.ffn_names(layer).items():
        if layout is not None and layout.gate is not None and role == "gate":
            continue  # a gate-resident layout's gate goes to resident.safetensors
        if name not in infos:
            raise ValueError(f"{ckpt.path}: tensor {name} is missing from the source")
        quant = layout.part_quant(role) if layout is not None and layout.per_part \
            and role in layout.matrix_names else None
        if quant is not None and quant.packed:
            parts[role] = Carried(*ckpt.read_quantized(name, quant.bits, quant.group_size))
        else:
            parts[role] = cast(ckpt.read(name), infos[name].dtype, dtype)
    down = parts["down"].q if isinstance(parts["down"], Carried) else parts["down"]
    n = down.shape[1] if down.ndim == 2 else -1
    for role, arr in parts.items():
        shape = (arr.q if isinstance(arr, Carried) else arr).shape
        expected = ((d_model, n) if role == "down" else (n,) if role.endswith("_bias")
                    else (n, d_model))
        if shape != expected:
            raise ValueError(f"{ckpt.path}: layer {layer} {role} has shape {shape}, expected "
                             f"{expected} from hidden_size={d_model}")
    return parts


def carried_layout(ckpt: Checkpoint, dtype: str, widen: bool = False
                   ) -> tuple[FFNLayout, list[dict | None]]:
    """The format-3 layout of a checkpoint whose FFN is carried as stored (`carries_ffn`):
    each part at the checkpoint's own bits and group size - gate and up along d_model, down
    along the neurons, as mlx_lm quantizes a linear along its input - or 16-bit where it left
    a module unquantized; and each layer's overrides where it differs from layer 0 (mixed
    recipes). widen: bits other than 4 and 8 stored as 8 (the same integers, exact: the fast
    CPU path computes those two). Raises ValueError naming the tensor a layout cannot hold."""
    base = layout_for(ckpt, dtype)
    per_layer = []
    for layer in range(int(ckpt.config["num_hidden_layers"])):
        quant = {}
        for role in base.matrix_names:
            name = ckpt.ffn_names(layer)[role]
            params = ckpt.ffn_quantization(name)
            bits = None if params is None else params["bits"]
            if widen and bits not in (None, 4, 8):
                bits = 8
            quant[role] = asdict(PartQuant(16) if params is None else PartQuant(
                bits, params["group_size"], "neurons" if role == "down" else "d_model"))
        try:
            replace(base, quant=quant)
        except FormatError as e:
            names = ", ".join(ckpt.ffn_names(layer).values())
            raise ValueError(f"{ckpt.path}: layer {layer}'s FFN ({names}) cannot be carried "
                             f"exactly ({e}); convert it without carrying (from the 16-bit "
                             "model, or without --carry-ffn)") from e
        per_layer.append(quant)
    if not any(q["bits"] < 16 for quant in per_layer for q in quant.values()):
        return base, [None] * len(per_layer)  # nothing packed in the FFN: a 16-bit layout
    overrides = [{m: q for m, q in quant.items() if q != per_layer[0][m]} or None
                 for quant in per_layer]
    return replace(base, quant=per_layer[0]), overrides


def gate_resident_layout(ckpt: Checkpoint, layout: FFNLayout, overrides: list[dict | None],
                         bits: int | None) -> tuple[FFNLayout, list[dict | None]]:
    """The gate-resident (format 4) form of a gated `layout` and its per-layer overrides: the
    bundles [up | down] as a plain identity FFN, the gate at `bits` (None: as the FFN's own
    precision - a carried gate's bits and groups, else the bundles' bits, 16 for 16-bit ones).
    Raises ValueError naming what cannot be held so."""
    where = f"{ckpt.path}: --gate-resident"
    if layout.kind != "gated" or layout.has_bias:
        raise ValueError(f"{where} needs a gated FFN without input biases (this model's is "
                         f"{layout.kind}{' with biases' if layout.has_bias else ''}); convert "
                         "it without --gate-resident")
    gate_quant = layout.part_quant("gate")
    if any(o and "gate" in o for o in overrides):
        raise ValueError(f"{where}: the source quantizes gate_proj differently per layer; one "
                         "resident gate precision holds every layer - convert without it")
    if gate_quant.packed and layout.per_part:  # carried: the gate's own blocks
        if bits is not None and bits != gate_quant.bits:
            raise ValueError(f"{where}: the gate is carried at its own {gate_quant.bits} bits; "
                             f"--gate-bits {bits} would re-quantize it - drop --gate-bits")
        if gate_quant.bits not in GATE_BITS:
            raise ValueError(f"{where}: the gate is stored at {gate_quant.bits} bits; a "
                             f"resident gate is {GATE_BITS} bits - convert without it")
        gate = GateResident(layout.model_activation, gate_quant.bits, gate_quant.group_size)
    else:
        bits = bits or (layout.bits if layout.quantized and not layout.per_part else 16)
        if bits not in GATE_BITS:
            raise ValueError(f"{where}: --gate-bits must be one of {GATE_BITS}, got {bits}")
        gate = GateResident(layout.model_activation, bits,
                            (layout.group_size or 64) if bits < 16 else 0)
    quant = None if layout.quant is None else {m: q for m, q in layout.quant.items()
                                               if m != "gate"}
    bundles = replace(layout, kind="plain", activation="identity", parts=[], quant=quant,
                      gate=asdict(gate))
    return bundles, [o and {m: q for m, q in o.items() if m != "gate"} or None
                     for o in overrides]


def gate_infos(ckpt: Checkpoint, gate: GateResident, dtype: str) -> list[TensorInfo]:
    """resident.safetensors' entries for each layer's gate (`gate_names`)."""
    out = []
    for layer in range(int(ckpt.config["num_hidden_layers"])):
        n, d = ckpt.tensors()[ckpt.ffn_names(layer)["gate"]].shape
        weight, scales, biases = gate_names(layer)
        if not gate.packed:
            out.append(TensorInfo(weight, (n, d), dtype))
            continue
        groups = (n, d // gate.group_size)
        out += [TensorInfo(weight, (n, d * gate.bits // 32), "uint32"),
                TensorInfo(scales, groups, dtype), TensorInfo(biases, groups, dtype)]
    return out


def gate_arrays(ckpt: Checkpoint, gate: GateResident, dtype: str, carry: bool = True
                ) -> Iterable[np.ndarray]:
    """The tensors of `gate_infos`, one layer at a time: the source's own blocks where they
    are exactly MLX affine at the gate's bits (and `carry`), else the 16-bit rows quantized
    here (or cast, 16 bits)."""
    for layer in range(int(ckpt.config["num_hidden_layers"])):
        name = ckpt.ffn_names(layer)["gate"]
        stored = ckpt.tensors()[name].dtype
        if not gate.packed:
            yield cast(ckpt.read(name), stored, dtype)
            continue
        yield from quantized_blocks(ckpt, name, stored, dtype, gate.bits, gate.group_size,
                                    carry)


def stored_plan(ckpt: Checkpoint) -> dict[str, dict]:
    """Module path -> {"bits", "group_size"} of every resident matrix the checkpoint stores
    quantized: carried as it is (`resident_arrays` reads its blocks exactly)."""
    return {name[: -len(".weight")]: params for name in ckpt.tensors()
            if not ckpt.is_ffn_tensor(name) and (params := ckpt.quantization_for(name))}


def down_table(parts: dict[str, np.ndarray | Carried], layout: FFNLayout, dtype: str
               ) -> tuple[np.ndarray, np.ndarray] | None:
    """The layer's down table (scales, biases (n / group, d) in `dtype`) when its down part is
    carried along the neurons, else None."""
    if not layout.down_table_group:
        return None
    down = parts["down"]
    return tuple(cast(np.ascontiguousarray(a.T), "float32", dtype)
                 for a in (down.scales, down.biases))


def resident_plan(ckpt: Checkpoint, bits: int, group_size: int, carry: bool = True
                  ) -> dict[str, dict]:
    """Module path -> {"bits", "group_size"} of every resident matrix to store quantized.

    bits 16: none. Otherwise every 2-D `.weight` whose rows split into whole groups
    (attention, lm_head, the embedding table), at `bits`/`group_size` or, with `carry`, at
    what the source's own blocks are exactly (`Checkpoint.quantization_for`, GGUF)."""
    if bits >= 16:
        return {}
    plan = {}
    for name, info in ckpt.tensors().items():
        if ckpt.is_ffn_tensor(name) or not quantizable(name, info.shape, group_size):
            continue
        params = ckpt.quantization_for(name) if carry else None
        plan[name[: -len(".weight")]] = params or {"bits": bits, "group_size": group_size}
    return plan


def resident_infos(ckpt: Checkpoint, dtype: str, plan: dict[str, dict] | None = None
                   ) -> list[TensorInfo]:
    """Every non-FFN tensor, in the order written, with its stored dtype; a quantized
    module's weight as (rows, cols * bits / 32) uint32 then its scales and biases (rows,
    cols / group_size) in `dtype`."""
    out, plan = [], plan or {}
    for name, info in ckpt.tensors().items():
        if ckpt.is_ffn_tensor(name):
            continue
        params = plan.get(name[: -len(".weight")]) if name.endswith(".weight") else None
        if params is None:
            out.append(TensorInfo(name, info.shape, dtype if len(info.shape) >= 2
                                  else info.dtype))
            continue
        (rows, cols), base = info.shape, name[: -len(".weight")]
        groups = (rows, cols // params["group_size"])
        out += [TensorInfo(name, (rows, cols * params["bits"] // 32), "uint32"),
                TensorInfo(f"{base}.scales", groups, dtype),
                TensorInfo(f"{base}.biases", groups, dtype)]
    return out


def affine_quantize(values: np.ndarray, src: str, dtype: str, bits: int, group_size: int,
                    rows_per_chunk: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mx.quantize of a (r, c) tensor of storage dtype `src`, in the storage dtype `dtype`
    (as mlx_lm quantizes a 16-bit checkpoint, and as load-time quantization does on the fast
    CPU path): (q (r, c*bits/32) uint32, scales, biases (r, c/group_size) in `dtype`). A
    block of rows at a time, so no f32 copy of a whole embedding table is made."""
    rows, cols = values.shape
    q = np.empty((rows, cols * bits // 32), np.uint32)
    scales = np.empty((rows, cols // group_size), NP_STORAGE[dtype])
    biases = np.empty_like(scales)
    mx_dtype = getattr(mx, dtype)
    for start in range(0, rows, rows_per_chunk):
        stop = min(rows, start + rows_per_chunk)
        block = mx.array(to_f32(values[start:stop], src)).astype(mx_dtype)
        wq, s, b = mx.quantize(block, group_size=group_size, bits=bits)
        q[start:stop] = np.array(wq)
        scales[start:stop], biases[start:stop] = (to_storage(a, dtype) for a in (s, b))
    return q, scales, biases


def to_storage(a: mx.array, dtype: str) -> np.ndarray:
    """An MLX array of storage dtype `dtype` -> numpy in NP_STORAGE[dtype] (bf16 as bits)."""
    return np.array(a.view(mx.uint16)) if dtype == "bfloat16" else np.array(a)


def resident_arrays(ckpt: Checkpoint, dtype: str, plan: dict[str, dict]
                    ) -> Iterable[np.ndarray]:
    """The tensors of `resident_infos(ckpt, dtype, plan)`, in order, one at a time: a
    quantized module's blocks as the source holds them when they are exactly MLX affine
    (`Checkpoint.read_quantized`), else quantized here."""
    src = ckpt.tensors()
    for name, info in src.items():
        if ckpt.is_ffn_tensor(name):
            continue
        params = plan.get(name[: -len(".weight")]) if name.endswith(".weight") else None
        if params is None:
            yield cast(ckpt.read(name), info.dtype, dtype if len(info.shape) >= 2
                       else info.dtype)
            continue
        yield from quantized_blocks(ckpt, name, info.dtype, dtype, params["bits"],
                                    params["group_size"])


def quantized_blocks(ckpt: Checkpoint, name: str, stored: str, dtype: str, bits: int,
                     group_size: int, carry: bool = True) -> Iterable[np.ndarray]:
    """Matrix `name` as (packed uint32, scales, biases in `dtype`): the source's own blocks
    where they are exactly MLX affine at bits / group_size (and `carry`), else its `stored`
    values quantized here."""
    carried = ckpt.read_quantized(name, bits, group_size) if carry else None
    if carried is None:
        yield from affine_quantize(ckpt.read(name), stored, dtype, bits, group_size)
        return
    q, scales, biases = carried
    yield pack_bits(q, bits)
    yield from (cast(a, "float32", dtype) for a in (scales, biases))


def convert(src: str | Path | Checkpoint, out: str | Path, *, dtype: str | None = None,
            bits: int = 16, group_size: int | None = None, align: int = 64, force: bool = False,
            progress: Progress | None = None, resident_bits: int | None = None,
            resident_group_size: int | None = None, carry: bool = True,
            carry_ffn: bool | None = None, gate_resident: bool = False,
            gate_bits: int | None = None) -> ConvertStats:
    """Convert a source checkpoint into a flash model dir at `out`.

    dtype: storage dtype of weights ("float16", "bfloat16", "float32"); None keeps the source
    dtype of the FFN weights. bits: 16 stores FFN rows in `dtype`; 8 or 4 quantizes each row
    (MLX affine quantization, `group_size` values per scale/bias in `dtype`; None: the
    source's `Checkpoint.group_size`, 32 for a GGUF, whose blocks are 32 wide). resident_bits
    (None: `bits`) and resident_group_size (None: `group_size`): the same for the resident
    matrices (attention, lm_head, embedding table), stored as mlx_lm stores a quantized model
    (`resident_plan`); 16 keeps them in `dtype`. carry: a GGUF's resident blocks that are
    exactly MLX affine (Q8_0, Q5_0, Q4_0) are stored as they are, at their own bits, not
    re-quantized (False: every matrix at resident_bits). align: bundle stride alignment in
    bytes (the store reads aligned spans for O_DIRECT itself, so padding to 4096 is only worth
    it for huge bundles). carry_ffn: the FFN's own blocks copied into format-3 bundles (each
    part at its own bits; `Checkpoint.ffn_quantization`) instead of dequantized or re-quantized
    at `bits` (which then applies to the resident part only); a quantized mlx_lm checkpoint is
    always carried whole (resident part too), as stored. gate_resident: format 4 - each
    layer's gate_proj a resident matrix at `gate_bits` (None: the FFN's own precision, a
    carried gate's blocks as they are) and the bundles [up | down] only, for a gate-driven
    selector (`gate_resident_layout`).
    """
    ckpt = src if isinstance(src, Checkpoint) else open_checkpoint(src)
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass force=True (--force) to replace it")
    check_config(ckpt)  # a config that disagrees with the tensors would give a dir that fails
    if align < 1 or align & (align - 1):
        raise ValueError(f"align must be a power of two, got {align}")
    n_layers = int(ckpt.config["num_hidden_layers"])
    d_model = int(ckpt.config["hidden_size"])
    dtype = dtype or ckpt.tensors()[ckpt.ffn_names(0)["down"]].dtype
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {tuple(DTYPE_BYTES)}, got {dtype!r}")
    if ckpt.carries_ffn:
        _check_carried_options(ckpt, bits, group_size, resident_bits, resident_group_size,
                               carry)
        layout, overrides = carried_layout(ckpt, dtype)
        plan = stored_plan(ckpt)
        quantization = {**ckpt.default_quantization(), "modules": plan} if plan else None
    else:
        group_size = group_size or ckpt.group_size
        if carry_ffn:  # widened to 4/8 bits as carried resident matrices are (gguf.py)
            layout, overrides = carried_layout(ckpt, dtype, widen=True)
        else:
            layout, overrides = layout_for(ckpt, dtype, bits, group_size), [None] * n_layers
        resident_bits = bits if resident_bits is None else resident_bits
        resident_group_size = resident_group_size or group_size
        if resident_bits not in (16, 8, 4) or resident_group_size not in QUANT_GROUPS:
            raise ValueError(f"resident_bits must be 16, 8 or 4 and resident_group_size one of "
                             f"{QUANT_GROUPS}, got {resident_bits} and {resident_group_size}")
        plan = resident_plan(ckpt, resident_bits, resident_group_size, carry)
        quantization = {"bits": resident_bits, "group_size": resident_group_size,
                        "modules": plan} if plan else None
    if gate_resident:
        layout, overrides = gate_resident_layout(ckpt, layout, overrides, gate_bits)
    elif gate_bits is not None:
        raise ValueError("gate_bits (--gate-bits) applies with gate_resident (--gate-resident)")

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / FFN_DIR).mkdir(parents=True)
    try:
        report = progress or (lambda stage, n: None)
        layers, tables = _write_layers(ckpt, tmp, layout, overrides, align, d_model, report)
        _write_resident(ckpt, tmp, dtype, plan, report, tables, layout.gate_resident, carry)
        _write_metadata(ckpt, tmp, layout, layers, align, quantization, report)
        read_manifest(tmp)  # what load checks first, before the dir gets OUT's name
        _replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError | FileExistsError):
            raise OSError(e.errno, f"convert to {out} failed while writing ({e.strerror}); "
                          "nothing was left behind - free disk space or pick another OUT") from e
        raise
    return ConvertStats(out, (out / RESIDENT).stat().st_size, sum(e.size for e in layers),
                        n_layers, layers[0].n_neurons, layout.bundle_bytes, layers[0].stride)


def _check_carried_options(ckpt, bits, group_size, resident_bits, resident_group_size,
                           carry) -> None:
    """A quantized mlx_lm source is carried exactly as stored: refuse options that ask for
    other precision (they would re-quantize already-quantized weights)."""
    asked = {"--bits": bits if bits != 16 else None, "--group-size": group_size,
             "--resident-bits": resident_bits, "--resident-group-size": resident_group_size,
             "--requantize": None if carry else True}
    given = [flag for flag, value in asked.items() if value is not None]
    if given:
        q = ckpt.default_quantization()
        raise ValueError(f"{ckpt.path} is an mlx_lm checkpoint quantized at {q['bits']} bits "
                         f"(groups of {q['group_size']}): it is carried exactly as stored, so "
                         f"{', '.join(given)} cannot apply; drop them (or convert the 16-bit "
                         "model to choose the precision)")


def _write_layers(ckpt, tmp, layout, overrides, align, d_model, report
                  ) -> tuple[list[LayerEntry], dict[int, tuple[np.ndarray, np.ndarray]]]:
    """Every layer's bundle file; returns the layer entries and the down tables of layers
    whose down part is carried along the neurons."""
    entries, tables = [], {}
    for layer, override in enumerate(overrides):
        own = layout.with_overrides(override)
        stride = round_up(own.bundle_bytes, align)
        parts = read_layer_parts(ckpt, layer, "float32" if own.quantized else own.dtype,
                                 d_model, own)
        rel = layer_file_name(layer)
        size = write_layer(tmp / rel, parts, own, stride)
        sha256, blocks = file_checks(tmp / rel, bundle_block_size(stride))
        entries.append(LayerEntry(rel, size // stride, stride, size, sha256, blocks=blocks,
                                  quant=override))
        table = down_table(parts, own, own.dtype)
        if table is not None:
            tables[layer] = table
        del parts
        report(f"ffn layer {layer}", size)
    return entries, tables


def _write_resident(ckpt, tmp, dtype, plan, report, tables, gate, carry) -> None:
    """resident.safetensors: the non-FFN tensors, then each carried layer's down table, then
    (gate-resident) each layer's gate."""
    infos = resident_infos(ckpt, dtype, plan)
    for layer, pair in tables.items():
        infos += [TensorInfo(name, a.shape, dtype)
                  for name, a in zip(down_table_names(layer), pair, strict=True)]
    if gate is not None:
        infos += gate_infos(ckpt, gate, dtype)

    def arrays():
        yield from resident_arrays(ckpt, dtype, plan)
        for pair in tables.values():
            yield from pair
        if gate is not None:
            yield from gate_arrays(ckpt, gate, dtype, carry)

    write_safetensors(tmp / RESIDENT, infos, arrays(), metadata={"format": "mlx"})
    report("resident", (tmp / RESIDENT).stat().st_size)


def _write_metadata(ckpt, tmp, layout, layers, align, quantization, report) -> None:
    source_hash = _hash_sources(ckpt)
    ckpt.write_tokenizer(tmp)
    config = dict(ckpt.config)
    write_text_atomic(tmp / "config.json", json.dumps(config, indent=2))
    for path in tmp.iterdir():  # the tokenizer files: on disk before the dir is renamed into place
        if path.is_file():
            fsync_file(path)
    manifest = Manifest(
        format_version=(GATE_RESIDENT_VERSION if layout.gate is not None else
                        PART_QUANT_VERSION if layout.per_part else FORMAT_VERSION),
        source={"path": str(Path(ckpt.path).resolve()), "kind": ckpt.kind, "sha256": source_hash},
        config=config, ffn=layout, layers=layers, align=align,
        resident=file_entry(tmp, RESIDENT, blocks=True),
    )
    if quantization:
        manifest.resident["quantization"] = quantization
    write_text_atomic(tmp / MANIFEST, manifest.to_json())
    report("metadata", 0)


def _hash_sources(ckpt: Checkpoint) -> str:
    digest = hashlib.sha256()
    for path in ckpt.files():
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def _replace(tmp: Path, out: Path) -> None:
    """Rename tmp to out; an existing out (force) is moved aside first, then deleted."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
