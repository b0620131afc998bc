"""Benchmark mlx-flash against its baselines under a real DRAM cap (issue 5).

    python scripts/benchmark.py --model /tmp/qwen-flash --caps 0.7,1.0 --tokens 32

For one flash model dir and each DRAM cap (bytes, "700MiB", or a fraction of the model's size)
every contender runs in its own process inside a cgroup v1 memory group whose
`memory.limit_in_bytes` is the cap (page cache included), after the page cache was dropped:

  dense       mlx_lm with the whole model in DRAM, no cap (the upper bound; run once)
  naive       flash, every layer's whole FFN streamed from the bundles every token (the paper's
              baseline)
  mmap        the FFN memory-mapped and computed densely with numpy (what llama.cpp does)
  llama.cpp   llama-cpp-python on the source GGUF, mmap'd, same cap (when installed)
  flash       mlx-flash defaults, then one switch off at a time: flash-window1,
              flash-no-predictor, flash-no-bundling, flash-threads1

The child joins the cgroup before it imports anything (a `sh -c 'echo $$ > cgroup.procs; exec
python ...'` wrapper), so the cap covers the whole process; the worker reports its baseline RSS
(Python + MLX imported, no weights). An OOM kill is a result, not a crash of the benchmark.
Without root or the cgroup v1 memory controller the caps cannot be enforced: the script says so,
runs uncapped, and the flash contenders read with O_DIRECT (labelled in every row).

The same run measures the disk (sequential 1 MiB direct reads; random direct reads against read
size and thread count, the paper's Figure 2b) and writes results.json, results.md and PNG plots
under --out (default /tmp/bench).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import mlx_flash.bench.baselines as bench_baselines
import mlx_flash.offline.calibrate_disk as offline_calibrate_disk
import mlx_flash.offline.placement as offline_placement
import mlx_flash.runtime.disk as runtime_disk
import mlx_flash.runtime.loader as runtime_loader

REPO = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("mlx_flash") is None:
    sys.path.insert(0, str(REPO))  # run from a checkout without `pip install -e .`

pass  # noqa: E402  (after the path fix above)
from mlx_flash.offline.calibrate_disk import drop_page_cache  # noqa: E402

DEFAULT_CAPS = ("0.4", "0.5", "0.7", "1.0")
DEFAULT_PROMPT = "Write a Python function that checks whether a number is prime."
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
TIME_SPLIT = ("predictor", "io", "memory", "compute", "ffn_unsplit", "rest")
MIB = 2**20


# ---------------------------------------------------------------- caps


def model_bytes(root: Path) -> int:
    """Bytes of the model on flash: resident.safetensors plus every bundle file."""
    from mlx_flash.format.manifest import read_manifest

    manifest = read_manifest(root)
    return manifest.ffn_bytes + manifest.resident["size"]


def parse_cap(value: str, size: int) -> int | None:
    """A cap in bytes from "0.5" (fraction of the model), "1.5x", "700MiB", "2GB" or "none"."""
    from mlx_flash.runtime.memory import parse_budget

    text = str(value).strip().lower()
    if text in ("none", "inf", "uncapped"):
        return None
    if text.endswith("x"):
        try:
            return int(float(text[:-1]) * size)
        except ValueError:
            raise ValueError(f"cap {value!r}: '<number>x' means that many times the model "
                             "size, e.g. 1.5x") from None
    cap = parse_budget(text, size)
    if _is_fraction(text) or cap >= 64 * MIB:
        return cap
    raise ValueError(f"cap {value!r} is {cap} bytes, below 64 MiB: give a fraction of the "
                     "model size (0.5), a multiple (1.5x) or a size (700MiB, 2GB)")


def _is_fraction(text: str) -> bool:
    try:
        return 0 < float(text) <= 1
    except ValueError:
        return False


def parse_caps(text: str, size: int) -> list[int | None]:
    """Comma-separated caps -> bytes (None = uncapped), in the order given."""
    return [parse_cap(part, size) for part in text.split(",") if part.strip()]


def cap_label(cap: int | None, size: int) -> str:
    return "none" if cap is None else f"{cap / MIB:.0f} MiB ({cap / size:.2f}x)"


# ---------------------------------------------------------------- contenders


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


# ---------------------------------------------------------------- cgroup v1 and page cache


def own_memory_cgroup() -> Path:
    """This process's cgroup v1 memory group (children nest there, keeping its accounting)."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                candidate = CGROUP_ROOT / path.lstrip("/")
                if candidate.is_dir():
                    return candidate
    except OSError:
        pass
    return CGROUP_ROOT


def cgroup_problem() -> str | None:
    """None if memory caps can be enforced here, else why not."""
    if os.geteuid() != 0:
        return "not root: cannot create memory cgroups or drop the page cache"
    if not (CGROUP_ROOT / "memory.limit_in_bytes").exists():
        return f"no cgroup v1 memory controller at {CGROUP_ROOT}"
    return None


class MemoryGroup:
    """A cgroup v1 memory group with a limit; use as a context manager (removed on exit)."""

    def __init__(self, parent: Path, name: str, limit: int | None):
        self.path = parent / name
        self.path.mkdir()
        self._write("memory.limit_in_bytes", str(limit if limit is not None else -1))
        if limit is not None and (self.path / "memory.memsw.limit_in_bytes").exists():
            self._write("memory.memsw.limit_in_bytes", str(limit))  # no escape into swap

    def _write(self, name: str, value: str) -> None:
        (self.path / name).write_text(value)

    def _read(self, name: str) -> str:
        return (self.path / name).read_text()

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    def usage(self) -> dict:
        """Peak usage, limit hits and OOM kills so far."""
        oom = dict(line.split() for line in self._read("memory.oom_control").splitlines())
        return {"max_usage_bytes": int(self._read("memory.max_usage_in_bytes")),
                "failcnt": int(self._read("memory.failcnt")),
                "oom_kills": int(oom.get("oom_kill", 0))}

    def __enter__(self) -> MemoryGroup:
        return self

    def __exit__(self, *exc) -> None:
        for _ in range(50):  # the last task may take a moment to leave
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


# ---------------------------------------------------------------- the worker (child process)


