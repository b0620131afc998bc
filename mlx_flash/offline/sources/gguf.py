"""GGUF sources: llama.cpp's single-file checkpoints, read one tensor at a time.

`GGUFCheckpoint(path)` gives what `convert` needs from a .gguf file: an mlx_lm config built from
the GGUF metadata, the tensors in mlx_lm naming, each one dequantized on demand, and HF tokenizer
files built from the GGUF vocabulary.

The header (metadata, tensor table) is parsed here rather than with `gguf.GGUFReader`: the reader
makes one numpy array per vocabulary string, which for the default model (152k tokens, 151k
merges) costs ~8 s and ~500 MB before the first tensor is read. Tensor data is read with
`np.fromfile` at the tensor's offset, a bounded number of rows at a time, and dequantized with
`gguf.quants.dequantize` (llama.cpp's own numpy reference), so memory holds one output tensor
and a small scratch buffer, never the model.

Storage dtypes: quantized tensors are declared float16. Their blocks are `q * d (- m)` with f16
scales `d, m`, so f16 keeps ~11 significant bits, far finer than the quantization step, at half
the size of f32 (the default model's embedding alone is 272 MB in f16). Unquantized tensors keep
the dtype they have in the file (F32 norms and biases stay exact, BF16 stays bfloat16 bits).

Name map and fix-ups per architecture (llama.cpp's convert_hf_to_gguf.py does the forward way):
- llama: q/k rows were permuted from HF's half-split rotary layout to llama.cpp's interleaved
  one; `read` applies the inverse so mlx_lm's (HF-layout) llama computes the same thing.
- gemma3: norm weights were stored as `w + 1`; mlx_lm's Gemma RMSNorm adds 1 itself, so `read`
  subtracts it again.
"""

from __future__ import annotations

import json
import math
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import Q4_K, dequantize

from ...format.storage import NP_STORAGE, to_f32
from .base import Checkpoint, TensorInfo
from .gguf_tokenizer import build_tokenizer, tokenizer_config

GGUF_ALIGNMENT = 32  # default when `general.alignment` is absent (GGUF spec)


MAX_ARRAY_DEPTH = 8  # arrays of arrays: llama.cpp writes at most 2 levels; deeper is hostile


MAX_DIMS = 4  # GGML_MAX_DIMS


SCRATCH_BYTES = 32 << 20  # f32 rows dequantized per step: bounds the temporary memory


# general.architecture -> mlx_lm model_type
MODEL_TYPES = {"qwen2": "qwen2", "qwen3": "qwen3", "llama": "llama", "gemma3": "gemma3_text"}


_ATTN_FFN = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


_LLAMA_BLOCK = {**_ATTN_FFN, "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


_QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}


_GEMMA3_BLOCK = {
    **_ATTN_FFN,
    **_QK_NORM,
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


# general.architecture -> (blk.N.<gguf> -> model.layers.N.<mlx_lm>)
BLOCK_NAMES = {
    "qwen2": _LLAMA_BLOCK,
    "qwen3": {**_LLAMA_BLOCK, **_QK_NORM},
    "llama": _LLAMA_BLOCK,
    "gemma3": _GEMMA3_BLOCK,
}


GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                "output": "lm_head"}


SKIPPED = {"rope_freqs.weight"}  # llama3 rope factors: turned into config["rope_scaling"]


_NATIVE = {GGMLQuantizationType.F32: "float32", GGMLQuantizationType.F16: "float16",
           GGMLQuantizationType.BF16: "bfloat16"}  # unquantized types: their storage dtype


# GGML types whose 32-value blocks are exactly MLX affine groups of 32: w = d * (q - zero) with
# d the block's leading f16 scale and q in [0, 2**bits). type -> (bits, zero). convert stores
# such resident matrices as they are (`read_quantized`) instead of re-quantizing them.
CARRIED = {GGMLQuantizationType.Q8_0: (8, 128), GGMLQuantizationType.Q5_0: (5, 16),
           GGMLQuantizationType.Q4_0: (4, 8)}


