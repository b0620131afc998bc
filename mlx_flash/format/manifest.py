"""The flash model dir, format versions 1 to 4: manifest schema, validation, offsets.

A flash model dir holds everything `mlx_flash.load` needs:

    manifest.json           this module's `Manifest`
    config.json, tokenizer  as mlx_lm expects them
    resident.safetensors    every weight that is not a per-neuron FFN row (mlx_lm names)
    ffn/layer_NNN.bin       neuron i of layer N at byte offset i * stride
    predictors.safetensors  optional low-rank predictors

A bundle is one neuron's rows stored together ("row-column bundling"): for a gated FFN
`[gate_i | up_i | down_i]` (d_model elements each, `down_i` is column i of down_proj), for a plain
FFN `[up_i | down_i]`, followed by the neuron's input-bias entries when the FFN has biases. The
output bias is not per neuron and lives in resident.safetensors.

Quantized bundles (bits 8 or 4) hold the same rows in MLX's affine quantization, each row
quantized along d_model in groups of `group_size`: `[gate.q | up.q | down.q | gate.scales | ...
| down.biases | *_bias]` - packed uint32 words, then scales and biases in `dtype`, so one read
still gets everything a neuron needs (`FFNLayout.segments`).

The resident part of a dir converted with --bits 8/4 (or --resident-bits) is quantized too, as
mlx_lm stores a quantized model: each 2-D matrix (attention, lm_head, the embedding table) as
`<module>.weight` packed uint32, `<module>.scales`, `<module>.biases` in the bundles' dtype;
norms and biases stay 16-bit. The resident entry's "quantization" says so: {"bits",
"group_size" (what convert was asked), "modules": {module path: {"bits", "group_size"}}} (a
GGUF's blocks may be carried at their own bits). Without it (every older dir) the resident
part is 16-bit. `check_quantized_tensors` checks the packed shapes against it at read.

Version 3 stores each matrix part at its own precision (`FFNLayout.quant`, overridden per
layer by `LayerEntry.quant`: mlx_lm's mixed recipes quantize some layers' down_proj finer),
as a quantized mlx_lm checkpoint does: a part may be 16-bit, MLX affine along d_model (its
scales and biases in the bundle), or - down_proj as mlx_lm and GGUF quantize it, across the
neurons - affine along the neurons: the bundle holds column i's integers and the layer's
scales and biases, shared by `group_size` neurons, are a resident table
(`down_table_names`). `convert` writes version 3 only when a part needs it.

Version 4 keeps the gate resident (`FFNLayout.gate`, issue 21): each layer's gate_proj is a
resident matrix (`gate_names`, 4/8-bit MLX affine or 16-bit) and the bundles hold only
`[up_i | down_i]`, so a gate-driven selector (CATS / TEAL) computes act(gate x) for every neuron
from DRAM and reads the up/down rows of the neurons it keeps. Such bundles are described as a
plain FFN with the "identity" activation: h = (up x) * mask, the mask carrying act(gate x).
Version 4 may also carry versions 2 and 3's features; `convert --gate-resident` writes it.

Version 2 is a placed dir (`offline/placement.py`): the neurons of a layer are stored in
another order, `LayerEntry.order[p]` = the original id of the neuron at position p (a
permutation, checked on read), and the store maps ids to positions, so nothing above it sees the
order. `convert` writes version 1, which every reader still accepts.

The stride is the bundle size rounded up to `align` bytes. We do not pad each bundle to 4096: the
default model's f16 bundle is 5376 bytes and padding it would read 52% more. The store reads
the 4096-aligned span around a run of neurons instead when it uses O_DIRECT.
"""

from __future__ import annotations

import base64
import json
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..process import trim_heap
from .arch import ACTIVATIONS, ARCHITECTURES, RELU_FAMILY
from .checksums import (
    BLOCK_SIZE,
    BlockTable,
    ChecksumError,
    bundle_block_size,
    check_file,
    file_checks,
    unverified_message,
)
from .errors import FormatError
from .storage import (
    DTYPE_BYTES,
    NP_STORAGE,
    sha256_file,
    tensor_sizes,
    to_f32,
    write_text_atomic,
)

FORMAT_VERSION = 1  # what `convert` writes


PLACED_FORMAT_VERSION = 2  # a dir whose bundles `mlx-flash place` reordered (LayerEntry.order)


PART_QUANT_VERSION = 3  # per-part (and per-layer) precision: FFNLayout.quant, LayerEntry.quant


GATE_RESIDENT_VERSION = 4  # gate rows resident, bundles hold up/down only: FFNLayout.gate


SUPPORTED_VERSIONS = (FORMAT_VERSION, PLACED_FORMAT_VERSION, PART_QUANT_VERSION,
                      GATE_RESIDENT_VERSION)


MANIFEST = "manifest.json"


RESIDENT = "resident.safetensors"


PREDICTORS = "predictors.safetensors"


FFN_DIR = "ffn"


def layer_file_name(layer: int) -> str:
    return f"{FFN_DIR}/layer_{layer:03d}.bin"


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class Part:
    """One segment of a bundle: `count` elements starting at element `offset`."""

    name: str  # "gate" | "up" | "down" | "gate_bias" | "up_bias"
    offset: int
    count: int


QUANT_AXES = ("d_model", "neurons")