def rss_bytes() -> int:
    """Resident set size of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def disk_read_bytes() -> int:
    """Bytes this process made the block layer read (page faults, buffered and direct I/O)."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Clock:
    """Timestamps of each generated token plus process counters at the first and last one."""

    def __init__(self, probe=None):
        self.t0, self.times, self.probe = time.perf_counter(), [], probe or (lambda: 0.0)
        self.first: dict = {}
        self.last: dict = {}

    def _counters(self) -> dict:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {"t": time.perf_counter(), "disk": disk_read_bytes(), "majflt": usage.ru_majflt,
                "probe": self.probe()}

    def tick(self) -> None:
        counters = self._counters()
        self.times.append(counters["t"] - self.t0)
        if len(self.times) == 1:
            self.first = counters
        self.last = counters

    def per_token(self, key: str) -> float:
        """A counter's growth per token over tokens 2..N."""
        n = len(self.times) - 1
        return (self.last[key] - self.first[key]) / n if n > 0 else 0.0

    def summary(self) -> dict:
        """Decode rate over tokens 2..N (the first token carries the prompt)."""
        n = len(self.times) - 1
        span = self.last.get("t", 0.0) - self.first.get("t", 0.0)
        return {"ttft_s": self.times[0] if self.times else None,
                "decode_tps": n / span if span > 0 else None,
                "ms_per_token": 1e3 * span / n if n > 0 else None,
                "disk_bytes_per_token": self.per_token("disk"),
                "major_faults_per_token": self.per_token("majflt"),
                "probe_s_per_token": self.per_token("probe"), "token_times_s": self.times}


def generate_mlx(model, prompt_ids: list[int], tokens: int, probe=None) -> tuple[list, Clock]:
    """Greedy decode of exactly `tokens` tokens with mlx_lm's generate_step (no EOS stop)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    clock, out = Clock(probe), []
    for token, _ in generate_step(mx.array(prompt_ids), model, max_tokens=tokens):
        out.append(int(token))
        clock.tick()
    return out, clock


class RecordingSelector:
    """Wraps a selector and keeps every call's active ids (for the window sweep)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []  # calls: (layer, [ids per token])

    def select(self, layer, x):
        selection = self.inner.select(layer, x)
        self.calls.append((layer, [ids.astype("int32") for ids in selection.ids]))
        return selection

    def __getattr__(self, name):
        return getattr(self.inner, name)


def save_calls(path: Path, calls: list) -> None:
    import numpy as np

    arrays = {f"c{i}_l{layer}_t{t}": ids for i, (layer, per_token) in enumerate(calls)
              for t, ids in enumerate(per_token)}
    np.savez_compressed(path, **arrays)


def load_calls(path: Path) -> list[tuple[int, list]]:
    """Inverse of save_calls: [(layer, [ids per token])] in call order."""
    import numpy as np

    with np.load(path) as data:
        keys = sorted(data.files, key=lambda k: tuple(int(p[1:]) for p in k.split("_")))
        calls: dict[int, tuple[int, list]] = {}
        for key in keys:
            c, layer, _ = (int(p[1:]) for p in key.split("_"))
            calls.setdefault(c, (layer, []))[1].append(data[key])
    return [calls[c] for c in sorted(calls)]


def flash_result(model) -> dict:
    """Per decoded token averages from model.flash.stats (the first decode step excluded)."""
    stats = model.flash.stats
    steps = [s for s in stats.steps if s.tokens == 1][1:]
    n = max(1, len(steps))
    seconds = {k: sum(s.seconds[k] for s in steps) / n for k in ("predictor", "io", "memory",
                                                                 "compute")}
    return {"flash_seconds_per_token": seconds,
            "bytes_read_per_token": sum(s.bytes_read for s in steps) / n,
            "bytes_needed_per_token": sum(s.bytes_needed for s in steps) / n,
            "read_amplification": _ratio(sum(s.bytes_read for s in steps),
                                         sum(s.bytes_needed for s in steps)),
            "predictor_bytes_per_token": sum(s.predictor_bytes for s in steps) / n,
            "reads_per_token": sum(s.reads for s in steps) / n,
            "hit_rate": sum(s.neurons_hit for s in steps) / max(1, sum(s.neurons_active
                                                                       for s in steps)),
            "truncated_per_token": sum(s.truncated for s in steps) / n,
            "settings": {k: str(v) for k, v in stats.settings.items()},
            "memory_plan": stats.memory}


def _ratio(num: float, den: float) -> float | None:
    """num / den, or None when nothing was needed (naive streaming counts no needed bytes)."""
    return num / den if den else None


def load_flash(spec: dict):
    """load() a flash contender from worker args; returns (model, extra result fields)."""
    from mlx_flash.runtime.loader import load

    opts = dict(spec["options"])
    unbundled = opts.pop("unbundled", False)
    model_dir = opts.pop("model_dir", spec["model"])  # a placed copy (issue 9)
    if spec.get("force_direct"):
        opts["direct"] = True
    model, _ = load(model_dir, dram_budget=spec["cap"], dtype=spec["dtype"], **opts)
    if unbundled:
        from mlx_flash.bench.baselines import use_unbundled

        use_unbundled(model, spec["model"], spec["unbundled_dir"])
    if spec.get("record_ids"):
        model.flash.selector = RecordingSelector(model.flash.selector)
    return model


def run_mlx_worker(spec: dict, result: dict) -> None:
    """dense / mmap / flash: load, generate, fill `result`."""
    import mlx.core as mx  # noqa: F401  (the baseline RSS includes MLX and mlx_lm)
    import mlx_lm  # noqa: F401

    pass  # noqa: F401
    pass

    result["baseline_rss_bytes"] = rss_bytes()
    spec = dict(spec, options=dict(spec["options"]))
    os.environ.update(spec["options"].pop("env", {}))  # e.g. MLX_FLASH_CPU_BLOCKS=0
    t0 = time.perf_counter()
    kind, probe = spec["kind"], None
    try:
        if kind == "dense":
            model, _ = runtime_loader.load_dense(spec["model"], dtype=spec["dtype"],
                                              **spec["options"])
        elif kind == "mmap":
            model, _ = bench_baselines.load_mmap(spec["model"], dtype=spec["dtype"], **spec["options"])
            layers = [layer.mlp for layer in model.layers]
            probe = lambda: sum(m.seconds for m in layers)  # noqa: E731
        else:
            model = load_flash(spec)
    except ValueError as e:  # load() refusing a budget too small is a result
        result.update(status="refused", error=str(e))
        return
    result["load_s"] = time.perf_counter() - t0
    result["rss_after_load_bytes"] = rss_bytes()
    out, clock = generate_mlx(model, spec["prompt_ids"], spec["tokens"], probe)
    result.update(clock.summary(), tokens_out=out)
    if kind == "mmap":
        result["ffn_unsplit_s_per_token"] = result["probe_s_per_token"]
    if kind == "flash":
        result.update(flash_result(model))
        if spec.get("record_ids"):
            save_calls(Path(spec["ids_file"]), model.flash.selector.calls)
            result["ids_file"] = spec["ids_file"]
        model.flash.close()