# Types that are not carried but would lose much at 4 bits: re-quantized at these instead.
KEPT = {GGMLQuantizationType.Q6_K: {"bits": 8, "group_size": 32}}


# Every type whose values are exactly affine per group along a row, w = scale * q + bias with q
# in [0, 2**bits): type -> (bits, group). The k-quants' scales are products of the super-block's
# f16 d with 6-bit (Q4_K/Q5_K) or int8 (Q6_K) sub-block scales. An FFN carried into format-3
# bundles (`convert --carry-ffn`) keeps these blocks: gate/up rows at groups of 32 (MLX's
# smallest), down along the neurons at any of these groups.
AFFINE = {**{qtype: (bits, 32) for qtype, (bits, _) in CARRIED.items()},
          GGMLQuantizationType.Q4_K: (4, 32), GGMLQuantizationType.Q5_K: (5, 32),
          GGMLQuantizationType.Q6_K: (6, 16)}


def group_affine(raw: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, np.ndarray]:
    """Per-group (scale, bias) of `AFFINE` rows: raw (r, row_bytes) uint8 -> (r, groups) f32
    each, w = scale * q + bias."""
    rows, block_bytes = len(raw), GGML_QUANT_SIZES[qtype][1]
    if qtype in CARRIED:  # 32-value blocks led by their f16 d: w = d * (q - zero)
        d = raw.reshape(rows, -1, block_bytes)[:, :, :2].copy().view(np.float16)[..., 0]
        d = d.astype(np.float32)
        return d, -CARRIED[qtype][1] * d
    blocks = raw.reshape(-1, block_bytes)
    if qtype == GGMLQuantizationType.Q6_K:  # ql 128 | qh 64 | int8 scales 16 | d f16
        sc = blocks[:, 192:208].copy().view(np.int8).astype(np.float32)
        d = blocks[:, 208:210].copy().view(np.float16).astype(np.float32)
        scale = d * sc
        return scale.reshape(rows, -1), (-32 * scale).reshape(rows, -1)
    d, dmin = (blocks[:, i:i + 2].copy().view(np.float16).astype(np.float32) for i in (0, 2))
    sc, m = Q4_K.get_scale_min(blocks[:, 4:16])  # Q4_K and Q5_K share the 12-byte packing
    return (d * sc).reshape(rows, -1), (-dmin * m).reshape(rows, -1)


@dataclass(frozen=True)
class GGUFTensor:
    """One entry of the GGUF tensor table."""

    name: str  # GGUF name, e.g. "blk.0.ffn_up.weight"
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (rows, cols): GGUF lists dims fastest first
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def n_rows(self) -> int:
        return math.prod(self.shape[:-1])


_SCALARS = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}


class _Cursor:
    """Sequential little-endian reads over the mapped header bytes."""

    def __init__(self, buf: mmap.mmap, where: str):
        self.buf, self.pos, self.where = buf, 0, where

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.buf):
            raise ValueError(f"{self.where}: GGUF header is truncated at byte {self.pos}; the "
                             "file is incomplete, download it again")
        out, self.pos = self.buf[self.pos:end], end
        return out

    def uint(self, nbytes: int) -> int:
        return int.from_bytes(self.take(nbytes), "little")

    def string(self) -> str:
        return self.take(self.uint(8)).decode("utf-8", errors="replace")

    def value(self, vtype: int, depth: int = 0) -> Any:
        vtype = self.value_type(vtype)
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise ValueError(f"{self.where}: GGUF arrays nested more than {MAX_ARRAY_DEPTH} "
                                 f"deep at byte {self.pos}; the file is corrupt or hostile")
            item, count = self.value_type(self.uint(4)), self.uint(8)
            if item in _SCALARS:  # numeric arrays in one read (scores, token types)
                dtype = np.dtype(_SCALARS[item])
                return np.frombuffer(self.take(count * dtype.itemsize), dtype).copy()
            return [self.value(item, depth + 1) for _ in range(count)]
        dtype = np.dtype(_SCALARS[vtype])
        return np.frombuffer(self.take(dtype.itemsize), dtype)[0].item()

    def value_type(self, code: int) -> GGUFValueType:
        try:
            return GGUFValueType(code)
        except ValueError:
            raise ValueError(f"{self.where}: unknown GGUF value type {code} at byte {self.pos}; "
                             "the file is corrupt or from a newer GGUF version") from None


