"""Re-encode a quantized GGUF as F16: the same model, tokenizer and metadata, F16 weights.

    python scripts/gguf_to_f16.py SRC.gguf DST.gguf

Why: mlx-flash converts a GGUF into f16 bundles (see mlx_flash/gguf.py), so comparing its
decode speed with llama.cpp on the Q4_K_M source compares two different weight precisions
(issue 11). No f16 GGUF of the default model can be downloaded here, so this writes one from the
quantized file: llama.cpp can then be measured at the same precision as mlx-flash. The weights
are the dequantized Q4_K_M ones (what mlx-flash itself runs), not the original bf16 checkpoint.

What it does:
- every quantized tensor (Q4_K, Q5_0, Q6_K, Q8_0, ...) is dequantized with llama.cpp's numpy
  reference (`gguf.quants.dequantize`, as mlx_flash.gguf does) and stored as F16; unquantized
  tensors (F32 norms and biases, F16, BF16, integer types) are copied byte for byte;
- every metadata key/value is copied with its original type (tokenizer, rope, architecture...),
  except `general.file_type`, set to MOSTLY_F16 so llama.cpp reports what the file holds;
- the header is parsed with mlx_flash.gguf's fast parser (gguf.GGUFReader takes ~16 s and
  ~540 MB on the default model's 152k-token vocabulary), and tensor data is streamed through
  `GGUFWriter.write_tensor_data` a bounded number of rows at a time, so memory holds a ~32 MB
  scratch buffer rather than a whole tensor (the embedding alone is 272 MB in f16);
- the output is written to a temporary name next to DST, fsync'ed, then renamed onto DST.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import mmap
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.quants import dequantize

if importlib.util.find_spec("mlx_flash") is None:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mlx_flash.offline.sources.gguf import (
    GGUF_ALIGNMENT,
    SCRATCH_BYTES,
    GGUFTensor,
    _Cursor,
    read_header,
)

UNQUANTIZED = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
               GGMLQuantizationType.F64, GGMLQuantizationType.I8, GGMLQuantizationType.I16,
               GGMLQuantizationType.I32, GGMLQuantizationType.I64}
FILE_TYPE_KEY = "general.file_type"


# ---------------------------------------------------------------- metadata


def read_typed_kv(path: Path) -> dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]]:
    """Metadata key -> (value, value type, array item type): what GGUFWriter needs to copy it.

    `read_header` drops the value types (UINT32 and INT32 both come back as int), so the
    key/value section is walked again here with the same cursor, keeping them.
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf, str(path))
        cur.take(8)  # magic + version, already checked by read_header
        cur.uint(8)  # tensor count
        kv = {}
        for _ in range(cur.uint(8)):
            key = cur.string()
            vtype = cur.value_type(cur.uint(4))
            sub = (cur.value_type(int.from_bytes(buf[cur.pos:cur.pos + 4], "little"))
                   if vtype == GGUFValueType.ARRAY else None)
            value = cur.value(vtype)
            kv[key] = (value.tolist() if isinstance(value, np.ndarray) else value, vtype, sub)
    return kv


def add_metadata(writer: GGUFWriter, kv: dict[str, tuple[Any, GGUFValueType, Any]]) -> None:
    """Copy every key/value into the writer (the architecture is already there)."""
    for key, (value, vtype, sub) in kv.items():
        if key == "general.architecture":
            continue  # GGUFWriter(arch=...) wrote it
        if key == FILE_TYPE_KEY:
            value = int(LlamaFileType.MOSTLY_F16)
        writer.add_key_value(key, value, vtype, sub)


# ---------------------------------------------------------------- tensors


def check_types(src: Path, tensors: dict[str, GGUFTensor]) -> None:
    """Fail before writing anything on a quantization type gguf-py cannot dequantize."""
    for qtype in sorted({t.qtype for t in tensors.values()} - UNQUANTIZED):
        try:
            dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
        except NotImplementedError:
            raise ValueError(f"{src}: GGML type {qtype.name} cannot be dequantized by the "
                             "installed gguf package (pip install -U gguf)") from None