def run_llama_worker(spec: dict, result: dict) -> None:
    """llama.cpp on the GGUF, mmap'd, greedy, same prompt token ids."""
    import llama_cpp

    result["baseline_rss_bytes"] = rss_bytes()
    result["llama_cpp_version"] = getattr(llama_cpp, "__version__", "?")
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=spec["options"]["gguf"], n_ctx=max(512, len(
        spec["prompt_ids"]) + spec["tokens"] + 16), n_threads=os.cpu_count(), use_mmap=True,
        use_mlock=False, verbose=False, seed=0)
    result["load_s"] = time.perf_counter() - t0
    result["rss_after_load_bytes"] = rss_bytes()
    clock, out = Clock(), []
    for token in llm.generate(spec["prompt_ids"], temp=0.0, top_k=1, top_p=1.0,
                              repeat_penalty=1.0, reset=True):
        out.append(int(token))
        clock.tick()
        if len(out) == spec["tokens"]:
            break
    result.update(clock.summary(), tokens_out=out)


def worker_main(args_file: str) -> int:
    """Entry of the child process: run one contender, write its result JSON."""
    spec = json.loads(Path(args_file).read_text())
    result: dict = {"status": "ok"}
    try:
        if spec["kind"] == "llama_cpp":
            run_llama_worker(spec, result)
        else:
            run_mlx_worker(spec, result)
    except Exception as e:  # noqa: BLE001  (reported in the table, the benchmark goes on)
        result.update(status="error", error=f"{type(e).__name__}: {e}",
                      traceback=traceback.format_exc()[-3000:])
    result["peak_rss_bytes"] = peak_rss()
    tmp = Path(spec["result_file"] + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, spec["result_file"])
    return 0


# ---------------------------------------------------------------- running one contender


@dataclass
class Setup:
    """What every run shares."""

    model: Path
    size: int
    out: Path
    prompt_ids: list[int]
    tokens: int
    dtype: str
    timeout: float
    cgroup_parent: Path | None  # None: no caps (fallback, O_DIRECT for flash)
    force_direct: bool
    unbundled_dir: Path | None = None
    run_id: int = 0


def worker_spec(setup: Setup, c: Contender, cap: int | None, tag: str) -> dict:
    return {"kind": c.kind, "model": str(setup.model), "options": c.options,
            "cap": cap, "dtype": setup.dtype, "prompt_ids": setup.prompt_ids,
            "tokens": setup.tokens, "force_direct": setup.force_direct,
            "unbundled_dir": str(setup.unbundled_dir) if setup.unbundled_dir else None,
            "record_ids": c.name == "flash", "ids_file": str(setup.out / f"ids_{tag}.npz"),
            "result_file": str(setup.out / f"result_{tag}.json")}


def child_command(spec_file: Path, procs: Path | None) -> list[str]:
    """The child's argv: a shell that joins the cgroup first, then execs the worker."""
    worker = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_file)]
    if procs is None:
        return worker
    return ["sh", "-c", f'echo $$ > {shlex.quote(str(procs))} && exec "$@"', "sh", *worker]


def spawn(cmd: list[str], log: Path, timeout: float) -> tuple[int | None, float]:
    """Run cmd in its own process group; returns (exit status or None on timeout, seconds)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        except BaseException:  # Ctrl-C: do not leave the child running in its cgroup
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        if rc is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return rc, time.perf_counter() - t0


def run_one(setup: Setup, c: Contender, cap: int | None) -> dict:
    """One contender at one cap in a fresh process (and cgroup); always returns a row."""
    setup.run_id += 1
    tag = f"{c.name}_{'none' if cap is None else cap}"
    row = {"name": c.name, "label": c.label, "kind": c.kind, "cap_bytes": cap,
           "cap_fraction": None if cap is None else cap / setup.size,
           "io_mode": io_mode(setup, c, cap)}
    if c.skip:
        return {**row, "status": "skipped", "error": c.skip}
    spec = worker_spec(setup, c, cap, tag)
    spec_file = setup.out / f"spec_{tag}.json"
    spec_file.write_text(json.dumps(spec))
    Path(spec["result_file"]).unlink(missing_ok=True)
    row["page_cache_dropped"] = drop_page_cache()
    if setup.cgroup_parent is None:
        rc, wall = spawn(child_command(spec_file, None), setup.out / f"log_{tag}.txt",
                         setup.timeout)
        row["cgroup"] = None
    else:
        name = f"mlx_flash_bench_{os.getpid()}_{setup.run_id}"
        with MemoryGroup(setup.cgroup_parent, name, cap) as group:
            rc, wall = spawn(child_command(spec_file, group.procs),
                             setup.out / f"log_{tag}.txt", setup.timeout)
            row["cgroup"] = {"path": str(group.path), **group.usage()}
    row.update(exit_status=rc, wall_s=wall, log=str(setup.out / f"log_{tag}.txt"))
    return {**row, **read_result(spec["result_file"], rc, row.get("cgroup"))}


def io_mode(setup: Setup, c: Contender, cap: int | None) -> str:
    if setup.cgroup_parent is None:
        direct = " O_DIRECT" if c.kind == "flash" else ""
        return f"no cgroup: cap NOT enforced{direct}"
    if cap is None:
        return "cgroup, no limit"
    return "cgroup cap" + (" + O_DIRECT" if setup.force_direct and c.kind == "flash" else
                           " (page cache counts)")


def read_result(path: str, rc: int | None, cgroup: dict | None) -> dict:
    """The worker's result, or the status its exit implies (OOM kill, timeout, crash)."""
    oom = bool(cgroup and cgroup["oom_kills"] > 0)
    if Path(path).exists():
        result = json.loads(Path(path).read_text())
        return {**result, "oom_killed": oom}
    if rc is None:
        return {"status": "timeout", "oom_killed": oom}
    if oom or rc in (-9, 137):
        return {"status": "oom", "oom_killed": True,
                "error": "killed by the OOM killer under the cap" if oom else
                "SIGKILL (OOM killer?)"}
    return {"status": "crashed", "oom_killed": oom, "error": f"exit status {rc}, see the log"}


# ---------------------------------------------------------------- derived numbers


def time_split_ms(row: dict) -> dict | None:
    """ms/token by TIME_SPLIT key; what the FFN stats do not cover is `rest`."""
    total = row.get("ms_per_token")
    if total is None:
        return None
    split = dict.fromkeys(TIME_SPLIT, 0.0)
    if "flash_seconds_per_token" in row:
        for k, v in row["flash_seconds_per_token"].items():
            split[k] = 1e3 * v
    elif "ffn_unsplit_s_per_token" in row:
        split["ffn_unsplit"] = 1e3 * row["ffn_unsplit_s_per_token"]
    split["rest"] = max(0.0, total - sum(split.values()))
    return split


