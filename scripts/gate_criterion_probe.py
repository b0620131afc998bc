"""Which per-token score picks the FFN neurons that matter, given what is in DRAM (issue 21)?

For sampled layers of a flash dir's dense rebuild, on the first tokens of a text: the relative
error of the FFN output when each token keeps only its top `keep` neurons by each score,
||y_kept - y|| / ||y|| (mean over tokens and layers), with h = silu(g x) * (u x):

- oracle |h|           the true activations (needs gate and up rows)
- gate |silu(g x)|     CATS: the gate alone (a gate-resident dir's `--selector gate`)
- gate * up{2,3}bit    the exact gate times a 2/3-bit copy of up (MLX affine, group 64)
- gate * up_rank{r}    the exact gate times a rank-r SVD of up

    python scripts/gate_criterion_probe.py DIR --layers 1,7,14,21,27 [--tokens 256]
        [--text-file F] [--keep 0.3,0.5,0.7] [--no-svd]

The SVD of a 1.5B's up matrices takes most of the ~10 min a run of 5 layers takes here.
"""

from __future__ import annotations

import argparse

import mlx.core as mx
import numpy as np

from mlx_flash import load_dense


def dense_weight(linear) -> np.ndarray:
    """An mlx_lm Linear / QuantizedLinear's weight as f32 numpy (rows, cols)."""
    if hasattr(linear, "scales"):
        w = mx.dequantize(linear.weight, linear.scales, linear.biases,
                          group_size=linear.group_size, bits=linear.bits)
    else:
        w = linear.weight
    return np.array(w.astype(mx.float32))


def record_ffn_inputs(model, ids: list[int], layers: list[int]) -> dict[int, np.ndarray]:
    """Each layer's FFN input (T, d) for one forward pass over ids."""
    seen, blocks = {}, model.model.layers
    originals = {i: blocks[i].mlp for i in layers}

    def recorder(i):
        def call(x):
            seen[i] = np.array(x.reshape(-1, x.shape[-1]).astype(mx.float32))
            return originals[i](x)
        return call

    for i in layers:
        blocks[i].mlp = recorder(i)
    try:
        model(mx.array([ids]))
    finally:
        for i in layers:
            blocks[i].mlp = originals[i]
    return seen


def scores(x: np.ndarray, gate: np.ndarray, up: np.ndarray, svd: bool) -> tuple[np.ndarray,
                                                                                dict]:
    """h (T, n) and each criterion's (T, n) score."""
    g = x @ gate.T
    act = g / (1.0 + np.exp(-g))
    h = act * (x @ up.T)
    out = {"oracle |h|": np.abs(h), "gate |silu(g x)|": np.abs(act)}
    for bits in (2, 3):
        q = mx.quantize(mx.array(up), group_size=64, bits=bits)
        approx = np.array(mx.dequantize(*q, group_size=64, bits=bits))
        out[f"gate * up{bits}bit"] = np.abs(act * (x @ approx.T))
    if svd:
        u, s, vt = np.linalg.svd(up, full_matrices=False)
        for rank in (64, 256):
            approx = (u[:, :rank] * s[:rank]) @ vt[:rank]
            out[f"gate * up_rank{rank}"] = np.abs(act * (x @ approx.T))
    return h, out


def kept_error(h: np.ndarray, down: np.ndarray, score: np.ndarray, keep: float) -> float:
    """Mean over tokens of ||y_kept - y|| / ||y||, keeping each token's top-k by score."""
    k = max(1, int(keep * h.shape[1]))
    top = np.argpartition(-score, k - 1, axis=1)[:, :k]
    mask = np.zeros_like(h)
    np.put_along_axis(mask, top, 1.0, axis=1)
    y = h @ down.T
    return float(np.mean(np.linalg.norm((h * mask) @ down.T - y, axis=1)
                         / np.linalg.norm(y, axis=1)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir")
    p.add_argument("--layers", required=True, help="comma-separated layer indices")
    p.add_argument("--text-file", default="/usr/lib/python3.11/textwrap.py")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--keep", default="0.3,0.5,0.7")
    p.add_argument("--no-svd", action="store_true")
    args = p.parse_args()
    model, tokenizer = load_dense(args.dir, dtype="float32")
    with open(args.text_file, encoding="utf-8") as f:
        ids = tokenizer.encode(f.read())[:args.tokens]
    layers = [int(t) for t in args.layers.split(",")]
    inputs = record_ffn_inputs(model, ids, layers)
    errors: dict[tuple[float, str], list[float]] = {}
    for i in layers:
        mlp = model.model.layers[i].mlp
        gate, up, down = (dense_weight(m) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        h, by_name = scores(inputs[i], gate, up, not args.no_svd)
        for keep in (float(k) for k in args.keep.split(",")):
            for name, score in by_name.items():
                errors.setdefault((keep, name), []).append(kept_error(h, down, score, keep))
    print(f"{args.dir}: {len(ids)} tokens of {args.text_file}, layers {layers}")
    for (keep, name), values in errors.items():
        print(f"keep {keep:.1f}  {name:20s} relative FFN error {np.mean(values):.4f}")


if __name__ == "__main__":
    main()