class StreamedTensor:
    """One source tensor as GGUFWriter.write_tensor_data sees it: `nbytes` and `tofile`.

    `tofile` writes the tensor a bounded number of rows at a time: quantized rows dequantized
    to F16, unquantized bytes copied as they are. Little-endian in, little-endian out, so the
    writer never calls `byteswap`.
    """

    def __init__(self, src: Path, t: GGUFTensor):
        self.src, self.t = src, t
        self.quantized = t.qtype not in UNQUANTIZED
        self.nbytes = math.prod(t.shape) * 2 if self.quantized else t.nbytes

    def _raw(self, offset: int, nbytes: int) -> np.ndarray:
        raw = np.fromfile(self.src, dtype=np.uint8, count=nbytes, offset=offset)
        if raw.size != nbytes:
            raise ValueError(f"{self.src}: truncated at byte {offset + raw.size}")
        return raw

    def tofile(self, fout: IO[bytes]) -> None:
        t = self.t
        if not self.quantized:
            for start in range(0, t.nbytes, SCRATCH_BYTES):
                self._raw(t.offset + start, min(SCRATCH_BYTES, t.nbytes - start)).tofile(fout)
            return
        rows, cols = t.n_rows, t.shape[-1]
        row_bytes = t.nbytes // rows
        step = max(1, SCRATCH_BYTES // (4 * cols))  # f32 rows per dequantize call
        for r0 in range(0, rows, step):
            n = min(step, rows - r0)
            raw = self._raw(t.offset + r0 * row_bytes, n * row_bytes)
            rows16 = dequantize(raw.reshape(n, row_bytes), t.qtype).astype(np.float16)
            if not np.isfinite(rows16).all():
                raise ValueError(f"{self.src}: tensor {t.name} has values outside the float16 "
                                 "range after dequantization; it cannot be stored as F16")
            rows16.tofile(fout)


def add_tensor_infos(writer: GGUFWriter, streams: list[StreamedTensor]) -> None:
    """Declare every tensor: F16 for re-encoded ones, the source type for copied ones."""
    for s in streams:
        raw_dtype = None if s.quantized else s.t.qtype
        writer.add_tensor_info(s.t.name, s.t.shape, np.dtype(np.float16), s.nbytes, raw_dtype)


# ---------------------------------------------------------------- file


def write_f16(src: Path, tmp: Path) -> tuple[int, int]:
    """Write the F16 GGUF to `tmp` and fsync it; returns (tensors, tensors re-encoded)."""
    _, tensors = read_header(src)
    check_types(src, tensors)
    kv = read_typed_kv(src)
    arch = kv.get("general.architecture", (None,))[0]
    if not isinstance(arch, str):
        raise ValueError(f"{src}: no general.architecture string in the GGUF metadata")
    writer = GGUFWriter(tmp, arch)
    writer.data_alignment = int(kv.get("general.alignment", (GGUF_ALIGNMENT,))[0])
    streams = [StreamedTensor(src, t) for t in tensors.values()]
    try:
        add_metadata(writer, kv)
        add_tensor_infos(writer, streams)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for s in streams:
            writer.write_tensor_data(s)  # type: ignore[arg-type]  # duck-typed: nbytes, tofile
        fout = writer.fout[0]
        fout.flush()
        os.fsync(fout.fileno())
    finally:
        writer.close()
    return len(streams), sum(s.quantized for s in streams)


def convert(src: Path, dst: Path) -> tuple[int, int]:
    """SRC -> DST atomically: a temporary file in DST's folder, fsync'ed, then renamed."""
    if not src.is_file():
        raise FileNotFoundError(f"{src} does not exist or is not a file; pass a .gguf file "
                                "(`mlx-flash pull` fetches the default model's)")
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"output folder {dst.parent} does not exist")
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"{dst} is the input file; choose another output path")
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        counts = write_f16(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(dst.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename durable
    finally:
        os.close(dir_fd)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="quantized .gguf to read")
    parser.add_argument("dst", type=Path, help="F16 .gguf to write (replaced atomically)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        n, requantized = convert(args.src, args.dst)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    size = args.dst.stat().st_size
    print(f"wrote {args.dst} ({size / 1e6:.0f} MB): {n} tensors, {requantized} re-encoded as "
          f"F16, the rest copied, in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