def derive(row: dict, seq_throughput: float | None) -> dict:
    """Add the split, achieved read throughput and the read-time/ideal ratio to a row."""
    split = time_split_ms(row)
    if split is None:
        return row
    row["split_ms"] = split
    read = row.get("bytes_read_per_token", 0.0) + row.get("predictor_bytes_per_token", 0.0)
    if "bytes_read_per_token" in row and split["io"] > 0:
        row["read_throughput"] = row["bytes_read_per_token"] / (split["io"] / 1e3)
        if seq_throughput:
            ideal_ms = 1e3 * row["bytes_read_per_token"] / seq_throughput
            row["io_vs_ideal"] = split["io"] / ideal_ms if ideal_ms else None
    row["all_flash_bytes_per_token"] = read
    return row


def agreement(rows: list[dict]) -> None:
    """Per row: how many leading tokens equal the dense reference's."""
    ref = next((r.get("tokens_out") for r in rows if r["name"] == "dense"
                and r.get("tokens_out")), None)
    for r in rows:
        out = r.get("tokens_out")
        if ref is None or not out:
            continue
        same = next((i for i, (a, b) in enumerate(zip(ref, out, strict=False)) if a != b),
                    min(len(ref), len(out)))
        r["same_tokens_as_dense"] = same


def speedups(rows: list[dict]) -> list[dict]:
    """mlx-flash decode tok/s over naive and mmap at each cap (the issue's targets)."""
    out = []
    for cap in sorted({r["cap_bytes"] for r in rows if r["cap_bytes"] is not None}):
        at = {r["name"]: r for r in rows if r["cap_bytes"] == cap}
        flash = at.get("flash", {}).get("decode_tps")
        entry = {"cap_bytes": cap}
        for other in ("naive", "mmap", "llama.cpp"):
            tps = at.get(other, {}).get("decode_tps")
            entry[f"vs_{other}"] = flash / tps if flash and tps else None
        entry["io_vs_ideal"] = at.get("flash", {}).get("io_vs_ideal")
        entry["flash_same_tokens"] = at.get("flash", {}).get("same_tokens_as_dense")
        out.append(entry)
    return out


# ---------------------------------------------------------------- window sweep


def window_sweep(ids_file: Path, model: Path, capacity: int, windows=range(1, 9)) -> dict:
    """Bytes read per decoded token for each window size, replaying recorded active sets.

    The recorded run's selections (prompt seeding, then one call per token and layer) go through
    a fresh NeuronCache of the same capacity per window; new neurons x stride = bytes read (as
    with buffered reads; O_DIRECT alignment not included). Returns {window: bytes/token}.
    """
    from mlx_flash.format.manifest import read_manifest

    manifest = read_manifest(model)
    calls = load_calls(ids_file)
    return {w: _replay(calls, manifest, capacity, w) for w in windows}


def _replay(calls: list, manifest, capacity: int, window: int) -> float:
    """Bytes/token of one window size; like flash_result, the first decode call is skipped."""
    import mlx.core as mx

    from mlx_flash.runtime.cache import NeuronCache

    caches: dict[int, NeuronCache] = {}
    decoded: dict[int, int] = {}
    new = 0
    for layer, per_token in calls:
        entry = manifest.layers[layer]
        if layer not in caches:  # (1, capacity, 1) buffer: only the index math is used
            caches[layer] = NeuronCache(entry.n_neurons, min(capacity, entry.n_neurons), 1, 1,
                                        mx.float32, window)
        if len(per_token) > 1:  # the prompt's seeding of the window, oldest first
            for ids in per_token[-window:]:
                caches[layer].advance(ids)
            continue
        plan = caches[layer].advance(per_token[0])  # a decoded token
        decoded[layer] = decoded.get(layer, 0) + 1
        if decoded[layer] > 1:
            new += int(plan.new_ids.size) * entry.stride
    return new / max(1, max(decoded.values(), default=1) - 1)


# ---------------------------------------------------------------- report


def _fmt(value, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}"


TABLE_COLUMNS = ("cap", "contender", "status", "tok/s", "ms/tok", "pred", "io", "mem", "comp",
                 "ffn(io+comp)", "rest", "MiB/tok cache", "reads/tok", "ampl",
                 "MiB/tok select", "disk MiB/tok",
                 "read MB/s",
                 "io/ideal", "cgroup peak MiB", "peak RSS MiB", "base RSS MiB", "hit",
                 "same tok")


COLUMN_NOTES = """
Columns. tok/s and ms/tok: decode, tokens 2..N (the first token carries the prompt).
pred/io/mem/comp: ms/token from mlx-flash's per-token stats (comp includes the attention that
each FlashFFN's input evaluation forces); ffn(io+comp): the mmap FFN, page faults inside;
rest: everything else (lm_head, sampling, Python; attention for mmap). MiB/tok cache: bytes
read into the neuron caches; reads/tok: their syscalls; ampl: read amplification (bytes read /
bytes of the neurons needed: O_DIRECT pages and gaps the read planner crossed); MiB/tok select: bytes the no-predictor oracle read to choose
neurons; disk MiB/tok: /proc/self/io read_bytes (what reached the block device, page-cache hits
excluded). read MB/s: cache bytes / io time; io/ideal: io time / (cache bytes / best sequential
throughput), target <= 1.3. cgroup peak: memory.max_usage_in_bytes (page cache included);
base RSS: Python + MLX (+ mlx_lm) imported, no weights. same tok: leading tokens equal to dense's.
"""


def table_row(r: dict, size: int) -> list[str]:
    split = r.get("split_ms") or {}
    cg = r.get("cgroup") or {}
    status = r["status"] + (" (OOM)" if r.get("oom_killed") and r["status"] != "oom" else "")
    return [cap_label(r["cap_bytes"], size) if r["name"] != "dense" else "none", r["name"],
            status, _fmt(r.get("decode_tps"), digits=2), _fmt(r.get("ms_per_token"), digits=0),
            *[_fmt(split.get(k), digits=0) if split else "-" for k in TIME_SPLIT],
            _fmt(r.get("bytes_read_per_token"), MIB), _fmt(r.get("reads_per_token"), digits=0),
            _fmt(r.get("read_amplification"), digits=2),
            _fmt(r.get("predictor_bytes_per_token"), MIB),
            _fmt(r.get("disk_bytes_per_token"), MIB),
            _fmt(r.get("read_throughput"), 1e6, 0), _fmt(r.get("io_vs_ideal"), digits=2),
            _fmt(cg.get("max_usage_bytes"), MIB, 0), _fmt(r.get("peak_rss_bytes"), MIB, 0),
            _fmt(r.get("baseline_rss_bytes"), MIB, 0),
            "-" if r.get("hit_rate") is None else f"{r['hit_rate']:.0%}",
            str(r.get("same_tokens_as_dense", "-"))]


