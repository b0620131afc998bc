"""A GGUF's FFN blocks carried into format-3 bundles (`convert --carry-ffn`): every affine type
(Q4_0, Q5_0, Q8_0 and the k-quants Q4_K, Q5_K, Q6_K) decomposes exactly into per-group scales,
biases and integers, and on the real default model the carried dir computes what the GGUF
holds."""

from __future__ import annotations

import os

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from mlx_flash.offline.sources.gguf import AFFINE, group_affine

ROWS, COLS = 4, 512


def raw_blocks(qtype: Q, seed: int = 0) -> np.ndarray:
    """A (ROWS, row_bytes) tensor of valid `qtype` blocks: the 32-value types quantized by
    gguf-py, the k-quants (which it cannot quantize) as random bits with finite f16 scales."""
    rng = np.random.default_rng(seed)
    if qtype in (Q.Q4_0, Q.Q5_0, Q.Q8_0):
        values = rng.normal(0, 0.1, (ROWS, COLS)).astype(np.float32)
        return gguf.quants.quantize(values, qtype)
    block_values, block_bytes = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (ROWS * COLS // block_values, block_bytes), dtype=np.uint8)
    d = rng.uniform(1e-3, 2e-2, len(blocks)).astype(np.float16).view(np.uint8).reshape(-1, 2)
    if qtype == Q.Q6_K:
        blocks[:, 208:210] = d
    else:  # d, dmin lead the block
        blocks[:, 0:2] = d
        blocks[:, 2:4] = d[::-1]
    return blocks.reshape(ROWS, -1)


@pytest.mark.parametrize("qtype", list(AFFINE), ids=lambda q: q.name)
def test_blocks_are_exactly_affine_groups(qtype):
    bits, group = AFFINE[qtype]
    raw = raw_blocks(qtype)
    want = gguf.quants.dequantize(raw, qtype).reshape(ROWS, -1, group)
    scales, biases = group_affine(raw, qtype)
    assert scales.shape == (ROWS, COLS // group)
    s, b = scales[..., None], biases[..., None]
    q = np.rint(np.divide(want - b, s, out=np.zeros_like(want), where=s != 0))
    assert q.min() >= 0 and q.max() < 2 ** bits
    np.testing.assert_allclose(s * q + b, want, rtol=0, atol=1e-6 * np.abs(want).max())


@pytest.mark.real_model
def test_real_model_ffn_carried_as_the_gguf_stores_it(tmp_path):
    """The default model's Q4_K_M FFN (gate/up Q5_0, down Q4_K or Q6_K by layer) carried: the
    layers keep their own types, and the dense rebuild gives the logits of the 16-bit dir
    dequantized from the same GGUF (up to float16 rounding)."""
    from mlx_flash.cli.common import default_model_dir
    from mlx_flash.format.manifest import read_manifest
    from mlx_flash.offline.convert import convert
    from mlx_flash.offline.sources.gguf import GGUFCheckpoint
    from mlx_flash.runtime.loader import load_dense

    try:
        flash16 = default_model_dir()
    except Exception as e:
        if os.environ.get("MLX_FLASH_REQUIRE_REAL_MODEL") == "1":
            raise
        pytest.skip(f"the default model could not be pulled ({e})")
    source = flash16.parent / "model.gguf"
    convert(source, tmp_path / "carried", carry_ffn=True)
    manifest, ckpt = read_manifest(tmp_path / "carried"), GGUFCheckpoint(source)
    for layer in range(manifest.n_layers):
        qtype = ckpt._names[ckpt.ffn_names(layer)["down"]].qtype
        down = manifest.layer_layout(layer).part_quant("down")
        bits, group = AFFINE[qtype]  # widened to 8 where the fast CPU path needs it
        assert (down.bits, down.group_size, down.axis) == (bits if bits in (4, 8) else 8,
                                                            group, "neurons")
    tokens = mx.array([[785, 6722, 315, 9625, 374, 220, 16, 17, 18]])
    want = np.array(load_dense(flash16, dtype="float32")[0](tokens))
    got = np.array(load_dense(tmp_path / "carried", dtype="float32")[0](tokens))
    assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()
    assert (got[0].argmax(-1) == want[0].argmax(-1)).mean() >= 0.85
