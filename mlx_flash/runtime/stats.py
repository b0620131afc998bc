"""Per-token statistics: I/O, cache hits, and where the time went.

Library code only fills these in; the CLI prints them (`--verbose`) or dumps them
(`--stats-json`). The JSON schema is `RunStats.to_dict()` (documented in the README).
"""

from __future__ import annotations

import json
import resource
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from ..format.storage import write_text_atomic

TIME_KEYS = ("predictor", "io", "memory", "compute")


@dataclass
class TokenStats:
    """One decoded token (or one prefill call), summed over the layers."""

    tokens: int = 1  # tokens in this forward call (1 when decoding, the prompt when prefilling)
    bytes_read: int = 0
    reads: int = 0
    bytes_needed: int = 0  # new neurons x stride: bytes_read / bytes_needed = read amplification
    predictor_bytes: int = 0  # bytes the no-predictor oracle read to find the active neurons
    neurons_active: int = 0  # sum over layers of this token's active neurons
    neurons_new: int = 0  # read from flash for this token
    neurons_hit: int = 0  # active and already cached
    neurons_cached: int = 0  # live rows over all layers after the update
    truncated: int = 0  # active neurons the caches could not hold (streamed, not cached)
    bytes_wasted: int = 0  # read ahead for chunks that were then not needed (in bytes_read)
    emitted: int = 0  # tokens a speculative verification call produced (0: not one)
    seconds: dict = field(default_factory=lambda: dict.fromkeys(TIME_KEYS, 0.0))

    @property
    def hit_rate(self) -> float:
        return self.neurons_hit / self.neurons_active if self.neurons_active else 1.0

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    def to_dict(self) -> dict:
        out = asdict(self)
        out["hit_rate"] = self.hit_rate
        out["total_seconds"] = self.total_seconds
        return out


@dataclass
class RunStats:
    """Every forward call of a generation, plus totals."""

    steps: list[TokenStats] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)  # planned budget breakdown, bytes
    speculative: dict = field(default_factory=dict)  # SpecStats.totals() with a drafter
    generation: dict = field(default_factory=dict)  # GenerationResult.figures() of the last run

    def new_step(self, tokens: int) -> TokenStats:
        self.steps.append(TokenStats(tokens=tokens))
        return self.steps[-1]

    @property
    def current(self) -> TokenStats:
        return self.steps[-1]

    def decode_steps(self) -> list[TokenStats]:
        """Calls that produced tokens: one-token decodes and speculative verifications."""
        return [s for s in self.steps if s.tokens == 1 or s.emitted]

    def totals(self) -> dict:
        decode = self.decode_steps()
        n = sum(s.emitted or 1 for s in decode)  # tokens produced: per-token figures divide
        seconds = {k: sum(s.seconds[k] for s in decode) for k in TIME_KEYS}
        wall = sum(seconds.values())
        return {
            "decode_tokens": n,
            "prefill_tokens": sum(s.tokens for s in self.steps if s.tokens > 1 and not s.emitted),
            "bytes_read": sum(s.bytes_read for s in self.steps),
            "bytes_read_per_token": (sum(s.bytes_read for s in decode) / n) if n else 0.0,
            "reads_per_token": (sum(s.reads for s in decode) / n) if n else 0.0,
            "read_amplification": (sum(s.bytes_read for s in decode)
                                   / max(1, sum(s.bytes_needed for s in decode))),
            "hit_rate": (sum(s.neurons_hit for s in decode)
                         / max(1, sum(s.neurons_active for s in decode))),
            "ffn_seconds_per_token": {k: v / n if n else 0.0 for k, v in seconds.items()},
            "ffn_tokens_per_second": n / wall if wall else 0.0,
            "peak_rss_bytes": peak_rss_bytes(),
        }

    def to_dict(self) -> dict:
        out = {"settings": self.settings, "memory": self.memory, "totals": self.totals(),
               "steps": [s.to_dict() for s in self.steps]}
        if self.speculative:
            out["speculative"] = self.speculative
        if self.generation:
            out["generation"] = self.generation
        return out

    def write_json(self, path: str | Path) -> None:
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1))

    def reset(self) -> None:
        self.steps.clear()
        self.generation = {}


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def current_rss_bytes() -> int:
    return psutil.Process().memory_info().rss