def markdown_table(rows: list[dict], size: int) -> str:
    """The results as a GitHub markdown table, one line per run."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |",
             "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"]
    lines += ["| " + " | ".join(table_row(r, size)) + " |" for r in rows]
    return "\n".join(lines)


def notes(rows: list[dict]) -> list[str]:
    """One line per run that did not produce numbers, and every row's label."""
    out = []
    for r in rows:
        cap = "none" if r["cap_bytes"] is None else f"{r['cap_bytes'] / MIB:.0f} MiB"
        if r["status"] != "ok":
            out.append(f"- {r['name']} @ {cap}: {r['status']}: "
                       f"{(r.get('error') or '').splitlines()[0] if r.get('error') else ''}")
    seen = {}
    for r in rows:
        seen.setdefault(r["name"], f"- `{r['name']}`: {r['label']}; {r['io_mode']}")
    return out + list(seen.values())


def disk_table(disk: dict) -> str:
    rand = disk["random"]
    threads = list(rand)
    lines = ["| read size | " + " | ".join(f"{t} thr MB/s" for t in threads) + " |",
             "|---|" + "---|" * len(threads)]
    for k in rand[threads[0]]:
        lines.append(f"| {k} KiB | " + " | ".join(f"{rand[t][k] / 1e6:.0f}" for t in threads)
                     + " |")
    seq = ", ".join(f"{t} thread(s) {v / 1e6:.0f} MB/s" for t, v in
                    disk["sequential_1mib"].items())
    return f"Sequential 1 MiB direct reads: {seq}.\n\n" + "\n".join(lines)


def markdown_report(report: dict) -> str:
    size, parts = report["model_bytes"], []
    parts.append(f"# mlx-flash benchmark\n\nCommand: `{report['command']}`\n\n"
                 f"Code: {report['code']}\n\n"
                 f"Machine: {report['machine']}\n\nModel: {report['model']}"
                 f"{' (private copy of ' + report['copied_from'] + ')' if report.get('copied_from') else ''} "
                 f"({size / MIB:.0f} MiB on flash); prompt {len(report['prompt_ids'])} tokens, "
                 f"{report['tokens']} generated (greedy, no EOS stop), dtype {report['dtype']}; "
                 f"caps: {report['caps_note']}\n")
    parts.append(markdown_table(report["runs"], size))
    parts.append(COLUMN_NOTES)
    parts.append("\n".join(notes(report["runs"])))
    if report.get("speedups"):
        parts.append("\n## Targets (mlx-flash tok/s over ...)\n")
        for s in report["speedups"]:
            parts.append(f"- cap {s['cap_bytes'] / MIB:.0f} MiB: vs naive "
                         f"{_fmt(s['vs_naive'], digits=2)}x (target 6x), vs mmap "
                         f"{_fmt(s['vs_mmap'], digits=2)}x (target 3x), vs llama.cpp "
                         f"{_fmt(s['vs_llama.cpp'], digits=2)}x, read time / ideal "
                         f"{_fmt(s['io_vs_ideal'], digits=2)} (target <= 1.3); leading "
                         f"tokens equal to dense's: {s.get('flash_same_tokens', '-')}")
    if report.get("window_sweep"):
        parts.append("\n## Bytes read per token vs window (replayed active sets)\n")
        for cap, sweep in report["window_sweep"].items():
            parts.append(f"- cap {cap}: " + ", ".join(f"w={w}: {b / MIB:.1f} MiB"
                                                    for w, b in sweep.items()))
    if report.get("disk"):
        parts.append("\n## Disk\n\n" + disk_table(report["disk"]))
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- plots


def save_figure(fig, path: Path, plt) -> Path:
    """Lay out, write and close a figure (every plot ends here)."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_all(report: dict, out: Path) -> list[str]:
    """PNG plots under out; returns their paths ([] without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return []
    paths = [plot_latency(report, out / "latency.png", plt),
             plot_caps(report, out / "tps_vs_cap.png", plt)]
    if report.get("window_sweep"):
        paths.append(plot_window(report, out / "bytes_vs_window.png", plt))
    if report.get("disk"):
        paths.append(plot_disk(report["disk"], out / "disk.png", plt))
    return [str(p) for p in paths]


def plot_latency(report: dict, path: Path, plt) -> Path:
    rows = [r for r in report["runs"] if r.get("split_ms")]
    labels = [r["name"] + " @ " + ("none" if r["cap_bytes"] is None
                                   else f"{r['cap_fraction']:.2f}x") for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.4 * len(rows) + 1.5))
    left = [0.0] * len(rows)
    for key in TIME_SPLIT:
        values = [r["split_ms"][key] for r in rows]
        ax.barh(labels, values, left=left, label=key)
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax.set_xlabel("ms per decoded token")
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    ax.set_title("Latency breakdown per token")
    return save_figure(fig, path, plt)


def plot_caps(report: dict, path: Path, plt) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    names = dict.fromkeys(r["name"] for r in report["runs"] if r["cap_bytes"] is not None)
    for name in names:
        pts = sorted((r["cap_fraction"], r["decode_tps"]) for r in report["runs"]
                     if r["name"] == name and r.get("decode_tps") and r["cap_bytes"])
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
    dense = next((r.get("decode_tps") for r in report["runs"] if r["name"] == "dense"), None)
    if dense:
        ax.axhline(dense, ls="--", color="gray", label="dense, no cap")
    ax.set_xlabel("DRAM cap / model size")
    ax.set_ylabel("decode tokens/s")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    return save_figure(fig, path, plt)


def plot_window(report: dict, path: Path, plt) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for cap, sweep in report["window_sweep"].items():
        ax.plot([int(w) for w in sweep], [b / MIB for b in sweep.values()], marker="o",
                label=f"replayed, cap {cap}")
    for r in report["runs"]:
        if r["name"] in ("flash", "flash-window1") and r.get("bytes_needed_per_token"):
            ax.plot(int(r["settings"]["window"]), r["bytes_needed_per_token"] / MIB, "kx")
    ax.set_xlabel("window (tokens)")
    ax.set_ylabel("MiB of new neurons per token (x: measured)")
    ax.legend(fontsize=7)
    return save_figure(fig, path, plt)


