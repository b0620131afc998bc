"""Read planning: which byte spans of a bundle file to read for a set of neuron positions.

The disk is bound by the read count for small reads (`disk.py`): a 4 KiB read and a 32 KiB read
cost nearly the same. So reading the neurons at positions 10 and 13 as one span [10, 14) - two
unneeded bundles in between - can be cheaper than two reads. The planner merges neighbours across
gaps of at most `gap` missing neurons and picks, per call, the `gap` whose spans the cost model
prices lowest (every candidate is a vectorized pass over the sorted positions, ~20 us).

Planners:
  "neuron"  one read per neuron (what a store without coalescing does; the reference)
  "runs"    adjacent positions coalesced into one read, no gaps crossed
  "cost"    gaps crossed where the cost model says one larger read is cheaper

Read amplification = bytes read / bytes needed (needed = neurons x stride).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .disk import CostModel

PLANNERS = ("neuron", "runs", "cost")


GAP_CANDIDATES = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


DIRECT_ALIGN = 4096


@dataclass
class ReadPlan:
    """Spans [start, stop) of positions to read, in ascending order."""

    starts: np.ndarray  # (m,) int64
    stops: np.ndarray  # (m,) int64
    gap: int  # the largest gap crossed (neurons)
    seconds: float  # predicted device time

    @property
    def spans(self) -> list[tuple[int, int]]:
        return list(zip(self.starts.tolist(), self.stops.tolist(), strict=True))


def spans_across(pos: np.ndarray, gap: int) -> tuple[np.ndarray, np.ndarray]:
    """[start, stop) spans of sorted unique positions, merging across <= gap missing ones."""
    if pos.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    breaks = np.nonzero(np.diff(pos) > gap + 1)[0]
    starts = np.concatenate(([pos[0]], pos[breaks + 1]))
    stops = np.concatenate((pos[breaks], [pos[-1]])) + 1
    return starts.astype(np.int64), stops.astype(np.int64)


def span_bytes(starts: np.ndarray, stops: np.ndarray, stride: int, direct: bool) -> np.ndarray:
    """Bytes each span reads; O_DIRECT widens a span to page boundaries."""
    lo, hi = starts * stride, stops * stride
    if direct:
        lo = lo // DIRECT_ALIGN * DIRECT_ALIGN
        hi = -(-hi // DIRECT_ALIGN) * DIRECT_ALIGN
    return hi - lo


def plan_reads(pos: np.ndarray, stride: int, planner: str = "cost", cost: CostModel | None = None,
               *, threads: int = 8, direct: bool = False, max_read: int = 1 << 20,
               max_gap: int = 0) -> ReadPlan:
    """Spans to read for sorted unique positions `pos` (k,) of a file with this stride.

    "runs" crosses gaps of up to `max_gap` (fixed); "cost" needs `cost` and chooses the gap.
    """
    if planner not in PLANNERS:
        raise ValueError(f"read planner must be one of {PLANNERS}, got {planner!r}")
    if planner == "neuron":
        return _priced(pos, pos + 1, 0, stride, cost, threads, direct)
    if planner == "runs":
        return _priced(*spans_across(pos, max_gap), max_gap, stride, cost, threads, direct)
    if cost is None:
        raise ValueError("the 'cost' read planner needs a disk cost model")
    best = None
    for gap in GAP_CANDIDATES:
        if gap and gap * stride > max_read:
            break
        plan = _priced(*spans_across(pos, gap), gap, stride, cost, threads, direct)
        if best is None or plan.seconds < best.seconds:
            best = plan
        if plan.starts.size <= 1:
            break  # every larger gap gives the same single span
    return best


def _priced(starts, stops, gap, stride, cost, threads, direct) -> ReadPlan:
    seconds = 0.0
    if cost is not None and starts.size:
        seconds = float(cost.read_seconds(span_bytes(starts, stops, stride, direct),
                                          threads).sum())
    return ReadPlan(starts, stops, gap, seconds)


def split_spans(spans: list[tuple[int, int]], max_neurons: int) -> list[tuple[int, int]]:
    """Cut spans longer than max_neurons so one big request still spreads over the threads."""
    out = []
    for start, stop in spans:
        for s in range(start, stop, max_neurons):
            out.append((s, min(stop, s + max_neurons)))
    return out