def read_header(path: str | Path) -> tuple[dict[str, Any], dict[str, GGUFTensor]]:
    """Metadata (key -> python value, numeric arrays as numpy) and the tensor table of a GGUF."""
    path = Path(path)
    size = path.stat().st_size
    if size < 24:
        raise ValueError(f"{path}: {size} bytes is too small to be a GGUF file")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf, str(path))
        magic = cur.take(4)
        if magic != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (magic {magic!r}); pass a .gguf file")
        version = cur.uint(4)
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 and 3 are; "
                             "big-endian files are not); re-export it with a current llama.cpp")
        n_tensors, n_kv = cur.uint(8), cur.uint(8)
        meta = {}
        for _ in range(n_kv):
            key = cur.string()
            meta[key] = cur.value(cur.uint(4))
        entries = [_tensor_entry(cur) for _ in range(n_tensors)]
        align = _alignment(meta, path)
        base = -(-cur.pos // align) * align  # tensor data starts at the next aligned byte
    tensors = {}
    for name, dims, code, offset in entries:
        if name in tensors:
            raise ValueError(f"{path}: tensor {name} is listed twice in the tensor table; the "
                             "file is corrupt, download or export it again")
        tensors[name] = _tensor(path, name, dims, code, base + offset)
        if tensors[name].offset + tensors[name].nbytes > size:
            raise ValueError(f"{path}: tensor {name} ends past the end of the file ({size} "
                             "bytes): the file is truncated; download it again")
    return meta, tensors


def _alignment(meta: dict[str, Any], path: Path) -> int:
    """`general.alignment`: a power of two (the GGUF spec), GGUF_ALIGNMENT when absent."""
    align = meta.get("general.alignment", GGUF_ALIGNMENT)
    if not isinstance(align, int) or isinstance(align, bool) or align < 1 \
            or align & (align - 1) or align > 1 << 30:
        raise ValueError(f"{path}: general.alignment {align!r} is not a power of two; the file "
                         "is corrupt, download or export it again")
    return align


def _tensor_entry(cur: _Cursor) -> tuple[str, list[int], int, int]:
    name, n_dims = cur.string(), cur.uint(4)
    if not 1 <= n_dims <= MAX_DIMS:
        raise ValueError(f"{cur.where}: tensor {name} has {n_dims} dimensions (GGUF allows 1 to "
                         f"{MAX_DIMS}); the file is corrupt, download or export it again")
    dims = [cur.uint(8) for _ in range(n_dims)]
    return name, dims, cur.uint(4), cur.uint(8)


def _tensor(path: Path, name: str, dims: list[int], code: int, offset: int) -> GGUFTensor:
    try:
        qtype = GGMLQuantizationType(code)
    except ValueError:
        raise ValueError(f"{path}: tensor {name} has unknown GGML type {code}; the file is "
                         "newer than the installed gguf package (pip install -U gguf)") from None
    block, type_size = GGML_QUANT_SIZES[qtype]
    if dims[0] % block:
        raise ValueError(f"{path}: tensor {name} row length {dims[0]} is not a multiple of the "
                         f"{qtype.name} block size {block}")
    shape = tuple(int(d) for d in reversed(dims))
    return GGUFTensor(name, qtype, shape, offset, math.prod(shape) // block * type_size)


class GGUFCheckpoint(Checkpoint):
    """A .gguf file of a supported architecture (see `MODEL_TYPES`), read tensor by tensor."""

    kind = "gguf"
    group_size = 32  # its blocks' width (4-bit re-quantized, default model: ppl +18%, g64 +23%)

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} does not exist; pass a .gguf file (or run "
                                    "`mlx-flash pull` for the default model)")
        self.meta, self._gguf = read_header(self.path)
        self.arch = self.meta.get("general.architecture")
        if self.arch not in MODEL_TYPES:
            raise ValueError(
                f"{self.path}: GGUF architecture {self.arch!r} is not supported (supported: "
                f"{', '.join(sorted(MODEL_TYPES))}); convert from the HF safetensors model "
                "instead, or open an issue with the GGUF's metadata"
            )
        self._check_types()
        self._names = self._map_names()  # mlx_lm name -> GGUF tensor
        self.config = self._build_config()
        self._infos = {name: TensorInfo(name, t.shape, self._dtype(name, t))
                       for name, t in self._names.items()}
        self.spec()

    # -- names and dtypes

    def _check_types(self) -> None:
        """Fail at open, not halfway through a conversion, on types we cannot dequantize."""
        for qtype in sorted({t.qtype for t in self._gguf.values()} - set(_NATIVE)):
            type_size = GGML_QUANT_SIZES[qtype][1]
            try:
                dequantize(np.zeros((1, type_size), np.uint8), qtype)
            except NotImplementedError:
                names = [t.name for t in self._gguf.values() if t.qtype == qtype]
                raise ValueError(
                    f"{self.path}: tensor {names[0]} uses GGML type {qtype.name}, which the "
                    "installed gguf package cannot dequantize (pip install -U gguf, or use a "
                    "GGUF with F16/BF16/F32/Q4_K/Q5_0/Q6_K/Q8_0-style types)") from None

    def _map_names(self) -> dict[str, GGUFTensor]:
        names = {}
        for gname, t in self._gguf.items():
            if gname in SKIPPED:
                continue
            names[self._mlx_name(gname)] = t
        return names

    def _mlx_name(self, gname: str) -> str:
        parts = gname.split(".")
        base, suffix = ".".join(parts[:-1]), parts[-1]
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in BLOCK_NAMES[self.arch]:
            return f"model.layers.{parts[1]}.{BLOCK_NAMES[self.arch][parts[2]]}.{suffix}"
        if base in GLOBAL_NAMES:
            return f"{GLOBAL_NAMES[base]}.{suffix}"
        raise ValueError(f"{self.path}: tensor {gname} has no mlx_lm equivalent for "
                         f"architecture {self.arch!r}; this GGUF variant is not supported")

    def _shifted_norm(self, name: str) -> bool:
        return self.arch == "gemma3" and name.endswith("norm.weight")

    def _dtype(self, name: str, t: GGUFTensor) -> str:
        if self._shifted_norm(name):
            return "float32"  # 1 is subtracted in f32; these are tiny
        return _loaded_dtype(t)

    # -- the Checkpoint interface

    def tensors(self) -> dict[str, TensorInfo]:
        return dict(self._infos)

    def read(self, name: str) -> np.ndarray:
        """One tensor, shape `TensorInfo.shape` (e.g. (n_out, n_in) for a Linear weight)."""
        if name not in self._names:
            raise KeyError(f"{self.path}: no tensor {name}")
        t, info = self._names[name], self._infos[name]
        arr = self._load(t)
        if self._shifted_norm(name):
            arr = to_f32(arr, _loaded_dtype(t)) - np.float32(1)
        if self.arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            arr = unpermute_rows(arr, self.config["num_attention_heads"])
        if self.arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            arr = unpermute_rows(arr, self.config["num_key_value_heads"])
        assert arr.shape == info.shape, (name, arr.shape, info.shape)
        return arr

    def quantization_for(self, name: str) -> dict | None:
        """A matrix's own block format when it is MLX affine (`CARRIED`, groups of 32), the
        bits that keep a finer type's precision (`KEPT`), else None. Carried linears are
        widened to 4 or 8 bits (the same integers, still exact: Q5_0 -> 8) because the fast
        CPU path computes those widths only; an untied embedding table, only looked up, keeps
        its own bits."""
        t = self._names[name]
        if len(t.shape) != 2 or t.shape[-1] % 32 or self._shifted_norm(name):
            return None
        if t.qtype not in CARRIED:
            return KEPT.get(t.qtype)
        bits = CARRIED[t.qtype][0]
        looked_up = name == "model.embed_tokens.weight" and "lm_head.weight" in self._names
        return {"bits": bits if looked_up or bits in (4, 8) else 8, "group_size": 32}

    def ffn_quantization(self, name: str) -> dict | None:
        """{"bits", "group_size"} of an FFN matrix's own blocks when they are exactly affine
        (`AFFINE`, k-quants included), else None."""
        t = self._names[name]
        if t.qtype not in AFFINE or len(t.shape) != 2:
            return None
        bits, group = AFFINE[t.qtype]
        return {"bits": bits, "group_size": group}

    def read_quantized(self, name: str, bits: int, group_size: int
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """An `AFFINE` matrix's blocks at `bits` >= its own and its own group size: (q (r, c)
        uint8, scales, biases (r, c / group) float32), exact (scale * k is exact in f32 for
        these small integers k, so q = (w - bias) / scale recovers the stored integers from
        llama.cpp's own dequantization). None for other types or params."""
        t = self._names[name]
        if t.qtype not in AFFINE or bits < AFFINE[t.qtype][0] \
                or group_size != AFFINE[t.qtype][1]:
            return None
        rows, cols = t.shape
        row_bytes, q = t.nbytes // rows, np.empty((rows, cols), np.uint8)
        scales = np.empty((rows, cols // group_size), np.float32)
        biases = np.empty_like(scales)
        step = max(1, SCRATCH_BYTES // (4 * cols))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            raw = self._bytes(t.offset + r0 * row_bytes, (r1 - r0) * row_bytes).reshape(
                r1 - r0, row_bytes)
            scales[r0:r1], biases[r0:r1] = group_affine(raw, t.qtype)
            w = dequantize(raw, t.qtype).reshape(r1 - r0, -1, group_size)
            s, b = scales[r0:r1, :, None], biases[r0:r1, :, None]
            k = np.divide(w - b, s, out=np.zeros_like(w), where=s != 0)
            q[r0:r1] = np.rint(k).reshape(r1 - r0, cols)
        if self.arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = self.config["num_attention_heads" if "q_proj" in name
                                else "num_key_value_heads"]
            q, scales, biases = (unpermute_rows(a, heads) for a in (q, scales, biases))
        return q, scales, biases

    def files(self) -> list[Path]:
        return [self.path]

    def write_tokenizer(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        build_tokenizer(self.meta, str(self.path)).save(str(out_dir / "tokenizer.json"))
        config = tokenizer_config(self.meta)
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))

    # -- reading

    def _bytes(self, offset: int, nbytes: int) -> np.ndarray:
        raw = np.fromfile(self.path, dtype=np.uint8, count=nbytes, offset=offset)
        if raw.size != nbytes:
            raise ValueError(f"{self.path}: truncated at byte {offset + raw.size}; download "
                             "the file again")
        return raw

    def _load(self, t: GGUFTensor) -> np.ndarray:
        """The stored tensor: unquantized types as they are, quantized ones dequantized to f16."""
        if t.qtype in _NATIVE:
            stored = NP_STORAGE[_NATIVE[t.qtype]]
            return self._bytes(t.offset, t.nbytes).view(stored).reshape(t.shape)
        rows, cols = t.n_rows, t.shape[-1]
        row_bytes = t.nbytes // rows
        out = np.empty((rows, cols), np.float16)
        step = max(1, SCRATCH_BYTES // (4 * cols))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            raw = self._bytes(t.offset + r0 * row_bytes, (r1 - r0) * row_bytes)
            out[r0:r1] = dequantize(raw.reshape(r1 - r0, row_bytes), t.qtype)  # f32 -> f16
            if not np.isfinite(out[r0:r1]).all():
                raise ValueError(f"{self.path}: tensor {t.name} has values outside the float16 "
                                 "range after dequantization; this model cannot be stored in f16")
        return out.reshape(t.shape)

    # -- config

    def _get(self, key: str, default: Any = None, required: bool = False) -> Any:
        full = f"{self.arch}.{key}"
        if required and full not in self.meta:
            raise ValueError(f"{self.path}: GGUF metadata has no {full}; the file is incomplete "
                             "or was written by an old converter")
        value = self.meta.get(full, default)
        return value.item() if isinstance(value, np.generic) else value

    def _count(self, key: str, default: Any = None, required: bool = False) -> int:
        """A positive integer from the metadata; ValueError naming the file and key else."""
        value = self._get(key, default, required)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{self.path}: GGUF metadata {self.arch}.{key} is {value!r}, not a "
                             "positive integer; the file is corrupt or was edited - download "
                             "or export it again")
        return value

    def _build_config(self) -> dict:
        heads = self._count("attention.head_count", required=True)
        hidden = self._count("embedding_length", required=True)
        if "model.embed_tokens.weight" not in self._names:
            raise ValueError(f"{self.path}: no token_embd.weight tensor; not a complete model")
        config = {
            "model_type": MODEL_TYPES[self.arch],
            "hidden_size": hidden,
            "num_hidden_layers": self._count("block_count", required=True),
            "intermediate_size": self._ffn_length(),
            "num_attention_heads": heads,
            "num_key_value_heads": self._count("attention.head_count_kv", heads),
            "rms_norm_eps": _f32(self._get("attention.layer_norm_rms_epsilon", required=True)),
            "rope_theta": _f32(self._get("rope.freq_base", 10000.0)),
            "vocab_size": self._names["model.embed_tokens.weight"].shape[0],
            "tie_word_embeddings": "lm_head.weight" not in self._names,
            "max_position_embeddings": self._count("context_length", 4096),
            **self._special_ids(),
        }
        rope_scaling = self._rope_scaling(config)
        if rope_scaling:
            config["rope_scaling"] = rope_scaling
        config.update(self._arch_config(config))
        return config

    def _ffn_length(self) -> int:
        value = self._get("feed_forward_length", required=True)
        array = np.atleast_1d(value)
        if array.dtype.kind not in "iu" or array.size == 0 or array.min() < 1:
            raise ValueError(f"{self.path}: GGUF metadata {self.arch}.feed_forward_length is "
                             f"{value!r}, not positive integers; the file is corrupt or was "
                             "edited - download or export it again")
        sizes = {int(v) for v in array}
        if len(sizes) != 1:
            raise ValueError(f"{self.path}: per-layer FFN sizes {sorted(sizes)} are not "
                             "supported (mlx-flash needs one intermediate_size)")
        return sizes.pop()

    def _special_ids(self) -> dict:
        ids = {}
        eos = [self.meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        eos = list(dict.fromkeys(int(i) for i in eos if i is not None))
        if eos:
            ids["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        if "tokenizer.ggml.bos_token_id" in self.meta:
            ids["bos_token_id"] = int(self.meta["tokenizer.ggml.bos_token_id"])
        return ids

    def _head_dim(self, config: dict) -> int:
        default = config["hidden_size"] // config["num_attention_heads"]
        return int(self._get("attention.key_length", self._get("rope.dimension_count", default)))

    def _arch_config(self, config: dict) -> dict:
        head_dim = self._head_dim(config)
        if self.arch == "llama":
            return {"head_dim": head_dim,
                    "attention_bias": "model.layers.0.self_attn.q_proj.bias" in self._names,
                    "mlp_bias": "model.layers.0.mlp.up_proj.bias" in self._names}
        if self.arch == "qwen3":
            return {"head_dim": head_dim}
        if self.arch == "gemma3":
            # llama.cpp scales queries by 1/sqrt(hidden/heads) for the 27B (62 layers) and by
            # 1/sqrt(head_dim) otherwise; it hardcodes the local rope base and the 5:1 pattern.
            big = config["num_hidden_layers"] == 62
            return {"head_dim": head_dim,
                    "query_pre_attn_scalar": config["hidden_size"] // config[
                        "num_attention_heads"] if big else head_dim,
                    "sliding_window": int(self._get("attention.sliding_window", 512)),
                    "sliding_window_pattern": sliding_window_pattern(
                        self._get("attention.sliding_window_pattern", 6), str(self.path)),
                    "rope_local_base_freq": 10000.0}
        return {}

    def _rope_scaling(self, config: dict) -> dict | None:
        if "rope_freqs.weight" in self._gguf:
            factors = to_f32(self._load(self._gguf["rope_freqs.weight"]), "float32")
            return llama3_rope_scaling(factors, self._head_dim(config), config["rope_theta"],
                                       str(self.path))
        kind = self._get("rope.scaling.type", "none")
        factor = self._get("rope.scaling.factor", 1.0)
        if kind == "none" or (kind == "linear" and factor == 1.0):
            return None
        if kind == "linear":
            return {"type": "linear", "factor": _f32(factor)}
        if kind == "yarn":
            original = self._get("rope.scaling.original_context_length", required=True)
            return {"type": "yarn", "factor": _f32(factor),
                    "original_max_position_embeddings": int(original)}
        raise ValueError(f"{self.path}: rope scaling {kind!r} is not supported (none, linear, "
                         "yarn, llama3 rope_freqs are)")


def _loaded_dtype(t: GGUFTensor) -> str:
    """Unquantized tensors keep their dtype; quantized ones are dequantized to float16."""
    return _NATIVE.get(t.qtype, "float16")


def _f32(value: float) -> float:
    """A float32 metadata value as the short decimal it was written from (9.99e-07 -> 1e-06)."""
    return float(str(np.float32(value)))


def sliding_window_pattern(value: int | np.ndarray, where: str) -> int:
    """mlx_lm's period of global layers from the GGUF's: an int, or per-layer "is sliding" flags
    (layer i slides unless (i + 1) % period == 0)."""
    if np.ndim(value) == 0:
        return int(value)
    flags = np.asarray(value, dtype=bool)
    period = int(np.argmin(flags)) + 1 if not flags.all() else len(flags) + 1
    if not np.array_equal(flags, (np.arange(len(flags)) + 1) % period != 0):
        raise ValueError(f"{where}: sliding-window layers {flags.tolist()} do not follow a "
                         "fixed period, which mlx_lm's gemma3 needs")
    return period


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation.

    w: (n_head * head_dim, d_in) weight or (n_head * head_dim,) bias. llama.cpp reorders each
    head's rows from HF's [first halves | second halves] rotary layout to interleaved pairs:
    `w.reshape(n_head, 2, head_dim // 2, ...).swapaxes(1, 2)`. This is the inverse.
    """
    rows, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def llama3_factors(scaling: dict, head_dim: int, base: float) -> np.ndarray:
    """Per-frequency divisors of llama3 rope scaling, (head_dim // 2,), as llama.cpp stores them."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * np.pi * base ** (np.arange(0, head_dim, 2) / head_dim)
    smooth = (old / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, mid))


def llama3_rope_scaling(factors: np.ndarray, head_dim: int, base: float, where: str) -> dict:
    """Recover mlx_lm's llama3 `rope_scaling` from the GGUF `rope_freqs` tensor.

    factors: (head_dim // 2,). The GGUF keeps only the factors, so the three shape parameters
    are Llama 3.1's (1, 4, 8192) and checked against them.
    """
    scaling = {"type": "llama3", "factor": float(factors.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    expected = llama3_factors(scaling, head_dim, base)
    if expected.shape != factors.shape or not np.allclose(expected, factors, rtol=1e-3):
        raise ValueError(f"{where}: rope_freqs does not match llama3 rope scaling with "
                         "low/high freq factors 1/4 and 8192 original positions; convert from "
                         "the HF model instead")
    return scaling