def plot_disk(disk: dict, path: Path, plt) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for threads, by_size in disk["random"].items():
        ax.plot([int(k) for k in by_size], [v / 1e6 for v in by_size.values()], marker="o",
                label=f"random, {threads} threads")
    ax.axhline(disk["sequential_best"] / 1e6, ls="--", color="gray", label="sequential 1 MiB")
    ax.set_xscale("log", base=2)
    sizes = [int(k) for k in next(iter(disk["random"].values()))]
    ax.set_xticks(sizes, [str(k) for k in sizes])
    ax.set_xlabel("read size (KiB)")
    ax.set_ylabel("MB/s (O_DIRECT)")
    ax.legend(fontsize=7)
    ax.set_title("Read throughput vs read size and threads")
    return save_figure(fig, path, plt)


# ---------------------------------------------------------------- I/O replay (issue 9)


REPLAY_PLANNERS = ("neuron", "runs", "cost")


def replay_sets(calibration: Path, manifest, keep: float, tokens: int,
                holdout: float = 0.2) -> list[list]:
    """Per layer, per held-out calibration token: its top-`keep` ids, largest |h| first."""
    import numpy as np

    from mlx_flash.offline.placement import calibration_mags, split_holdout

    info = json.loads((calibration / "calibration.json").read_text())
    out = []
    for layer in range(manifest.n_layers):
        mag = calibration_mags(calibration, manifest, layer)
        start = split_holdout(len(mag), holdout, int(info.get("seq_len", 1)))
        block = np.asarray(mag[start:start + tokens], dtype=np.float32)
        k = max(1, int(np.ceil(keep * block.shape[1])))
        out.append([np.argsort(-row, kind="stable")[:k] for row in block])
    return out


def replay_io(model: Path, sets: list[list], planner: str, window: int, capacity: int,
              pin: int = 0) -> dict:
    """Real O_DIRECT reads of what a window cache of `capacity` neurons/layer misses, token by
    token over `sets` (page cache dropped first); per-token reads, bytes, amplification, ms."""
    import mlx.core as mx
    import numpy as np

    from mlx_flash.format.manifest import read_manifest
    from mlx_flash.runtime.cache import NeuronCache
    from mlx_flash.runtime.store import IOStats, NeuronStore

    manifest = read_manifest(model)
    cost = runtime_disk.cost_model_for(model) or runtime_disk.FALLBACK
    caches = [NeuronCache(e.n_neurons, capacity, 1, 1, mx.float32, window)
              for e in manifest.layers]
    if pin:
        for cache, entry in zip(caches, manifest.layers, strict=True):
            cache.pin(np.asarray(entry.hot[:pin]))
    total, tokens = IOStats(), len(sets[0])
    drop_page_cache()
    with NeuronStore(model, manifest, direct=True, threads=8, planner=planner,
                     cost=cost) as store:
        for t in range(tokens):
            for layer, cache in enumerate(caches):
                _, stats = store.read(layer, cache.advance(sets[layer][t]).new_ids)
                if t:  # the first token fills the cache: not a steady-state token
                    total.add(stats)
    n = max(1, tokens - 1)
    return {"reads": total.reads / n, "bytes": total.bytes / n, "needed": total.needed / n,
            "amplification": total.amplification, "io_ms": 1e3 * total.seconds / n}


def io_replay(args) -> int:
    """The --io-replay mode: every (dir, planner, pin) combination, one table."""
    from mlx_flash.format.manifest import read_manifest

    dirs = [Path(args.model)] + [Path(d) for d in filter(None, (args.placed or "").split(","))]
    manifest = read_manifest(dirs[0])
    sets = replay_sets(Path(args.io_replay), manifest, args.keep, args.replay_tokens + 1)
    rows = []
    for d in dirs:
        placed = read_manifest(d).placement
        label = placed["method"] if placed else "original"
        runs = [(p, 0) for p in REPLAY_PLANNERS] if not placed else [("cost", 0)]
        if placed and args.pin:
            runs.append(("cost", args.pin))
        for planner, pin in runs:
            print(f"[replay] {label} {planner} pin={pin} ...", file=sys.stderr, flush=True)
            rows.append({"dir": str(d), "placement": label, "planner": planner, "pin": pin,
                         **replay_io(d, sets, planner, args.window, args.capacity, pin)})
    base = next(r["io_ms"] for r in rows if r["planner"] == "neuron")
    for r in rows:
        r["io_speedup_vs_neuron"] = base / r["io_ms"] if r["io_ms"] else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"command": " ".join(shlex.quote(a) for a in sys.argv), "keep": args.keep,
              "window": args.window, "capacity": args.capacity,
              "tokens": args.replay_tokens, "machine": machine_description(dirs[0]),
              "rows": rows}
    if args.study_layers:
        print("[replay] cost-model study of placement ...", file=sys.stderr, flush=True)
        report["study"] = placement_study(Path(args.io_replay), dirs[0], args.keep, args.window,
                                          args.replay_tokens,
                                          [int(x) for x in args.study_layers.split(",")])
    (out / "io_replay.json").write_text(json.dumps(report, indent=1))
    print(replay_table(report))
    return 0


def placement_study(calibration: Path, model: Path, keep: float, window: int, tokens: int,
                    layers: list[int]) -> list[dict]:
    """Cost-model replay (no I/O) of sample layers: one read per neuron, the cost planner on
    the id order, on hot-first and on co-activation orders, and the paper's closest-friend
    bundles; per token and layer."""
    import numpy as np

    pass
    from mlx_flash.format.manifest import read_manifest

    manifest = read_manifest(model)
    cost = runtime_disk.cost_model_for(model) or runtime_disk.FALLBACK
    info = json.loads((calibration / "calibration.json").read_text())
    names = ("one read per neuron", "cost planner, id order", "cost planner, hot-first",
             "cost planner, co-activation order", "closest-friend bundles (paper)")
    totals = {name: offline_placement.ReadTotals() for name in names}
    for layer in layers:
        mag = offline_placement.calibration_mags(calibration, manifest, layer)
        train = offline_placement.split_holdout(len(mag), 0.2, int(info.get("seq_len", 1)))
        fit = offline_placement.active_sets(mag[:train], keep)
        new = offline_placement.new_sets(offline_placement.active_sets(mag[train:train + tokens], keep), window)
        stride, ident = manifest.layers[layer].stride, np.arange(mag.shape[1])
        offline_placement.evaluate(ident, new, stride, cost, "neuron", totals=totals[names[0]])
        for name, order in zip(names[1:4], (ident, offline_placement.hot_order(fit), offline_placement.coact_order(fit)),
                               strict=True):
            offline_placement.evaluate(order, new, stride, cost, "cost", totals=totals[name])
        offline_placement.friend_bundles(offline_placement.closest_friends(fit), new, stride, cost, totals=totals[names[4]])
    return [{"layout": name, **t.per_token()} for name, t in totals.items()]


