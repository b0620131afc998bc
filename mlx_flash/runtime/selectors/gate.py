"""The gate selector (CATS, arXiv 2404.08763): a gate-resident dir's act(gate x) says which
neurons a token needs; only their up/down rows are read (runtime/gate.py)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..config import check_fraction
from ..gate import ResidentGate
from .base import Selection, top_ids

DEFAULT_KEEP = 0.5


class GateSelector:
    """Per token, the `keep` fraction of neurons with the largest |act(gate x)| (CATS's
    criterion, a per-token top-k instead of a calibrated threshold), best first."""

    def __init__(self, gate: ResidentGate, keep: float = DEFAULT_KEEP):
        check_fraction("keep", keep)
        self.gate, self.keep = gate, keep

    @property
    def fixed(self) -> bool:
        return self.keep >= 1.0  # every neuron every call: the runtime may read ahead

    def select(self, layer: int, x: mx.array) -> Selection:
        """x: (T, d) evaluated -> each token's kept ids, largest |act(gate x)| first."""
        g = np.abs(self.gate.values(layer, x))
        return Selection([top_ids(row, self.keep) for row in g])