@dataclass(frozen=True)
class PartQuant:
    """How one matrix part of a bundle is stored: bits 16, d_model elements in the layout's
    dtype; else MLX affine at `bits` in groups of `group_size` along `axis` - "d_model" (the
    row's scales and biases follow in the bundle) or "neurons" (down_proj only: the bundle
    holds column i's d_model integers, the scales and biases are the layer's resident table)."""

    bits: int
    group_size: int = 0
    axis: str = "d_model"

    @property
    def packed(self) -> bool:
        return self.bits < 16

    def words(self, d_model: int) -> int:
        """uint32 words of one packed row of d_model values."""
        return d_model * self.bits // 32


def down_table_names(layer: int) -> tuple[str, str]:
    """Resident tensors of a layer whose down part is quantized along the neurons: its scales
    and biases, each (n / group_size, d_model) in the bundles' dtype (row g: neurons g*G..)."""
    return f"flash.ffn.{layer}.down.scales", f"flash.ffn.{layer}.down.biases"


def gate_names(layer: int) -> tuple[str, str, str]:
    """Resident tensors of layer `layer`'s gate in a gate-resident dir (format 4): `.weight`
    (n, d * bits / 32) uint32 with `.scales` / `.biases` (n, d / group_size) in the bundles'
    dtype, or a 16-bit `.weight` (n, d) alone (then the other two are absent)."""
    base = f"flash.ffn.{layer}.gate"
    return f"{base}.weight", f"{base}.scales", f"{base}.biases"


GATE_BITS = (4, 8, 16)  # what both compute paths multiply resident gate rows at


@dataclass(frozen=True)
class GateResident:
    """A gate-resident layout's gate (format 4): the model's gated FFN with activation
    `activation`, whose gate rows are resident matrices (`gate_names`) at `bits` (16: the
    bundles' dtype) in groups of `group_size` along d_model, so a gate-driven selector can
    score every neuron before reading any bundle (issue 21). The bundles then hold [up | down]
    and are computed as a plain FFN with the "identity" activation whose mask carries
    act(gate x) for each token and neuron."""

    activation: str
    bits: int = 4
    group_size: int = 64

    @property
    def packed(self) -> bool:
        return self.bits < 16