def replay_table(report: dict) -> str:
    lines = [f"keep {report['keep']}, window {report['window']}, capacity "
             f"{report['capacity']} neurons/layer, {report['tokens']} held-out tokens",
             "", "| placement | planner | pinned/layer | reads/tok | MiB read/tok | "
             "MiB needed/tok | amplification | I/O ms/tok | vs one read per neuron |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['placement']} | {r['planner']} | {r['pin']} | {r['reads']:.0f} | "
                     f"{r['bytes'] / MIB:.1f} | {r['needed'] / MIB:.1f} | "
                     f"{r['amplification']:.2f} | {r['io_ms']:.0f} | "
                     f"{r['io_speedup_vs_neuron']:.2f}x |")
    if report.get("study"):
        lines += ["", "Cost model only (no I/O), per token and layer, sample layers:", "",
                  "| layout | reads | KiB read | amplification | modelled ms |", "|---|---|---|---|---|"]
        lines += [f"| {r['layout']} | {r['reads']:.0f} | {r['bytes'] / 1024:.0f} | "
                  f"{r['amplification']:.2f} | {r['ms']:.2f} |" for r in report["study"]]
    return "\n".join(lines)


# ---------------------------------------------------------------- orchestration


def machine_description(model: Path) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               "?") if Path("/proc/cpuinfo").exists() else "?"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    dev = os.stat(model).st_dev
    load = os.getloadavg()[0]
    return (f"{os.uname().sysname} {os.uname().machine}, {cpu}, {os.cpu_count()} cores, "
            f"{mem / 2**30:.0f} GiB RAM, model on device {os.major(dev)}:{os.minor(dev)}, "
            f"load average {load:.1f} at start")


