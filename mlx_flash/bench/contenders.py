"""The benchmark's contenders: what each process loads, and with which options."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Contender:
    """One process to run: what to load and with which options."""

    name: str
    kind: str  # "dense" | "flash" | "mmap" | "llama_cpp"
    label: str
    options: dict = field(default_factory=dict)  # for load() (flash) or the loader
    capped: bool = True  # dense runs without a cap
    skip: str | None = None  # why it does not run (stays in the report)


ABLATIONS = ("flash-window1", "flash-no-predictor", "flash-no-bundling", "flash-threads1")
# Issue 9: the read planner, placement and pinning (the placed ones need --placed DIR).
IO_ABLATIONS = ("flash-per-neuron", "flash-runs", "flash-placed", "flash-placed-pinned")
ALL_CONTENDERS = ("dense", "naive", "mmap", "llama.cpp", "flash") + ABLATIONS + IO_ABLATIONS


def flash_defaults(has_predictors: bool, keep: float) -> tuple[dict, str]:
    """load() options of the default mlx-flash contender, and how to describe its selector."""
    if has_predictors:
        return {"selector": "predictor", "window": 5, "threads": 8}, "predictor"
    # Without predictors every neuron is active (exact): the cached ones come from DRAM, the
    # rest is streamed. The oracle's top-k (flash-no-predictor) must read every layer whole to
    # select, so it cannot beat naive flash; it stays as an ablation.
    return ({"selector": "oracle", "oracle_rule": "all", "window": 5, "threads": 8},
            "no predictors: every neuron, cached ones from DRAM, the rest streamed")


def build_contenders(names: list[str], has_predictors: bool, keep: float,
                     gguf: Path | None, llama_ok: str | None, placed: Path | None = None,
                     pin_hot: float = 0.25) -> list[Contender]:
    """The contenders to run, in order. llama_ok: None if llama_cpp imports, else why not."""
    unknown = sorted(set(names) - set(ALL_CONTENDERS))
    if unknown:
        raise ValueError(f"unknown contenders {unknown}; choose from {', '.join(ALL_CONTENDERS)}")
    base, how = flash_defaults(has_predictors, keep)
    table = {
        "dense": Contender("dense", "dense", "dense mlx_lm, whole model in DRAM, no cap",
                           {"fast_cpu": None}, capped=False),
        "naive": Contender("naive", "flash", "naive flash: whole FFN streamed every token",
                           {"naive": True, "threads": 8}),
        "mmap": Contender("mmap", "mmap", "mmap'd FFN, dense compute block by block "
                          "(llama.cpp style)", {"fast_cpu": None}),
        "llama.cpp": Contender("llama.cpp", "llama_cpp", "llama.cpp (llama-cpp-python), source "
                               "GGUF, mmap", {"gguf": str(gguf) if gguf else None}),
        "flash": Contender("flash", "flash", f"mlx-flash defaults ({how})", dict(base)),
        "flash-window1": Contender("flash-window1", "flash", "mlx-flash, window=1",
                                   dict(base, window=1)),
        "flash-no-predictor": Contender(
            "flash-no-predictor", "flash", "mlx-flash, no predictor (oracle top-k)",
            {**base, "selector": "oracle", "oracle_rule": "top", "keep": keep}),
        "flash-no-bundling": Contender("flash-no-bundling", "flash",
                                       "mlx-flash, no bundling (gate/up/down read separately)",
                                       dict(base, unbundled=True)),
        "flash-threads1": Contender("flash-threads1", "flash", "mlx-flash, threads=1",
                                    dict(base, threads=1)),
    }
    table.update(io_contenders(base, placed, pin_hot))
    if llama_ok is not None:
        table["llama.cpp"].skip = llama_ok
    elif gguf is None or not gguf.exists():
        table["llama.cpp"].skip = f"no GGUF file ({gguf}); pass --gguf"
    return [table[n] for n in names]


def io_contenders(base: dict, placed: Path | None, pin_hot: float) -> dict[str, Contender]:
    """Issue 9's ablations: one read per neuron, adjacent runs only, a placed copy, pinning."""
    at = {"model_dir": str(placed)} if placed else {}
    out = {
        "flash-per-neuron": Contender("flash-per-neuron", "flash", "mlx-flash, one read per "
                                      "neuron (no coalescing)", dict(base, read_planner="neuron")),
        "flash-runs": Contender("flash-runs", "flash", "mlx-flash, adjacent neurons coalesced, "
                                "no cost-model gaps", dict(base, read_planner="runs")),
        "flash-placed": Contender("flash-placed", "flash", f"mlx-flash on the placed copy {placed}",
                                  dict(base, **at)),
        "flash-placed-pinned": Contender("flash-placed-pinned", "flash", f"mlx-flash on the "
                                         f"placed copy, {pin_hot:.0%} of the cache pinned hot",
                                         dict(base, pin_hot=pin_hot, **at)),
    }
    if placed is None:
        for name in ("flash-placed", "flash-placed-pinned"):
            out[name].skip = "no --placed dir given"
    return out


def llama_cpp_available() -> str | None:
    """None if llama_cpp can be imported, else the reason (shown in the report)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install llama-cpp-python)"
    return None