@dataclass
class FFNLayout:
    """How a neuron's bundle is laid out, shared by every layer of a model."""

    kind: str  # "gated" (gate, up, down) or "plain" (up, down)
    activation: str  # one of ACTIVATIONS
    d_model: int
    dtype: str  # storage dtype of the bundles
    has_bias: bool
    parts: list[Part] = field(default_factory=list)
    bits: int = 16  # 16: rows stored in `dtype`; 8 or 4: affine-quantized rows
    group_size: int = 64  # quantization group along d_model (bits < 16)
    # format 3: matrix part -> {"bits", "group_size", "axis"} (PartQuant), replacing bits and
    # group_size; None: every part at bits / group_size along d_model
    quant: dict | None = None
    # format 4: the gate resident (GateResident as a dict); None: gate rows in the bundles
    gate: dict | None = None

    def __post_init__(self):
        if self.kind not in ("gated", "plain"):
            raise FormatError(f"ffn kind must be 'gated' or 'plain', got {self.kind!r}")
        if self.activation not in ACTIVATIONS:
            raise FormatError(f"activation {self.activation!r} is not one of {ACTIVATIONS}")
        if self.dtype not in DTYPE_BYTES:
            raise FormatError(f"bundle dtype {self.dtype!r} is not one of {tuple(DTYPE_BYTES)}")
        if not isinstance(self.d_model, int) or isinstance(self.d_model, bool) \
                or self.d_model < 1:
            raise FormatError(f"ffn d_model must be a positive integer, got {self.d_model!r}")
        self.parts = [p if isinstance(p, Part) else Part(**p) for p in self.parts]
        if not self.parts:
            self.parts = self.default_parts()
        self._check_parts()
        if self.gate is not None:
            self._check_gate()
        if self.quant is not None:
            self._check_quant()
            return
        if self.bits not in (16, 8, 4):
            raise FormatError(f"bits must be 16, 8 or 4, got {self.bits}")
        if self.quantized and (self.group_size not in (32, 64, 128)
                               or self.d_model % self.group_size):
            raise FormatError(f"group_size {self.group_size} must be 32, 64 or 128 and divide "
                              f"d_model {self.d_model}")

    def _check_parts(self) -> None:
        """The parts must be exactly what kind, has_bias and d_model imply: readers slice
        bundles by them, so a lost or moved part would compute garbage."""
        want = self.default_parts()
        if self.parts != want:
            def show(parts: list[Part]) -> str:
                return "[" + ", ".join(p.name for p in parts) + "]"
            raise FormatError(
                f"ffn parts {show(self.parts)} (offsets {[p.offset for p in self.parts]}) are "
                f"not the {self.kind} layout {show(want)} (offsets {[p.offset for p in want]}) "
                f"for d_model {self.d_model}, has_bias {self.has_bias}: the manifest was edited "
                "or damaged; re-convert the model")

    def _check_gate(self) -> None:
        """A gate-resident layout's bundles are plain identity ones without input biases and
        its gate is one both compute paths multiply."""
        fix = "the manifest was edited or damaged; re-convert the model"
        try:
            gate = self.gate_resident
        except TypeError as e:
            raise FormatError(f"ffn gate {str(self.gate)[:80]!r}: {e}; {fix}") from e
        if (self.kind, self.activation, self.has_bias) != ("plain", "identity", False) \
                or gate.activation not in ACTIVATIONS or gate.activation == "identity" \
                or gate.bits not in GATE_BITS \
                or (gate.packed and (gate.group_size not in QUANT_GROUPS
                                     or self.d_model % gate.group_size)):
            raise FormatError(f"ffn gate {self.gate} with bundles {self.kind} "
                              f"{self.activation} (has_bias {self.has_bias}) is not a gate-"
                              f"resident layout: plain identity bundles without biases, the "
                              f"gate at bits {GATE_BITS} in groups of {QUANT_GROUPS}; {fix}")

    @property
    def gate_resident(self) -> GateResident | None:
        """The resident gate (format 4), or None when the gate rows are in the bundles."""
        if self.gate is None:
            return None
        return self.gate if isinstance(self.gate, GateResident) else GateResident(**self.gate)

    @property
    def model_kind(self) -> str:
        """The model's FFN kind ("gated" for a gate-resident layout's plain bundles)."""
        return "gated" if self.gate is not None else self.kind

    @property
    def model_activation(self) -> str:
        """The model's FFN activation (a gate-resident layout's is its gate's)."""
        return self.gate_resident.activation if self.gate is not None else self.activation

    def _check_quant(self) -> None:
        """Each matrix part's PartQuant is one MLX affine packs (or 16), its groups divide the
        axis they run along, and only down may run along the neurons."""
        fix = "the manifest was edited or damaged; re-convert the model"
        if not isinstance(self.quant, dict) or set(self.quant) != set(self.matrix_names):
            raise FormatError(f"ffn quant must give each of {self.matrix_names} its bits, got "
                              f"{str(self.quant)[:80]!r}; {fix}")
        for name in self.matrix_names:
            spec = self.quant[name]
            try:
                q = spec if isinstance(spec, PartQuant) else PartQuant(**spec)
            except TypeError as e:
                raise FormatError(f"ffn quant of {name}: {e}; {fix}") from e
            if q.bits == 16:
                continue
            groups = NEURON_GROUPS if q.axis == "neurons" else QUANT_GROUPS
            if q.bits not in QUANT_BITS or q.group_size not in groups \
                    or q.axis not in QUANT_AXES or (q.axis == "neurons" and name != "down") \
                    or (q.axis == "d_model" and self.d_model % q.group_size) \
                    or self.d_model * q.bits % 32:
                raise FormatError(f"ffn quant of {name} {spec} is not MLX affine bits in "
                                  f"{QUANT_BITS}, group_size in {groups} dividing its "
                                  f"axis ({QUANT_AXES}; only down runs along the neurons) for "
                                  f"d_model {self.d_model}; {fix}")

    def part_quant(self, name: str) -> PartQuant:
        """How matrix part `name` is stored."""
        if self.quant is None:
            return PartQuant(self.bits, self.group_size if self.bits < 16 else 0)
        spec = self.quant[name]
        return spec if isinstance(spec, PartQuant) else PartQuant(**spec)

    @property
    def per_part(self) -> bool:
        """Format 3: parts stored at their own precision (the cache keeps them apart)."""
        return self.quant is not None

    @property
    def down_table_group(self) -> int:
        """Neurons per row of the layer's down table (0: down carries its own scales)."""
        down = self.part_quant(self.matrix_names[-1])
        return down.group_size if down.packed and down.axis == "neurons" else 0

    def with_overrides(self, overrides: dict | None) -> FFNLayout:
        """This layout with some parts' quant replaced (a layer's `LayerEntry.quant`)."""
        if not overrides:
            return self
        base = {m: asdict(self.part_quant(m)) for m in self.matrix_names}
        return replace(self, quant={**base, **overrides})

    @property
    def quantized(self) -> bool:
        if self.quant is not None:
            return any(self.part_quant(m).packed for m in self.matrix_names)
        return self.bits < 16

    @property
    def matrix_names(self) -> list[str]:
        return [p.name for p in self.parts if not p.name.endswith("_bias")]

    @property
    def bias_names(self) -> list[str]:
        return [p.name for p in self.parts if p.name.endswith("_bias")]

    def segments(self) -> list[tuple[str, str, int]]:
        """(name, dtype, count) of each piece of a quantized bundle, in file order: each part's
        packed words (`m.q`; a 16-bit part's elements `m.w`), then the scales and then the
        biases of the parts quantized along d_model, then the input-bias entries."""
        d = self.d_model
        quant = {m: self.part_quant(m) for m in self.matrix_names}
        own = [m for m, q in quant.items() if q.packed and q.axis == "d_model"]
        return ([(f"{m}.q", "uint32", q.words(d)) if q.packed else (f"{m}.w", self.dtype, d)
                 for m, q in quant.items()]
                + [(f"{m}.scales", self.dtype, d // quant[m].group_size) for m in own]
                + [(f"{m}.biases", self.dtype, d // quant[m].group_size) for m in own]
                + [(b, self.dtype, 1) for b in self.bias_names])

    def default_parts(self) -> list[Part]:
        names = ["gate", "up", "down"] if self.kind == "gated" else ["up", "down"]
        parts = [Part(n, i * self.d_model, self.d_model) for i, n in enumerate(names)]
        if self.has_bias:
            base = len(names) * self.d_model
            in_names = names[:-1]
            parts += [Part(f"{n}_bias", base + i, 1) for i, n in enumerate(in_names)]
        return parts

    @property
    def elements(self) -> int:
        return max(p.offset + p.count for p in self.parts)

    @property
    def bundle_bytes(self) -> int:
        if self.quantized:
            return sum(count * NP_STORAGE[dt].itemsize for _, dt, count in self.segments())
        return self.elements * DTYPE_BYTES[self.dtype]

    def part(self, name: str) -> Part:
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def relu_family(self) -> bool:
        return self.activation in RELU_FAMILY


@dataclass
class LayerEntry:
    file: str
    n_neurons: int
    stride: int
    size: int
    sha256: str
    # Placement (format version 2, `offline/placement.py`): order[p] is the original id of the
    # neuron stored at position p (None: position = id); hot is original ids, most often active
    # first.
    order: np.ndarray | None = None
    hot: np.ndarray | None = None
    blocks: dict | None = None  # per-block crc32 (format/checksums.py); None in older dirs
    quant: dict | None = None  # format 3: this layer's parts stored unlike FFNLayout.quant

    def __post_init__(self):
        # Stored as base64 of little-endian int32 (`encode_ids`): a JSON list of 2 x 24 x 4864
        # ints costs ~5 MiB of RSS to parse, which a tight DRAM budget would pay for good.
        for key in ("order", "hot"):
            value = getattr(self, key)
            if value is not None:
                setattr(self, key, decode_ids(value, f"layer file {self.file} {key}"))


def encode_ids(ids: np.ndarray) -> str:
    """Neuron ids -> base64 of little-endian int32 (one JSON string)."""
    return base64.b64encode(np.asarray(ids, dtype="<i4").tobytes()).decode("ascii")


def decode_ids(value, what: str) -> np.ndarray:
    """Inverse of encode_ids (a plain list of ints is accepted too)."""
    if isinstance(value, np.ndarray | list):
        return np.asarray(value)
    try:
        raw = base64.b64decode(value, validate=True)
        if len(raw) % 4:
            raise ValueError("length is not a multiple of 4 bytes")
    except (ValueError, TypeError) as e:
        raise FormatError(f"{what} is not base64 int32 ids ({e}); re-run "
                          "`mlx-flash place` on the dir (or re-convert it)") from e
    return np.frombuffer(raw, dtype="<i4").copy()


@dataclass
class Manifest:
    format_version: int
    source: dict  # {"path": str, "sha256": str, "kind": "safetensors" | "gguf"}
    config: dict  # mlx_lm config.json contents
    ffn: FFNLayout
    layers: list[LayerEntry]
    resident: dict  # {"file", "size", "sha256"}
    align: int = 64
    predictors: dict | None = None  # {"file", "size", "sha256", ...} when trained
    placement: dict | None = None  # how the bundles were ordered (method, calibration, ...)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def ffn_bytes(self) -> int:
        return sum(entry.size for entry in self.layers)

    def layer_layout(self, layer: int) -> FFNLayout:
        """Layer `layer`'s bundle layout: `ffn` with the layer's own part overrides (format 3's
        mixed precision), else `ffn` itself."""
        overrides = self.layers[layer].quant
        if not overrides:
            return self.ffn
        cache = self.__dict__.setdefault("_layer_layouts", {})  # not a dataclass field
        if layer not in cache:
            cache[layer] = self.ffn.with_overrides(overrides)
        return cache[layer]

    @property
    def per_part(self) -> bool:
        """Whether any layer stores its parts at their own precision (format 3)."""
        return self.ffn.per_part or any(e.quant for e in self.layers)

    def to_json(self) -> str:
        """Indented JSON; absent placement keys left out (so an unplaced dir's manifest is
        exactly what format version 1 always was)."""
        data = asdict(self)
        if data["placement"] is None:
            del data["placement"]
        for key in ("quant", "gate"):
            if data["ffn"][key] is None:
                del data["ffn"][key]
        for layer in data["layers"]:
            for key in ("blocks", "quant"):
                if layer[key] is None:
                    del layer[key]
            for key in ("order", "hot"):
                if layer[key] is None:
                    del layer[key]
                else:
                    layer[key] = encode_ids(layer[key])
        return json.dumps(data, indent=2)

    @classmethod
    def from_dict(cls, data: dict, where: str = MANIFEST) -> Manifest:
        check_structure(data, where)
        version = data.get("format_version")
        if version not in SUPPORTED_VERSIONS:
            raise FormatError(
                f"{where}: format_version {version!r} is not supported (this mlx-flash reads "
                f"versions {SUPPORTED_VERSIONS}); re-convert the model with `mlx-flash convert`"
            )
        try:
            manifest = cls(
                format_version=version,
                source=data["source"],
                config=data["config"],
                ffn=FFNLayout(**data["ffn"]),
                layers=[LayerEntry(**entry) for entry in data["layers"]],
                resident=data["resident"],
                align=data.get("align", 64),
                predictors=data.get("predictors"),
                placement=data.get("placement"),
            )
        except (KeyError, TypeError) as e:
            raise FormatError(f"{where}: malformed manifest ({e}); re-convert the model") from e
        except FormatError as e:
            raise FormatError(f"{where}: {e}") from e
        check_placement(manifest, where)
        check_part_quant(manifest, where)
        return manifest

    def order(self, layer: int) -> np.ndarray | None:
        """(n,) original id of the neuron at each file position, or None (position = id)."""
        order = self.layers[layer].order
        return None if order is None else np.asarray(order)

    def to_original(self, layer: int, rows: np.ndarray) -> np.ndarray:
        """A whole layer's rows in file order -> the same rows in original id order."""
        order = self.order(layer)
        if order is None:
            return rows
        out = np.empty_like(rows)
        out[order] = rows
        return out


def read_layer_rows(root: str | Path, manifest: Manifest, layer: int, *,
                    file_order: bool = False) -> np.ndarray:
    """One layer's whole bundle file: (n_neurons, stride) uint8, row i the bundle of neuron i
    (file_order: the rows as stored, a placed dir's order kept). Raises FormatError naming the
    file when its size is not the manifest's, ChecksumError when a block does not match its
    checksum (format/checksums.py; a dir without them is read unchecked)."""
    entry = manifest.layers[layer]
    path = contained(root, entry.file, str(Path(root) / MANIFEST))
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size != entry.size:
        raise FormatError(f"{path}: {raw.size} bytes, manifest says {entry.size}: the file is "
                          "truncated or was replaced; re-convert the model")
    if entry.blocks:
        table = BlockTable(path, entry.size, entry.blocks)
        for block in range(table.n_blocks):
            start, stop = table.span(block)
            table.check(block, raw[start:stop])
    rows = raw.reshape(entry.n_neurons, entry.stride)
    return rows if file_order else manifest.to_original(layer, rows)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _file_record(value, what: str, where: str) -> None:
    if not isinstance(value, dict) or not isinstance(value.get("file"), str) \
            or not _is_int(value.get("size")):
        raise FormatError(f"{where}: {what} must be an object with a string 'file' and an "
                          f"integer 'size', got {str(value)[:80]!r}; re-convert the model")


def check_structure(data, where: str) -> None:
    """The JSON types every reader relies on, before any dataclass is built: an object, a
    non-empty list of layers with integer sizes, file records for the resident and predictors
    files, a power-of-two align. Raises FormatError naming `where`."""
    fix = "the manifest was edited or damaged; re-convert the model"
    if not isinstance(data, dict):
        raise FormatError(f"{where}: not a JSON object (got a {type(data).__name__}); {fix}")
    for key in ("config", "ffn", "source"):
        if not isinstance(data.get(key), dict):
            raise FormatError(f"{where}: '{key}' must be a JSON object; {fix}")
    layers = data.get("layers")
    if not isinstance(layers, list):
        raise FormatError(f"{where}: 'layers' must be a list of layer entries; {fix}")
    if not layers:
        raise FormatError(f"{where}: lists no FFN layers ('layers' is empty); {fix}")
    for i, entry in enumerate(layers):
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise FormatError(f"{where}: layer {i} must be an object with a string 'file'; {fix}")
        for key in ("n_neurons", "stride", "size"):
            value = entry.get(key)
            if not _is_int(value) or value < (0 if key == "size" else 1):
                raise FormatError(f"{where}: layer {i} {key} must be a positive integer, got "
                                  f"{value!r}; {fix}")
    _file_record(data.get("resident"), "'resident'", where)
    _check_quantization(data["resident"].get("quantization"), where)
    if data.get("predictors") is not None:
        _file_record(data["predictors"], "'predictors'", where)
    align = data.get("align", 64)
    if not _is_int(align) or align < 1 or align & (align - 1):
        raise FormatError(f"{where}: align must be a power of two, got {align!r}; {fix}")


QUANT_BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize's affine mode packs


QUANT_GROUPS = (32, 64, 128)


NEURON_GROUPS = (16, *QUANT_GROUPS)  # a down table's groups (Q6_K's blocks are 16 wide)


def _quant_params(value, what: str, where: str) -> None:
    if not isinstance(value, dict) or value.get("bits") not in QUANT_BITS \
            or value.get("group_size") not in QUANT_GROUPS:
        raise FormatError(f"{where}: {what} must be {{'bits': one of {QUANT_BITS}, 'group_size': "
                          f"one of {QUANT_GROUPS}}}, got {str(value)[:80]!r}; the manifest was "
                          "edited or damaged - re-convert the model")


def _check_quantization(value, where: str) -> None:
    """resident["quantization"]: absent (16-bit resident), or {"bits", "group_size" (the
    convert options), "modules": {module path: {"bits", "group_size"}}}."""
    if value is None:
        return
    _quant_params(value, "resident quantization", where)
    modules = value.get("modules")
    if not isinstance(modules, dict):
        raise FormatError(f"{where}: resident quantization 'modules' must map module paths to "
                          "their bits and group size; re-convert the model")
    for name, params in modules.items():
        _quant_params(params, f"resident module {name!r}", where)


def resident_quantization(manifest: Manifest) -> dict[str, dict]:
    """Module path -> {"bits", "group_size"} of every resident matrix stored quantized
    (`<path>.weight` packed uint32, `.scales`, `.biases`, MLX affine); {} for a 16-bit
    resident part (every dir made before quantized resident files)."""
    quant = manifest.resident.get("quantization")
    return dict(quant["modules"]) if quant else {}


def resident_rows(root: str | Path, manifest: Manifest, name: str, ids: np.ndarray
                  ) -> np.ndarray:
    """Rows `ids` of resident matrix `name` as (k, cols) float32, read from the file: 16-bit
    rows widened, quantized ones dequantized (w = scales * q + biases, MLX's packing)."""
    path = Path(root) / manifest.resident["file"]
    tensors = tensor_sizes(path)
    base = name[: -len(".weight")]
    params = resident_quantization(manifest).get(base)
    rows = np.asarray(tensors[name].memmap(path)[ids])
    if params is None:
        return to_f32(rows, tensors[name].dtype)
    scales, biases = (to_f32(np.asarray(tensors[f"{base}.{k}"].memmap(path)[ids]),
                             tensors[f"{base}.{k}"].dtype) for k in ("scales", "biases"))
    return dequantize_rows(rows, scales, biases, params["bits"], params["group_size"])


def dequantize_rows(packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int,
                    group: int) -> np.ndarray:
    """MLX affine rows -> (k, cols) float32: packed (k, cols*bits/32) uint32 (low bits first),
    scales and biases (k, cols/group) float32; w = scales * q + biases."""
    stream = np.unpackbits(packed.view(np.uint8), axis=-1, bitorder="little")
    q = stream.reshape(len(packed), -1, bits) @ (1 << np.arange(bits)).astype(np.float32)
    w = q.reshape(len(packed), -1, group) * scales[..., None] + biases[..., None]
    return w.reshape(len(packed), -1).astype(np.float32)


def resident_bits(manifest: Manifest) -> tuple[int, int]:
    """(bits, group_size) the resident part was converted with; (16, 0) when unquantized."""
    quant = manifest.resident.get("quantization")
    return (quant["bits"], quant["group_size"]) if quant else (16, 0)


def contained(root: str | Path, rel: str, where: str) -> Path:
    """root / rel, refused unless it resolves inside root: a manifest may not point at '..',
    an absolute path or a symlink out of its dir. Raises FormatError naming both."""
    base = Path(root).resolve()
    path = (base / rel).resolve()
    if path == base or not path.is_relative_to(base):
        raise FormatError(f"{where}: file {rel!r} resolves to {path}, outside the model dir "
                          f"{base}; a manifest may only list files inside its own dir - "
                          "re-convert the model (or fix the manifest)")
    return Path(root) / rel


def listed_files(manifest: Manifest) -> list[dict]:
    """{"file", "size", ...} of every file the manifest lists: resident, layers, predictors."""
    entries = [manifest.resident, *[{"file": e.file, "size": e.size, "sha256": e.sha256,
                                     "blocks": e.blocks} for e in manifest.layers]]
    if manifest.predictors:
        entries.append(manifest.predictors)
    return entries


def describe_parts(manifest: Manifest) -> str:
    """Format 3's per-part precision, e.g. "gate 4-bit g64, up 4-bit g64, down 4-bit g64
    along neurons (layers 1, 5: down 6-bit g64 along neurons)"."""
    def describe(layout, names) -> str:
        out = []
        for name in names:
            q = layout.part_quant(name)
            out.append(f"{name} 16-bit" if not q.packed else
                       f"{name} {q.bits}-bit g{q.group_size}"
                       + (" along neurons" if q.axis == "neurons" else ""))
        return ", ".join(out)

    text = describe(manifest.ffn, manifest.ffn.matrix_names)
    odd = {}
    for i, entry in enumerate(manifest.layers):
        if entry.quant:
            odd.setdefault(describe(manifest.layer_layout(i), sorted(entry.quant)), []).append(i)
    for what, layers in odd.items():
        text += f" (layers {', '.join(map(str, layers))}: {what})"
    return text


def check_part_quant(manifest: Manifest, where: str) -> None:
    """Per-part precision is format 3 (an older reader must refuse it, not misread it), and
    each layer's overrides make a valid layout."""
    if manifest.per_part and manifest.format_version < PART_QUANT_VERSION:
        raise FormatError(f"{where}: parts stored at their own precision need format_version "
                          f"{PART_QUANT_VERSION} or later, not {manifest.format_version}; the "
                          "manifest was edited or damaged - re-convert the model")
    gate = manifest.ffn.gate is not None
    if gate != (manifest.format_version == GATE_RESIDENT_VERSION):
        raise FormatError(f"{where}: format_version {manifest.format_version} with "
                          f"{'a' if gate else 'no'} resident gate (version "
                          f"{GATE_RESIDENT_VERSION} is exactly the gate-resident dirs); the "
                          "manifest was edited or damaged - re-convert the model")
    for i in range(manifest.n_layers):
        try:
            manifest.layer_layout(i)
        except (FormatError, TypeError, ValueError) as e:
            raise FormatError(f"{where}: layer {i} quant: {e}") from e


def check_placement(manifest: Manifest, where: str) -> None:
    """Each layer's order is a permutation of its ids; hot ids are unique and in range."""
    placed = [i for i, e in enumerate(manifest.layers) if e.order is not None]
    if placed and manifest.format_version < PLACED_FORMAT_VERSION:
        raise FormatError(f"{where}: layer {placed[0]} has a neuron order but format_version is "
                          f"{manifest.format_version}, not {PLACED_FORMAT_VERSION} or later; the "
                          "manifest "
                          "was edited or damaged - re-run `mlx-flash place` or re-convert")
    for i, entry in enumerate(manifest.layers):
        for key in ("order", "hot"):
            ids = getattr(entry, key)
            if ids is not None:
                _check_ids(np.asarray(ids), entry.n_neurons, key == "order",
                           f"{where}: layer {i} {key}")


def _check_ids(ids: np.ndarray, n: int, whole: bool, what: str) -> None:
    fix = "re-run `mlx-flash place` on the dir (or re-convert it)"
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        raise FormatError(f"{what} must be a list of integer neuron ids; {fix}")
    if ids.size and (ids.min() < 0 or ids.max() >= n):
        raise FormatError(f"{what} has ids outside [0, {n}); {fix}")
    if np.unique(ids).size != ids.size:
        raise FormatError(f"{what} repeats neuron ids; {fix}")
    if whole and ids.size != n:
        raise FormatError(f"{what} has {ids.size} ids, not a permutation of all {n}; {fix}")


def file_entry(root: Path, rel: str, blocks: bool = False) -> dict:
    """{"file", "size", "sha256"} of root / rel, and its "blocks" checksums (one pass) when
    asked: the files read in parts or big enough for crc32's speed to matter (resident)."""
    path = root / rel
    sha256, sums = file_checks(path)
    return {"file": rel, "size": path.stat().st_size, "sha256": sha256,
            **({"blocks": sums} if blocks else {})}


def has_block_checksums(manifest: Manifest) -> bool:
    """Whether the resident file and every layer have block checksums (dirs made before them
    do not; side files such as predictors are checked whole by their sha256 at load)."""
    return bool(manifest.resident.get("blocks")) and all(e.blocks for e in manifest.layers)


def check_resident(root: str | Path, manifest: Manifest) -> bool:
    """What a loader checks before using a dir: resident.safetensors against its block
    checksums (read once; ChecksumError naming the file and the block). A dir made before
    block checksums gets one warning (how to add them) and returns False."""
    entry = manifest.resident
    if not has_block_checksums(manifest):
        warnings.warn(unverified_message(Path(root)), stacklevel=3)
    return check_file(Path(root) / entry["file"], entry["size"], entry.get("blocks"))


def add_block_checksums(root: str | Path, manifest: Manifest,
                        block_size: int | None = None) -> Manifest:
    """Record the block checksums of the resident file and every layer, after checking each
    file's sha256 (so damage is not blessed), then replace the manifest atomically.

    block_size: None = what convert writes (BLOCK_SIZE for the resident file, whole bundles
    for a layer: `bundle_block_size`)."""
    root = Path(root)

    def blocks_of(rel: str, sha256: str, default: int = BLOCK_SIZE) -> dict:
        got, blocks = file_checks(root / rel, block_size or default)
        if got != sha256:
            raise FormatError(f"{root / rel}: checksum mismatch, the file is corrupted; "
                              "re-convert the model (no checksums were written)")
        return blocks

    manifest.resident["blocks"] = blocks_of(manifest.resident["file"],
                                            manifest.resident["sha256"])
    for layer in manifest.layers:
        layer.blocks = blocks_of(layer.file, layer.sha256, bundle_block_size(layer.stride))
    write_text_atomic(root / MANIFEST, manifest.to_json())
    return manifest


def read_manifest(root: str | Path) -> Manifest:
    """Read and check the manifest of a flash model dir (cheap: sizes, not checksums)."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory; pass a flash model dir made by "
                                "`mlx-flash convert` (or `mlx-flash pull`)")
    if not path.exists():
        raise FormatError(f"{path} is missing: {root} is not a flash model dir "
                          "(make one with `mlx-flash convert SRC OUT`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON ({e}); re-convert the model") from e
    manifest = Manifest.from_dict(data, str(path))
    if manifest.placement:
        del data
        trim_heap()  # the parsed placement strings are garbage now: do not keep them as RSS
    check_shapes(manifest, str(path))
    check_sizes(root, manifest, str(path))
    check_headers(root, manifest)
    return manifest


def check_headers(root: Path, manifest: Manifest) -> None:
    """The resident safetensors header parses and stays inside its file (`tensor_sizes` raises
    FormatError naming the file); cheap, the data is not read. The resident matrices are stored
    in the bundles' dtype (`convert` writes both), so a bundle dtype edited to another of the
    same size still shows. The predictors file is checked when it is loaded, not here: a
    damaged one must not stop `train-predictors` from replacing it."""
    path = root / manifest.resident["file"]
    tensors = tensor_sizes(path)
    quantized = check_quantized_tensors(path, tensors, {**resident_quantization(manifest),
                                                        **gate_modules(manifest)},
                                        manifest.ffn.dtype)
    dtypes = {e.dtype for name, e in tensors.items() if len(e.shape) >= 2
              and name not in quantized}
    if dtypes and dtypes != {manifest.ffn.dtype}:
        raise FormatError(f"{root / MANIFEST}: ffn dtype {manifest.ffn.dtype} disagrees with "
                          f"{path}, whose matrices are {', '.join(sorted(dtypes))}: the manifest "
                          "was edited or damaged; re-convert the model")


def gate_modules(manifest: Manifest) -> dict[str, dict]:
    """Resident module path -> {"bits", "group_size"} of each layer's packed gate (format 4)."""
    gate = manifest.ffn.gate_resident
    if gate is None or not gate.packed:
        return {}
    return {gate_names(i)[0][: -len(".weight")]: {"bits": gate.bits,
                                                  "group_size": gate.group_size}
            for i in range(manifest.n_layers)}


def check_quantized_tensors(path: Path, tensors: dict, modules: dict[str, dict],
                            dtype: str) -> set[str]:
    """Each quantized module's `.weight` is (rows, cols * bits / 32) uint32 and its `.scales`
    and `.biases` are (rows, cols / group_size) in `dtype`; no other tensor is uint32. Returns
    the names of those tensors; raises FormatError naming the file and the tensor."""
    names = set()
    for base, params in modules.items():
        bits, group = params["bits"], params["group_size"]
        parts = [tensors.get(f"{base}.{k}") for k in ("weight", "scales", "biases")]
        weight, scales, biases = parts
        fine = (None not in parts and weight.dtype == "uint32" and len(weight.shape) == 2
                and scales.dtype == biases.dtype == dtype and scales.shape == biases.shape
                and len(scales.shape) == 2 and scales.shape[0] == weight.shape[0]
                and weight.shape[1] * 32 == scales.shape[1] * group * bits)
        if not fine:
            got = ", ".join(f"{k} {p.shape} {p.dtype}" if p else f"no {k}"
                            for k, p in zip(("weight", "scales", "biases"), parts, strict=True))
            raise FormatError(f"{path}: quantized tensor {base} ({got}) is not {bits}-bit MLX "
                              f"affine in groups of {group} with {dtype} scales and biases: the "
                              "file is damaged or was edited; re-convert the model")
        names.update(f"{base}.{k}" for k in ("weight", "scales", "biases"))
    stray = [name for name, e in tensors.items() if e.dtype == "uint32" and name not in names]
    if stray:
        raise FormatError(f"{path}: tensor {stray[0]} is packed uint32 but the manifest lists "
                          "no quantization for it; the manifest was edited or damaged - "
                          "re-convert the model")
    return names


def check_shapes(manifest: Manifest, where: str) -> None:
    """The FFN layout must agree with the architecture config."""
    cfg = manifest.config
    check_architecture(manifest, where)
    d_model, n_layers = cfg.get("hidden_size"), cfg.get("num_hidden_layers")
    if manifest.ffn.d_model != d_model:
        raise FormatError(f"{where}: bundle d_model {manifest.ffn.d_model} disagrees with "
                          f"config hidden_size {d_model}")
    if n_layers is not None and manifest.n_layers != n_layers:
        raise FormatError(f"{where}: {manifest.n_layers} FFN layers listed but config has "
                          f"num_hidden_layers={n_layers}")
    n_ffn = cfg.get("intermediate_size")
    for i, entry in enumerate(manifest.layers):
        if n_ffn is not None and entry.n_neurons != n_ffn:
            raise FormatError(f"{where}: layer {i} has {entry.n_neurons} neurons but config has "
                              f"intermediate_size={n_ffn}")
        layout = manifest.layer_layout(i)
        if entry.stride < layout.bundle_bytes:
            raise FormatError(f"{where}: layer {i} stride {entry.stride} is smaller than the "
                              f"bundle ({layout.bundle_bytes} bytes)")
        if entry.stride != round_up(layout.bundle_bytes, manifest.align):
            raise FormatError(f"{where}: layer {i} stride {entry.stride} is not the "
                              f"{layout.bundle_bytes}-byte bundle of the ffn layout "
                              f"(bits {layout.bits}, quant {layout.quant}, dtype {layout.dtype}, "
                              f"has_bias {layout.has_bias}) rounded up to align {manifest.align}: "
                              "the layout was edited or damaged; re-convert the model")
        if entry.size != entry.n_neurons * entry.stride:
            raise FormatError(f"{where}: layer {i} size {entry.size} != n_neurons*stride")


def check_architecture(manifest: Manifest, where: str) -> None:
    """config's model_type is a supported architecture whose FFN kind and activation are the
    layout's."""
    model_type = manifest.config.get("model_type")
    spec = ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None
    if spec is None:
        raise FormatError(f"{where}: config model_type {model_type!r} is not supported (supported:"
                          f" {', '.join(sorted(ARCHITECTURES))}); the manifest was edited or is "
                          "from another tool - re-convert the model")
    ffn = manifest.ffn
    if (ffn.model_kind, ffn.model_activation) != (spec.kind, spec.activation):
        raise FormatError(f"{where}: ffn kind {ffn.model_kind!r} activation "
                          f"{ffn.model_activation!r} "
                          f"disagrees with {model_type}, which is {spec.kind!r} "
                          f"{spec.activation!r}; re-convert the model")


def check_sizes(root: Path, manifest: Manifest, where: str = MANIFEST) -> None:
    """Every listed file is inside `root` (`contained`) and exists with the size the manifest
    says (catches truncation)."""
    for entry in listed_files(manifest):
        path = contained(root, entry["file"], where)
        if not path.exists():
            raise FormatError(f"{path} is missing; the model dir is incomplete, re-convert it")
        size = path.stat().st_size
        if size != entry["size"]:
            raise FormatError(f"{path} is {size} bytes but the manifest says {entry['size']}: "
                              "the file is truncated or was replaced; re-convert the model")


def verify_checksums(root: str | Path, manifest: Manifest | None = None, progress=None) -> None:
    """Full check: sha256 of every file against the manifest, and its block checksums where
    recorded (the same pass; a damaged table would refuse good reads). Slow (reads everything).
    """
    root = Path(root)
    manifest = manifest or read_manifest(root)
    for entry in listed_files(manifest):
        path = contained(root, entry["file"], str(root / MANIFEST))
        blocks = entry.get("blocks")
        if blocks:
            BlockTable(path, entry["size"], blocks)  # readable, the right length
            sha256, got = file_checks(path, blocks["block_size"])
        else:
            sha256, got = sha256_file(path), None
        if sha256 != entry["sha256"]:
            raise FormatError(f"{path}: checksum mismatch, the file is corrupted; re-convert "
                              "the model")
        if blocks and got != blocks:
            raise ChecksumError(f"{path}: its sha256 matches but its block checksums in the "
                                "manifest do not; rewrite them with `mlx-flash info DIR "
                                "--verify --write-checksums`")
        if progress is not None:
            progress(entry["size"])
