"""What every selector returns, and the top-k rule two of them use."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..store import IOStats


@dataclass
class Selection:
    ids: list[np.ndarray]  # per token, priority order (most important first)
    io: IOStats = field(default_factory=IOStats)  # what the selector itself read


def top_ids(score: np.ndarray, keep: float) -> np.ndarray:
    """(n,) scores -> the ceil(keep * n) best ids (at least one), best first; ties in id order
    when every id is kept."""
    return top_k(score, max(1, math.ceil(keep * score.size)))


def top_k(score: np.ndarray, k: int) -> np.ndarray:
    """(n,) scores -> the k best ids (1 <= k), best first; ties in id order when k >= n."""
    top = np.argpartition(-score, k - 1)[:k] if k < score.size else np.arange(score.size)
    return top[np.argsort(-score[top], kind="stable")]
