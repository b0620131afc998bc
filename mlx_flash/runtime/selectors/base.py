"""What every selector returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..store import IOStats


@dataclass
class Selection:
    ids: list[np.ndarray]  # per token, priority order (most important first)
    io: IOStats = field(default_factory=IOStats)  # what the selector itself read