def source_stamp() -> dict:
    """Which mlx_flash code the workers run: git HEAD (if any) and a hash of its sources."""
    import hashlib

    import mlx_flash

    package = Path(mlx_flash.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    try:
        head = subprocess.run(["git", "-C", str(package), "describe", "--always", "--dirty"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head = ""
    return {"package": str(package), "git": head or None, "sources_sha256": digest.hexdigest()}


def prompt_token_ids(model: Path, prompt: str) -> list[int]:
    """The chat-templated prompt, tokenized once so every contender gets the same ids."""
    from mlx_flash.format.manifest import read_manifest
    from mlx_flash.runtime.generate import format_prompt
    from mlx_flash.runtime.loader import load_tokenizer

    tokenizer = load_tokenizer(model, read_manifest(model))
    ids = list(format_prompt(tokenizer, prompt))
    if not ids:
        raise ValueError(f"the prompt {prompt!r} tokenizes to no tokens with {model}'s "
                         "tokenizer: give another --prompt or --prompt-ids")
    return ids


def default_gguf(model: Path) -> Path | None:
    from mlx_flash.format.manifest import read_manifest

    source = read_manifest(model).source
    return Path(source["path"]) if source.get("kind") == "gguf" and source.get("path") else None


def private_copy(model: Path, gguf: Path | None, dest: Path) -> tuple[Path, Path | None]:
    """Copy the model dir (and GGUF) to `dest` once; returns the copies' paths.

    On a shared machine other processes keep the model's pages in the page cache, charged to
    their cgroups and not to the run's: a mapped file then looks cheaper than it is under the
    cap. Files nobody else opens give every contender the same cold start.
    """
    import shutil

    copy = dest / model.name
    if not (copy / "manifest.json").exists() or \
            (copy / "manifest.json").read_bytes() != (model / "manifest.json").read_bytes():
        print(f"[bench] copying {model} to {copy} ...", file=sys.stderr)
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(model, copy)
    gguf_copy = None
    if gguf is not None and gguf.exists():
        gguf_copy = dest / gguf.name
        if not gguf_copy.exists() or gguf_copy.stat().st_size != gguf.stat().st_size:
            shutil.copyfile(gguf, gguf_copy)
    return copy, gguf_copy


def make_setup(args, size: int) -> Setup:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    problem = "--no-cgroup given" if args.no_cgroup else cgroup_problem()
    parent = None if problem else (Path(args.cgroup_parent) if args.cgroup_parent
                                   else own_memory_cgroup())
    if problem:
        print(f"WARNING: {problem}. Caps are NOT enforced; flash contenders read with O_DIRECT "
              "and every row is labelled so.", file=sys.stderr)
    ids = ([int(t) for t in args.prompt_ids.split(",")] if args.prompt_ids
           else prompt_token_ids(Path(args.model), args.prompt))
    return Setup(Path(args.model), size, out, ids,
                 args.tokens, args.dtype, args.timeout, parent,
                 force_direct=args.direct or parent is None)


def run_all(setup: Setup, contenders: list[Contender], caps: list[int | None],
            ablation_caps: list[int | None] | None = None) -> list[dict]:
    """Dense once (uncapped), the main contenders at every cap, the ablations at
    `ablation_caps` (default: every cap); progress on stderr."""
    rows = []
    for c in contenders:
        at = caps if ablation_caps is None or c.name not in ABLATIONS + IO_ABLATIONS \
            else ablation_caps
        for cap in ([None] if not c.capped else at):
            print(f"[bench] {c.name} @ {cap_label(cap, setup.size)} ...", file=sys.stderr,
                  end="", flush=True)
            row = run_one(setup, c, cap)
            print(f" {row['status']} {_fmt(row.get('decode_tps'), digits=2)} tok/s "
                  f"({row.get('wall_s', 0):.0f} s)", file=sys.stderr)
            rows.append(row)
    return rows


def sweeps(rows: list[dict], model: Path) -> dict:
    out = {}
    for r in rows:
        if r["name"] == "flash" and r.get("ids_file") and Path(r["ids_file"]).exists():
            capacity = int(r["memory_plan"]["capacity"])
            key = f"{r['cap_bytes'] / MIB:.0f} MiB"
            out[key] = {str(w): b for w, b in window_sweep(Path(r["ids_file"]), model,
                                                            capacity).items()}
    return out


def run(args: argparse.Namespace) -> int:
    """The benchmark from parsed arguments (also `mlx-flash bench`)."""
    from mlx_flash.format.manifest import read_manifest

    model = source = Path(args.model)
    gguf = Path(args.gguf) if args.gguf else default_gguf(model)
    if args.copy_to:
        model, gguf = private_copy(model, gguf, Path(args.copy_to))
        args.model = str(model)
    manifest = read_manifest(model)
    size = model_bytes(model)
    caps = parse_caps(args.caps, size)
    setup = make_setup(args, size)
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    contenders = build_contenders(names, (model / "predictors.safetensors").exists(),
                                  args.keep, gguf, llama_cpp_available(),
                                  Path(args.placed.split(",")[0]) if args.placed else None,
                                  args.pin_hot)
    if any(c.name == "flash-no-bundling" and not c.skip for c in contenders):
        from mlx_flash.bench.baselines import write_unbundled

        print("[bench] writing the unbundled copy for flash-no-bundling ...", file=sys.stderr)
        setup.unbundled_dir = write_unbundled(model, Path(args.out) / "unbundled")
    disk = None if args.skip_disk else disk_report(model, manifest, args)
    stamp = source_stamp()
    ablation_caps = None if args.ablation_caps == "all" else parse_caps(args.ablation_caps, size)
    rows = run_all(setup, contenders, caps, ablation_caps)
    if source_stamp()["sources_sha256"] != stamp["sources_sha256"]:
        stamp["warning"] = ("mlx_flash sources changed during the run: rows mix code versions "
                            "(run from a copy of the tree)")
        print(f"WARNING: {stamp['warning']}", file=sys.stderr)
    seq = disk["sequential_best"] if disk else None
    rows = [derive(r, seq) for r in rows]
    agreement(rows)
    report = {"command": " ".join(shlex.quote(a) for a in sys.argv),
              "machine": machine_description(model), "model": str(model),
              "copied_from": str(source) if source != model else None, "model_bytes": size,
              "gguf": str(gguf) if gguf else None, "code": stamp,
              "caps": caps, "caps_note": ", ".join(cap_label(c, size) for c in caps) +
              (" (NOT enforced: no cgroup)" if setup.cgroup_parent is None else
               " (cgroup v1 memory.limit_in_bytes on the whole process, page cache included)"),
              "tokens": args.tokens, "prompt": args.prompt, "prompt_ids": setup.prompt_ids,
              "dtype": args.dtype, "disk": disk, "runs": rows, "speedups": speedups(rows),
              "window_sweep": sweeps(rows, model)}
    write_report(report, Path(args.out))
    return 0


def disk_report(model: Path, manifest, args) -> dict:
    """The disk table: this device's stored cost model (`mlx-flash calibrate-disk`), else
    measured now on the model's bundle files and stored for next time."""
    stored = None if args.measure_disk else runtime_disk.cost_model_for(model)
    if stored is None:
        print("[bench] measuring the disk (stored for later runs) ...", file=sys.stderr)
        stored = offline_calibrate_disk.calibrate(model, [model / e.file for e in manifest.layers],
                                      args.disk_seconds)
        runtime_disk.save(stored, runtime_disk.model_path(model))
    return runtime_disk.as_report(stored)


def write_report(report: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(report, indent=1, default=str))
    report["plots"] = plot_all(report, out)
    (out / "results.md").write_text(markdown_report(report))
    print(markdown_report(report))
    print(f"[bench] wrote {out / 'results.json'}, {out / 'results.md'} and "
          f"{len(report['plots'])} plots", file=sys.stderr)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's flags (shared with `mlx-flash bench`)."""
    parser.add_argument("--model", required=True, help="flash model dir")
    parser.add_argument("--caps", default=",".join(DEFAULT_CAPS),
                        help="comma-separated DRAM caps: fractions of the model size (0.5), "
                             "multiples (1.5x) or sizes (700MiB)")
    parser.add_argument("--contenders", default=",".join(ALL_CONTENDERS),
                        help=f"comma-separated subset of: {', '.join(ALL_CONTENDERS)}")
    parser.add_argument("--ablation-caps", default="0.5",
                        help="caps the ablations (flash-window1 ... flash-placed-pinned) run at, "
                             "or 'all' for every --caps value (the default keeps the whole run "
                             "under 30 minutes on the default model)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens generated per run")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT,
                        help="user message, through the chat template when there is one")
    parser.add_argument("--prompt-ids", default=None,
                        help="comma-separated token ids instead of --prompt")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="compute dtype of every MLX contender; default: the fast CPU path "
                             "(16-bit weights, f32 compute) where MLX runs on the CPU, else "
                             "load()'s choice. Giving one selects MLX's own kernels")
    parser.add_argument("--keep", type=float, default=0.3,
                        help="fraction of neurons the oracle keeps without predictors")
    parser.add_argument("--gguf", default=None, help="GGUF for llama.cpp (default: the source "
                                                     "in the manifest)")
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "bench"),
                        help="where results, logs and plots go")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    parser.add_argument("--direct", action="store_true",
                        help="flash contenders read with O_DIRECT even under a cgroup")
    parser.add_argument("--no-cgroup", action="store_true",
                        help="do not use cgroups (caps not enforced, O_DIRECT for flash)")
    parser.add_argument("--cgroup-parent", default=None,
                        help="memory cgroup to create the run groups in (default: this "
                             "process's own)")
    parser.add_argument("--copy-to", default=None,
                        help="first copy the model dir and GGUF here and benchmark the copies "
                             "(on a shared machine: pages others cache are not charged to the "
                             "cap)")
    parser.add_argument("--io-replay", default=None, metavar="CALIB",
                        help="instead of the contenders: replay held-out tokens of this "
                             "calibration recording through real O_DIRECT reads of --model (and "
                             "--placed dirs) with each read planner (issue 9)")
    parser.add_argument("--placed", default=None, help="comma-separated placed copies of --model")
    parser.add_argument("--replay-tokens", type=int, default=32)
    parser.add_argument("--study-layers", default=None,
                        help="with --io-replay: also a cost-model study of placement layouts "
                             "on these layers (e.g. 3,12,20)")
    parser.add_argument("--pin-hot", type=float, default=0.25,
                        help="fraction of the neuron cache pinned in flash-placed-pinned")
    parser.add_argument("--window", type=int, default=1, help="window of the I/O replay")
    parser.add_argument("--capacity", type=int, default=1616,
                        help="neurons cached per layer in the I/O replay (1616: the 4-bit "
                             "default model under a 0.5x cap)")
    parser.add_argument("--pin", type=int, default=0,
                        help="hot neurons pinned per layer (placed dirs) in the I/O replay")
    parser.add_argument("--skip-disk", action="store_true", help="no disk table in the report")
    parser.add_argument("--measure-disk", action="store_true",
                        help="measure the disk again even if its cost model is stored")
    parser.add_argument("--disk-seconds", type=float, default=0.5,
                        help="seconds per random-read point")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return io_replay(args) if args.io_replay else run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"benchmark: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
