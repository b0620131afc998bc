"""The resident gate of a gate-resident dir (format 4, issue 21): act(gate x) for every neuron.

Such a dir keeps each layer's gate_proj in resident.safetensors (`format.manifest.gate_names`)
and only [up | down] in the bundles. Every FFN call first multiplies its input by the layer's
gate (the same kernels as the other resident matrices: `linear_q` / `linear16` on the fast CPU
path, `mx.quantized_matmul` or a matmul elsewhere), then

- the gate selector (`selectors/gate.py`) keeps, per token, the neurons whose |act(gate x)| is
  largest (CATS, arXiv 2404.08763): only their up/down rows are read, through the window;
- FlashFFN computes the bundles as a plain FFN with the identity activation whose mask is
  act(gate x) of those neurons: h = (up x) * act(gate x), exactly the gated FFN over them.

With every neuron selected it is the dense FFN (at the gate's stored precision).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..accel import build as accel_build
from ..accel.linear import to_f32_rows
from ..format.arch import ACTIVATION_FNS, np_activation
from ..format.errors import FormatError
from ..format.manifest import MANIFEST, RESIDENT, GateResident, Manifest, gate_names


def pop_gate(weights: dict[str, mx.array], manifest: Manifest, layer: int
             ) -> dict[str, mx.array] | None:
    """Take layer `layer`'s resident gate tensors out of the loaded resident weights
    ({"weight"} or {"weight", "scales", "biases"}), or None for a dir without them."""
    gate = manifest.ffn.gate_resident
    if gate is None:
        return None
    names = gate_names(layer) if gate.packed else gate_names(layer)[:1]
    missing = [name for name in names if name not in weights]
    if missing:
        raise FormatError(f"{MANIFEST}: the gate is resident but {RESIDENT} has no "
                          f"{missing[0]}; the dir is damaged - re-convert it")
    return {name.rsplit(".", 1)[1]: weights.pop(name) for name in names}


class ResidentGate:
    """Every layer's gate on the load's backend; `values(layer, x)` -> act(gate x) (T, n)."""

    def __init__(self, manifest: Manifest, backend):
        self.spec: GateResident = manifest.ffn.gate_resident
        self.cpu = backend.name == "cpu"
        self.act = ACTIVATION_FNS[self.spec.activation]
        self.layers: dict[int, dict] = {}
        self._last: tuple[int, object, np.ndarray] | None = None  # (layer, x, values)

    def add(self, layer: int, tensors: dict[str, mx.array]) -> None:
        """Keep layer `layer`'s gate (`pop_gate`'s tensors) as the backend computes it."""
        if not self.cpu:
            mx.eval(*tensors.values())
            self.layers[layer] = tensors
            return
        self.layers[layer] = {k: _host(v) for k, v in tensors.items()}

    def values(self, layer: int, x: mx.array | np.ndarray, rows: np.ndarray | None = None
               ) -> np.ndarray:
        """x: (T, d) -> act(gate x) (T, n) float32, or (T, k) for neurons `rows` only (a
        prefill's chunk: the whole (T, n) would be the prompt's length times n). The last
        whole-layer result is reused for the same x object (FlashFFN and the gate selector
        both ask for it)."""
        if rows is not None:
            return self._compute({k: (a[0][rows], a[1]) if self.cpu else a[mx.array(rows)]
                                  for k, a in self.layers[layer].items()}, x)
        last = self._last
        if last is not None and last[0] == layer and last[1] is x:
            return last[2]
        out = self._compute(self.layers[layer], x)
        self._last = (layer, x, out)
        return out

    def _compute(self, t: dict, x: mx.array | np.ndarray) -> np.ndarray:
        spec = self.spec
        if self.cpu:
            xf = to_f32_rows(x) if isinstance(x, mx.array) else np.ascontiguousarray(x)
            lib = accel_build.kernels()
            weight, dtype = t["weight"]
            if spec.packed:
                (scales, sdt), (biases, _) = t["scales"], t["biases"]
                pre = lib.linear_q(weight, scales, biases, spec.bits, spec.group_size, xf,
                                   scale_dtype=sdt)
            else:
                pre = lib.linear16(weight, dtype, xf)
            return np_activation(self.spec.activation, pre)  # no MLX buffers on this path
        xm = mx.array(x) if isinstance(x, np.ndarray) else x
        if spec.packed:
            pre = mx.quantized_matmul(xm, t["weight"], t["scales"], t["biases"], transpose=True,
                                      group_size=spec.group_size, bits=spec.bits)
        else:
            pre = xm @ t["weight"].T
        return np.asarray(self.act(pre).astype(mx.float32))


def _host(a: mx.array) -> tuple[np.ndarray, str]:
    """An MLX array as the C kernels take it: (numpy array - 16-bit values as their uint16
    bits - and its dtype name)."""
    name = str(a.dtype).rsplit(".", 1)[-1]
    if a.dtype in (mx.float16, mx.bfloat16):
        a = a.view(mx.uint16)
    return np.ascontiguousarray(np.array(a)), name
